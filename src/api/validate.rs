//! Spec checks beyond the CRD's schema and CEL rules (which `api::admission` evaluates for
//! `sync-once`, and the API server for the operator): the ranges of durations and quantities, which
//! CEL cannot bound exactly. Messages name the field and say how to fix it. The parsed values feed
//! the engine, so a value is read one way everywhere.

use std::time::Duration;

use super::units::{MAX_DURATION, bounded, parse_quantity};
use super::{BulkExportSyncSpec, FhirServer, FhirSubscriptionSyncSpec, Limits, RunTemplate};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Default longest wait between two polls of an asynchronous job.
pub const DEFAULT_MAX_POLL: Duration = Duration::from_secs(300);

/// A server's parsed timing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerTiming {
    pub connect: Duration,
    pub response: Duration,
    pub idle: Duration,
    pub max_poll: Duration,
}

/// A run template's parsed values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateValues {
    pub run_timeout: Duration,
    pub max_file_bytes: u64,
    pub max_run_bytes: u64,
    pub source: ServerTiming,
    pub target: ServerTiming,
}

/// Parses and bounds a server's timeouts and poll interval.
pub fn server_timing(s: &FhirServer, what: &str) -> Result<ServerTiming, Vec<String>> {
    let mut errs = vec![];
    let mut get = |f: &str, v: Option<&str>, def: Duration, min: Duration, max: Duration| match v {
        None => def,
        Some(v) => bounded(&format!("{what}.{f}"), v, min, max).unwrap_or_else(|e| {
            errs.push(e);
            def
        }),
    };
    let t = s.timeouts.as_ref();
    let timing = ServerTiming {
        connect: get("timeouts.connect", t.map(|t| t.connect.as_str()), 10 * SEC, 100 * MS, 600 * SEC),
        response: get("timeouts.response", t.map(|t| t.response.as_str()), 60 * SEC, 100 * MS, DAY),
        idle: get("timeouts.idle", t.map(|t| t.idle.as_str()), 120 * SEC, 100 * MS, DAY),
        max_poll: get("maxPollInterval", s.max_poll_interval.as_deref(), DEFAULT_MAX_POLL, SEC, HOUR),
    };
    if errs.is_empty() { Ok(timing) } else { Err(errs) }
}

fn limits(l: &Limits, errs: &mut Vec<String>) -> (u64, u64) {
    let mut q = |f: &str, v: &str| match parse_quantity(v) {
        Ok(n) if n >= 1024 => n,
        Ok(_) => {
            errs.push(format!("spec.limits.{f}: {v} is below 1Ki"));
            0
        }
        Err(e) => {
            errs.push(format!("spec.limits.{f}: {e}"));
            0
        }
    };
    (q("maxFileSize", &l.max_file_size), q("maxRunSize", &l.max_run_size))
}

/// Checks a run template and returns its parsed values; the errors joined with `; `.
pub fn template_values(t: &RunTemplate) -> Result<TemplateValues, String> {
    let mut errs = vec![];
    let run_timeout = bounded("spec.runTimeout", &t.run_timeout, SEC, MAX_DURATION).unwrap_or_else(|e| {
        errs.push(e);
        DAY
    });
    let (max_file_bytes, max_run_bytes) = limits(&t.limits, &mut errs);
    let source = server_timing(&t.source, "spec.source").map_err(|e| errs.extend(e)).ok();
    let target = server_timing(&t.target.server(), "spec.target").map_err(|e| errs.extend(e)).ok();
    match (source, target) {
        (Some(source), Some(target)) if errs.is_empty() => {
            Ok(TemplateValues { run_timeout, max_file_bytes, max_run_bytes, source, target })
        }
        _ => Err(errs.join("; ")),
    }
}

/// The parsed values of a BulkExportSync spec beyond its run template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncValues {
    pub since_overlap: Duration,
    pub template: TemplateValues,
}

/// All problems with a BulkExportSync spec, or its parsed values. (Schedule problems are reported
/// separately by [`crate::schedule::Schedule::parse`], as reason InvalidSchedule.)
pub fn validate_bulk_sync(spec: &BulkExportSyncSpec) -> Result<SyncValues, String> {
    let mut errs = vec![];
    let template = template_values(&RunTemplate::from(spec)).map_err(|e| errs.push(e)).ok();
    if let (Some(since), Some(until)) = (&spec.export.since, &spec.export.until)
        && since.0 >= until.0
    {
        errs.push(format!("spec.export.until ({}) must be after spec.export.since ({})", until.0, since.0));
    }
    let since_overlap =
        bounded("spec.sinceOverlap", &spec.since_overlap, Duration::ZERO, 7 * DAY).map_err(|e| errs.push(e)).ok();
    match (template, since_overlap) {
        (Some(template), Some(since_overlap)) if errs.is_empty() => Ok(SyncValues { since_overlap, template }),
        _ => Err(errs.join("; ")),
    }
}

