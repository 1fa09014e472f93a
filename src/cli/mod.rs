//! Command-line entry points that are not the operator.

pub mod sync_once;
