//! When the relay knows it missed changes, decided from what topic-based notifications say: event
//! numbers count per Subscription from its handshake, and `events-since-subscription-start` says how
//! many there were. Pure: the relay feeds it notifications and asks for a catch-up when it answers.

use std::collections::BTreeMap;

use super::notify::{Kind, TopicNotification};

/// Most Subscriptions tracked per sync (a sync owns one per criteria, at most 100).
const TRACKED_MAX: usize = 200;

/// What the relay has seen per Subscription (seeded from the sync's status after a restart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    /// The highest event number seen per Subscription id.
    pub last: BTreeMap<String, i64>,
}

impl Tracker {
    /// A tracker that remembers `last` (from status).
    pub fn seeded(last: BTreeMap<String, i64>) -> Self {
        Self { last }
    }

    /// Takes in a notification; returns what was missed, if anything.
    pub fn observe(&mut self, n: &TopicNotification) -> Option<String> {
        let sub = n.subscription.clone().unwrap_or_else(|| "(unnamed)".into());
        let mut missed = vec![];
        if n.status.as_deref().is_some_and(|s| s == "error" || s == "off") {
            missed
                .push(format!("the source reports Subscription/{sub} as {}", n.status.as_deref().unwrap_or_default()));
        }
        let last = self.last.get(&sub).copied();
        match n.kind {
            Kind::Handshake => {
                // a new handshake restarts the count: what happened before it was not delivered
                if last.is_some_and(|l| l > 0) {
                    missed.push(format!(
                        "Subscription/{sub} was handshaken again after event {}: changes while it was not active were not delivered",
                        last.unwrap_or_default()
                    ));
                }
                self.last.insert(sub.clone(), n.events_since_start.unwrap_or(0));
            }
            Kind::Heartbeat | Kind::QueryStatus => {
                if let (Some(l), Some(e)) = (last, n.events_since_start)
                    && e > l
                {
                    missed.push(format!("Subscription/{sub}: events {}–{e} never arrived", l.saturating_add(1)));
                    self.last.insert(sub.clone(), e);
                }
            }
            Kind::Event => {
                let mut numbers: Vec<i64> = n.events.iter().filter_map(|e| e.number).collect();
                numbers.sort_unstable();
                let mut expect = last.map(|l| l.saturating_add(1));
                for k in &numbers {
                    if let Some(x) = expect
                        && *k > x
                    {
                        missed.push(format!("Subscription/{sub}: events {x}–{} never arrived", k - 1));
                    }
                    expect = Some(expect.map_or(k.saturating_add(1), |x| x.max(k.saturating_add(1))));
                }
                if let Some(max) = numbers.last() {
                    let v = self.last.entry(sub.clone()).or_insert(0);
                    *v = (*v).max(*max);
                }
            }
            Kind::Other => {}
        }
        if n.unknowable > 0 {
            missed.push(format!(
                "Subscription/{sub}: {} events whose change the notification does not say (empty payload, or an entry naming nothing)",
                n.unknowable
            ));
        }
        // bounded: a source cannot grow the tracker with made-up Subscription ids
        while self.last.len() > TRACKED_MAX {
            let Some(k) = self.last.keys().find(|k| **k != sub).cloned() else { break };
            self.last.remove(&k);
        }
        (!missed.is_empty()).then(|| missed.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::notify::Event;

    fn n(kind: Kind, since: Option<i64>, numbers: &[i64]) -> TopicNotification {
        TopicNotification {
            subscription: Some("s1".into()),
            kind,
            status: Some("active".into()),
            events_since_start: since,
            events: numbers.iter().map(|k| Event { number: Some(*k), ..Default::default() }).collect(),
            changes: vec![],
            unknowable: 0,
        }
    }

    #[test]
    fn what_counts_as_missed() {
        let mut t = Tracker::default();
        // first handshake: nothing missed
        assert_eq!(t.observe(&n(Kind::Handshake, Some(0), &[])), None);
        assert_eq!(t.observe(&n(Kind::Event, Some(1), &[1])), None);
        assert_eq!(t.observe(&n(Kind::Event, Some(2), &[2])), None);
        // a retried notification (the same number again) is not a gap
        assert_eq!(t.observe(&n(Kind::Event, Some(2), &[2])), None);
        // 3 and 4 never came
        assert!(t.observe(&n(Kind::Event, Some(5), &[5])).unwrap().contains("events 3–4"));
        // a heartbeat that counts more events than were seen
        assert!(t.observe(&n(Kind::Heartbeat, Some(7), &[])).unwrap().contains("events 6–7"));
        assert_eq!(t.observe(&n(Kind::Heartbeat, Some(7), &[])), None);
        // a second handshake (the source re-armed it): what happened meanwhile was lost
        assert!(t.observe(&n(Kind::Handshake, Some(0), &[])).unwrap().contains("handshaken again"));
        assert_eq!(t.observe(&n(Kind::Event, Some(1), &[1])), None);
        // an error status, an empty payload
        let mut e = n(Kind::Event, Some(2), &[2]);
        e.status = Some("error".into());
        assert!(t.observe(&e).unwrap().contains("as error"));
        let mut e = n(Kind::Event, Some(3), &[3]);
        e.unknowable = 1;
        assert!(t.observe(&e).unwrap().contains("empty payload"));
        // after a restart, seeded from status: a gap across the restart is seen
        let mut t = Tracker::seeded([("s1".to_string(), 10)].into());
        assert!(t.observe(&n(Kind::Event, Some(12), &[12])).unwrap().contains("events 11–11"));
    }
}
