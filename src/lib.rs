//! fhirsync: keeps a Pathling FHIR analytics server in sync with clinical FHIR servers.
//!
//! Layers (each uses only those below it): `cli` and `controller` → `run` (the run engine) →
//! protocol clients (`fhir`, `pathling`, `auth`, `staging`) → `api` (CRD types, no I/O).

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod controller;
pub mod fhir;
pub mod metrics;
pub mod pathling;
pub mod run;
pub mod schedule;
pub mod secrets;
pub mod staging;
pub mod telemetry;
