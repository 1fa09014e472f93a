//! A real S3 implementation in-process: `s3s` serving `s3s-fs` (objects are files under a directory,
//! the bucket a sub-directory), with SigV4 authentication.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

pub const ACCESS_KEY: &str = "AKIAFHIRSYNCTEST";
pub const SECRET_KEY: &str = "fhirsync-test-secret-key-0123456789";

/// A running S3 server.
pub struct FakeS3 {
    pub endpoint: String,
    pub root: tempfile::TempDir,
}

impl FakeS3 {
    /// Starts the server with one empty bucket.
    pub async fn start(bucket: &str) -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(bucket)).unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ =
                        ConnBuilder::new(TokioExecutor::new()).serve_connection(TokioIo::new(socket), service).await;
                });
            }
        });
        Self { endpoint: format!("http://{addr}"), root }
    }

    /// Object files (relative paths) currently stored, excluding s3s-fs internals.
    pub fn objects(&self) -> Vec<String> {
        fn walk(base: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    let rel = p.strip_prefix(base).unwrap().display().to_string();
                    if !rel.contains(".s3s") && !rel.starts_with('.') {
                        out.push(rel);
                    }
                }
            }
        }
        let mut v = vec![];
        walk(self.root.path(), self.root.path(), &mut v);
        v
    }
}
