//! Cron schedules (standard 5 fields, or @hourly/@daily/...) in an IANA time zone.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: TimeZone,
}

impl Schedule {
    /// Parses `expr` in time zone `tz`. Errors say what is wrong.
    pub fn parse(expr: &str, tz: &str) -> Result<Self, String> {
        let tz = TimeZone::get(tz)
            .map_err(|_| format!("timeZone {tz:?} is not a known IANA time zone (e.g. Etc/UTC, Europe/Berlin)"))?;
        let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
        let cron = parser
            .parse(expr.trim())
            .map_err(|e| format!("schedule {expr:?} is not a valid 5-field cron expression: {e}"))?;
        Ok(Self { cron, tz })
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let z = t.to_zoned(self.tz.clone());
        self.cron.find_next_occurrence(&z, false).ok().map(|z| z.timestamp())
    }
}

impl Schedule {
    /// The latest slot in `(from, now]`, if any: missed slots (an operator that was down) give one
    /// catch-up run, not one per slot.
    pub fn latest_due(&self, from: Timestamp, now: Timestamp) -> Option<Timestamp> {
        let mut slot = self.next_after(from).filter(|s| *s <= now)?;
        while let Some(n) = self.next_after(slot) {
            if n > now {
                break;
            }
            slot = n;
        }
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_runs() {
        let s = Schedule::parse("0 */6 * * *", "Etc/UTC").unwrap();
        let t: Timestamp = "2026-11-26T03:10:00Z".parse().unwrap();
        assert_eq!(s.next_after(t).unwrap().to_string(), "2026-11-26T06:00:00Z");
        let s = Schedule::parse("@daily", "Europe/Berlin").unwrap();
        assert_eq!(s.next_after(t).unwrap().to_string(), "2026-11-26T23:00:00Z");
        assert!(Schedule::parse("61 * * * *", "Etc/UTC").is_err());
        assert!(Schedule::parse("* * * * * *", "Etc/UTC").is_err());
        assert!(Schedule::parse("* * * * *", "Mars/Base").unwrap_err().contains("time zone"));
    }

    #[test]
    fn missed_slots_give_one_catch_up_run() {
        let s = Schedule::parse("0 */6 * * *", "Etc/UTC").unwrap();
        let from: Timestamp = "2026-11-25T00:00:00Z".parse().unwrap();
        let now: Timestamp = "2026-11-26T13:10:00Z".parse().unwrap();
        assert_eq!(s.latest_due(from, now).unwrap().to_string(), "2026-11-26T12:00:00Z");
        let just_ran: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        assert_eq!(s.latest_due(just_ran, now), None);
    }
}
