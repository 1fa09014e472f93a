//! FHIR protocol clients. No Kubernetes types.

pub mod bulk;
pub mod capabilities;
pub mod client;
pub mod ids;
pub mod ndjson;
pub mod outcome;
pub mod retry;
pub mod subscription;
