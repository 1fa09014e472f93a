//! The Helios FHIR Server (crates.io `helios-hfs`), an independent real FHIR server, as a source in
//! tests: started on a free loopback port with a fresh database, loaded with transactions of PUTs,
//! changed with PUT and DELETE, and asked which ids it holds (by search, independently of fhirsync).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// The `hfs` binary: `FHIRSYNC_HFS` (set by .ci/run), else the cache .ci/helios builds into.
fn binary() -> PathBuf {
    let p = std::env::var_os("FHIRSYNC_HFS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/fhirsync-helios/bin/hfs")
    });
    if !p.is_file() {
        panic!(
            "the Helios FHIR Server is not built ({}): run .ci/run, or `bash .ci/helios ~/.cache/fhirsync-helios` \
             (about 20 minutes once), or set FHIRSYNC_HFS",
            p.display()
        );
    }
    p
}

/// The HL7 R4 search parameters Helios needs (`../shared/data`).
fn data_dir() -> PathBuf {
    std::env::var_os("FHIRSYNC_HFS_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// A running Helios, stopped on drop.
pub struct Helios {
    child: Child,
    /// FHIR base URL (Helios serves at the root).
    pub base: String,
    pub dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Helios {
    /// Starts Helios with a fresh database and waits until it answers.
    pub async fn start() -> Self {
        Self::start_as(None).await
    }

    /// [`Helios::start`], with the base URL Helios puts into the URLs it hands out (export status,
    /// files, links) when it is reached through something in front of it.
    pub async fn start_as(public_base: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let base = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("hfs.log")).unwrap();
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--database-url")
            .arg(dir.path().join("fhir.db"))
            .arg("--data-dir")
            .arg(data_dir())
            .env("HFS_BASE_URL", public_base.unwrap_or(&base))
            .env("HFS_SUBSCRIPTIONS_ENABLED", "true")
            .env("HFS_BULK_EXPORT_OUTPUT_DIR", dir.path().join("exports"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start hfs");
        fhirsync::net::init_tls();
        let me = Self { child, base, dir, http: reqwest::Client::new() };
        // the port opens only once Helios is ready (seeding takes ~3 s)
        let url = format!("{}/health", me.base);
        super::real_server::wait_until_answers(&me.http, &url, Duration::from_secs(60), || me.log()).await;
        me
    }

    /// Helios's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hfs.log")).unwrap_or_default()
    }

    /// Creates or updates resources in one transaction of PUTs.
    pub async fn put(&self, resources: &[Value]) {
        super::real_server::put(&self.http, &self.base, resources).await
    }

    /// Deletes one resource.
    pub async fn delete(&self, t: &str, id: &str) {
        super::real_server::delete(&self.http, &self.base, t, id).await
    }

    /// The ids of `t` Helios holds now (search, following next links).
    pub async fn ids(&self, t: &str) -> BTreeSet<String> {
        super::real_server::ids(&self.http, &self.base, t, 1000).await
    }
}

impl Drop for Helios {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` Patients `{prefix}{k}`.
pub fn patients(prefix: &str, n: usize) -> Vec<Value> {
    (0..n).map(|k| json!({"resourceType": "Patient", "id": format!("{prefix}{k}"), "active": true})).collect()
}

/// `n` Observations `{prefix}{k}` of the patients `p0..p{m}`.
pub fn observations(prefix: &str, n: usize, patients: usize) -> Vec<Value> {
    (0..n)
        .map(|k| {
            json!({"resourceType": "Observation", "id": format!("{prefix}{k}"),
                   "status": if k % 2 == 0 { "final" } else { "preliminary" },
                   "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                   "subject": {"reference": format!("Patient/p{}", k % patients.max(1))}})
        })
        .collect()
}
