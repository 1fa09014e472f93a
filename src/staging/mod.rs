//! Where exported files wait for Pathling: a shared volume or an S3 bucket, behind one small trait.
//!
//! Every file is written under a temporary name (or as an uncommitted multipart upload) and only
//! appears under its final name once complete, so a resumed run can trust what it finds.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub mod object;
pub mod volume;

/// Staging errors.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("staging {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The volume has no room left (what was half-written is removed).
    #[error("the staging volume is full ({path}): free space or raise its size; nothing half-written was kept")]
    Full { path: String },
    /// The run area belongs to another run.
    #[error("staging area {location} belongs to another run ({owner}); refusing to share it")]
    Taken { location: String, owner: String },
    #[error("object store {location}: {message}")]
    Store { location: String, message: String },
    #[error("{0}")]
    Config(String),
}

/// A file being written; invisible under its final name until [`StagedWriter::finish`].
pub trait StagedWriter: Send {
    /// Appends bytes.
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), StagingError>>;
    /// Makes the file visible under its final name.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<(), StagingError>>;
    /// Drops the partial file.
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Name of the marker that records which run owns a staging area.
pub const OWNER_MARKER: &str = ".fhirsync-owner";

/// One run's staging area (`<root>/<namespace>/<run>/`).
pub trait Staging: Send + Sync {
    /// Claims the area for `owner` (a run's uid): creates it with a marker, or checks that the marker
    /// names `owner`. A second run with the same name never shares (or removes) another's files.
    fn claim(&self, owner: &str) -> BoxFuture<'_, Result<(), StagingError>>;
    /// Starts writing `name`.
    fn create(&self, name: &str) -> BoxFuture<'_, Result<Box<dyn StagedWriter>, StagingError>>;
    /// Whether `name` is completely staged.
    fn exists(&self, name: &str) -> BoxFuture<'_, Result<bool, StagingError>>;
    /// Reads a staged file.
    fn read(&self, name: &str) -> BoxFuture<'_, Result<BoxStream<'static, Result<Bytes, StagingError>>, StagingError>>;
    /// Removes one staged file (absent counts as removed).
    fn remove(&self, name: &str) -> BoxFuture<'_, Result<(), StagingError>>;
    /// Names of completely staged files (not the owner marker).
    fn list(&self) -> BoxFuture<'_, Result<Vec<String>, StagingError>>;
    /// Removes the whole run area (finished, failed or cancelled runs) — only when `owner` owns it: an
    /// area another run claimed is left alone.
    fn remove_all(&self, owner: &str) -> BoxFuture<'_, Result<(), StagingError>>;
    /// The URL Pathling reads `name` from.
    fn pathling_url(&self, name: &str) -> String;
}

/// Joins a base URL and path segments with single slashes.
pub fn join_url(base: &str, parts: &[&str]) -> String {
    let mut s = base.trim_end_matches('/').to_string();
    for p in parts {
        s.push('/');
        s.push_str(p.trim_matches('/'));
    }
    s
}

impl StagingError {
    /// Whether trying again may help (a full volume or a taken area will not fix itself).
    pub fn retryable(&self) -> bool {
        matches!(self, StagingError::Io { .. } | StagingError::Store { .. })
    }
}

/// Maps an I/O error on `path`, recognising a full volume.
pub fn io_error(path: &std::path::Path, e: std::io::Error) -> StagingError {
    if e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::QuotaExceeded {
        StagingError::Full { path: path.display().to_string() }
    } else {
        StagingError::Io { path: path.display().to_string(), source: e }
    }
}
