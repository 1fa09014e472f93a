//! FhirSubscriptionSync controller: ensure, verify, repair and finally remove the Subscriptions (and,
//! for topic-based sources, the topics) on the source; in Relay mode, configure the relay and show
//! its counters. The protocol lives in `fhir::subscription` and `relay`; this maps spec to desired
//! Subscriptions and outcomes to status (`subscription_desired.rs` builds what is desired).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::{Context, Error, ReadyCheck};
use crate::api::conditions::{set_condition, set_insecure_tls, types};
use crate::api::validate::{server_timing, validate_subscription_sync};
use crate::api::{
    Delivery, FINALIZER_SUBSCRIPTIONS, FhirSubscriptionSync, FhirSubscriptionSyncStatus, OWNER_TAG_SYSTEM,
    SubscriptionState,
};
use crate::fhir::client::Error as HttpError;
use crate::fhir::retry::rules;
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

/// Sets Ready=False (and Degraded for errors a person must fix) and schedules the next attempt.
fn not_ready(st: &mut FhirSubscriptionSyncStatus, gen_: Option<i64>, reason: &str, msg: String) {
    set_condition(&mut st.conditions, types::READY, false, reason, msg.clone(), gen_);
    let needs_person = matches!(reason, "AuthFailed" | "SourceUnsupported" | "InvalidSpec" | "SubscriptionError");
    set_condition(
        &mut st.conditions,
        types::DEGRADED,
        needs_person,
        if needs_person { reason } else { "Transient" },
        if needs_person { msg } else { "retrying".into() },
        gen_,
    );
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
    let mut plan = match super::subscription_desired::plan(&ctx, &obj, &caps, client.http()).await {
        Ok(p) => p,
        Err((reason, msg)) => {
            not_ready(&mut st, gen_, &reason, msg);
            write_status(&api, &obj, &before, &st).await?;
            return Ok(retry_soon);
        }
    };
    let desired = std::mem::take(&mut plan.desired);
    let prev: HashMap<String, SubscriptionState> =
        before.subscriptions.iter().map(|s| (s.criteria.clone(), s.clone())).collect();
    let now = Timestamp::now();
    // re-request a Subscription seen in error/off at the previous pass, with exponential backoff
    // (base verifyInterval, at most 30 minutes)
    let may_retry = |c: &str| match prev.get(c) {
        Some(p) if matches!(p.status.as_str(), "error" | "off") || p.retries > 0 => {
            let wait = rules::rerequest(verify).wait(p.retries.saturating_add(1));
            let since = p.last_retry.as_ref().or(p.last_verified.as_ref()).map(|t| t.0).unwrap_or(now);
            now.duration_since(since).as_secs_f64() >= wait.as_secs_f64()
        }
        _ => false,
    };
    let tag = owner_tag(&obj);
    let outcome = match client.reconcile(&tag, &desired, may_retry).await {
        Ok(o) => {
            // topics no longer served by any criteria go (after their Subscriptions)
            if let Some(topics) = &plan.topics
                && let Err(e) = topics.remove_owned(&tag, &plan.topic_urls).await
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
            let hint = if crate::fhir::class::refuses(&e, crate::fhir::class::Ask::Create) {
                " — the source refused the Subscription: does it allow rest-hook channels (HAPI: hapi.fhir.subscription.resthook_enabled: true) and this criteria?"
            } else {
                ""
            };
            not_ready(&mut st, gen_, reason, format!("{e}{hint}"));
            write_status(&api, &obj, &before, &st).await?;
            return Ok(retry_soon);
        }
    };
    if spec.delivery == Delivery::Relay && !outcome.updated.is_empty() {
        // the Subscriptions now carry another credential or endpoint (a restart without
        // --relay-key-file makes a new key): deliveries the source still retries with the old ones
        // will be refused, so what changed meanwhile comes by a catch-up now, not after the source
        // gives up on its retries
        ctx.relay.catch_up_now(
            &ns,
            &name,
            "the Subscriptions were updated (credential or endpoint): deliveries in flight with the old ones are refused",
        );
    }
    for (what, list) in [("Updated", &outcome.updated), ("Rerequested", &outcome.rerequested)] {
        for c in list {
            ctx.event(
                obj.as_ref(),
                EventType::Normal,
                what,
                "Subscription",
                format!("{what} the Subscription for {c:?} on the source"),
            )
            .await;
        }
    }
    for c in &outcome.created {
        tracing::info!(fss = %format!("{ns}/{name}"), criteria = %c, "created a Subscription on the source");
    }
    for id in &outcome.deleted {
        ctx.event(
            obj.as_ref(),
            EventType::Normal,
            "Deleted",
            "Subscription",
            format!("deleted Subscription/{id} on the source (no longer wanted)"),
        )
        .await;
    }
    st.subscriptions = outcome
        .states
        .iter()
        .map(|s| {
            let p = prev.get(&s.criteria).filter(|p| p.id.as_deref() == Some(s.id.as_str()));
            let rerequested = outcome.rerequested.contains(&s.criteria);
            let active = s.status == "active";
            let retries = match (active, rerequested) {
                (true, _) => 0,
                (false, true) => p.map(|p| p.retries).unwrap_or(0) + 1,
                (false, false) => p.map(|p| p.retries).unwrap_or(0),
            };
            // keep showing the last error while a re-requested Subscription is not active yet
            let error = if s.error.is_empty() && !active && retries > 0 {
                p.map(|p| p.error.clone()).unwrap_or_default()
            } else {
                crate::text::peer_text(&s.error, crate::text::PEER_TEXT_MAX)
            };
            // written only when the state changes: a verification that finds nothing new writes nothing
            let unchanged = p.is_some_and(|p| p.status == s.status && p.error == error && p.retries == retries);
            let since = match p {
                Some(p) if p.status == s.status => p.since.clone(),
                _ => Some(Time(now)),
            };
            SubscriptionState {
                criteria: s.criteria.clone(),
                kind: plan.kind.into(),
                topic: plan.topic_of(&s.criteria),
                since,
                id: Some(s.id.clone()),
                status: s.status.clone(),
                last_verified: if unchanged { p.and_then(|p| p.last_verified.clone()) } else { Some(Time(now)) },
                error,
                retries,
                last_retry: if rerequested {
                    Some(Time(now))
                } else if active {
                    None
                } else {
                    p.and_then(|p| p.last_retry.clone())
                },
            }
        })
        .collect();
    let total = st.subscriptions.len();
    let active = st.subscriptions.iter().filter(|s| s.status == "active").count();
    st.active_subscriptions = Some(format!("{active}/{total}"));
    let failing: Vec<&SubscriptionState> =
        st.subscriptions.iter().filter(|s| matches!(s.status.as_str(), "error" | "off")).collect();
    for (state, n) in [("active", active), ("failing", failing.len()), ("requested", total - active - failing.len())] {
        ctx.metrics
            .subscriptions
            .get_or_create(&crate::metrics::SubscriptionLabels {
                namespace: ns.clone(),
                name: name.clone(),
                state: state.into(),
            })
            .set(n as i64);
    }
    let action = if !failing.is_empty() {
        let desc: Vec<String> = failing
            .iter()
            .map(|s| {
                format!(
                    "{:?} (Subscription/{}) is {}{}",
                    s.criteria,
                    s.id.clone().unwrap_or_default(),
                    s.status,
                    if s.error.is_empty() { String::new() } else { format!(": {}", s.error) }
                )
            })
            .collect();
        let msg = format!(
            "{}; re-requested with backoff. Check that the source can reach {} and that Pathling accepts its writes ({})",
            desc.join("; "),
            if spec.delivery == Delivery::Relay { "the receiver (--receiver-url)" } else { "spec.endpoint" },
            if spec.delivery == Delivery::Relay { "spec.target.auth" } else { "headersRef" }
        );
        let was = before
            .conditions
            .iter()
            .any(|c| c.type_ == types::DEGRADED && c.status == "True" && c.reason == "SubscriptionError");
        if !was {
            ctx.event(obj.as_ref(), EventType::Warning, "SubscriptionError", "Verify", msg.clone()).await;
        }
        not_ready(&mut st, gen_, "SubscriptionError", msg);
        retry_soon
    } else if active < total {
        set_condition(
            &mut st.conditions,
            types::READY,
            false,
            "Requested",
            format!("{} of {total} Subscriptions are still requested: the source activates them", total - active),
            gen_,
        );
        match super::subscription_desired::stuck(&st.subscriptions, now, spec.delivery) {
            Some(msg) => {
                let was = before.conditions.iter().any(|c| c.type_ == types::DEGRADED && c.reason == "NotActivated");
                if !was {
                    ctx.event(obj.as_ref(), EventType::Warning, "NotActivated", "Verify", msg.clone()).await;
                }
                set_condition(&mut st.conditions, types::DEGRADED, true, "NotActivated", msg, gen_);
            }
            None => {
                set_condition(&mut st.conditions, types::DEGRADED, false, "Requested", "waiting for the source", gen_);
            }
        }
        // sources activate within seconds: look again soon — and a first status that would only
        // say "requested" waits for that look (one write instead of two)
        if before.observed_generation.is_none() && ctx.defer_first_write(&uid) {
            return Ok(requeue(Duration::from_secs(2)));
        }
        requeue(verify.min(Duration::from_secs(5)))
    } else {
        set_condition(
            &mut st.conditions,
            types::READY,
            true,
            "AllActive",
            format!("all {total} Subscriptions are active on the source"),
            gen_,
        );
        set_condition(&mut st.conditions, types::DEGRADED, false, "AllActive", "all Subscriptions are active", gen_);
        requeue(verify)
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
