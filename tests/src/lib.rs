//! End-to-end suites; see the files under `tests/tests/`.
