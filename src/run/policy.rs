//! THE failure policy of a run: every error is classified once, here, and each class has one bounded
//! answer. Nothing else in fhirsync decides whether to retry a peer.
//!
//! | class        | what                                                     | answer                                   |
//! |--------------|----------------------------------------------------------|------------------------------------------|
//! | Busy         | 429, Pathling's import lock (503), an export cap          | wait (Retry-After, growing), bounded by runTimeout |
//! | Transient    | 5xx, 408, OperationOutcome `transient`, broken connection | retry, at most [`MAX_STREAK`] in a row    |
//! | Unreachable  | cannot connect / host does not resolve                    | first contact: fail at once with a hint; later: like Transient |
//! | Auth         | 401, 403, a credential that cannot be produced            | fail (`AuthFailed`)                      |
//! | Permanent    | any other answer, a protocol violation, an over-large body | fail with the phase's reason            |
//! | Invalid      | the configuration cannot work                             | fail (`InvalidSpec`)                     |

use std::time::Duration;

use crate::fhir::client::Error as HttpError;
use crate::fhir::retry::{Backoff, rules};

/// Machine-readable reasons used in conditions and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InvalidSpec,
    AuthFailed,
    SourceUnreachable,
    TargetUnreachable,
    ExportFailed,
    TransferFailed,
    ImportFailed,
    RunTimeout,
    Cancelled,
    PartialExport,
    /// A verification could not compare (Pathling's export failed, an id file could not be read).
    VerifyFailed,
}

impl Reason {
    /// CamelCase reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidSpec => "InvalidSpec",
            Reason::AuthFailed => "AuthFailed",
            Reason::SourceUnreachable => "SourceUnreachable",
            Reason::TargetUnreachable => "TargetUnreachable",
            Reason::ExportFailed => "ExportFailed",
            Reason::TransferFailed => "TransferFailed",
            Reason::ImportFailed => "ImportFailed",
            Reason::RunTimeout => "RunTimeout",
            Reason::Cancelled => "Cancelled",
            Reason::PartialExport => "PartialExport",
            Reason::VerifyFailed => "VerifyFailed",
        }
    }
}

/// A run failure: a reason and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
}

impl Failure {
    /// Builds a failure.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

pub use crate::fhir::class::{Class, classify};

/// Most consecutive transient failures before a run fails (the README promises this number).
pub const MAX_STREAK: u32 = rules::TRANSIENT_STREAK;
/// Longest wait while a peer says it is busy.
pub const BUSY_MAX: Duration = rules::BUSY.max;

/// Which peer an attempt talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Source,
    Target,
}

impl Peer {
    fn unreachable(self) -> Reason {
        match self {
            Peer::Source => Reason::SourceUnreachable,
            Peer::Target => Reason::TargetUnreachable,
        }
    }
    fn field(self) -> &'static str {
        match self {
            Peer::Source => "spec.source.url",
            Peer::Target => "spec.target.url",
        }
    }
}

/// One attempt that failed: what it was, toward whom, and which reason a permanent failure gets.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub what: &'a str,
    pub peer: Peer,
    pub reason: Reason,
    /// No answer has ever come from this peer in this run: a connect failure is a wrong URL.
    pub first_contact: bool,
}

/// Consecutive failures of a run in this process (a restart starts afresh: the bound is per process
/// life, and a restarted run waits at least as long as the first failures took).
#[derive(Debug, Default, Clone, Copy)]
pub struct Streaks {
    pub transient: u32,
    pub busy: u32,
}

impl Streaks {
    /// A request succeeded: the streaks end.
    pub fn ok(&mut self) {
        *self = Streaks::default();
    }
}

/// What to do about a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this wait; the message says so.
    Retry { wait: Duration, message: String },
    /// The run fails.
    Fail(Failure),
}

/// Decides about one failed attempt: the policy table above, as code.
pub fn decide(a: Attempt<'_>, e: &HttpError, streaks: &mut Streaks) -> Decision {
    let class = classify(e);
    match class {
        Class::Unreachable if a.first_contact => {
            let hint = e.first_contact_hint().unwrap_or("check the URL");
            Decision::Fail(Failure::new(
                a.peer.unreachable(),
                format!("{}: {e} — this was the first request to {}: {hint}", a.what, a.peer.field()),
            ))
        }
        Class::Transient | Class::Unreachable => {
            if streaks.transient >= MAX_STREAK {
                let reason = if class == Class::Unreachable { a.peer.unreachable() } else { a.reason };
                return Decision::Fail(Failure::new(
                    reason,
                    format!("{}: {e} ({MAX_STREAK} failures in a row; the next run tries again)", a.what),
                ));
            }
            streaks.transient += 1;
            let wait = rules::TRANSIENT.wait(streaks.transient).max(e.retry_after().unwrap_or_default());
            Decision::Retry {
                wait,
                message: format!("{}: {e}; retry {}/{MAX_STREAK} in {}", a.what, streaks.transient, show(wait)),
            }
        }
        Class::Busy => {
            streaks.busy = streaks.busy.saturating_add(1);
            // a peer that is busy forever costs a bounded number of requests: the wait grows
            let wait = rules::BUSY.wait(streaks.busy).max(e.retry_after().unwrap_or_default()).min(BUSY_MAX);
            // the same message for every busy answer: waiting is not news (no status write per retry)
            Decision::Retry { wait, message: format!("{}: the server is busy ({e}); waiting", a.what) }
        }
        Class::Auth => {
            let hint = crate::fhir::class::auth_hint(e).map(|h| format!(" — {h}")).unwrap_or_default();
            Decision::Fail(Failure::new(Reason::AuthFailed, format!("{}: {e}{hint}", a.what)))
        }
        Class::Permanent | Class::Unsupported => Decision::Fail(Failure::new(a.reason, format!("{}: {e}", a.what))),
        Class::Invalid => Decision::Fail(Failure::new(Reason::InvalidSpec, format!("{}: {e}", a.what))),
    }
}

