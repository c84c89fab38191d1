//! A fake Kubernetes API server over HTTP. Test-only; must not be a dependency of shipped crates.
