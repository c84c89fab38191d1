//! Azure simulator. Test-only; must not be a dependency of shipped crates.
