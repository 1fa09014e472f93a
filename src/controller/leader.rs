//! Leader election on one `coordination.k8s.io` Lease: one active controller among replicas. A
//! standby is Ready (so rollouts and drains proceed); a leader that cannot renew its lease exits, so
//! two processes never act at once.
//!
//! The algorithm is client-go's: writes are full updates guarded by resourceVersion (a lost race is a
//! 409, never two holders), and expiry is judged by when *this* process last saw the record change,
//! not by comparing clocks across nodes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio_util::sync::CancellationToken;

use super::{Context, Error, RunArgs, run_controllers, stop_tasks};
use crate::admin::Readiness;

/// This process's identity: the pod name, else host name and process id.
pub fn identity() -> String {
    if let Ok(p) = std::env::var("POD_NAME")
        && !p.is_empty()
    {
        return p;
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "fhirsync".into());
    format!("{host}-{}", std::process::id())
}

/// The identity this process takes part in the election with: [`identity`], and when it runs the
/// relay's receiver and knows its pod IP (`POD_IP`), `@ip:port`, so that other replicas forward
/// notifications to the leader.
pub fn election_identity(args: &RunArgs) -> String {
    let id = identity();
    match (args.receiver.receiver_addr, std::env::var("POD_IP").ok().filter(|s| !s.is_empty())) {
        (Some(addr), Some(ip)) if ip.parse::<std::net::IpAddr>().is_ok() => {
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
            format!("{id}@{host}:{}", addr.port())
        }
        _ => id,
    }
}

/// Namespace of the Lease: the flag, else the pod's namespace, else `default`.
pub fn lease_namespace(flag: &Option<String>) -> String {
    flag.clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "default".into())
}

/// One participant in the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    id: String,
    duration: Duration,
    /// The holder/renewTime last seen, and when this process saw it change.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, id: &str, duration: Duration) -> Self {
        Self { api, name: name.into(), id: id.into(), duration, observed: None }
    }

    /// The holder last seen.
    pub fn holder(&self) -> Option<String> {
        self.observed.as_ref().and_then(|o| o.0.clone())
    }

    /// Takes or renews the lease; returns whether this process holds it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let secs = self.duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let l = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.id.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &l).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let snapshot = (spec.holder_identity.clone(), spec.renew_time.clone());
        let changed = self.observed.as_ref().is_none_or(|(h, r, _)| (h, r) != (&snapshot.0, &snapshot.1));
        if changed {
            self.observed = Some((snapshot.0.clone(), snapshot.1.clone(), Instant::now()));
        }
        let seen_at = self.observed.as_ref().map(|o| o.2).unwrap_or_else(Instant::now);
        let their_duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64);
        let mine = spec.holder_identity.as_deref() == Some(self.id.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty) || seen_at.elapsed() > their_duration;
        if mine {
            spec.renew_time = Some(now);
            spec.lease_duration_seconds = Some(secs);
        } else if free {
            spec.holder_identity = Some(self.id.clone());
            spec.acquire_time = Some(now.clone());
            spec.renew_time = Some(now);
            spec.lease_duration_seconds = Some(secs);
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        } else {
            return Ok(false);
        }
        // a full update guarded by the resourceVersion we read: a concurrent writer makes this a 409
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(l) => {
                let s = l.spec.unwrap_or_default();
                self.observed = Some((s.holder_identity, s.renew_time, Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on shutdown) so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.id.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Waits for the lease, runs the controllers while holding it, releases it on shutdown.
pub async fn run_with_election(args: &RunArgs, ctx: Arc<Context>, ready: Readiness) -> Result<(), Error> {
    let id = election_identity(args);
    let ns = lease_namespace(&args.lease_namespace);
    let secs: u64 = std::env::var("FHIRSYNC_LEASE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15).max(2);
    let duration = Duration::from_secs(secs);
    let retry = duration / 3;
    let renew_deadline = duration * 2 / 3;
    let mut elector = Elector::new(Api::namespaced(ctx.client.clone(), &ns), &args.lease_name, &id, duration);
    ready.set(true); // a standby is ready
    tracing::info!(identity = %id, lease = %format!("{ns}/{}", args.lease_name), "waiting for leadership");
    let shutdown = ctx.shutdown.clone();
    loop {
        let sent = Instant::now();
        match elector.try_acquire_or_renew().await {
            Ok(true) => {
                // valid for the renew deadline from when the request was sent: a standby takes
                // over only a whole lease duration after it last saw a renewal, later than this
                ctx.fence.renewed(sent, renew_deadline);
                ctx.leadership.observe(true, Some(id.clone()));
                break;
            }
            Ok(false) => ctx.leadership.observe(false, elector.holder()),
            Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the Lease"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    tracing::info!(identity = %id, "acquired leadership; starting controllers");
    ready.set(false);
    let stop = CancellationToken::new();
    let controllers = run_controllers(args, ctx.clone(), ready.clone(), stop.clone());
    tokio::pin!(controllers);
    let mut last_renewed = Instant::now();
    let result = loop {
        tokio::select! {
            _ = &mut controllers => break Ok(()),
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(retry) => {
                let sent = Instant::now();
                match elector.try_acquire_or_renew().await {
                    Ok(true) => {
                        last_renewed = sent;
                        ctx.fence.renewed(sent, renew_deadline);
                    }
                    Ok(false) => break Err(Error::LostLeadership("lost leadership to another replica")),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the Lease");
                        if last_renewed.elapsed() > renew_deadline {
                            break Err(Error::LostLeadership("could not renew the Lease in time"));
                        }
                    }
                }
            }
        }
    };
    ctx.fence.revoke();
    ctx.leadership.observe(false, None);
    stop.cancel();
    stop_tasks(&ctx).await;
    controllers.await;
    if let Err(e) = elector.release().await {
        tracing::warn!(error = %e, "could not release the Lease");
    }
    result
}