/// Checks a FhirSubscriptionSync spec; returns its verify interval.
pub fn validate_subscription_sync(spec: &FhirSubscriptionSyncSpec) -> Result<Duration, String> {
    let mut errs = vec![];
    if let Err(e) = server_timing(&spec.source, "spec.source") {
        errs.extend(e);
    }
    let verify = bounded("spec.verifyInterval", &spec.verify_interval, SEC, 7 * DAY).map_err(|e| errs.push(e)).ok();
    match verify {
        Some(v) if errs.is_empty() => Ok(v),
        _ => Err(errs.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BulkExportSync;

    /// A valid spec with the keys of `extra` (YAML, indented two spaces) replaced.
    fn sync(extra: &str) -> BulkExportSyncSpec {
        let mut spec: serde_yaml::Mapping = serde_yaml::from_str(
            "source: {url: http://s/fhir}\ntarget: {url: http://p/fhir}\nstaging: {volume: {path: /staging, pathlingPath: file:///s}}\n",
        )
        .unwrap();
        let extra: Option<serde_yaml::Mapping> = serde_yaml::from_str(&extra.replace("\n  ", "\n")).unwrap();
        for (k, v) in extra.unwrap_or_default() {
            spec.insert(k, v);
        }
        let doc = serde_yaml::to_string(&serde_yaml::Value::Mapping(
            [
                ("apiVersion".into(), "fhirsync.io/v1alpha1".into()),
                ("kind".into(), "BulkExportSync".into()),
                ("metadata".into(), serde_yaml::from_str("{name: a}").unwrap()),
                ("spec".into(), serde_yaml::Value::Mapping(spec)),
            ]
            .into_iter()
            .collect(),
        ))
        .unwrap();
        serde_yaml::from_str::<BulkExportSync>(&doc).unwrap().spec
    }

    #[test]
    fn every_duration_and_quantity_is_bounded() {
        let table: &[(&str, Option<&str>)] = &[
            ("", None),
            ("  runTimeout: 18446744073709551615s1s\n", Some("spec.runTimeout")),
            ("  runTimeout: 144115188075855872d\n", Some("spec.runTimeout")),
            ("  runTimeout: 0s\n", Some("spec.runTimeout: 0s is outside")),
            ("  sinceOverlap: 30d\n", Some("spec.sinceOverlap")),
            ("  source: {url: http://s/fhir, timeouts: {connect: 9999999d}}\n", Some("spec.source.timeouts.connect")),
            ("  source: {url: http://s/fhir, maxPollInterval: 2h}\n", Some("spec.source.maxPollInterval")),
            ("  target: {url: http://p/fhir, timeouts: {idle: 0ms}}\n", Some("spec.target.timeouts.idle")),
            ("  limits: {maxFileSize: 99999999999999Pi}\n", Some("spec.limits.maxFileSize")),
            ("  limits: {maxRunSize: 10}\n", Some("spec.limits.maxRunSize: 10 is below 1Ki")),
        ];
        for (extra, want) in table {
            match (validate_bulk_sync(&sync(extra)), want) {
                (Ok(_), None) => {}
                (Err(e), Some(frag)) => assert!(e.contains(frag), "{extra}: {e}"),
                (got, _) => panic!("{extra}: got {got:?}, want {want:?}"),
            }
        }
        let v = validate_bulk_sync(&sync("")).unwrap();
        assert_eq!(v.template.run_timeout, DAY);
        assert_eq!(v.template.max_file_bytes, 16 << 30);
        assert_eq!(v.template.source.max_poll, DEFAULT_MAX_POLL);
    }

    #[test]
    fn verify_interval_is_bounded() {
        let y = "apiVersion: fhirsync.io/v1alpha1\nkind: FhirSubscriptionSync\nmetadata: {name: a}\nspec:\n  source: {url: http://s/fhir}\n  criteria: [\"Patient?\"]\n  endpoint: http://p/fhir\n  verifyInterval: 18446744073709551615s1s\n";
        let f: crate::api::FhirSubscriptionSync = serde_yaml::from_str(y).unwrap();
        assert!(validate_subscription_sync(&f.spec).unwrap_err().contains("spec.verifyInterval"));
    }
}
