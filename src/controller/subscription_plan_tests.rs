//! The FhirSubscriptionSync planner as tables: what the source holds after a pass → the states, the
//! conditions, the Events and the next look.

use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Value, json};

use super::*;
use crate::fhir::subscription::Existing;

const NOW: &str = "2026-12-02T08:00:00Z";

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn ago(secs: i64) -> Time {
    Time(now() - jiff::SignedDuration::from_secs(secs))
}

fn existing(criteria: &str, id: &str, status: &str, error: &str) -> Existing {
    Existing {
        id: id.into(),
        criteria: criteria.into(),
        status: status.into(),
        error: error.into(),
        resource: Value::Null,
    }
}

fn state(criteria: &str, id: &str, status: &str, since: i64, retries: u32) -> SubscriptionState {
    SubscriptionState {
        criteria: criteria.into(),
        kind: "rest-hook".into(),
        topic: None,
        id: Some(id.into()),
        status: status.into(),
        since: Some(ago(since)),
        error: String::new(),
        last_verified: Some(ago(60)),
        retries,
        last_retry: None,
    }
}

fn degraded(reason: &str) -> FhirSubscriptionSyncStatus {
    serde_json::from_value(json!({"conditions": [
        {"type": "Degraded", "status": "True", "reason": reason, "message": "m", "lastTransitionTime": "2026-12-02T07:00:00Z"}
    ]}))
    .unwrap()
}

fn with(mut st: FhirSubscriptionSyncStatus, subs: Vec<SubscriptionState>) -> FhirSubscriptionSyncStatus {
    st.subscriptions = subs;
    st
}

fn condition(st: &FhirSubscriptionSyncStatus, t: &str) -> (String, String) {
    let c = crate::api::conditions::get_condition(&st.conditions, t);
    c.map(|c| (c.status.clone(), c.reason.clone())).unwrap_or_else(|| ("-".into(), "-".into()))
}

fn pass(
    before: &FhirSubscriptionSyncStatus,
    outcome: &Outcome,
    delivery: Delivery,
) -> (FhirSubscriptionSyncStatus, Verdict) {
    let topics = |_: &str| None;
    let f = Found {
        before,
        outcome,
        kind: "rest-hook",
        topics: &topics,
        delivery,
        verify: Duration::from_secs(60),
        now: now(),
        generation: Some(1),
    };
    let mut st = before.clone();
    let v = found(&f, &mut st);
    (st, v)
}

