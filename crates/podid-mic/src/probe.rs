//! The `/healthz` and `/metrics` HTTP servers of the `mic` binary.
