//! THE retry arithmetic: `Retry-After` read at the edge, the one [`Backoff`] type every retrying
//! loop of fhirsync counts its attempts with, and the table of every retry rule ([`rules`]). What
//! an error *means* (may it pass?) is `fhir/class.rs`; what a run does about it is `run/policy.rs`.

use std::time::{Duration, SystemTime};

/// Shortest wait honoured from a server's Retry-After.
pub const MIN_WAIT: Duration = Duration::from_secs(1);
/// Longest wait honoured from a server's Retry-After (a bigger value is clamped).
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// Parses a `Retry-After` value: delta-seconds, an HTTP-date, or (a quirk of one reference server) a
/// Unix timestamp in seconds (> 10^9) or milliseconds (> 10^12). The result is clamped to
/// [`MIN_WAIT`]..=[`MAX_WAIT`]; `None` when the value is unreadable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    let wait = if let Ok(n) = v.parse::<u64>() {
        if n >= 1_000_000_000_000 {
            until(SystemTime::UNIX_EPOCH + Duration::from_millis(n), now)
        } else if n >= 1_000_000_000 {
            until(SystemTime::UNIX_EPOCH + Duration::from_secs(n), now)
        } else {
            Duration::from_secs(n)
        }
    } else if let Ok(f) = v.parse::<f64>() {
        if !f.is_finite() || f < 0.0 {
            return None;
        }
        Duration::from_secs_f64(f.min(1e9))
    } else {
        until(httpdate::parse_http_date(v).ok()?, now)
    };
    Some(clamp(wait))
}

fn until(t: SystemTime, now: SystemTime) -> Duration {
    t.duration_since(now).unwrap_or(Duration::ZERO)
}

/// Clamps a server-suggested wait into the sane range.
pub fn clamp(d: Duration) -> Duration {
    d.clamp(MIN_WAIT, MAX_WAIT)
}

/// Exponential backoff for attempt `n` (0-based): `base * 2^n`, capped at `max`.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u64.checked_shl(attempt.min(30)).unwrap_or(u64::MAX);
    let ms = (base.as_millis() as u64).saturating_mul(factor);
    Duration::from_millis(ms).min(max)
}

/// A retry schedule: the wait after failure `n` (1-based) is `first * 2^(n-1)`, at most `max`, and
/// at most `tries` attempts are made in all (`None`: the caller's deadline bounds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub tries: Option<u32>,
}

impl Backoff {
    /// Waits from `first` doubling to `max`, bounded elsewhere.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, tries: None }
    }

    /// At most `n` attempts in all.
    pub const fn tries(self, n: u32) -> Self {
        Self { tries: Some(n), ..self }
    }

    /// The wait after the `n`-th failure in a row (1-based; 0 is no wait).
    pub fn wait(&self, n: u32) -> Duration {
        if n == 0 { Duration::ZERO } else { backoff(n - 1, self.first, self.max) }
    }

    /// A fresh count of attempts on this schedule.
    pub fn start(self) -> Attempts {
        Attempts { schedule: self, failed: 0 }
    }
}

/// Failed attempts counted against a [`Backoff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts {
    schedule: Backoff,
    failed: u32,
}

impl Attempts {
    /// One more attempt failed: the wait before the next one — at least what the server asked —
    /// or `None` when the schedule allows no more attempts.
    pub fn failed(&mut self, server: Option<Duration>) -> Option<Duration> {
        self.failed = self.failed.saturating_add(1);
        if self.schedule.tries.is_some_and(|t| self.failed >= t) {
            return None;
        }
        Some(self.schedule.wait(self.failed).max(server.unwrap_or_default()))
    }

    /// Failures so far (in a row).
    pub fn count(&self) -> u32 {
        self.failed
    }

    /// A success: the count starts again.
    pub fn reset(&mut self) {
        self.failed = 0;
    }
}

