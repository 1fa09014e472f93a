//! Protocol doubles shared by the test suites.
#![allow(dead_code)]

pub mod cli;
pub mod cluster;
pub mod engine;
pub mod fhir_server;
pub mod hapi;
pub mod helios;
pub mod pathling;
pub mod pathling_export;
pub mod real_server;
pub mod s3;
pub mod smart;
pub mod source;
pub mod source_rest;
pub mod source_search;
pub mod tls;
pub mod world;

/// The `fhirsync` binary: Cargo's for integration tests; beside the running example otherwise
/// (`target/<profile>/examples/x` → `target/<profile>/fhirsync`).
pub fn fhirsync_bin() -> std::path::PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_fhirsync") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(|d| d.parent()).expect("target dir").join("fhirsync")
}
