//! Leader election on one `coordination.k8s.io` Lease: one active controller among replicas. A
//! standby is Ready (so rollouts and drains proceed); a leader that loses its lease exits, so two
//! processes never act at once.

use std::sync::Arc;

use kube_lease_manager::LeaseManagerBuilder;
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

/// Waits for the lease, runs the controllers while holding it, releases it on shutdown.
pub async fn run_with_election(args: &RunArgs, ctx: Arc<Context>, ready: Readiness) -> Result<(), Error> {
    let id = identity();
    let ns = lease_namespace(&args.lease_namespace);
    let duration: u64 = std::env::var("FHIRSYNC_LEASE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let manager = LeaseManagerBuilder::new(ctx.client.clone(), &args.lease_name)
        .with_namespace(&ns)
        .with_identity(&id)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .with_field_manager(format!("fhirsync-{id}"))
        .build()
        .await
        .map_err(|e| Error::Other(format!("leader election on Lease {ns}/{}: {e}", args.lease_name)))?;
    let (mut leading, task) = manager.watch().await;
    ready.set(true); // a standby is ready
    tracing::info!(identity = %id, lease = %format!("{ns}/{}", args.lease_name), "waiting for leadership");
    let shutdown = ctx.shutdown.clone();
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            r = leading.changed() => if r.is_err() {
                return Err(Error::Other("leader election stopped unexpectedly".into()));
            },
            _ = shutdown.cancelled() => {
                drop(leading);
                if let Ok(Ok(m)) = task.await { let _ = m.release().await; }
                return Ok(());
            }
        }
    }
    tracing::info!(identity = %id, "acquired leadership; starting controllers");
    ready.set(false);
    let stop = CancellationToken::new();
    let controllers = run_controllers(args, ctx.clone(), ready.clone(), stop.clone());
    tokio::pin!(controllers);
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return;
            }
        }
    };
    let result = tokio::select! {
        _ = &mut controllers => Ok(()),
        _ = lost => Err(Error::Other("lost leadership; exiting so that a single leader acts".into())),
        _ = shutdown.cancelled() => Ok(()),
    };
    stop.cancel();
    stop_tasks(&ctx).await;
    controllers.await;
    drop(leading);
    if let Ok(Ok(m)) = task.await {
        let _ = m.release().await;
    }
    result
}
