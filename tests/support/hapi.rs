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
        let deadline = tokio::time::Instant::now() + Duration::from_secs(400);
        loop {
            if let Ok(r) = me.http.get(format!("{}/metadata", me.base)).send().await
                && r.status().is_success()
            {
                return me;
            }
            assert!(tokio::time::Instant::now() < deadline, "HAPI did not start: {}", me.log());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// HAPI's log so far (its last 4 KiB).
    pub fn log(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("hapi.log")).unwrap_or_default();
        s[s.len().saturating_sub(4096)..].to_string()
    }

    /// Creates or updates resources (a transaction of PUTs).
    pub async fn put(&self, resources: &[Value]) {
        let entries: Vec<Value> = resources
            .iter()
            .map(|r| {
                let url = format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
                serde_json::json!({"resource": r, "request": {"method": "PUT", "url": url}})
            })
            .collect();
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let r = self
            .http
            .post(&self.base)
            .header("content-type", "application/fhir+json")
            .body(bundle.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "transaction: {} {}", r.status(), r.text().await.unwrap_or_default());
    }

    /// Deletes one resource.
    pub async fn delete(&self, t: &str, id: &str) {
        let r = self.http.delete(format!("{}/{t}/{id}", self.base)).send().await.unwrap();
        assert!(r.status().is_success(), "DELETE {t}/{id}: {}", r.status());
    }

    /// The ids of `t` HAPI holds now (search past its cache, following next links).
    pub async fn ids(&self, t: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut url = Some(format!("{}/{t}?_count=50&_elements=id", self.base));
        while let Some(u) = url.take() {
            let b: Value =
                self.http.get(&u).header("cache-control", "no-cache").send().await.unwrap().json().await.unwrap();
            for e in b["entry"].as_array().into_iter().flatten() {
                out.insert(e["resource"]["id"].as_str().unwrap().to_string());
            }
            url = b["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .map(str::to_string);
        }
        out
    }
}

impl Drop for Hapi {
    fn drop(&mut self) {
        // run.sh execs java: the child is the JVM
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
