//! Direct delivery's blind spot: the source writes into Pathling without fhirsync in the path, and
//! a source such as HAPI gives up on a change whose delivery failed for about a minute (its
//! Subscription stays `active`, nothing says a change was dropped). With `catchUp`, fhirsync watches
//! the catch-up BulkExportSync's Pathling — the same server, as the operator reaches it — every
//! [`PROBE_EVERY`]: while it does not answer the sync is Degraded `TargetUnavailable`, and when it
//! answers again a catch-up run of that BulkExportSync brings what the source dropped (its
//! watermark cannot have moved during the outage: its runs need that Pathling too).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;

use super::Context;
use crate::api::conditions::{set_condition, types};
use crate::api::validate::server_timing;
use crate::api::{BulkExportSync, FhirSubscriptionSyncStatus};
use crate::fhir::client::HttpClient;
use crate::relay::CatchUpRequest;
use crate::run::resolve;

/// How often a Direct sync with `catchUp` looks at its Pathling.
pub const PROBE_EVERY: Duration = Duration::from_secs(15);
/// Longest a probe may take before it counts as "does not answer".
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a resolved client (the catch-up sync's target and its Secret) is reused.
const CLIENT_TTL: Duration = Duration::from_secs(300);

/// What one probe means for the sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outage {
    /// Pathling answers, as before.
    Up,
    /// It stopped answering now.
    Began,
    /// It still does not answer (since then).
    Continues(Time),
    /// It answers again after not answering since then: catch up.
    Ended(Time),
}

/// The outage after a probe, from the one recorded before it.
pub fn step(down_since: Option<&Time>, answered: bool) -> Outage {
    match (down_since, answered) {
        (None, true) => Outage::Up,
        (None, false) => Outage::Began,
        (Some(t), false) => Outage::Continues(t.clone()),
        (Some(t), true) => Outage::Ended(t.clone()),
    }
}

/// The catch-up sync's Pathling client, resolved at most every [`CLIENT_TTL`] per sync.
async fn client(ctx: &Context, ns: &str, bes: &str) -> Result<HttpClient, String> {
    static CLIENTS: OnceLock<Mutex<HashMap<String, (Instant, HttpClient)>>> = OnceLock::new();
    let key = format!("{ns}/{bes}");
    let cache = CLIENTS.get_or_init(Mutex::default);
    if let Some((at, c)) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
        && at.elapsed() < CLIENT_TTL
    {
        return Ok(c.clone());
    }
    let api: Api<BulkExportSync> = Api::namespaced(ctx.client.clone(), ns);
    let sync = api
        .get_opt(bes)
        .await
        .map_err(|e| format!("reading BulkExportSync {bes}: {e}"))?
        .ok_or_else(|| format!("the catch-up BulkExportSync {bes} does not exist"))?;
    let server = sync.spec.target.server();
    let what = "the catch-up BulkExportSync's spec.target";
    let timing = server_timing(&server, what).map_err(|e| e.join("; "))?;
    let c = resolve::http_client(&server, &timing, ns, ctx.secrets.as_ref(), what)
        .await
        .map_err(|e| e.failure.message)?
        .client;
    let mut m = cache.lock().unwrap_or_else(|p| p.into_inner());
    if m.len() > 10_000 {
        m.clear();
    }
    m.insert(key, (Instant::now(), c.clone()));
    Ok(c)
}

/// Probes the catch-up sync's Pathling, records the outage in `st` and asks for the catch-up run
/// when one ended. `from` is the FhirSubscriptionSync.
pub async fn watch(
    ctx: &Context,
    ns: &str,
    from: &str,
    bes: &str,
    st: &mut FhirSubscriptionSyncStatus,
    gen_: Option<i64>,
) {
    let answered = match client(ctx, ns, bes).await {
        Ok(c) => {
            let probe = tokio::time::timeout(PROBE_TIMEOUT, crate::fhir::capabilities::read(&c)).await;
            matches!(probe, Ok(Ok(_)))
        }
        Err(e) => {
            // not the target's fault: say so, and decide nothing
            tracing::warn!(fss = %format!("{ns}/{from}"), error = %e, "cannot watch the catch-up sync's Pathling");
            return;
        }
    };
    match step(st.target_unavailable_since.as_ref(), answered) {
        Outage::Up => {}
        Outage::Began => {
            st.target_unavailable_since = Some(Time(Timestamp::now()));
            mark_down(st, bes, gen_);
        }
        Outage::Continues(_) => mark_down(st, bes, gen_),
        Outage::Ended(since) => {
            st.target_unavailable_since = None;
            let secs = Timestamp::now().duration_since(since.0).as_secs().max(0);
            set_condition(
                &mut st.conditions,
                types::DEGRADED,
                false,
                "TargetAvailable",
                format!("Pathling answers again; a catch-up run of {bes} was requested"),
                gen_,
            );
            ctx.relay.request_catch_up(CatchUpRequest {
                namespace: ns.to_string(),
                from: from.to_string(),
                sync: bes.to_string(),
                why: format!(
                    "Pathling did not answer for about {secs} s from {} (the source may have dropped changes it could not deliver)",
                    since.0
                ),
            });
        }
    }
}

/// The `TargetUnavailable` degradation, while an outage lasts (set again after the rest of the
/// reconcile, which speaks of the Subscriptions only).
pub fn mark_down(st: &mut FhirSubscriptionSyncStatus, bes: &str, gen_: Option<i64>) {
    let Some(since) = st.target_unavailable_since.clone() else { return };
    set_condition(
        &mut st.conditions,
        types::DEGRADED,
        true,
        "TargetUnavailable",
        format!(
            "Pathling (the target of BulkExportSync {bes}) has not answered since {}: the source's deliveries fail \
             meanwhile, and a source gives up on them after its retries (HAPI: about a minute). A catch-up run of \
             {bes} starts when Pathling answers again",
            since.0
        ),
        gen_,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_recorded_once_and_ends_in_one_catch_up() {
        let t = Time("2026-12-02T03:00:00Z".parse().unwrap());
        let table = [
            (None, true, Outage::Up),
            (None, false, Outage::Began),
            (Some(&t), false, Outage::Continues(t.clone())),
            (Some(&t), true, Outage::Ended(t.clone())),
        ];
        for (before, answered, want) in table {
            assert_eq!(step(before, answered), want, "{before:?} {answered}");
        }
    }
}
