//! Spec checks that mirror the CRD's CEL rules (for `sync-once`, which has no API server) plus the
//! ones CEL cannot do (cron parsing, time zones). Messages name the field and say how to fix it.

use super::{BulkExportSyncSpec, ExportLevel, FhirServer, SaveMode, parse_duration};

fn server(s: &FhirServer, what: &str, errs: &mut Vec<String>) {
    if url::Url::parse(&s.url).map(|u| !matches!(u.scheme(), "http" | "https")).unwrap_or(true) {
        errs.push(format!("{what}.url {:?} must be an absolute http(s) URL", s.url));
    }
    if let Some(a) = &s.auth {
        let n = [
            a.bearer_token.is_some(),
            a.basic.is_some(),
            a.client_credentials.is_some(),
            a.smart_backend_services.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if n > 1 {
            errs.push(format!(
                "{what}.auth: set at most one of bearerToken, basic, clientCredentials, smartBackendServices"
            ));
        }
    }
    if let Some(t) = &s.tls
        && t.client_cert_ref.is_some() != t.client_key_ref.is_some()
    {
        errs.push(format!("{what}.tls: clientCertRef and clientKeyRef go together"));
    }
    if let Some(t) = &s.timeouts {
        for (f, v) in [("connect", &t.connect), ("response", &t.response), ("idle", &t.idle)] {
            if let Err(e) = parse_duration(v) {
                errs.push(format!("{what}.timeouts.{f}: {e}"));
            }
        }
    }
}

/// All problems with a BulkExportSync spec, or Ok. (Schedule problems are reported separately by
/// [`crate::schedule::Schedule::parse`], as reason InvalidSchedule.)
pub fn validate_bulk_sync(spec: &BulkExportSyncSpec) -> Result<(), String> {
    let mut errs = vec![];
    server(&spec.source, "spec.source", &mut errs);
    server(&spec.target.server(), "spec.target", &mut errs);
    match (spec.export.level, &spec.export.group_id) {
        (ExportLevel::Group, None) => errs.push("spec.export.groupId is required when level is Group".into()),
        (ExportLevel::System | ExportLevel::Patient, Some(_)) => {
            errs.push("spec.export.groupId is only allowed when level is Group".into())
        }
        _ => {}
    }
    let st = &spec.staging;
    let n = [st.volume.is_some(), st.object_store.is_some(), st.ping_and_pull.is_some()].iter().filter(|x| **x).count();
    if n != 1 {
        errs.push("spec.staging: set exactly one of volume, objectStore, pingAndPull".into());
    }
    if spec.incremental && spec.target.save_mode != SaveMode::Merge {
        errs.push(
            "spec.target.saveMode: incremental runs allow merge only (set incremental: false for other modes)".into(),
        );
    }
    if st.ping_and_pull.is_some()
        && (spec.export.level != ExportLevel::System || spec.target.apply_deletes || spec.source.auth.is_some())
    {
        errs.push("spec.staging.pingAndPull needs export.level System, target.applyDeletes false and no source.auth (Pathling uses its own credential)".into());
    }
    for (f, v) in [("sinceOverlap", &spec.since_overlap), ("runTimeout", &spec.run_timeout)] {
        if let Err(e) = parse_duration(v) {
            errs.push(format!("spec.{f}: {e}"));
        }
    }
    if !(1..=64).contains(&spec.max_parallel_downloads) {
        errs.push("spec.maxParallelDownloads must be between 1 and 64".into());
    }
    if errs.is_empty() { Ok(()) } else { Err(errs.join("; ")) }
}
