//! FHIR protocol clients. No Kubernetes types.

pub mod bulk;
pub mod client;
pub mod outcome;
pub mod retry;
pub mod subscription;
