//! The decisions of a BulkExportSync, as pure functions: which run is due and what it is called, its
//! `_since`, the label that finds its runs, and how a finished run moves the watermark. The
//! controller and `fhirsync sync-once` both call these; neither decides on its own.

use std::time::Duration;

use jiff::Timestamp;

use crate::api::{BulkExportRunStatus, BulkExportSyncSpec, ExportSpec, Phase, RunTemplate, Trigger};
use crate::schedule::Schedule;

pub mod verify;

/// Stable 64-bit FNV-1a fingerprint (std's hasher is not stable across releases).
pub fn fingerprint(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The query a watermark belongs to: source URL, export (without its initial `since`) and target URL.
pub fn watermark_scope(spec: &BulkExportSyncSpec) -> String {
    query_scope(&spec.source.url, &spec.export, &spec.target.url)
}

/// The query a run's template covers, in the same terms as [`watermark_scope`].
pub fn template_scope(t: &RunTemplate) -> String {
    query_scope(&t.source.url, &t.export, &t.target.url)
}

fn query_scope(source: &str, export: &ExportSpec, target: &str) -> String {
    let mut e = export.clone();
    e.since = None;
    fingerprint(&format!(
        "{}|{}|{}",
        source.trim_end_matches('/'),
        serde_json::to_string(&e).unwrap_or_default(),
        target.trim_end_matches('/')
    ))
}

/// What a watermark is measured against: the query and the last `reset-watermark` value handled. A
/// run carries the basis it was created under (annotation [`crate::api::ANNOTATION_WATERMARK_BASIS`]).
pub fn watermark_basis(scope: &str, handled_reset: Option<&str>) -> String {
    fingerprint(&format!("{scope}|{}", handled_reset.unwrap_or("")))
}

/// Whether a finished run's watermark may apply to the sync now. A run of an older spec (its
/// template covered another query) or one started before a `reset-watermark` must not move the
/// watermark the change reset: its export did not cover what the new query asks for. A run without
/// a recorded basis (made by hand, or by an older fhirsync) is judged by its template's query.
pub fn run_applies(run_basis: Option<&str>, run_scope: Option<&str>, scope: &str, basis: &str) -> bool {
    match (run_basis, run_scope) {
        (Some(b), _) => b == basis,
        (None, Some(s)) => s == scope,
        (None, None) => false,
    }
}

/// The value of the `fhirsync.io/sync` label on a sync's runs: its name when that is a valid label
/// value (at most 63 characters), else a shortened name with a hash (names go up to 253).
pub fn label_value(sync: &str) -> String {
    if sync.len() <= 63 {
        return sync.to_string();
    }
    let head = sync[..46].trim_end_matches(['-', '.']);
    format!("{head}-{}", &fingerprint(sync))
}

/// Most characters of a run name (an object name is a DNS subdomain of at most 253).
const NAME_MAX: usize = 253;

/// A run name `{sync}-{suffix}`, the sync's name shortened (with a hash, so shortened names stay
/// distinct) when the whole would be too long.
pub fn run_name(sync: &str, suffix: &str) -> String {
    let whole = format!("{sync}-{suffix}");
    if whole.len() <= NAME_MAX {
        return whole;
    }
    let keep = NAME_MAX - suffix.len() - 18;
    let head = sync[..keep.min(sync.len())].trim_end_matches(['-', '.']);
    format!("{head}-{}-{suffix}", &fingerprint(sync)[..16])
}

/// The `_since` of the next run: the watermark for an incremental sync, else (and before the first
/// run) `export.since`.
pub fn since(spec: &BulkExportSyncSpec, watermark: Option<Timestamp>) -> Option<Timestamp> {
    let initial = spec.export.since.as_ref().map(|t| t.0);
    if spec.incremental { watermark.or(initial) } else { initial }
}

/// What the sync's status says about its runs so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The `fhirsync.io/run-now` annotation's value, and the value already acted on.
    pub run_now: Option<String>,
    pub handled_run_now: Option<String>,
    /// The last slot a run was started for (else the sync's creation).
    pub last_schedule: Option<Timestamp>,
    pub created: Option<Timestamp>,
    /// The spec generation, and the one the last run was started for.
    pub generation: Option<i64>,
    pub last_run_generation: Option<i64>,
}

/// A run that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub trigger: Trigger,
    /// The slot it is for (now for run-now and spec changes).
    pub slot: Timestamp,
    /// Its name: deterministic, so a decision taken twice creates one run.
    pub name: String,
}

