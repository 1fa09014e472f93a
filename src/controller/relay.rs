//! The operator's side of the relay: starts the receiver, carries out the catch-ups the relay asks
//! for (a `fhirsync.io/run-now` on the named BulkExportSync, as a person would), and wakes the
//! FhirSubscriptionSync controller when a sync's counters changed, so its status follows.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::Error;
use crate::api::{ANNOTATION_RUN_NOW, BulkExportSync, FhirSubscriptionSync};
use crate::relay::receiver::{self, Leadership};
use crate::relay::{CatchUpRequest, Relay};

/// Flags of the receiver (part of `fhirsync run`).
#[derive(Debug, Clone, clap::Args)]
pub struct ReceiverArgs {
    /// Where the relay's receiver listens (every replica); absent: no receiver, and syncs with
    /// `delivery: Relay` report ReceiverNotConfigured.
    #[arg(long, env = "FHIRSYNC_RECEIVER_ADDR")]
    pub receiver_addr: Option<SocketAddr>,
    /// The receiver's base URL as sources reach it (the Service or Ingress), e.g.
    /// `https://fhirsync-receiver.fhirsync.svc:8443`. Put into the Subscriptions' endpoints.
    #[arg(long, env = "FHIRSYNC_RECEIVER_URL")]
    pub receiver_url: Option<url::Url>,
    /// File holding the secret every replica derives the per-sync credentials from (the chart
    /// makes one); absent: a random one per process (credentials change on restart).
    #[arg(long, env = "FHIRSYNC_RELAY_KEY_FILE")]
    pub relay_key_file: Option<PathBuf>,
    /// PEM certificate chain for the receiver to serve HTTPS itself.
    #[arg(long, env = "FHIRSYNC_RECEIVER_TLS_CERT", requires = "receiver_tls_key")]
    pub receiver_tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, env = "FHIRSYNC_RECEIVER_TLS_KEY", requires = "receiver_tls_cert")]
    pub receiver_tls_key: Option<PathBuf>,
}

/// How often changed counters are taken to the status.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Starts what the relay needs in this process; returns it and the stream that wakes the
/// FhirSubscriptionSync controller.
pub async fn start(
    args: &ReceiverArgs,
    client: Client,
    metrics: Arc<crate::metrics::Metrics>,
    leadership: Arc<Leadership>,
    recorder: kube::runtime::events::Recorder,
    stop: CancellationToken,
) -> Result<(Arc<Relay>, broadcast::Sender<(String, String)>), Error> {
    let key = match &args.relay_key_file {
        Some(p) => {
            let k = std::fs::read(p).map(|b| b.trim_ascii().to_vec()).map_err(|source| Error::File {
                flag: "--relay-key-file",
                path: p.display().to_string(),
                source,
            })?;
            // anyone who knows a sync's uid could make its credential from a short key
            if k.len() < 32 {
                return Err(Error::Flag {
                    flag: "--relay-key-file",
                    message: format!(
                        "{}: the key has {} bytes; it needs at least 32 (e.g. `head -c 48 /dev/urandom | base64`)",
                        p.display(),
                        k.len()
                    ),
                });
            }
            Some(k)
        }
        None => None,
    };
    if key.is_none() && args.receiver_addr.is_some() {
        tracing::warn!(
            "no --relay-key-file: the relay's credentials change when the operator restarts (Subscriptions are updated), and replicas would not agree"
        );
    }
    let shared = key.is_some();
    let key = match key {
        Some(k) => k,
        None => {
            let mut b = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(|_| Error::Flag {
                flag: "--relay-key-file",
                message: "not given, and no random numbers for a key".into(),
            })?;
            b
        }
    };
    let (relay, catch_ups) = Relay::new(&key, metrics, stop.clone());
    if !shared {
        relay.key_is_per_process();
    }
    if let Some(addr) = args.receiver_addr {
        // the certificate is read and the port bound before serving: either failing stops the
        // process, before it says it is ready
        let tls = match (&args.receiver_tls_cert, &args.receiver_tls_key) {
            (Some(c), Some(k)) => {
                let read = |flag: &'static str, p: &std::path::Path| {
                    std::fs::read(p).map_err(|source| Error::File { flag, path: p.display().to_string(), source })
                };
                let (cert, key) = (read("--receiver-tls-cert", c)?, read("--receiver-tls-key", k)?);
                Some(
                    receiver::tls_config(&cert, &key)
                        .map_err(|message| Error::Flag { flag: "--receiver-tls-cert/--receiver-tls-key", message })?,
                )
            }
            _ => None,
        };
        let listener = crate::serve::bind(addr, "--receiver-addr").await.map_err(Error::Bind)?;
        tokio::spawn(receiver::serve(listener, tls, relay.clone(), leadership, stop.clone()));
    }
    tokio::spawn(catch_up(client, recorder, catch_ups, stop.clone()));
    let (tx, _) = broadcast::channel(1024);
    {
        let (relay, tx, stop) = (relay.clone(), tx.clone(), stop);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(STATUS_EVERY) => {}
                    _ = stop.cancelled() => return,
                }
                for k in relay.take_dirty() {
                    let _ = tx.send(k);
                }
            }
        });
    }
    Ok((relay, tx))
}

/// The FhirSubscriptionSyncs in scope `ns` whose relay counters changed.
pub fn wakeups(
    tx: &broadcast::Sender<(String, String)>,
    ns: Option<String>,
) -> impl futures::Stream<Item = ObjectRef<FhirSubscriptionSync>> + Send + 'static {
    let rx = tx.subscribe();
    futures::stream::unfold((rx, ns), |(mut rx, ns)| async move {
        loop {
            match rx.recv().await {
                Ok((n, name)) if ns.as_ref().is_none_or(|x| *x == n) => {
                    return Some((ObjectRef::new(&name).within(&n), (rx, ns)));
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// Carries out catch-ups: a new `fhirsync.io/run-now` value on the BulkExportSync, and an Event on
/// the FhirSubscriptionSync saying why.
async fn catch_up(
    client: Client,
    recorder: kube::runtime::events::Recorder,
    mut rx: mpsc::UnboundedReceiver<CatchUpRequest>,
    stop: CancellationToken,
) {
    loop {
        let req = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = stop.cancelled() => return,
        };
        let api: Api<BulkExportSync> = Api::namespaced(client.clone(), &req.namespace);
        let value = format!("catch-up-{}", jiff::Timestamp::now().as_millisecond());
        let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_RUN_NOW: value}}});
        let (kind, note) = match api.patch(&req.sync, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => (EventType::Normal, format!("{}; started a catch-up run of BulkExportSync {}", req.why, req.sync)),
            Err(e) => {
                (EventType::Warning, format!("{}, but BulkExportSync {} could not be started: {e}", req.why, req.sync))
            }
        };
        tracing::info!(fss = %format!("{}/{}", req.namespace, req.from), bes = %req.sync, "{note}");
        let obj = ObjectReference {
            api_version: Some("fhirsync.io/v1alpha1".into()),
            kind: Some("FhirSubscriptionSync".into()),
            name: Some(req.from.clone()),
            namespace: Some(req.namespace.clone()),
            ..Default::default()
        };
        let mut note = note;
        crate::text::cut_bytes(&mut note, 1000);
        let ev =
            Event { type_: kind, reason: "CatchUp".into(), note: Some(note), action: "Relay".into(), secondary: None };
        let _ = recorder.publish(&ev, &obj).await;
    }
}
