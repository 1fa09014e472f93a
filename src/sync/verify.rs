//! A BulkExportSync's decisions about drift, as pure functions: which verification or repair run is
//! due, how a finished verification or repair changes `status.drift`, and what the `InSync`
//! condition says. The controller and `fhirsync sync-once --verify` only adapt these.

use jiff::Timestamp;

use super::{fingerprint, run_name};
use crate::api::drift::{Drift, RepairState, RepairStatus};
use crate::schedule::Schedule;

/// What the sync's spec and status say about verifications.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    /// `spec.verify.schedule`, parsed.
    pub schedule: Option<&'a Schedule>,
    pub suspend: bool,
    /// The `fhirsync.io/verify-now` annotation, and the value already acted on.
    pub verify_now: Option<String>,
    pub handled_verify_now: Option<String>,
    /// The last verify slot started (else the sync's creation).
    pub last_slot: Option<Timestamp>,
    pub created: Option<Timestamp>,
    /// A run has succeeded (scheduled verifications wait for the first).
    pub has_succeeded: bool,
    /// `status.drift`.
    pub drift: Option<&'a Drift>,
}

/// A verification or repair that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// A verification run.
    Verify {
        name: String,
        /// It checks a repair.
        recheck: bool,
        /// The verify.schedule slot it is for.
        slot: Option<Timestamp>,
        /// The verify-now value it answers.
        verify_now: Option<String>,
    },
    /// A repair run exporting these types in full.
    Repair { name: String, types: Vec<String> },
}

/// Which verification or repair is due now. A pending repair comes first, then the check of a
/// finished repair, then verify-now (even while suspended), then the schedule (after a first
/// successful run).
pub fn due(sync: &str, f: &Facts<'_>, now: Timestamp) -> Option<Due> {
    let short = |s: &str| fingerprint(s)[..10].to_string();
    if !f.suspend
        && let Some(r) = f.drift.and_then(|d| d.repair.as_ref().map(|r| (d, r)))
    {
        let (d, r) = r;
        let from = d.run.clone().unwrap_or_default();
        match r.state {
            RepairState::Pending => {
                return Some(Due::Repair {
                    name: run_name(sync, &format!("repair-{}", short(&from))),
                    types: r.types.clone(),
                });
            }
            RepairState::Verifying => {
                let repair_run = r.run.clone().unwrap_or_default();
                return Some(Due::Verify {
                    name: run_name(sync, &format!("recheck-{}", short(&repair_run))),
                    recheck: true,
                    slot: None,
                    verify_now: None,
                });
            }
            _ => {}
        }
    }
    if let Some(v) = f.verify_now.as_ref().filter(|v| f.handled_verify_now.as_ref() != Some(*v)) {
        return Some(Due::Verify {
            name: run_name(sync, &format!("verify-{}", short(v))),
            recheck: false,
            slot: None,
            verify_now: Some(v.clone()),
        });
    }
    if f.suspend || !f.has_succeeded {
        return None;
    }
    let s = f.schedule?;
    let from = f.last_slot.or(f.created).unwrap_or(now);
    let slot = s.latest_due(from, now)?;
    Some(Due::Verify {
        name: run_name(sync, &format!("v{}", slot.as_second() / 60)),
        recheck: false,
        slot: Some(slot),
        verify_now: None,
    })
}

/// The sync's drift after a verification run succeeded with `report`.
pub fn after_verification(prev: Option<&Drift>, run: &str, mut report: Drift, recheck: bool, repair: bool) -> Drift {
    report.run = Some(run.to_string());
    let missing = report.missing_types();
    report.repair = if recheck {
        let repair_run = prev.and_then(|p| p.repair.as_ref()).and_then(|r| r.run.clone());
        Some(if missing.is_empty() {
            RepairStatus {
                state: RepairState::Done,
                types: vec![],
                run: repair_run,
                message: Some("the repair was verified: nothing is missing any more".into()),
            }
        } else {
            RepairStatus {
                state: RepairState::Failed,
                types: missing,
                run: repair_run,
                message: Some(
                    "Pathling still misses resources after the repair run; check the source's export of these types (the next verification tries again)"
                        .into(),
                ),
            }
        })
    } else if repair && !missing.is_empty() {
        Some(RepairStatus {
            state: RepairState::Pending,
            types: missing,
            run: None,
            message: Some("a repair run will export these types in full".into()),
        })
    } else {
        None
    };
    report
}

