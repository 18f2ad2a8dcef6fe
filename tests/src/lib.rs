//! Harness for integration tests (to be written).
