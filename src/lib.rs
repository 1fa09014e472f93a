//! fhirsync: keeps a Pathling FHIR analytics server in sync with clinical FHIR servers.
//!
//! Layers (each uses only those below it): `cli` and `controller` → `sync` (a sync's decisions) and
//! `run` (the run engine) → protocol clients (`fhir`, `pathling`, `auth`, `staging`) → `net` and
//! `text` (where requests may go, what peer text may say) — with `api` (CRD types, no I/O) beside
//! them. See docs/architecture.md.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod controller;
pub mod fence;
pub mod fhir;
pub mod metrics;
pub mod net;
pub mod pathling;
pub mod relay;
pub mod run;
pub mod schedule;
pub mod secrets;
pub mod serve;
pub mod staging;
pub mod sync;
pub mod telemetry;
pub mod text;
pub mod verify;
