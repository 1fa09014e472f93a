//! Figures for push delivery: N changes (default 1,000) sent by a source that delivers with C
//! notifications in flight (default 32, like a server's delivery thread pool), against a Pathling
//! double whose every write request takes W ms (default 1,000, as a real Pathling's Delta commit
//! does) and which writes one request at a time. Baseline, from the same invocation: `delivery:
//! Direct`, where the source PUTs every change straight into Pathling. Then `delivery: Relay`, where
//! the source notifies fhirsync's receiver (the real receiver and relay, in process) and the relay
//! group-commits into Pathling. Reports Pathling's write requests, the time until the last change is
//! acknowledged, and their ratios; then the latency of one change on an idle relay, less Pathling's
//! own time.
//!
//!     cargo build --release --example bench_relay
//!     target/release/examples/bench_relay [--changes 1000] [--concurrency 32] [--write-ms 1000]

#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirsync::fhir::client::{ClientConfig, HttpClient};
use fhirsync::metrics::Metrics;
use fhirsync::pathling::PathlingClient;
use fhirsync::relay::receiver::{Leadership, router};
use fhirsync::relay::{Relay, SyncConfig};
use futures::StreamExt;
use serde_json::json;
use support::pathling::{FakePathling, PathlingConfig};
use tokio_util::sync::CancellationToken;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).find(|w| w[0] == name).and_then(|w| w[1].parse().ok()).unwrap_or(default)
}

/// What one way of delivering cost.
struct Figures {
    writes: u32,
    elapsed: Duration,
    failed: usize,
}

impl Figures {
    fn print(&self, label: &str) {
        println!(
            "{label} {} Pathling writes, {:.1} s until the last change was acknowledged, {} failed",
            self.writes,
            self.elapsed.as_secs_f64(),
            self.failed
        );
    }
}

/// Delivers `n` changes to `url_of(i)` with `c` in flight; every change is acknowledged (retrying
/// a 503 after its Retry-After, as sources do) before it counts.
async fn deliver(n: u64, c: u64, url_of: impl Fn(u64) -> String, token: Option<String>) -> (Duration, usize) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3600)).build().unwrap();
    let start = Instant::now();
    let failed = futures::stream::iter(0..n)
        .map(|i| {
            let (http, url, token) = (http.clone(), url_of(i), token.clone());
            async move {
                let body = json!({"resourceType": "Patient", "id": format!("p{i}"), "active": true,
                                  "name": [{"family": format!("Family{i}")}]})
                .to_string();
                for _ in 0..10 {
                    let mut rb = http.put(&url).header("content-type", "application/fhir+json").body(body.clone());
                    if let Some(t) = &token {
                        rb = rb.bearer_auth(t);
                    }
                    match rb.send().await {
                        Ok(r) if r.status().is_success() => return 0,
                        Ok(r) if r.status().as_u16() == 503 => {
                            let wait =
                                r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
                            tokio::time::sleep(Duration::from_secs(wait)).await;
                        }
                        _ => return 1,
                    }
                }
                1
            }
        })
        .buffer_unordered(c as usize)
        .fold(0usize, |a, f| async move { a + f })
        .await;
    (start.elapsed(), failed)
}

fn pathling_cfg(write: Duration) -> PathlingConfig {
    PathlingConfig { write_delay: Some(write), ..Default::default() }
}

async fn direct(n: u64, c: u64, write: Duration) -> Figures {
    let p = FakePathling::start(pathling_cfg(write)).await;
    let base = p.base.clone();
    let (elapsed, failed) = deliver(n, c, |i| format!("{base}/Patient/p{i}"), None).await;
    assert_eq!(p.ids("Patient").len() as u64 + failed as u64, n);
    Figures { writes: p.log().writes, elapsed, failed }
}

struct RelayBench {
    pathling: FakePathling,
    url: String,
    token: String,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_relay(write: Duration) -> RelayBench {
    let pathling = FakePathling::start(pathling_cfg(write)).await;
    let stop = CancellationToken::new();
    let (relay, _catch_ups) = Relay::new(b"bench", Arc::new(Metrics::default()), stop.clone());
    let http = |b: &str| HttpClient::new(&ClientConfig::new(b.parse().unwrap())).unwrap();
    relay.configure(SyncConfig {
        namespace: "bench".into(),
        name: "feed".into(),
        uid: "uid-1".into(),
        source: http("http://127.0.0.1:9/"),
        pathling: PathlingClient::new(http(&pathling.base)),
        catch_up: None,
        fingerprint: "1".into(),
        last_events: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(relay.clone(), Arc::new(Leadership::default()), false);
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    RelayBench {
        pathling,
        url: format!("http://{addr}{}", Relay::path("bench", "feed")),
        token: relay.token("uid-1"),
        _stop: stop.drop_guard(),
    }
}

async fn relayed(n: u64, c: u64, write: Duration) -> Figures {
    let r = start_relay(write).await;
    let url = r.url.clone();
    let (elapsed, failed) = deliver(n, c, |i| format!("{url}/Patient/p{i}"), Some(r.token.clone())).await;
    assert_eq!(r.pathling.ids("Patient").len() as u64 + failed as u64, n);
    Figures { writes: r.pathling.log().writes, elapsed, failed }
}

#[tokio::main]
async fn main() {
    fhirsync::net::init_tls();
    let n = arg("--changes", 1000);
    let c = arg("--concurrency", 32);
    let write = Duration::from_millis(arg("--write-ms", 1000));
    println!("{n} changes, {c} in flight at the source, every Pathling write {} ms, one at a time", write.as_millis());

    let d = direct(n, c, write).await;
    d.print("Direct (baseline):");
    let r = relayed(n, c, write).await;
    r.print("Relay:            ");
    println!(
        "Relay vs Direct: {:.1}x fewer writes, {:.1}x sooner",
        d.writes as f64 / r.writes.max(1) as f64,
        d.elapsed.as_secs_f64() / r.elapsed.as_secs_f64().max(1e-9)
    );

    // one change on an idle relay, repeated: what the relay adds to Pathling's own time
    let rb = start_relay(write).await;
    let http = reqwest::Client::new();
    let mut added = vec![];
    for i in 0..5 {
        let body = json!({"resourceType": "Patient", "id": format!("idle{i}")}).to_string();
        let t = Instant::now();
        let resp = http.put(format!("{}/Patient/idle{i}", rb.url)).bearer_auth(&rb.token).body(body).send().await;
        assert!(resp.is_ok_and(|r| r.status().is_success()));
        added.push(t.elapsed().saturating_sub(write));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    added.sort();
    println!(
        "Idle: one change reaches Pathling in Pathling's {} ms plus {:.1} ms (median of 5; max {:.1} ms)",
        write.as_millis(),
        added[2].as_secs_f64() * 1000.0,
        added[4].as_secs_f64() * 1000.0
    );
}
