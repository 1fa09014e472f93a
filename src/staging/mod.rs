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

/// One run's staging area (`<root>/<namespace>/<run>/`).
pub trait Staging: Send + Sync {
    /// Starts writing `name`.
    fn create(&self, name: &str) -> BoxFuture<'_, Result<Box<dyn StagedWriter>, StagingError>>;
    /// Whether `name` is completely staged.
    fn exists(&self, name: &str) -> BoxFuture<'_, Result<bool, StagingError>>;
    /// Reads a staged file.
    fn read(&self, name: &str) -> BoxFuture<'_, Result<BoxStream<'static, Result<Bytes, StagingError>>, StagingError>>;
    /// Names of completely staged files.
    fn list(&self) -> BoxFuture<'_, Result<Vec<String>, StagingError>>;
    /// Removes the whole run area (finished, failed or cancelled runs).
    fn remove_all(&self) -> BoxFuture<'_, Result<(), StagingError>>;
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