/// Which run is due now, if any. Run-now wins; a suspended sync starts nothing else; a schedule gives
/// one run for the latest missed slot (not one per slot); without a schedule, one run per generation.
pub fn due(sync: &str, schedule: Option<&Schedule>, suspend: bool, h: &History, now: Timestamp) -> Option<Due> {
    if let Some(v) = h.run_now.as_ref().filter(|v| h.handled_run_now.as_ref() != Some(*v)) {
        return Some(Due {
            trigger: Trigger::RunNow,
            slot: now,
            name: run_name(sync, &format!("now-{}", &fingerprint(v)[..10])),
        });
    }
    if suspend {
        return None;
    }
    match schedule {
        Some(s) => {
            let from = h.last_schedule.or(h.created).unwrap_or(now);
            let slot = s.latest_due(from, now)?;
            Some(Due { trigger: Trigger::Schedule, slot, name: run_name(sync, &(slot.as_second() / 60).to_string()) })
        }
        None if h.last_run_generation != h.generation => Some(Due {
            trigger: Trigger::Schedule,
            slot: now,
            name: run_name(sync, &format!("g{}", h.generation.unwrap_or(0))),
        }),
        None => None,
    }
}

/// How a finished run moves the watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatermarkMove {
    /// The run brought everything since its `_since`: the watermark moves here.
    To(Timestamp),
    /// The run failed, its export reported errors, or some deletions could not be read: the watermark stays, so the next run fetches
    /// again what this one did not bring (`merge` makes the overlap harmless).
    Stays,
}

