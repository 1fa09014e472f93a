//! FHIR protocol clients. No Kubernetes types.

pub mod bulk;
pub mod bundle;
pub mod capabilities;
pub mod client;
pub mod history;
pub mod ids;
pub mod ndjson;
pub mod outcome;
pub mod retry;
pub mod search;
pub mod subscription;
