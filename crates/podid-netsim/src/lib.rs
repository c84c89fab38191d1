//! Network-namespace nodes and pods. Test-only.