/// The watermark after a finished run: `min(transactionTime, kick-off time) − overlap` for a run that
/// succeeded without export errors, never earlier than the current one; else unchanged.
pub fn watermark_after(run: &BulkExportRunStatus, current: Option<Timestamp>, overlap: Duration) -> WatermarkMove {
    if run.phase != Phase::Succeeded || run.export_errors > 0 || run.deletions_incomplete {
        return WatermarkMove::Stays;
    }
    let Some(k) = run.kickoff_time.as_ref().map(|t| t.0) else { return WatermarkMove::Stays };
    let t = run.transaction_time.as_ref().map(|t| t.0.min(k)).unwrap_or(k);
    let Some(next) = jiff::SignedDuration::try_from(overlap).ok().and_then(|o| t.checked_sub(o).ok()) else {
        return WatermarkMove::Stays;
    };
    match current {
        Some(c) if c >= next => WatermarkMove::Stays,
        _ => WatermarkMove::To(next),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn label_values_fit_and_stay_distinct() {
        assert_eq!(label_value("hospital-a"), "hospital-a");
        let long_a = format!("{}-a", "x".repeat(70));
        let long_b = format!("{}-b", "x".repeat(70));
        for l in [label_value(&long_a), label_value(&long_b)] {
            assert!(l.len() <= 63 && l.chars().next().unwrap().is_ascii_alphanumeric(), "{l}");
        }
        assert_ne!(label_value(&long_a), label_value(&long_b));
    }

    #[test]
    fn run_names_fit_and_stay_distinct() {
        assert_eq!(run_name("hospital-a", "29401234"), "hospital-a-29401234");
        let a = run_name(&format!("{}a", "y".repeat(252)), "29401234");
        let b = run_name(&format!("{}b", "y".repeat(252)), "29401234");
        assert!(a.len() <= 253 && b.len() <= 253 && a.ends_with("-29401234"));
        assert_ne!(a, b);
    }

    #[test]
    fn which_run_is_due() {
        let hourly = Schedule::parse("0 * * * *", "Etc/UTC").unwrap();
        let now = ts("2026-11-26T13:10:00Z");
        let h = |f: &dyn Fn(&mut History)| {
            let mut h =
                History { created: Some(ts("2026-11-26T00:00:00Z")), generation: Some(1), ..Default::default() };
            f(&mut h);
            h
        };
        type Case<'a> = (&'a str, Option<&'a Schedule>, bool, History, Option<(Trigger, &'a str)>);
        let table: Vec<Case> = vec![
            (
                "missed slots: one run for the latest",
                Some(&hourly),
                false,
                h(&|h| h.last_schedule = Some(ts("2026-11-26T10:00:00Z"))),
                Some((Trigger::Schedule, "s-29928300")),
            ),
            ("nothing due yet", Some(&hourly), false, h(&|h| h.last_schedule = Some(ts("2026-11-26T13:00:00Z"))), None),
            (
                "run-now wins, even suspended",
                Some(&hourly),
                true,
                h(&|h| h.run_now = Some("1".into())),
                Some((Trigger::RunNow, "s-now-af63ac4c86")),
            ),
            (
                "run-now handled",
                None,
                false,
                h(&|h| {
                    h.run_now = Some("1".into());
                    h.handled_run_now = Some("1".into());
                    h.last_run_generation = Some(1)
                }),
                None,
            ),
            ("suspended", Some(&hourly), true, h(&|_| {}), None),
            ("no schedule: one per generation", None, false, h(&|_| {}), Some((Trigger::Schedule, "s-g1"))),
            ("no schedule: generation done", None, false, h(&|h| h.last_run_generation = Some(1)), None),
        ];
        for (what, s, suspend, hist, want) in table {
            let got = due("s", s, suspend, &hist, now).map(|d| (d.trigger, d.name));
            assert_eq!(got, want.map(|(t, n)| (t, n.to_string())), "{what}");
        }
    }

    #[test]
    fn the_watermark_moves_only_past_what_was_brought() {
        let run = |phase: Phase, errors: i64, kickoff: Option<&str>, tt: Option<&str>| BulkExportRunStatus {
            phase,
            export_errors: errors,
            kickoff_time: kickoff.map(|k| Time(ts(k))),
            transaction_time: tt.map(|t| Time(ts(t))),
            ..Default::default()
        };
        let five = Duration::from_secs(300);
        let w = |s: &str| WatermarkMove::To(ts(s));
        let table: Vec<(&str, BulkExportRunStatus, Option<&str>, WatermarkMove)> = vec![
            (
                "HAPI: transactionTime is the job's end",
                run(Phase::Succeeded, 0, Some("2026-11-26T03:00:00Z"), Some("2026-11-26T03:10:00Z")),
                None,
                w("2026-11-26T02:55:00Z"),
            ),
            (
                "Azure: transactionTime is the queue time",
                run(Phase::Succeeded, 0, Some("2026-11-26T03:00:00Z"), Some("2026-11-26T02:30:00Z")),
                None,
                w("2026-11-26T02:25:00Z"),
            ),
            (
                "export errors hold the watermark",
                run(Phase::Succeeded, 3, Some("2026-11-26T03:00:00Z"), None),
                Some("2019-01-01T00:00:00Z"),
                WatermarkMove::Stays,
            ),
            (
                "a failed run holds it",
                run(Phase::Failed, 0, Some("2026-11-26T03:00:00Z"), None),
                Some("2019-01-01T00:00:00Z"),
                WatermarkMove::Stays,
            ),
            (
                "never backwards",
                run(Phase::Succeeded, 0, Some("2026-11-26T03:00:00Z"), None),
                Some("2026-11-26T04:00:00Z"),
                WatermarkMove::Stays,
            ),
            ("no kick-off recorded", run(Phase::Succeeded, 0, None, None), None, WatermarkMove::Stays),
        ];
        for (what, r, current, want) in table {
            assert_eq!(watermark_after(&r, current.map(ts), five), want, "{what}");
        }
    }

    #[test]
    fn a_run_of_an_older_query_does_not_set_the_watermark() {
        let scope = "q2";
        let reset = watermark_basis(scope, Some("r1"));
        let basis = watermark_basis(scope, None);
        let old_basis = watermark_basis("q1", None);
        type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str, bool);
        let table: Vec<Case> = vec![
            ("created under this spec", Some(&basis), Some(scope), &basis, true),
            ("the spec changed while it ran (export.types gained a type)", Some(&old_basis), Some("q1"), &basis, false),
            ("reset-watermark handled while it ran", Some(&basis), Some(scope), &reset, false),
            ("made by hand, template of this query", None, Some(scope), &basis, true),
            ("made by hand, template of another query", None, Some("q1"), &basis, false),
            ("nothing known of what it covered", None, None, &basis, false),
        ];
        for (what, run_basis, run_scope, current, want) in table {
            assert_eq!(run_applies(run_basis, run_scope, scope, current), want, "{what}");
        }
    }

    #[test]
    fn since_follows_incremental() {
        let mut spec: BulkExportSyncSpec = serde_yaml::from_str(
            "source: {url: http://s/fhir}\ntarget: {url: http://p/fhir}\nstaging: {volume: {path: /s, pathlingPath: file:///s}}\nexport: {since: '2020-01-01T00:00:00Z'}\n",
        )
        .unwrap();
        let w = Some(ts("2026-11-26T00:00:00Z"));
        assert_eq!(since(&spec, w), w);
        assert_eq!(since(&spec, None), Some(ts("2020-01-01T00:00:00Z")));
        spec.incremental = false;
        assert_eq!(since(&spec, w), Some(ts("2020-01-01T00:00:00Z")));
    }
}
