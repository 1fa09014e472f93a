//! Retry-After parsing and exponential backoff.

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
    fn backoff_grows_and_caps() {
        let b = Duration::from_secs(1);
        let m = Duration::from_secs(60);
        assert_eq!(backoff(0, b, m), Duration::from_secs(1));
        assert_eq!(backoff(3, b, m), Duration::from_secs(8));
        assert_eq!(backoff(10, b, m), m);
        assert_eq!(backoff(200, b, m), m);
    }
}
