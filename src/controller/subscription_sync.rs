//! FhirSubscriptionSync controller: ensure, verify, repair and finally remove the Subscriptions (and,
//! for topic-based sources, the topics) on the source; in Relay mode, configure the relay and show
//! its counters. The protocol lives in `fhir::subscription` and `relay`; this maps spec to desired
//! Subscriptions and outcomes to status (`subscription_desired.rs` builds what is desired).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::subscription_plan::{self as plan, not_ready};
use super::{Context, Error, ReadyCheck};
use crate::api::conditions::{set_condition, set_insecure_tls, types};
use crate::api::validate::{server_timing, validate_subscription_sync};
use crate::api::{
    Delivery, FINALIZER_SUBSCRIPTIONS, FhirSubscriptionSync, FhirSubscriptionSyncStatus, OWNER_TAG_SYSTEM,
    SubscriptionState,
};
use crate::fhir::client::Error as HttpError;
use crate::fhir::subscription::{SubscriptionClient, Tag};
use crate::run::resolve;

/// Builds the controller future and its cache-sync check.
pub fn controller(
    ctx: Arc<Context>,
    ns: Option<String>,
    stop: CancellationToken,
) -> (BoxFuture<'static, ()>, ReadyCheck) {
    let (stream, store) = super::cache::watch::<FhirSubscriptionSync>(&ctx.client, &ns);
    // the relay's counters changed: the status follows
    let wake = super::relay::wakeups(&ctx.relay_wake, ns);
    super::launch(Controller::for_stream(stream, store).reconcile_on(wake), ctx, stop, reconcile)
}

