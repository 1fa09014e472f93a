//! What the commands without a cluster read: a BulkExportSync file (admitted as the API server
//! would), and Secrets from a directory laid out like mounted Secret volumes.

use std::path::Path;
use std::sync::Arc;

use kube::CustomResourceExt;
use serde::Deserialize;

use crate::api::BulkExportSync;
use crate::secrets::{DirSecrets, SecretSource};

/// Errors before a run could start (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a BulkExportSync: {message}")]
    Parse { path: String, message: String },
    #[error("invalid BulkExportSync: {0}")]
    Invalid(String),
    #[error("state file {path}: {message}")]
    State { path: String, message: String },
}

/// The spec file and its Secrets, as `check` and `sync-once` take them.
#[derive(Debug, Clone, clap::Args)]
pub struct SpecArgs {
    /// The BulkExportSync YAML file.
    #[arg(short = 'f', long = "file")]
    pub file: std::path::PathBuf,
    /// Directory of mounted Secrets: a reference {name, key} is read from DIR/name/key.
    #[arg(long)]
    pub secrets_dir: Option<std::path::PathBuf>,
}

impl SpecArgs {
    /// The Secrets `--secrets-dir` gives.
    pub fn secrets(&self) -> Arc<dyn SecretSource> {
        secrets_from(self.secrets_dir.as_deref())
    }
}

/// Secrets from `dir` (`DIR/name/key`), or none (each reference then says to pass `--secrets-dir`).
pub fn secrets_from(dir: Option<&Path>) -> Arc<dyn SecretSource> {
    match dir {
        Some(d) => Arc::new(DirSecrets::new(d)),
        None => Arc::new(NoSecrets),
    }
}

struct NoSecrets;
impl SecretSource for NoSecrets {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        r: &'a crate::api::SecretKeyRef,
    ) -> futures::future::BoxFuture<'a, Result<Vec<u8>, crate::secrets::SecretError>> {
        let e = crate::secrets::SecretError::SecretMissing {
            namespace: namespace.into(),
            name: r.name.clone(),
            hint: format!(" (no --secrets-dir given: pass a directory holding {}/{})", r.name, r.key),
        };
        Box::pin(async move { Err(e) })
    }
}

/// Reads the first BulkExportSync document of a YAML file and admits it exactly as the API server
/// would (unknown fields, schema, the CRD's CEL rules, defaults), in the API server's words.
pub fn load_sync(path: &Path) -> Result<BulkExportSync, CliError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError::Read { path: path.display().to_string(), source: e })?;
    let p = path.display().to_string();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)
            .map_err(|e| CliError::Parse { path: p.clone(), message: e.to_string() })?;
        if v.get("kind").and_then(|k| k.as_str()) != Some("BulkExportSync") {
            continue;
        }
        let json: serde_json::Value =
            serde_json::to_value(&v).map_err(|e| CliError::Parse { path: p.clone(), message: e.to_string() })?;
        if json.get("apiVersion").and_then(|a| a.as_str()) != Some("fhirsync.io/v1alpha1") {
            return Err(CliError::Parse { path: p, message: "apiVersion must be fhirsync.io/v1alpha1".into() });
        }
        let admitted = crate::api::admission::admit(&BulkExportSync::crd(), &json).map_err(|errs| {
            CliError::Invalid(format!("the API server would refuse it:\n  * {}", errs.join("\n  * ")))
        })?;
        return serde_json::from_value(admitted)
            .map_err(|e| CliError::Parse { path: p.clone(), message: e.to_string() });
    }
    Err(CliError::Parse { path: p, message: "no document with kind: BulkExportSync".into() })
}

/// A BulkExportSync file, admitted and checked as the operator would check it: its schedule, its
/// duration and quantity ranges, its name. Returns the sync and its parsed values.
pub fn load_checked(path: &Path) -> Result<(BulkExportSync, crate::api::validate::SyncValues), CliError> {
    let sync = load_sync(path)?;
    let values = crate::api::validate::validate_bulk_sync(&sync.spec).map_err(CliError::Invalid)?;
    if let Some(s) = &sync.spec.schedule {
        crate::schedule::Schedule::parse(s, &sync.spec.time_zone).map_err(CliError::Invalid)?;
    }
    let ns = sync.metadata.namespace.as_deref().unwrap_or("default");
    let name = sync.metadata.name.as_deref().unwrap_or("sync");
    if !crate::run::resolve::is_object_name(ns) || !crate::run::resolve::is_object_name(name) {
        return Err(CliError::Invalid(format!(
            "metadata.name {name:.80?} and metadata.namespace {ns:.80?} must be lowercase names (letters, digits, '-', '.')"
        )));
    }
    Ok((sync, values))
}