/// The sync's drift after a verification run failed: the last report stays; a check of a repair
/// that failed leaves the repair failed.
pub fn after_failed_verification(prev: Option<&Drift>, run: &str, message: &str) -> Option<Drift> {
    let mut d = prev?.clone();
    if let Some(r) = d.repair.as_mut().filter(|r| r.state == RepairState::Verifying) {
        r.state = RepairState::Failed;
        r.message = Some(format!("the check of the repair (run {run}) failed: {message}"));
    }
    Some(d)
}

/// The sync's drift once its repair run was created.
pub fn repair_started(prev: &Drift, run: &str) -> Drift {
    let mut d = prev.clone();
    if let Some(r) = d.repair.as_mut() {
        r.state = RepairState::Running;
        r.run = Some(run.to_string());
        r.message = Some(format!("run {run} exports {} in full", r.types.join(", ")));
    }
    d
}

/// The sync's drift after its repair run finished.
pub fn after_repair(prev: &Drift, run: &str, succeeded: bool, message: &str) -> Drift {
    let mut d = prev.clone();
    if let Some(r) = d.repair.as_mut() {
        r.run = Some(run.to_string());
        if succeeded {
            r.state = RepairState::Verifying;
            r.message = Some(format!("run {run} exported {} again; a verification checks it", r.types.join(", ")));
        } else {
            r.state = RepairState::Failed;
            r.message = Some(format!("the repair run {run} failed: {message}; the next verification tries again"));
        }
    }
    d
}

