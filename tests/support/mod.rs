//! Protocol doubles shared by the test suites.
#![allow(dead_code)]

pub mod pathling;
pub mod source;
pub mod cluster;
