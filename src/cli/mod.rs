//! Command-line entry points that are not the operator: adapters over the run engine, the sync's
//! decisions and the preflight checks.

pub mod check;
pub mod input;
pub mod state;
pub mod sync_once;
pub mod verify;
