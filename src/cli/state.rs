//! `sync-once --state`: the file that keeps the watermark and an in-flight run between invocations,
//! validated when read (it is input from outside), written atomically, locked while in use.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::input::CliError;
use crate::api::{BulkExportRunStatus, RunTemplate};
use crate::run::resolve::is_object_name;
use crate::run::{Persist, PersistError};

/// What `--state` keeps between invocations.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// `_since` of the next incremental run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<Timestamp>,
    /// Fingerprint of the query the watermark (and a run in flight) belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark_scope: Option<String>,
    /// A run in flight (resumed by the next invocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunState>,
}

/// A run in flight: its identity, its `_since`, the template it runs and its status.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    pub name: String,
    /// Unique per run: claims its staging area.
    #[serde(default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// What the run runs (a resumed run keeps it, whatever the file says now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<RunTemplate>,
    pub status: BulkExportRunStatus,
}

/// Largest state file read.
const STATE_MAX: u64 = 4 << 20;

pub fn read_state(path: &Path) -> Result<State, CliError> {
    let err = |message: String| CliError::State { path: path.display().to_string(), message };
    match std::fs::metadata(path) {
        Ok(m) if m.len() > STATE_MAX => {
            return Err(err(format!("larger than {STATE_MAX} bytes: not a fhirsync state file")));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(err(e.to_string())),
    }
    let b = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let s: State = serde_json::from_slice(&b).map_err(|e| err(format!("not a fhirsync state file: {e}")))?;
    if let Some(r) = &s.run
        && (!is_object_name(&r.name) || r.uid.is_empty() || r.uid.len() > 64)
    {
        return Err(err(format!("the run it holds has an invalid name or uid ({:.80?}); delete the file", r.name)));
    }
    Ok(s)
}

pub fn write_state(path: &Path, s: &State) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec_pretty(s).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, data).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Holds `<state>.lock` for the life of the process: two sync-once runs never share a state file.
pub fn lock_state(path: &Path) -> Result<std::fs::File, CliError> {
    let lock = PathBuf::from(format!("{}.lock", path.display()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|e| CliError::State { path: lock.display().to_string(), message: e.to_string() })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(CliError::State {
            path: path.display().to_string(),
            message: "another fhirsync sync-once is using it; wait for it, or use another --state file".into(),
        }),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(CliError::State { path: lock.display().to_string(), message: format!("cannot lock: {e}") })
        }
    }
}

/// Stores a run's status into the state file after every durable step.
pub struct StatePersist {
    pub path: Option<PathBuf>,
    pub state: State,
}

impl Persist for StatePersist {
    async fn save(&mut self, st: &BulkExportRunStatus) -> Result<(), PersistError> {
        if let Some(r) = &mut self.state.run {
            r.status = st.clone();
        }
        match &self.path {
            Some(p) => write_state(p, &self.state).map_err(PersistError::Failed),
            None => Ok(()),
        }
    }
}