/// The `InSync` condition: (status, reason, message), or `None` when the sync has never been
/// verified and does not ask to be.
pub fn in_sync(drift: Option<&Drift>, configured: bool) -> Option<(&'static str, &'static str, String)> {
    let Some(d) = drift else {
        return configured.then(|| {
            (
                "Unknown",
                "NotVerified",
                "no verification yet (the first runs after the first successful run)".to_string(),
            )
        });
    };
    let summary = d.summary();
    let when = d.verified_at.as_ref().map(|t| format!(" (verified {})", t.0)).unwrap_or_default();
    let repair_note = |r: &RepairStatus| r.message.clone().unwrap_or_default();
    Some(match d.repair.as_ref().map(|r| (r.state, r)) {
        Some((RepairState::Done, r)) => ("True", "Repaired", format!("{summary}{when}; {}", repair_note(r))),
        Some((RepairState::Pending | RepairState::Running | RepairState::Verifying, r)) => {
            ("False", "RepairPending", format!("{summary}{when}; repair: {}", repair_note(r)))
        }
        Some((RepairState::Failed, r)) => ("False", "RepairFailed", format!("{summary}{when}; {}", repair_note(r))),
        None if d.in_sync => {
            let deleted = if d.deleted > 0 {
                format!("; deleted {} extras that the source no longer has", d.deleted)
            } else {
                String::new()
            };
            ("True", if d.deleted > 0 { "Repaired" } else { "InSync" }, format!("{summary}{when}{deleted}"))
        }
        None => {
            let mut m = format!("{summary}{when}");
            if d.deleted > 0 {
                m.push_str(&format!("; deleted {} extras", d.deleted));
            }
            if d.kept > 0 {
                m.push_str(&format!(
                    "; {} extras are still at the source outside the export's selection (or could not be confirmed gone) and were kept",
                    d.kept
                ));
            }
            if let Some(n) = &d.not_repaired {
                m.push_str(&format!("; not repaired: {n}"));
            }
            ("False", "Drift", m)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::drift::TypeDrift;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn drift(missing: i64, extra: i64) -> Drift {
        Drift {
            in_sync: missing == 0 && extra == 0,
            run: Some("s-v1".into()),
            types: vec![TypeDrift {
                type_: "Observation".into(),
                source: 10,
                pathling: 10 - missing + extra,
                missing,
                extra,
                missing_examples: (0..missing.min(5)).map(|i| format!("o{i}")).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn with_repair(mut d: Drift, state: RepairState) -> Drift {
        d.repair = Some(RepairStatus {
            state,
            types: vec!["Observation".into()],
            run: Some("s-repair-x".into()),
            message: None,
        });
        d
    }

    #[test]
    fn which_verification_is_due() {
        let daily = Schedule::parse("30 2 * * *", "Etc/UTC").unwrap();
        let now = ts("2026-11-26T13:10:00Z");
        let base = Facts {
            schedule: Some(&daily),
            created: Some(ts("2026-11-20T00:00:00Z")),
            last_slot: Some(ts("2026-11-25T02:30:00Z")),
            has_succeeded: true,
            ..Default::default()
        };
        let pending = with_repair(drift(3, 0), RepairState::Pending);
        let verifying = with_repair(drift(3, 0), RepairState::Verifying);
        let running = with_repair(drift(3, 0), RepairState::Running);
        type Case<'a> = (&'a str, Facts<'a>, Option<&'a str>);
        let table: Vec<Case> = vec![
            ("the schedule's slot", base.clone(), Some("s-v29927670")),
            ("slot already done", Facts { last_slot: Some(ts("2026-11-26T02:30:00Z")), ..base.clone() }, None),
            ("not before a first successful run", Facts { has_succeeded: false, ..base.clone() }, None),
            ("suspended", Facts { suspend: true, ..base.clone() }, None),
            (
                "verify-now, even suspended",
                Facts { suspend: true, verify_now: Some("a".into()), ..base.clone() },
                Some("s-verify-"),
            ),
            (
                "verify-now handled",
                Facts {
                    verify_now: Some("a".into()),
                    handled_verify_now: Some("a".into()),
                    last_slot: Some(ts("2026-11-26T02:30:00Z")),
                    ..base.clone()
                },
                None,
            ),
            (
                "a pending repair first",
                Facts { drift: Some(&pending), verify_now: Some("a".into()), ..base.clone() },
                Some("s-repair-"),
            ),
            ("a finished repair is checked", Facts { drift: Some(&verifying), ..base.clone() }, Some("s-recheck-")),
            (
                "a running repair: only the schedule",
                Facts { drift: Some(&running), last_slot: Some(ts("2026-11-26T02:30:00Z")), ..base.clone() },
                None,
            ),
            ("no schedule, no annotation", Facts { schedule: None, ..base.clone() }, None),
        ];
        for (what, f, want) in table {
            let got = due("s", &f, now).map(|d| match d {
                Due::Verify { name, .. } | Due::Repair { name, .. } => name,
            });
            match want {
                None => assert_eq!(got, None, "{what}"),
                Some(prefix) => assert!(got.as_deref().is_some_and(|n| n.starts_with(prefix)), "{what}: {got:?}"),
            }
        }
        // deterministic: the same decision twice names the same run
        let f = Facts { verify_now: Some("x".into()), ..base.clone() };
        assert_eq!(due("s", &f, now), due("s", &f, now));
    }

    #[test]
    fn drift_moves_through_repair() {
        // found: a repair is pending for the types that miss resources
        let d = after_verification(None, "s-v1", drift(3, 0), false, true);
        assert_eq!(
            d.repair.as_ref().map(|r| (r.state, r.types.clone())),
            Some((RepairState::Pending, vec!["Observation".to_string()]))
        );
        assert_eq!(in_sync(Some(&d), true).unwrap().1, "RepairPending");
        // without repair: drift only
        let no = after_verification(None, "s-v1", drift(3, 0), false, false);
        assert_eq!((no.repair.is_none(), in_sync(Some(&no), true).unwrap().1), (true, "Drift"));
        // the repair run: started, finished, checked
        let d = repair_started(&d, "s-repair-1");
        assert_eq!(d.repair.as_ref().unwrap().state, RepairState::Running);
        let d = after_repair(&d, "s-repair-1", true, "");
        assert_eq!(d.repair.as_ref().unwrap().state, RepairState::Verifying);
        let ok = after_verification(Some(&d), "s-recheck-1", drift(0, 0), true, true);
        assert_eq!(ok.repair.as_ref().unwrap().state, RepairState::Done);
        assert_eq!(in_sync(Some(&ok), true).unwrap().0, "True");
        // a check that still finds drift does not start another repair
        let still = after_verification(Some(&d), "s-recheck-1", drift(2, 0), true, true);
        assert_eq!(still.repair.as_ref().unwrap().state, RepairState::Failed);
        assert_eq!(due("s", &Facts { drift: Some(&still), ..Default::default() }, ts("2026-11-26T00:00:00Z")), None);
        // a failed repair run
        let failed = after_repair(&repair_started(&d, "r"), "r", false, "boom");
        assert_eq!(in_sync(Some(&failed), true).unwrap().1, "RepairFailed");
    }

    #[test]
    fn the_in_sync_condition() {
        assert_eq!(in_sync(None, false), None);
        assert_eq!(in_sync(None, true).unwrap().0, "Unknown");
        let (s, r, m) = in_sync(Some(&drift(0, 0)), true).unwrap();
        assert_eq!((s, r), ("True", "InSync"));
        assert!(m.contains("Pathling matches the source"), "{m}");
        let mut d = drift(0, 2);
        d.kept = 2;
        let (s, r, m) = in_sync(Some(&d), true).unwrap();
        assert_eq!((s, r), ("False", "Drift"));
        assert!(m.contains("holds 2 Observation") && m.contains("were kept"), "{m}");
        let mut d = drift(0, 0);
        d.deleted = 2;
        assert_eq!(in_sync(Some(&d), true).unwrap().1, "Repaired");
    }
}