/// The first wait of a poll schedule.
pub const EARLY_POLL: Duration = rules::POLL.first;

/// The wait before poll number `polls` (0: the first after the kick-off or submission) of an
/// asynchronous job. Polls start early and double (100 ms, 200 ms, 400 ms …): a small job ends in
/// well under a second, and a fixed first wait is most of a small run. The doubling stops at what
/// the server asks (`Retry-After`), or at 60 s without one; a wait is never below 1/50 of the time
/// already spent waiting — so a job that never ends costs a number of polls that grows with the log
/// of its duration, whatever the server says — and never above the user's `maxPollInterval`.
pub fn poll_wait(server: Option<Duration>, polls: u32, waited: Duration, max: Duration) -> Duration {
    let base = Backoff::new(EARLY_POLL, server.unwrap_or(rules::POLL.max)).wait(polls.saturating_add(1));
    base.max(waited / 50).clamp(EARLY_POLL, max.max(EARLY_POLL))
}

fn show(d: Duration) -> String {
    crate::api::units::show(Duration::from_millis(d.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::class::status_error as status;

    #[test]
    fn transient_failures_are_bounded_and_a_first_refusal_fails_at_once() {
        let a =
            Attempt { what: "export kick-off", peer: Peer::Source, reason: Reason::ExportFailed, first_contact: false };
        let mut s = Streaks::default();
        let e = status(500, true, false, None);
        for n in 1..=MAX_STREAK {
            match decide(a, &e, &mut s) {
                Decision::Retry { message, .. } => {
                    assert!(message.contains(&format!("retry {n}/{MAX_STREAK}")), "{message}")
                }
                d => panic!("attempt {n}: {d:?}"),
            }
        }
        match decide(a, &e, &mut s) {
            Decision::Fail(f) => assert_eq!(f.reason, Reason::ExportFailed),
            d => panic!("{d:?}"),
        }
        let refused =
            HttpError::Transport { url: "http://h:1/".into(), message: "connection refused".into(), connect: true };
        let first = Attempt { first_contact: true, peer: Peer::Target, ..a };
        match decide(first, &refused, &mut Streaks::default()) {
            Decision::Fail(f) => {
                assert_eq!(f.reason, Reason::TargetUnreachable);
                assert!(f.message.contains("spec.target.url") && f.message.contains("host and port"), "{}", f.message);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn busy_waits_grow_and_honour_retry_after() {
        let a = Attempt { what: "x", peer: Peer::Target, reason: Reason::ImportFailed, first_contact: false };
        let mut s = Streaks::default();
        let waits: Vec<Duration> = (0..12)
            .map(|_| match decide(a, &status(503, true, true, None), &mut s) {
                Decision::Retry { wait, .. } => wait,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(waits[0], Duration::from_secs(1));
        assert_eq!(waits[11], BUSY_MAX);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        let mut s = Streaks::default();
        match decide(a, &status(429, false, true, Some(30)), &mut s) {
            Decision::Retry { wait, .. } => assert_eq!(wait, Duration::from_secs(30)),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn polls_are_paced() {
        let max = Duration::from_secs(300);
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        type Case = (&'static str, Option<Duration>, u32, Duration, Duration, Duration);
        let table: Vec<Case> = vec![
            ("the first poll comes early, whatever the server says", Some(s(120)), 0, s(0), max, ms(100)),
            ("then the waits double", Some(s(120)), 3, s(1), max, ms(800)),
            ("up to the server's Retry-After", Some(s(120)), 12, s(400), max, s(120)),
            ("never above maxPollInterval", Some(s(120)), 12, s(400), s(5), s(5)),
            ("without Retry-After: doubling up to 60 s", None, 20, s(900), max, s(60)),
            (
                "a server saying \"1 s\" forever is polled less often as the wait grows",
                Some(s(1)),
                30,
                s(3000),
                max,
                s(60),
            ),
            ("a Retry-After of 0 is not a hot loop", Some(s(0)), 0, s(0), max, ms(100)),
        ];
        for (what, server, polls, waited, max, want) in table {
            assert_eq!(poll_wait(server, polls, waited, max), want, "{what}");
        }
        // a job of 3 minutes at a server saying 120 s costs about a dozen polls, not hundreds
        let (mut t, mut n) = (Duration::ZERO, 0);
        while t < s(180) {
            t += poll_wait(Some(s(120)), n, t, max);
            n += 1;
        }
        assert!((10..=14).contains(&n), "{n} polls");
    }
}
