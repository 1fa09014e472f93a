//! Push latency from a real HAPI FHIR JPA server (tests/peers/hapi) into Pathling, `Direct` versus
//! `Relay`: `fhirsync run` on the test API server keeps two Subscriptions for `Patient?` on HAPI, one
//! delivering straight into one Pathling emulator, one through fhirsync's relay into another. N
//! Patients are written at HAPI at R a second; for each, the time from HAPI's answer to the write
//! (the change is committed) until the resource is readable in each Pathling; median and 95th
//! percentile, and Pathling write requests per 1,000 changes. (Real Pathling cannot be had from
//! Maven Central here: the target is the Pathling 3 emulator, whose writes take no time — the
//! figures are HAPI's delivery and fhirsync's relay, not Pathling's commit.)
//!
//!     ../shared/test-apiserver/{setup,up}.sh; export FHIRSYNC_E2E_KUBECONFIG=$K/kubeconfig
//!     cargo build --release --bin fhirsync --example bench_push_hapi
//!     target/release/examples/bench_push_hapi [N] [R]        (default: 200 10)

#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fhirsync::api::FhirSubscriptionSync;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::cluster::{self, Operator, fss_all_active, wait_for};
use support::hapi::Hapi;
use support::pathling::{FakePathling, PathlingConfig};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

type Sent = std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>>;

/// Watches `p` while the changes are written (woken by each request it gets, and every 20 ms) until
/// all `n` ids in `sent` are readable; returns each one's latency in seconds.
async fn arrivals(p: &FakePathling, sent: &Sent, n: usize, limit: Duration) -> Vec<f64> {
    let mut seen: HashMap<String, f64> = HashMap::new();
    let mut rx = p.requests();
    let deadline = tokio::time::Instant::now() + limit;
    while seen.len() < n {
        let pending: Vec<(String, Instant)> = sent
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| !seen.contains_key(*id))
            .map(|(id, t)| (id.clone(), *t))
            .collect();
        for (id, t0) in pending {
            if p.get("Patient", &id).is_some() {
                seen.insert(id, t0.elapsed().as_secs_f64());
            }
        }
        if seen.len() == n {
            break;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = tokio::time::sleep_until(deadline) => panic!("{} of {n} arrived", seen.len()),
        }
    }
    seen.into_values().collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let rate: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let hapi = Hapi::start(&[]).await;
    let client = cluster::client().await;
    cluster::install_crds(&client).await;
    let ns = cluster::namespace("bench-push");
    let api: Api<FhirSubscriptionSync> = Api::namespaced(client, &ns);
    let direct = FakePathling::start(PathlingConfig::default()).await;
    let relayed = FakePathling::start(PathlingConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let _op = Operator::start_with(&ns, dir.path(), &Operator::relay_args(dir.path()));
    for (name, spec) in [
        ("direct", json!({"source": {"url": hapi.base}, "criteria": ["Patient?"], "endpoint": direct.base})),
        (
            "relay",
            json!({"source": {"url": hapi.base}, "criteria": ["Patient?"], "delivery": "Relay", "target": {"url": relayed.base}}),
        ),
    ] {
        let m = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync",
                       "metadata": {"name": name, "namespace": ns}, "spec": spec});
        api.patch(name, &PatchParams::apply("bench").force(), &Patch::Apply(&m)).await.unwrap();
        wait_for(&api, name, 120, "active", |o| fss_all_active(o, 1)).await;
    }
    println!("HAPI FHIR JPA 8.8.0, {n} Patients written at {rate}/s, each delivered Direct and through the relay\n");
    let sent: Sent = Default::default();
    let gap = Duration::from_secs_f64(1.0 / rate);
    let write = async {
        let start = Instant::now();
        for k in 0..n {
            let id = format!("lat{k}");
            hapi.put(&[json!({"resourceType": "Patient", "id": id, "active": true})]).await;
            // HAPI has answered: the change is committed
            sent.lock().unwrap().insert(id, Instant::now());
            let next = start + gap * (k as u32 + 1);
            tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
        }
    };
    let limit = Duration::from_secs(300) + gap * n as u32;
    let ((), mut d, mut r) =
        tokio::join!(write, arrivals(&direct, &sent, n, limit), arrivals(&relayed, &sent, n, limit));
    let per_1000 = |p: &FakePathling| p.log().writes as f64 * 1000.0 / n as f64;
    println!("| delivery | median | p95 | max | Pathling writes per 1,000 changes |");
    println!("|---|---|---|---|---|");
    for (what, v, p) in [("Direct", &mut d, &direct), ("Relay", &mut r, &relayed)] {
        let (med, p95, max) = (percentile(v, 0.5), percentile(v, 0.95), percentile(v, 1.0));
        println!("| {what} | {med:.2} s | {p95:.2} s | {max:.2} s | {:.0} |", per_1000(p));
    }
}
