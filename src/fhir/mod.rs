//! FHIR protocol clients. No Kubernetes types.

pub mod bulk;
pub mod bundle;
pub mod capabilities;
pub mod class;
pub mod client;
pub mod crawl;
pub mod history;
pub mod ids;
pub mod ndjson;
pub mod outcome;
pub mod pace;
pub mod paging;
pub mod quirks;
pub mod retry;
pub mod search;
pub mod subscription;