async fn reconcile(obj: Arc<FhirSubscriptionSync>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<FhirSubscriptionSync> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER_SUBSCRIPTIONS, obj, |event| async {
        match event {
            Finalizer::Apply(o) => apply(o, ctx.clone()).await,
            Finalizer::Cleanup(o) => cleanup(o, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub(super) fn owner_tag(obj: &FhirSubscriptionSync) -> Tag {
    Tag {
        system: OWNER_TAG_SYSTEM.into(),
        code: format!("{}/{}/{}", obj.namespace().unwrap_or_default(), obj.name_any(), obj.uid().unwrap_or_default()),
    }
}

pub(super) async fn write_status(
    api: &Api<FhirSubscriptionSync>,
    obj: &FhirSubscriptionSync,
    before: &FhirSubscriptionSyncStatus,
    st: &FhirSubscriptionSyncStatus,
) -> Result<bool, Error> {
    if st == before {
        return Ok(true);
    }
    match super::status::apply(api, &obj.name_any(), obj.resource_version().as_deref(), st).await? {
        super::status::Applied::Written(_) => Ok(true),
        super::status::Applied::Conflict | super::status::Applied::Gone | super::status::Applied::NotHeld => Ok(false),
    }
}

/// The reason word for a source's error: by its class, as everywhere.
fn http_reason(e: &HttpError, otherwise: &'static str) -> &'static str {
    crate::fhir::class::classify(e).reason("SourceUnreachable", otherwise)
}

async fn apply(obj: Arc<FhirSubscriptionSync>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let gen_ = obj.metadata.generation;
    let api: Api<FhirSubscriptionSync> = Api::namespaced(ctx.client.clone(), &ns);
    let before = obj.status.clone().unwrap_or_default();
    let mut st = before.clone();
    st.observed_generation = gen_;
    let spec = &obj.spec;
    set_insecure_tls(&mut st.conditions, spec.source.tls.as_ref().is_some_and(|t| t.insecure_skip_verify), gen_);
    let verify = match validate_subscription_sync(spec) {
        Ok(v) => v,
        Err(m) => {
            not_ready(&mut st, gen_, "InvalidSpec", format!("{m}; fix the spec"));
            write_status(&api, &obj, &before, &st).await?;
            return Ok(Action::await_change());
        }
    };
    // Direct with catchUp: fhirsync is not in the data path, so it watches Pathling instead
    let watched = match (spec.delivery, &spec.catch_up) {
        (Delivery::Direct, Some(c)) => {
            let bes = c.bulk_export_sync_ref.name.clone();
            super::target_watch::watch(&ctx, &ns, &name, &bes, &mut st, gen_).await;
            Some(bes)
        }
        _ => None,
    };
    let every = watched.as_ref().map(|_| super::target_watch::PROBE_EVERY);
    let requeue = |d: Duration| Action::requeue(every.map_or(d, |p| d.min(p)));
    let retry_soon = requeue(verify.min(Duration::from_secs(30)));
    // every verifyInterval (the watch ignores our own status writes); after a restart the first
    // verifications of settled syncs are spread over the interval instead of all at once
    let uid = obj.uid().unwrap_or_default();
    let settled = before.observed_generation == gen_
        && before.conditions.iter().any(|c| c.type_ == types::READY && c.status == "True");
    if spec.delivery == Delivery::Relay {
        if ctx.relay.status(&ns, &name).is_none() {
            // new to this process (a restart, a new leader): relay at once, verify on schedule
            let timing = server_timing(&spec.source, "spec.source").unwrap_or_else(|_| default_timing());
            if let Ok(h) = resolve::http_client(&spec.source, &timing, &ns, ctx.secrets.as_ref(), "spec.source").await {
                let _ = super::subscription_desired::configure_relay(&ctx, &obj, &h.client).await;
            }
        }
        st.relay = ctx.relay.status(&ns, &name).or(st.relay.take());
        super::subscription_desired::missed_condition(&mut st, spec, gen_);
    }
    if let Some(wait) = ctx.verification_wait(&uid, verify, settled) {
        write_status(&api, &obj, &before, &st).await?;
        return Ok(requeue(wait));
    }
    ctx.verified(&uid);
    let timing = server_timing(&spec.source, "spec.source").unwrap_or_else(|_| default_timing());

    let http = match resolve::http_client(&spec.source, &timing, &ns, ctx.secrets.as_ref(), "spec.source").await {
        Ok(h) => h.client,
        Err(f) => {
            not_ready(&mut st, gen_, f.failure.reason.as_str(), f.failure.message);
            write_status(&api, &obj, &before, &st).await?;
            return Ok(retry_soon);
        }
    };
    let client = SubscriptionClient::new(http);
    let caps = match client.capabilities().await {
        Ok(c) => c,
        Err(e) => {
            let reason = http_reason(&e, "SourceUnsupported");
            not_ready(&mut st, gen_, reason, format!("reading the source's CapabilityStatement: {e}"));
            write_status(&api, &obj, &before, &st).await?;
            return Ok(retry_soon);
        }
    };
    st.fhir_version = Some(caps.fhir_version.clone());
    let unsupported = match spec.delivery {
        Delivery::Direct => caps.direct_unsupported(),
        Delivery::Relay => caps.unsupported(),
    };
    if let Some(why) = unsupported {
        not_ready(&mut st, gen_, "SourceUnsupported", why);
        write_status(&api, &obj, &before, &st).await?;
        return Ok(requeue(verify));
    }
    let mut desired_plan = match super::subscription_desired::prepare(&ctx, &obj, &caps, client.http()).await {
        Ok(p) => p,
        Err((reason, msg)) => {
            not_ready(&mut st, gen_, &reason, msg);
            write_status(&api, &obj, &before, &st).await?;
            return Ok(retry_soon);
        }
    };
    let desired = std::mem::take(&mut desired_plan.desired);
    let prev: HashMap<&str, &SubscriptionState> =
        before.subscriptions.iter().map(|s| (s.criteria.as_str(), s)).collect();
    let now = Timestamp::now();
    let may_retry = |c: &str| plan::may_rerequest(prev.get(c).copied(), verify, now);
    let tag = owner_tag(&obj);
    let outcome = match client.reconcile(&tag, &desired, may_retry).await {
        Ok(o) => {
            // topics no longer served by any criteria go (after their Subscriptions)
            if let Some(topics) = &desired_plan.topics
                && let Err(e) = topics.remove_owned(&tag, &desired_plan.topic_urls).await
            {
                tracing::warn!(fss = %format!("{ns}/{name}"), error = %e, "could not remove unused topics");
            }
            Ok(o)
        }
        Err(e) => Err(e),
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let reason = http_reason(&e, "SubscriptionError");
            // (a 403 is the credentials' business: AuthFailed says so)
            let refused = crate::fhir::class::refuses(&e, crate::fhir::class::Ask::Create);
            let hint = if refused && reason != "AuthFailed" {
                " — the source refused the Subscription: does it allow rest-hook channels (HAPI: hapi.fhir.subscription.resthook_enabled: true) and this criteria?"
            } else {
                ""
            };
            not_ready(&mut st, gen_, reason, format!("{e}{hint}"));
            write_status(&api, &obj, &before, &st).await?;
            return Ok(retry_soon);
        }
    };
    for c in &outcome.created {
        tracing::info!(fss = %format!("{ns}/{name}"), criteria = %c, "created a Subscription on the source");
    }
    let topics = |c: &str| desired_plan.topic_of(c);
    let found = plan::Found {
        before: &before,
        outcome: &outcome,
        kind: desired_plan.kind,
        topics: &topics,
        delivery: spec.delivery,
        verify,
        now,
        generation: gen_,
    };
    let verdict = plan::found(&found, &mut st);
    if let Some(why) = verdict.catch_up {
        ctx.relay.catch_up_now(&ns, &name, why);
    }
    super::notes::publish(&ctx, obj.as_ref(), &verdict.notes).await;
    let c = verdict.counts;
    for (state, n) in [("active", c.active), ("failing", c.failing), ("requested", c.requested)] {
        let labels =
            crate::metrics::SubscriptionLabels { namespace: ns.clone(), name: name.clone(), state: state.into() };
        ctx.metrics.subscriptions.get_or_create(&labels).set(n as i64);
    }
    let action = match verdict.next {
        plan::Next::After(d) => requeue(d),
        plan::Next::Requested(d) => {
            if before.observed_generation.is_none() && ctx.defer_first_write(&uid) {
                return Ok(requeue(Duration::from_secs(2)));
            }
            requeue(d)
        }
    };
    if spec.delivery == Delivery::Relay {
        st.relay = ctx.relay.status(&ns, &name).or(st.relay.take());
        super::subscription_desired::missed_condition(&mut st, spec, gen_);
    }
    if let Some(bes) = &watched {
        super::target_watch::mark_down(&mut st, bes, gen_);
    }
    if !write_status(&api, &obj, &before, &st).await? {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    Ok(action)
}

async fn cleanup(obj: Arc<FhirSubscriptionSync>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.verifications.lock().unwrap_or_else(|p| p.into_inner()).remove(&obj.uid().unwrap_or_default());
    ctx.deferred.lock().unwrap_or_else(|p| p.into_inner()).remove(&obj.uid().unwrap_or_default());
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let api: Api<FhirSubscriptionSync> = Api::namespaced(ctx.client.clone(), &ns);
    let timing = server_timing(&obj.spec.source, "spec.source").unwrap_or_else(|_| default_timing());
    ctx.relay.forget(&ns, &name);
    let result = match resolve::http_client(&obj.spec.source, &timing, &ns, ctx.secrets.as_ref(), "spec.source").await {
        Err(f) => Err(f.failure.message),
        Ok(h) => super::subscription_desired::remove_all(h.client, &owner_tag(&obj)).await.map_err(|e| e.to_string()),
    };
    match result {
        Ok(n) => {
            ctx.event(
                obj.as_ref(),
                EventType::Normal,
                "Cleaned",
                "Cleanup",
                format!("removed {n} Subscriptions and topics from the source"),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(msg) => {
            let before = obj.status.clone().unwrap_or_default();
            let mut st = before.clone();
            let msg = format!(
                "cannot remove the Subscriptions from the source: {msg}. fhirsync keeps trying; to give up and leave \
                 them on the source: kubectl patch fss {name} -n {ns} --type=json -p '[{{\"op\":\"remove\",\"path\":\"/metadata/finalizers\"}}]'"
            );
            set_condition(
                &mut st.conditions,
                types::DEGRADED,
                true,
                "CleanupBlocked",
                msg.clone(),
                obj.metadata.generation,
            );
            write_status(&api, &obj, &before, &st).await?;
            Err(Error::CleanupBlocked(msg))
        }
    }
}

/// Timing for a source whose spec values are out of range (reported as InvalidSpec elsewhere): the
/// defaults, so that cleanup can still reach it.
fn default_timing() -> crate::api::validate::ServerTiming {
    crate::api::validate::ServerTiming {
        connect: Duration::from_secs(10),
        response: Duration::from_secs(60),
        idle: Duration::from_secs(120),
        max_poll: crate::api::validate::DEFAULT_MAX_POLL,
    }
}