/// Every retry rule of fhirsync, in one table: the loop that uses each is named.
pub mod rules {
    use super::Backoff;
    use std::time::Duration;

    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A run's transient failures (5xx, broken connections): 2 s doubling to 60 s, 8 retries in a row
    /// (about four minutes) — `run/policy.rs`, and building a run's clients (`run::drive`).
    pub const TRANSIENT: Backoff = Backoff::new(s(2), s(60)).tries(TRANSIENT_STREAK + 1);
    /// Most transient failures in a row before a run fails (the README promises this number).
    pub const TRANSIENT_STREAK: u32 = 8;
    /// A peer that says it is busy (429, Pathling's import lock, an export cap): 1 s doubling to
    /// 5 min, until the run's deadline — `run/policy.rs`.
    pub const BUSY: Backoff = Backoff::new(s(1), s(300));
    /// One staged file (a download, an id file of a verification): 4 attempts, 2 s doubling —
    /// `run/transfer.rs`, `run/verify.rs`.
    pub const FILE: Backoff = Backoff::new(s(2), s(60)).tries(4);
    /// Pathling forgot an import job ("unknown job", it restarted): resubmitted 3 times in a row —
    /// `run/import.rs`.
    pub const LOST_JOB: Backoff = Backoff::new(s(2), s(60)).tries(4);
    /// Polls of an asynchronous job start here and double (the cap is the server's `Retry-After`) —
    /// `run/policy.rs::poll_wait`.
    pub const POLL: Backoff = Backoff::new(ms(100), s(60));
    /// A relay commit to Pathling: 250 ms doubling to 2 s, for at most `relay::commit::RETRY_FOR` —
    /// `relay/commit.rs` (the source's own retries carry on from there).
    pub const RELAY_WRITE: Backoff = Backoff::new(ms(250), s(2));
    /// A BulkExportRun status write or read that failed: 8 attempts, 400 ms doubling to 30 s —
    /// `controller/bulk_run.rs`.
    pub const STATUS_WRITE: Backoff = Backoff::new(ms(400), s(30)).tries(8);
    /// Reading a run before driving it: 2 s doubling to 30 s until the run is cancelled —
    /// `controller/bulk_run.rs`.
    pub const RUN_READ: Backoff = Backoff::new(s(2), s(30));
    /// A Subscription the source shows in `error`/`off`: re-requested after `verifyInterval`,
    /// doubling to 30 min — `controller/subscription_sync.rs` (see [`rerequest`]).
    pub const REREQUEST_MAX: Duration = s(1800);

    /// A status write that lost a race (409): the reconcile decides again on fresher data after
    /// 1–3 s, spread so that two writers do not collide again — `controller/*`.
    pub fn conflict_requeue() -> Duration {
        let jitter = (uuid::Uuid::new_v4().as_u128() % 2000) as u64;
        ms(1000 + jitter)
    }

    /// The re-request schedule of a Subscription for a sync verified every `verify`.
    pub fn rerequest(verify: Duration) -> Backoff {
        Backoff::new(verify.max(s(1)), REREQUEST_MAX)
    }
}

/// Reads `Retry-After` from response headers.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_http_date_and_epoch() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0", now), Some(MIN_WAIT));
        assert_eq!(parse_retry_after("86400", now), Some(MAX_WAIT));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(42)));
        assert_eq!(parse_retry_after("1800000030", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("1800000020000", now), Some(Duration::from_secs(20)));
        // a date in the past means "now", clamped to the minimum
        assert_eq!(parse_retry_after("1700000000", now), Some(MIN_WAIT));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn attempts_are_counted_against_their_schedule() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(60)).tries(4);
        let mut a = b.start();
        assert_eq!(a.failed(None), Some(Duration::from_secs(2)));
        assert_eq!(a.failed(Some(Duration::from_secs(30))), Some(Duration::from_secs(30)), "the server's wait wins");
        assert_eq!(a.failed(None), Some(Duration::from_secs(8)));
        assert_eq!(a.failed(None), None, "the fourth failure is the last attempt");
        a.reset();
        assert_eq!(a.count(), 0);
        assert_eq!(a.failed(None), Some(Duration::from_secs(2)), "a success starts the schedule again");
        let mut unbounded = Backoff::new(Duration::from_secs(1), Duration::from_secs(300)).start();
        let last = (0..40).filter_map(|_| unbounded.failed(None)).last();
        assert_eq!(last, Some(Duration::from_secs(300)));
        assert_eq!(b.wait(0), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Duration::from_secs(1);
        let m = Duration::from_secs(60);
        assert_eq!(backoff(0, b, m), Duration::from_secs(1));
        assert_eq!(backoff(3, b, m), Duration::from_secs(8));
        assert_eq!(backoff(10, b, m), m);
        assert_eq!(backoff(200, b, m), m);
    }
}
