//! The FhirSubscriptionSync reconcile's decisions, apart from its actions: whether a failed
//! Subscription may be asked again, what a pass that could not reach the source says, and — from
//! what the source holds after the pass (`fhir::subscription::Outcome`) — the Subscriptions' states,
//! Ready and Degraded (set here, once per pass), the Events, a catch-up to ask for and when to look
//! again. No I/O; table-tested below. `subscription_sync.rs` talks to the source and carries it out.

use std::collections::HashMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::notes::Note;
use crate::api::conditions::{set_condition, types};
use crate::api::{Delivery, FhirSubscriptionSyncStatus, SubscriptionState};
use crate::fhir::retry::rules;
use crate::fhir::subscription::Outcome;

/// Whether a Subscription the previous pass saw in `error`/`off` (or re-requested) may be asked again
/// now: after `verifyInterval`, doubling with each re-request up to 30 minutes.
pub fn may_rerequest(prev: Option<&SubscriptionState>, verify: Duration, now: Timestamp) -> bool {
    match prev {
        Some(p) if matches!(p.status.as_str(), "error" | "off") || p.retries > 0 => {
            let wait = rules::rerequest(verify).wait(p.retries.saturating_add(1));
            let since = p.last_retry.as_ref().or(p.last_verified.as_ref()).map(|t| t.0).unwrap_or(now);
            now.duration_since(since).as_secs_f64() >= wait.as_secs_f64()
        }
        _ => false,
    }
}

/// Reasons a person must act on (Degraded); the others are retried quietly.
fn needs_person(reason: &str) -> bool {
    matches!(reason, "AuthFailed" | "SourceUnsupported" | "InvalidSpec" | "SubscriptionError")
}

/// A pass that cannot go on: Ready=False, and Degraded for errors a person must fix.
pub fn not_ready(st: &mut FhirSubscriptionSyncStatus, gen_: Option<i64>, reason: &str, msg: String) {
    set_condition(&mut st.conditions, types::READY, false, reason, msg.clone(), gen_);
    let person = needs_person(reason);
    let (why, text) = if person { (reason, msg) } else { ("Transient", "retrying".to_string()) };
    set_condition(&mut st.conditions, types::DEGRADED, person, why, text, gen_);
}

/// What a pass found on the source.
pub struct Found<'a> {
    pub before: &'a FhirSubscriptionSyncStatus,
    pub outcome: &'a Outcome,
    /// `rest-hook`, `topic` or `medplum`.
    pub kind: &'a str,
    /// The topic each criteria's Subscription is on.
    pub topics: &'a (dyn Fn(&str) -> Option<String> + Sync),
    pub delivery: Delivery,
    pub verify: Duration,
    pub now: Timestamp,
    pub generation: Option<i64>,
}

/// When to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    After(Duration),
    /// Some are still `requested`: look again after this; a first status that would only say
    /// "requested" may wait for that look instead of being written (one write instead of two).
    Requested(Duration),
}

/// The counts of the sync's Subscriptions by state (the gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub active: usize,
    pub failing: usize,
    pub requested: usize,
}

/// What the actor does after the pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub notes: Vec<Note>,
    /// Ask the relay for a catch-up now, for this reason.
    pub catch_up: Option<&'static str>,
    pub counts: Counts,
    pub next: Next,
}

