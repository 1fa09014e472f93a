//! Protocol doubles shared by the test suites.
#![allow(dead_code)]

pub mod cluster;
pub mod engine;
pub mod fhir_server;
pub mod pathling;
pub mod s3;
pub mod smart;
pub mod source;
pub mod tls;
pub mod world;