#[test]
fn a_pass_that_reached_the_source_decides_states_conditions_and_events() {
    let p = "Patient?";
    let o = "Observation?";
    struct Want {
        ready: (&'static str, &'static str),
        degraded: (&'static str, &'static str),
        events: &'static [&'static str],
        next: Next,
        catch_up: bool,
    }
    type Case = (&'static str, FhirSubscriptionSyncStatus, Outcome, Delivery, Want);
    let table: Vec<Case> = vec![
        (
            "all active: Ready, not Degraded, a look after verifyInterval",
            FhirSubscriptionSyncStatus::default(),
            Outcome {
                states: vec![existing(p, "1", "active", ""), existing(o, "2", "active", "")],
                created: vec![p.into(), o.into()],
                ..Default::default()
            },
            Delivery::Direct,
            Want {
                ready: ("True", "AllActive"),
                degraded: ("False", "AllActive"),
                events: &[],
                next: Next::After(Duration::from_secs(60)),
                catch_up: false,
            },
        ),
        (
            "one in error: a Warning, Degraded SubscriptionError, a look within 30 s",
            FhirSubscriptionSyncStatus::default(),
            Outcome { states: vec![existing(p, "1", "error", "HTTP 401 from the endpoint")], ..Default::default() },
            Delivery::Direct,
            Want {
                ready: ("False", "SubscriptionError"),
                degraded: ("True", "SubscriptionError"),
                events: &["SubscriptionError"],
                next: Next::After(Duration::from_secs(30)),
                catch_up: false,
            },
        ),
        (
            "still in error: no second Warning",
            with(degraded("SubscriptionError"), vec![state(p, "1", "error", 120, 0)]),
            Outcome { states: vec![existing(p, "1", "error", "HTTP 401 from the endpoint")], ..Default::default() },
            Delivery::Direct,
            Want {
                ready: ("False", "SubscriptionError"),
                degraded: ("True", "SubscriptionError"),
                events: &[],
                next: Next::After(Duration::from_secs(30)),
                catch_up: false,
            },
        ),
        (
            "requested for a minute: waiting for the source, quietly",
            with(FhirSubscriptionSyncStatus::default(), vec![state(p, "1", "requested", 60, 0)]),
            Outcome { states: vec![existing(p, "1", "requested", "")], ..Default::default() },
            Delivery::Direct,
            Want {
                ready: ("False", "Requested"),
                degraded: ("False", "Requested"),
                events: &[],
                next: Next::Requested(Duration::from_secs(5)),
                catch_up: false,
            },
        ),
        (
            "requested for ten minutes: NotActivated, said once",
            with(FhirSubscriptionSyncStatus::default(), vec![state(p, "1", "requested", 600, 0)]),
            Outcome { states: vec![existing(p, "1", "requested", "")], ..Default::default() },
            Delivery::Relay,
            Want {
                ready: ("False", "Requested"),
                degraded: ("True", "NotActivated"),
                events: &["NotActivated"],
                next: Next::Requested(Duration::from_secs(5)),
                catch_up: false,
            },
        ),
        (
            "relay Subscriptions updated (a new credential): Events and a catch-up now",
            FhirSubscriptionSyncStatus::default(),
            Outcome {
                states: vec![existing(p, "1", "active", "")],
                updated: vec![p.into()],
                deleted: vec!["9".into()],
                ..Default::default()
            },
            Delivery::Relay,
            Want {
                ready: ("True", "AllActive"),
                degraded: ("False", "AllActive"),
                events: &["Updated", "Deleted"],
                next: Next::After(Duration::from_secs(60)),
                catch_up: true,
            },
        ),
        (
            "direct Subscriptions updated: no catch-up (fhirsync is not in the data path)",
            FhirSubscriptionSyncStatus::default(),
            Outcome { states: vec![existing(p, "1", "active", "")], updated: vec![p.into()], ..Default::default() },
            Delivery::Direct,
            Want {
                ready: ("True", "AllActive"),
                degraded: ("False", "AllActive"),
                events: &["Updated"],
                next: Next::After(Duration::from_secs(60)),
                catch_up: false,
            },
        ),
    ];
    for (what, before, outcome, delivery, want) in table {
        let (st, v) = pass(&before, &outcome, delivery);
        assert_eq!(condition(&st, types::READY), (want.ready.0.into(), want.ready.1.into()), "{what}: Ready");
        assert_eq!(
            condition(&st, types::DEGRADED),
            (want.degraded.0.into(), want.degraded.1.into()),
            "{what}: Degraded"
        );
        assert_eq!(v.notes.iter().map(|n| n.reason.as_str()).collect::<Vec<_>>(), want.events, "{what}: Events");
        assert_eq!(v.next, want.next, "{what}: next");
        assert_eq!(v.catch_up.is_some(), want.catch_up, "{what}: catch-up");
        let total = outcome.states.len();
        assert_eq!(v.counts.active + v.counts.failing + v.counts.requested, total, "{what}: counts");
    }
}

