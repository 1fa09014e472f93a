//! Staging in an S3-compatible object store (AWS S3, MinIO, Ceph) through `object_store`.
//!
//! Files are written as multipart uploads, which become visible only when completed, so an object
//! that exists under its final name is complete.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

use super::{OWNER_MARKER, StagedWriter, Staging, StagingError, join_url};

/// Connection settings for an S3 bucket.
#[derive(Clone)]
pub struct S3Config {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// The same location as Pathling reads it (`s3a://bucket/prefix`).
    pub pathling_url: String,
    /// Endpoint of a non-AWS store.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config").field("url", &self.url).field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

/// A run area `prefix/<namespace>/<run>/` in a bucket.
pub struct ObjectStaging {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    pathling_base: String,
    location: String,
}

fn store_err(location: &str, e: object_store::Error) -> StagingError {
    StagingError::Store { location: location.to_string(), message: e.to_string() }
}

impl ObjectStaging {
    /// Connects (lazily) to the bucket named in `cfg.url`.
    pub fn new(cfg: &S3Config, namespace: &str, run: &str) -> Result<Self, StagingError> {
        crate::net::init_tls();
        let rest = cfg
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| StagingError::Config(format!("objectStore.url {:?} must start with s3://", cfg.url)))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StagingError::Config("objectStore.url names no bucket".into()));
        }
        let mut b = AmazonS3Builder::new().with_bucket_name(bucket).with_region(&cfg.region);
        if let Some(ep) = &cfg.endpoint {
            b = b.with_endpoint(ep).with_allow_http(ep.starts_with("http://")).with_virtual_hosted_style_request(false);
        }
        if let (Some(k), Some(s)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
        }
        let store = b.build().map_err(|e| StagingError::Config(format!("objectStore: {e}")))?;
        let prefix = Path::from_iter(prefix.split('/').filter(|s| !s.is_empty()).chain([namespace, run]));
        Ok(Self {
            store: Arc::new(store),
            location: format!("s3://{bucket}/{prefix}"),
            pathling_base: join_url(&cfg.pathling_url, &[namespace, run]),
            prefix,
        })
    }

    fn path(&self, name: &str) -> Path {
        self.prefix.clone().join(name)
    }
}

struct MultipartWriter {
    w: Option<WriteMultipart>,
    location: String,
}

impl StagedWriter for MultipartWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), StagingError>> {
        Box::pin(async move {
            let Some(w) = self.w.as_mut() else {
                return Err(StagingError::Config("staged object written after it was finished".into()));
            };
            // bound memory: at most 4 parts (5 MiB each) in flight
            w.wait_for_capacity(4).await.map_err(|e| store_err(&self.location, e))?;
            w.put(chunk);
            Ok(())
        })
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StagingError>> {
        Box::pin(async move {
            let Some(w) = self.w.take() else { return Ok(()) };
            w.finish().await.map(|_| ()).map_err(|e| store_err(&self.location, e))
        })
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(w) = self.w.take() {
                let _ = w.abort().await;
            }
        })
    }
}

impl Staging for ObjectStaging {
    fn claim(&self, owner: &str) -> BoxFuture<'_, Result<(), StagingError>> {
        let owner = owner.to_string();
        let p = self.path(OWNER_MARKER);
        Box::pin(async move {
            match self.store.get(&p).await {
                Ok(r) => {
                    let found = r.bytes().await.map_err(|e| store_err(&self.location, e))?;
                    if found.as_ref() == owner.as_bytes() {
                        Ok(())
                    } else {
                        Err(StagingError::Taken {
                            location: self.location.clone(),
                            owner: crate::text::peer_text(&String::from_utf8_lossy(&found), 64),
                        })
                    }
                }
                Err(object_store::Error::NotFound { .. }) => self
                    .store
                    .put(&p, Bytes::from(owner.into_bytes()).into())
                    .await
                    .map(|_| ())
                    .map_err(|e| store_err(&self.location, e)),
                Err(e) => Err(store_err(&self.location, e)),
            }
        })
    }

    fn create(&self, name: &str) -> BoxFuture<'_, Result<Box<dyn StagedWriter>, StagingError>> {
        let p = self.path(name);
        Box::pin(async move {
            let up = self.store.put_multipart(&p).await.map_err(|e| store_err(&self.location, e))?;
            let w: Box<dyn StagedWriter> =
                Box::new(MultipartWriter { w: Some(WriteMultipart::new(up)), location: self.location.clone() });
            Ok(w)
        })
    }

    fn exists(&self, name: &str) -> BoxFuture<'_, Result<bool, StagingError>> {
        let p = self.path(name);
        Box::pin(async move {
            match self.store.head(&p).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(store_err(&self.location, e)),
            }
        })
    }

    fn read(&self, name: &str) -> BoxFuture<'_, Result<BoxStream<'static, Result<Bytes, StagingError>>, StagingError>> {
        let p = self.path(name);
        Box::pin(async move {
            let r = self.store.get(&p).await.map_err(|e| store_err(&self.location, e))?;
            let loc = self.location.clone();
            Ok(r.into_stream().map_err(move |e| store_err(&loc, e)).boxed())
        })
    }

    fn remove(&self, name: &str) -> BoxFuture<'_, Result<(), StagingError>> {
        let p = self.path(name);
        Box::pin(async move {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(store_err(&self.location, e)),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<String>, StagingError>> {
        Box::pin(async move {
            let metas: Vec<_> =
                self.store.list(Some(&self.prefix)).try_collect().await.map_err(|e| store_err(&self.location, e))?;
            let mut names: Vec<String> = metas
                .into_iter()
                .filter_map(|m| m.location.filename().map(str::to_string))
                .filter(|n| !n.starts_with('.'))
                .collect();
            names.sort();
            Ok(names)
        })
    }

    fn remove_all(&self, owner: &str) -> BoxFuture<'_, Result<(), StagingError>> {
        let owner = owner.to_string();
        Box::pin(async move {
            match self.store.get(&self.path(OWNER_MARKER)).await {
                Ok(r) => {
                    let found = r.bytes().await.map_err(|e| store_err(&self.location, e))?;
                    if found.as_ref() != owner.as_bytes() {
                        return Ok(()); // another run's area
                    }
                }
                Err(object_store::Error::NotFound { .. }) => return Ok(()), // never claimed: nothing staged
                Err(e) => return Err(store_err(&self.location, e)),
            }
            let locations = self.store.list(Some(&self.prefix)).map_ok(|m| m.location).boxed();
            self.store
                .delete_stream(locations)
                .try_collect::<Vec<_>>()
                .await
                .map(|_| ())
                .map_err(|e| store_err(&self.location, e))
        })
    }

    fn pathling_url(&self, name: &str) -> String {
        join_url(&self.pathling_base, &[name])
    }
}
