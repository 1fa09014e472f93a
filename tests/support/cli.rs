//! Running the `fhirsync` binary against the in-process doubles, as a user runs sync-once.

use std::process::{Command, Output, Stdio};

use super::pathling::{FakePathling, PathlingConfig};
use super::source::{FakeSource, SourceConfig, resources};

pub struct Cli {
    pub source: FakeSource,
    pub pathling: FakePathling,
    pub dir: tempfile::TempDir,
}

impl Cli {
    pub async fn new(cfg: SourceConfig) -> Self {
        Self::with(cfg, PathlingConfig::default()).await
    }

    pub async fn with(cfg: SourceConfig, mut pcfg: PathlingConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        pcfg.roots.push(("file:///staging".into(), dir.path().join("staging")));
        Self { source: FakeSource::start(cfg).await, pathling: FakePathling::start(pcfg).await, dir }
    }

    pub fn write_sync(&self, extra_source: &str, extra_spec: &str) -> std::path::PathBuf {
        let yaml = format!(
            "apiVersion: fhirsync.io/v1alpha1\nkind: BulkExportSync\nmetadata: {{name: demo, namespace: cli}}\nspec:\n  \
             source: {{url: \"{}\"{extra_source}}}\n  target: {{url: \"{}\"}}\n  \
             staging: {{volume: {{path: \"{}\", pathlingPath: \"file:///staging\"}}}}\n{extra_spec}",
            self.source.base,
            self.pathling.base,
            self.dir.path().join("staging").display()
        );
        let p = self.dir.path().join("sync.yaml");
        std::fs::write(&p, yaml).unwrap();
        p
    }

    pub fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("state.json")
    }

    /// Runs the binary off the async runtime (the doubles keep serving meanwhile).
    pub async fn run(&self, args: Vec<String>) -> Output {
        tokio::task::spawn_blocking(move || {
            Command::new(super::fhirsync_bin()).args(&args).stdin(Stdio::null()).output().unwrap()
        })
        .await
        .unwrap()
    }
}

pub fn data() -> SourceConfig {
    SourceConfig {
        files: vec![
            ("Patient".into(), resources("Patient", "p", 24)),
            ("Observation".into(), resources("Observation", "o", 300)),
        ],
        ..Default::default()
    }
}

pub fn s(x: &std::path::Path) -> String {
    x.display().to_string()
}

/// Runs the binary to its end with stdout and stderr in files; returns its output and peak RSS (KiB).
///
/// The peak is the child's own high-water mark (`VmHWM` of its address space after exec), sampled
/// every 10 ms until it exits: `getrusage`/`wait4` would include this process's memory, which a
/// vfork-spawned child shares until it execs.
pub async fn run_measured(args: Vec<String>) -> (Output, u64) {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let (o, e) = (dir.path().join("out"), dir.path().join("err"));
        let mut child = Command::new(super::fhirsync_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&o).unwrap())
            .stderr(std::fs::File::create(&e).unwrap())
            .spawn()
            .unwrap();
        let status_file = format!("/proc/{}/status", child.id());
        let mut peak = 0u64;
        let status = loop {
            if let Ok(text) = std::fs::read_to_string(&status_file)
                && let Some(kib) = text
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let out = Output { status, stdout: std::fs::read(&o).unwrap(), stderr: std::fs::read(&e).unwrap() };
        (out, peak)
    })
    .await
    .unwrap()
}
