//! A real HAPI FHIR JPA server (8.8.0, from HAPI's libraries: tests/peers/hapi, built by .ci/hapi) as
//! a source in tests: started on a free loopback port with an empty in-memory database, changed with
//! PUT and DELETE, and asked which ids it holds (search with `Cache-Control: no-cache`: HAPI answers
//! repeated searches from a 60 s cache otherwise).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The built server: `FHIRSYNC_HAPI_HOME` (set by .ci/run), else the cache .ci/hapi builds into.
fn home() -> PathBuf {
    let p = std::env::var_os("FHIRSYNC_HAPI_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/fhirsync-hapi"));
    if !p.join("hapi-test-peer.jar").is_file() {
        panic!(
            "the HAPI FHIR test server is not built ({}): run .ci/run, or `bash .ci/hapi ~/.cache/fhirsync-hapi` \
             (a few minutes once), or set FHIRSYNC_HAPI_HOME",
            p.display()
        );
    }
    p
}

/// A running HAPI server, stopped on drop.
pub struct Hapi {
    child: Child,
    /// FHIR base URL (`…/fhir`).
    pub base: String,
    pub dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Hapi {
    /// Starts HAPI (`extra`: Spring properties) and waits until `GET /fhir/metadata` answers.
    pub async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let base = format!("http://127.0.0.1:{port}/fhir");
        let log = std::fs::File::create(dir.path().join("hapi.log")).unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/hapi/run.sh");
        let child = Command::new("bash")
            .arg(script)
            .arg(home())
            .arg(port.to_string())
            .args(extra)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start HAPI");
        fhirsync::net::init_tls();
        let me = Self { child, base, dir, http: reqwest::Client::new() };
        // Spring starts for 1.5-3 minutes on 2 cores; the metadata endpoint answers once it is ready
        let url = format!("{}/metadata", me.base);
        super::real_server::wait_until_answers(&me.http, &url, Duration::from_secs(400), || me.log()).await;
        me
    }

    /// HAPI's log so far (its last 4 KiB).
    pub fn log(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("hapi.log")).unwrap_or_default();
        s[s.len().saturating_sub(4096)..].to_string()
    }

    /// Creates or updates resources (a transaction of PUTs).
    pub async fn put(&self, resources: &[Value]) {
        super::real_server::put(&self.http, &self.base, resources).await
    }

    /// Deletes one resource.
    pub async fn delete(&self, t: &str, id: &str) {
        super::real_server::delete(&self.http, &self.base, t, id).await
    }

    /// The ids of `t` HAPI holds now (at most 50 per page is HAPI's cap).
    pub async fn ids(&self, t: &str) -> BTreeSet<String> {
        super::real_server::ids(&self.http, &self.base, t, 50).await
    }
}

impl Drop for Hapi {
    fn drop(&mut self) {
        // run.sh execs java: the child is the JVM
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
