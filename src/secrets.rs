//! Where Secret values come from: Kubernetes Secrets for the operator, a directory for `sync-once`.
//! The run engine only sees the [`SecretSource`] trait. Errors name the Secret and key, never a value.

use std::path::PathBuf;

use futures::future::BoxFuture;

use crate::api::SecretKeyRef;

/// A Secret value could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecretError {
    /// `hint` is empty or a parenthesised note of where fhirsync looked.
    #[error("Secret {namespace}/{name} not found{hint}: create it, or fix the reference")]
    SecretMissing { namespace: String, name: String, hint: String },
    #[error("Secret {namespace}/{name} has no key {key:?}{hint}: add it, or fix the reference")]
    KeyMissing { namespace: String, name: String, key: String, hint: String },
    #[error("Secret {namespace}/{name} key {key:?} is empty")]
    Empty { namespace: String, name: String, key: String },
    #[error("cannot read Secret {namespace}/{name}: {message}")]
    Unavailable { namespace: String, name: String, message: String },
}

/// Reads one key of a Secret in a namespace.
pub trait SecretSource: Send + Sync {
    /// The raw bytes of `namespace/name[key]`.
    fn get<'a>(&'a self, namespace: &'a str, r: &'a SecretKeyRef) -> BoxFuture<'a, Result<Vec<u8>, SecretError>>;
}

/// Secrets laid out as mounted Secret volumes: `DIR/<name>/<key>`.
pub struct DirSecrets {
    dir: PathBuf,
}

impl DirSecrets {
    /// Reads from `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

fn safe(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\\')
}

impl SecretSource for DirSecrets {
    fn get<'a>(&'a self, namespace: &'a str, r: &'a SecretKeyRef) -> BoxFuture<'a, Result<Vec<u8>, SecretError>> {
        Box::pin(async move {
            let (ns, name, key) = (namespace.to_string(), r.name.clone(), r.key.clone());
            if !safe(&r.name) || !safe(&r.key) {
                return Err(SecretError::Unavailable { namespace: ns, name, message: "invalid name or key".into() });
            }
            let d = self.dir.join(&r.name);
            let file = d.join(&r.key);
            if !tokio::fs::try_exists(&d).await.unwrap_or(false) {
                let hint = format!(" (looked for the directory {})", d.display());
                return Err(SecretError::SecretMissing { namespace: ns, name, hint });
            }
            match read_bounded(&file).await {
                Ok(v) if v.is_empty() => Err(SecretError::Empty { namespace: ns, name, key }),
                Ok(v) => Ok(v),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let hint = format!(" (looked for the file {})", file.display());
                    Err(SecretError::KeyMissing { namespace: ns, name, key, hint })
                }
                Err(e) => Err(SecretError::Unavailable { namespace: ns, name, message: e.kind().to_string() }),
            }
        })
    }
}

/// Largest Secret value read from a file (Kubernetes caps a whole Secret at 1 MiB).
const SECRET_MAX: u64 = 1 << 20;

async fn read_bounded(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let f = tokio::fs::File::open(path).await?;
    let mut out = Vec::new();
    f.take(SECRET_MAX + 1).read_to_end(&mut out).await?;
    if out.len() as u64 > SECRET_MAX {
        return Err(std::io::Error::other(format!("larger than {SECRET_MAX} bytes")));
    }
    Ok(out)
}

/// Secrets read from the Kubernetes API, in the custom resource's namespace, each time they are used
/// (so a changed Secret takes effect without a restart).
pub struct KubeSecrets {
    client: kube::Client,
}

impl KubeSecrets {
    /// Reads through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl SecretSource for KubeSecrets {
    fn get<'a>(&'a self, namespace: &'a str, r: &'a SecretKeyRef) -> BoxFuture<'a, Result<Vec<u8>, SecretError>> {
        Box::pin(async move {
            use k8s_openapi::api::core::v1::Secret;
            let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), namespace);
            let (ns, name, key) = (namespace.to_string(), r.name.clone(), r.key.clone());
            let secret = match api.get_opt(&r.name).await {
                Ok(Some(s)) => s,
                Ok(None) => return Err(SecretError::SecretMissing { namespace: ns, name, hint: String::new() }),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(SecretError::SecretMissing { namespace: ns, name, hint: String::new() });
                }
                Err(e) => return Err(SecretError::Unavailable { namespace: ns, name, message: e.to_string() }),
            };
            if let Some(v) = secret.data.as_ref().and_then(|d| d.get(&r.key)) {
                return if v.0.is_empty() {
                    Err(SecretError::Empty { namespace: ns, name, key })
                } else {
                    Ok(v.0.clone())
                };
            }
            if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(&r.key)) {
                return Ok(v.clone().into_bytes());
            }
            Err(SecretError::KeyMissing { namespace: ns, name, key, hint: String::new() })
        })
    }
}
