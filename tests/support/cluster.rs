//! End-to-end plumbing: a client for the real test API server, the CRDs, and the operator process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config, CustomResourceExt, Resource};

use fhirsync::api::{BulkExportRun, BulkExportSync, FhirSubscriptionSync};

/// End-to-end tests run one at a time (one API server for the whole suite).
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Path of the test API server's kubeconfig (set by `.ci/run`).
pub fn kubeconfig() -> PathBuf {
    match std::env::var("FHIRSYNC_E2E_KUBECONFIG") {
        Ok(p) => PathBuf::from(p),
        Err(_) => panic!(
            "FHIRSYNC_E2E_KUBECONFIG is not set: end-to-end tests need the test API server; run .ci/run \
             (it starts ../shared/test-apiserver and sets it)"
        ),
    }
}

/// A client for the test API server.
pub async fn client() -> Client {
    let kc = Kubeconfig::read_from(kubeconfig()).expect("kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("config");
    Client::try_from(cfg).expect("client")
}

/// Installs (server-side apply) the CRDs and waits until they are established.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [BulkExportSync::crd(), BulkExportRun::crd(), FhirSubscriptionSync::crd()] {
        let name = crd.metadata.name.clone().unwrap();
        api.patch(&name, &PatchParams::apply("fhirsync-e2e").force(), &Patch::Apply(&crd)).await.expect("apply crd");
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("crd established in time")
        .expect("watch");
    }
}

/// Applies ../shared/test-apiserver/core-shims.yaml (Lease and events.k8s.io Event stand-ins).
pub fn apply_core_shims() {
    let shims = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/test-apiserver/core-shims.yaml");
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig().display().to_string(), "apply", "-f", &shims.display().to_string()])
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "core shims: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("kubectl")
        .args([
            "--kubeconfig",
            &kubeconfig().display().to_string(),
            "wait",
            "--for",
            "condition=established",
            "crd/leases.coordination.k8s.io",
        ])
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "lease shim: {}", String::from_utf8_lossy(&out.stderr));
}

/// A fresh namespace name for one test (the test server has no Namespace API; any name works).
pub fn namespace(test: &str) -> String {
    format!("{test}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An operator process (`fhirsync run`), killed on drop.
pub struct Operator {
    child: Option<Child>,
    pub admin: String,
    pub log: PathBuf,
}

impl Operator {
    /// The flags of an operator with a receiver on a free port and a relay key written to `dir`
    /// (shared by every start with them: a restarted operator keeps its Subscriptions' credential).
    pub fn relay_args(dir: &std::path::Path) -> Vec<String> {
        let key = dir.join("relay.key");
        std::fs::write(&key, "a relay key shared by every replica, 32 bytes or more").unwrap();
        let receiver = format!("127.0.0.1:{}", free_port());
        let url = format!("http://{receiver}");
        ["--receiver-addr", &receiver, "--receiver-url", &url, "--relay-key-file", &key.display().to_string()]
            .map(String::from)
            .to_vec()
    }

    /// Starts `fhirsync run` with `args` (owned, as [`Operator::relay_args`] makes them).
    pub fn start_with(namespace: &str, staging_root: &std::path::Path, args: &[String]) -> Self {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start(namespace, staging_root, &args)
    }

    /// Starts `fhirsync run` for one namespace.
    pub fn start(namespace: &str, staging_root: &std::path::Path, extra: &[&str]) -> Self {
        Self::start_env(namespace, staging_root, extra, &[])
    }

    /// Starts `fhirsync run` with extra environment variables.
    pub fn start_env(namespace: &str, staging_root: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("fhirsync-e2e-{namespace}-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(super::fhirsync_bin())
            .args(["run", "--namespace", namespace, "--admin-addr", &format!("127.0.0.1:{port}")])
            .args(["--staging-root", &staging_root.display().to_string(), "--log-level", "info,fhirsync=debug"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig())
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start operator");
        Self { child: Some(child), admin: format!("http://127.0.0.1:{port}"), log }
    }

    /// SIGKILLs the operator (a crash: nothing is cleaned up).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs the operator and waits for a graceful exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_free_kill(c.id());
        c.wait().ok().and_then(|s| s.code())
    }

    /// Sends a signal by name (`STOP`, `CONT`): a pause of the whole process, as a frozen node would.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args([format!("-{sig}"), c.id().to_string()]).status();
        }
    }

    /// Whether the process is still running (it did not crash).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The operator's log so far (for assertion messages).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn unsafe_free_kill(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (watching, no sleeps) until `cond` holds for the named object.
pub async fn wait_for<K>(api: &Api<K>, name: &str, secs: u64, what: &str, cond: impl Fn(&K) -> bool) -> K
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let r = tokio::time::timeout(
        Duration::from_secs(secs),
        await_condition(api.clone(), name, move |o: Option<&K>| o.is_some_and(&cond)),
    )
    .await;
    match r {
        Ok(Ok(Some(o))) => o,
        Ok(Ok(None)) => panic!("{what}: object {name} vanished"),
        Ok(Err(e)) => panic!("{what}: watch failed: {e}"),
        Err(_) => {
            let cur = api.get_opt(name).await.ok().flatten();
            panic!("{what}: timed out after {secs}s; object is {cur:#?}")
        }
    }
}

/// Waits until the named object is gone.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, uid: &str, secs: u64)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::time::timeout(Duration::from_secs(secs), await_condition(api.clone(), name, conditions::is_deleted(uid)))
        .await
        .expect("deleted in time")
        .expect("watch");
}

/// A FhirSubscriptionSync's condition `t`: (status, reason, message).
pub fn fss_cond(o: &fhirsync::api::FhirSubscriptionSync, t: &str) -> Option<(String, String, String)> {
    let c = o.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Ready, with all `n` Subscriptions active.
pub fn fss_all_active(o: &fhirsync::api::FhirSubscriptionSync, n: usize) -> bool {
    fss_cond(o, "Ready").is_some_and(|c| c.0 == "True")
        && o.status.as_ref().and_then(|s| s.active_subscriptions.clone()) == Some(format!("{n}/{n}"))
}
