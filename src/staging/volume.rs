//! Staging on a filesystem shared with Pathling.

use std::path::PathBuf;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use super::{OWNER_MARKER, StagedWriter, Staging, StagingError, io_error, join_url};

/// `path/<namespace>/<run>/` on a volume Pathling also mounts.
pub struct VolumeStaging {
    dir: PathBuf,
    pathling_base: String,
}

impl VolumeStaging {
    /// A run area `root/namespace/run`, which Pathling sees under `pathling_root/namespace/run`.
    pub fn new(root: &str, pathling_root: &str, namespace: &str, run: &str) -> Self {
        Self {
            dir: PathBuf::from(root).join(namespace).join(run),
            pathling_base: join_url(pathling_root, &[namespace, run]),
        }
    }

    fn io(&self, e: std::io::Error) -> StagingError {
        io_error(&self.dir, e)
    }
}

const PARTIAL: &str = ".partial";
/// Bytes gathered before one blocking write: big writes, no extra copy of the received chunks.
const BATCH: usize = 1 << 20;

struct FileWriter {
    file: Option<std::fs::File>,
    pending: Vec<Bytes>,
    pending_len: usize,
    tmp: PathBuf,
    dest: PathBuf,
}

impl FileWriter {
    async fn flush_pending(&mut self) -> Result<(), StagingError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        let mut file = self.file.take().ok_or_else(|| StagingError::Config("staged file already closed".into()))?;
        let (file, r) = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let r = batch.iter().try_for_each(|b| file.write_all(b));
            (file, r)
        })
        .await
        .map_err(|e| StagingError::Io { path: self.tmp.display().to_string(), source: std::io::Error::other(e) })?;
        self.file = Some(file);
        r.map_err(|e| io_error(&self.tmp, e))
    }
}

impl StagedWriter for FileWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(async move {
            self.pending_len += chunk.len();
            self.pending.push(chunk);
            if self.pending_len >= BATCH {
                self.flush_pending().await?;
            }
            Ok(())
        })
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StagingError>> {
        Box::pin(async move {
            let dest = self.dest.clone();
            let err = |e| io_error(&dest, e);
            if let Err(e) = self.flush_pending().await {
                let _ = tokio::fs::remove_file(&self.tmp).await;
                return Err(e);
            }
            drop(self.file.take());
            // no fsync: a crashed process leaves complete data in the page cache, and a resumed run
            // re-verifies staged files against the manifest's counts
            tokio::fs::rename(&self.tmp, &self.dest).await.map_err(err)
        })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let FileWriter { file, tmp, .. } = *self;
            drop(file);
            let _ = tokio::fs::remove_file(&tmp).await;
        })
    }
}

impl Staging for VolumeStaging {
    fn claim(&self, owner: &str) -> BoxFuture<'_, Result<(), StagingError>> {
        let owner = owner.to_string();
        Box::pin(async move {
            tokio::fs::create_dir_all(&self.dir).await.map_err(|e| self.io(e))?;
            let marker = self.dir.join(OWNER_MARKER);
            match tokio::fs::read_to_string(&marker).await {
                Ok(found) if found == owner => Ok(()),
                Ok(found) => Err(StagingError::Taken {
                    location: self.dir.display().to_string(),
                    owner: crate::text::peer_text(&found, 64),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tokio::fs::write(&marker, owner.as_bytes()).await.map_err(|e| self.io(e))
                }
                Err(e) => Err(self.io(e)),
            }
        })
    }

    fn create(&self, name: &str) -> BoxFuture<'_, Result<Box<dyn StagedWriter>, StagingError>> {
        let dest = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}{PARTIAL}"));
        Box::pin(async move {
            tokio::fs::create_dir_all(&self.dir).await.map_err(|e| self.io(e))?;
            let f = tokio::fs::File::create(&tmp).await.map_err(|e| self.io(e))?.into_std().await;
            let w: Box<dyn StagedWriter> =
                Box::new(FileWriter { file: Some(f), pending: Vec::new(), pending_len: 0, tmp, dest });
            Ok(w)
        })
    }

    fn exists(&self, name: &str) -> BoxFuture<'_, Result<bool, StagingError>> {
        let p = self.dir.join(name);
        Box::pin(async move { tokio::fs::try_exists(&p).await.map_err(|e| self.io(e)) })
    }

    fn read(&self, name: &str) -> BoxFuture<'_, Result<BoxStream<'static, Result<Bytes, StagingError>>, StagingError>> {
        let p = self.dir.join(name);
        Box::pin(async move {
            let f = tokio::fs::File::open(&p).await.map_err(|e| self.io(e))?;
            let path = p.display().to_string();
            let s = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024)
                .map_err(move |e| StagingError::Io { path: path.clone(), source: e });
            Ok(s.boxed())
        })
    }

    fn remove(&self, name: &str) -> BoxFuture<'_, Result<(), StagingError>> {
        let p = self.dir.join(name);
        Box::pin(async move {
            match tokio::fs::remove_file(&p).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.io(e)),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<String>, StagingError>> {
        Box::pin(async move {
            let mut out = vec![];
            let mut rd = match tokio::fs::read_dir(&self.dir).await {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(self.io(e)),
            };
            while let Some(e) = rd.next_entry().await.map_err(|e| self.io(e))? {
                let n = e.file_name().to_string_lossy().to_string();
                if !n.starts_with('.') {
                    out.push(n);
                }
            }
            out.sort();
            Ok(out)
        })
    }

    fn remove_all(&self, owner: &str) -> BoxFuture<'_, Result<(), StagingError>> {
        let owner = owner.to_string();
        Box::pin(async move {
            match tokio::fs::read_to_string(self.dir.join(OWNER_MARKER)).await {
                Ok(found) if found == owner => {}
                Ok(_) => return Ok(()), // another run's area
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // never claimed: only leftovers of this run's own attempts can be here
                    if tokio::fs::try_exists(&self.dir).await.unwrap_or(false) {
                        let mut rd = tokio::fs::read_dir(&self.dir).await.map_err(|e| self.io(e))?;
                        while let Some(e) = rd.next_entry().await.map_err(|e| self.io(e))? {
                            if !e.file_name().to_string_lossy().ends_with(PARTIAL) {
                                return Ok(());
                            }
                        }
                    }
                }
                Err(e) => return Err(self.io(e)),
            }
            match tokio::fs::remove_dir_all(&self.dir).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.io(e)),
            }
        })
    }

    fn pathling_url(&self, name: &str) -> String {
        join_url(&self.pathling_base, &[name])
    }
}