/// The states, the conditions and the rest of a pass that reached the source.
pub fn found(f: &Found<'_>, st: &mut FhirSubscriptionSyncStatus) -> Verdict {
    let (o, now, gen_) = (f.outcome, f.now, f.generation);
    let mut notes = vec![];
    for (what, list) in [("Updated", &o.updated), ("Rerequested", &o.rerequested)] {
        for c in list {
            notes.push(Note::normal(what, "Subscription", format!("{what} the Subscription for {c:?} on the source")));
        }
    }
    for id in &o.deleted {
        let text = format!("deleted Subscription/{id} on the source (no longer wanted)");
        notes.push(Note::normal("Deleted", "Subscription", text));
    }
    // the Subscriptions now carry another credential or endpoint (a restart without
    // --relay-key-file makes a new key): deliveries the source still retries with the old ones will
    // be refused, so what changed meanwhile comes by a catch-up now, not after the source gives up
    let catch_up = (f.delivery == Delivery::Relay && !o.updated.is_empty()).then_some(
        "the Subscriptions were updated (credential or endpoint): deliveries in flight with the old ones are refused",
    );
    st.subscriptions = states(f);
    let total = st.subscriptions.len();
    let active = st.subscriptions.iter().filter(|s| s.status == "active").count();
    st.active_subscriptions = Some(format!("{active}/{total}"));
    let failing: Vec<&SubscriptionState> =
        st.subscriptions.iter().filter(|s| matches!(s.status.as_str(), "error" | "off")).collect();
    let counts = Counts { active, failing: failing.len(), requested: total - active - failing.len() };
    let was_degraded = |reason: &str| {
        f.before.conditions.iter().any(|c| c.type_ == types::DEGRADED && c.status == "True" && c.reason == reason)
    };
    let next = if !failing.is_empty() {
        let desc: Vec<String> = failing
            .iter()
            .map(|s| {
                let error = if s.error.is_empty() { String::new() } else { format!(": {}", s.error) };
                format!("{:?} (Subscription/{}) is {}{error}", s.criteria, s.id.clone().unwrap_or_default(), s.status)
            })
            .collect();
        let (reach, accepts) = match f.delivery {
            Delivery::Relay => ("the receiver (--receiver-url)", "spec.target.auth"),
            Delivery::Direct => ("spec.endpoint", "headersRef"),
        };
        let msg = format!(
            "{}; re-requested with backoff. Check that the source can reach {reach} and that Pathling accepts its writes ({accepts})",
            desc.join("; ")
        );
        if !was_degraded("SubscriptionError") {
            notes.push(Note::warning("SubscriptionError", "Verify", msg.clone()));
        }
        not_ready(st, gen_, "SubscriptionError", msg);
        Next::After(f.verify.min(Duration::from_secs(30)))
    } else if active < total {
        let msg = format!("{} of {total} Subscriptions are still requested: the source activates them", total - active);
        set_condition(&mut st.conditions, types::READY, false, "Requested", msg, gen_);
        match super::subscription_desired::stuck(&st.subscriptions, now, f.delivery) {
            Some(msg) => {
                let was = f.before.conditions.iter().any(|c| c.type_ == types::DEGRADED && c.reason == "NotActivated");
                if !was {
                    notes.push(Note::warning("NotActivated", "Verify", msg.clone()));
                }
                set_condition(&mut st.conditions, types::DEGRADED, true, "NotActivated", msg, gen_);
            }
            None => {
                set_condition(&mut st.conditions, types::DEGRADED, false, "Requested", "waiting for the source", gen_);
            }
        }
        // sources activate within seconds: look again soon
        Next::Requested(f.verify.min(Duration::from_secs(5)))
    } else {
        let msg = format!("all {total} Subscriptions are active on the source");
        set_condition(&mut st.conditions, types::READY, true, "AllActive", msg, gen_);
        set_condition(&mut st.conditions, types::DEGRADED, false, "AllActive", "all Subscriptions are active", gen_);
        Next::After(f.verify)
    };
    Verdict { notes, catch_up, counts, next }
}

/// Each Subscription's state, changed only where the source's answer changed it (a verification
/// that finds nothing new writes nothing).
fn states(f: &Found<'_>) -> Vec<SubscriptionState> {
    let prev: HashMap<&str, &SubscriptionState> =
        f.before.subscriptions.iter().map(|s| (s.criteria.as_str(), s)).collect();
    let now = Some(Time(f.now));
    f.outcome
        .states
        .iter()
        .map(|s| {
            let p = prev.get(s.criteria.as_str()).copied().filter(|p| p.id.as_deref() == Some(s.id.as_str()));
            let rerequested = f.outcome.rerequested.contains(&s.criteria);
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
            let unchanged = p.is_some_and(|p| p.status == s.status && p.error == error && p.retries == retries);
            SubscriptionState {
                criteria: s.criteria.clone(),
                kind: f.kind.into(),
                topic: (f.topics)(&s.criteria),
                since: match p {
                    Some(p) if p.status == s.status => p.since.clone(),
                    _ => now.clone(),
                },
                id: Some(s.id.clone()),
                status: s.status.clone(),
                last_verified: if unchanged { p.and_then(|p| p.last_verified.clone()) } else { now.clone() },
                error,
                retries,
                last_retry: if rerequested {
                    now.clone()
                } else if active {
                    None
                } else {
                    p.and_then(|p| p.last_retry.clone())
                },
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "subscription_plan_tests.rs"]
mod tests;