#[test]
fn states_change_only_where_the_source_changed_them() {
    let p = "Patient?";
    // nothing new: the state is kept as it was (no status write)
    let before = with(FhirSubscriptionSyncStatus::default(), vec![state(p, "1", "active", 3600, 0)]);
    let (st, _) = pass(
        &before,
        &Outcome { states: vec![existing(p, "1", "active", "")], ..Default::default() },
        Delivery::Direct,
    );
    assert_eq!(st.subscriptions, before.subscriptions);
    assert_eq!(st.active_subscriptions.as_deref(), Some("1/1"));

    // re-requested after an error: the retry is counted, the error still shown, the time kept
    let mut failed = state(p, "1", "error", 600, 1);
    failed.error = "HTTP 401".into();
    let before = with(degraded("SubscriptionError"), vec![failed]);
    let outcome =
        Outcome { states: vec![existing(p, "1", "requested", "")], rerequested: vec![p.into()], ..Default::default() };
    let (st, v) = pass(&before, &outcome, Delivery::Direct);
    let s = &st.subscriptions[0];
    assert_eq!((s.retries, s.error.as_str(), s.status.as_str()), (2, "HTTP 401", "requested"));
    assert_eq!(s.last_retry, Some(Time(now())));
    assert_eq!(s.since, Some(Time(now())), "a new status starts its time");
    assert_eq!(v.notes.iter().map(|n| n.reason.as_str()).collect::<Vec<_>>(), ["Rerequested"]);

    // active again: the count starts over
    let before = st.clone();
    let (st, _) = pass(
        &before,
        &Outcome { states: vec![existing(p, "1", "active", "")], ..Default::default() },
        Delivery::Direct,
    );
    assert_eq!((st.subscriptions[0].retries, st.subscriptions[0].last_retry.clone()), (0, None));

    // a Subscription the source re-created (another id) is new: no retries carried over
    let before = with(FhirSubscriptionSyncStatus::default(), vec![state(p, "1", "error", 600, 3)]);
    let (st, _) = pass(
        &before,
        &Outcome { states: vec![existing(p, "7", "error", "x")], ..Default::default() },
        Delivery::Direct,
    );
    assert_eq!(st.subscriptions[0].retries, 0);
}

#[test]
fn a_failed_subscription_is_asked_again_on_a_doubling_schedule() {
    let verify = Duration::from_secs(60);
    let in_error = |retries: u32, last: i64| {
        let mut s = state("Patient?", "1", "error", 3600, retries);
        s.last_retry = (retries > 0).then(|| ago(last));
        s.last_verified = Some(ago(last));
        s
    };
    type Case = (&'static str, Option<SubscriptionState>, bool);
    let table: Vec<Case> = vec![
        ("never seen: nothing to re-request", None, false),
        ("active: nothing to re-request", Some(state("Patient?", "1", "active", 600, 0)), false),
        ("in error for 59 s: not yet", Some(in_error(0, 59)), false),
        ("in error for a verifyInterval: again", Some(in_error(0, 60)), true),
        ("re-requested twice, 3 minutes ago: waits 4", Some(in_error(2, 180)), false),
        ("re-requested twice, 4 minutes ago: again", Some(in_error(2, 240)), true),
        ("re-requested 10 times: at most every 30 minutes", Some(in_error(10, 1800)), true),
        ("re-requested 10 times, 29 minutes ago: not yet", Some(in_error(10, 1740)), false),
    ];
    for (what, prev, want) in table {
        assert_eq!(may_rerequest(prev.as_ref(), verify, now()), want, "{what}");
    }
}

#[test]
fn a_pass_that_stops_says_whether_a_person_must_act() {
    for (reason, degraded) in
        [("AuthFailed", true), ("SourceUnsupported", true), ("InvalidSpec", true), ("SourceUnreachable", false)]
    {
        let mut st = FhirSubscriptionSyncStatus::default();
        not_ready(&mut st, Some(1), reason, "why".into());
        assert_eq!(condition(&st, types::READY), ("False".into(), reason.into()));
        let want =
            if degraded { ("True".to_string(), reason.to_string()) } else { ("False".into(), "Transient".into()) };
        assert_eq!(condition(&st, types::DEGRADED), want, "{reason}");
    }
}
