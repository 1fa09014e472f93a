//! Preflight: what a run will need, checked in seconds before it starts — the source answers and
//! offers `$export` at the requested level, its credentials work, Pathling answers and offers
//! `$import`, the staging area is writable and Pathling's path to it well formed. `fhirsync check`
//! prints the findings; the operator shows them as the `Preflight` condition before a first run.

use std::time::Duration;

use url::Url;

use super::resolve::{self, Options, SetupError};
use crate::api::validate::TemplateValues;
use crate::api::{ExportLevel, ExportMethod, RunTemplate};
use crate::fhir::capabilities::{self, Capabilities};
use crate::fhir::client::{Error as HttpError, HttpClient};
use crate::secrets::SecretSource;

/// Longest a single check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked, e.g. "source answers".
    pub check: &'static str,
    pub ok: bool,
    /// What was found, or what went wrong.
    pub detail: String,
    /// What to do about a failure.
    pub fix: Option<String>,
    /// The condition reason a failure maps to.
    pub reason: &'static str,
    /// A failure a run cannot get past (the operator holds a first run until it passes); a
    /// capability the server does not advertise is reported, not blocking.
    pub blocking: bool,
}

fn pass(check: &'static str, detail: impl Into<String>) -> Finding {
    Finding { check, ok: true, detail: detail.into(), fix: None, reason: "ChecksPassed", blocking: false }
}

fn fail(check: &'static str, reason: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    let blocking = !matches!(reason, "ExportUnsupported" | "ImportUnsupported" | "SearchUnsupported");
    Finding { check, ok: false, detail: detail.into(), fix: Some(fix.into()), reason, blocking }
}

/// The findings as one condition: status, reason, message (failures with their fixes first).
pub fn summarize(findings: &[Finding]) -> (bool, &'static str, String) {
    let failed: Vec<&Finding> = findings.iter().filter(|f| !f.ok).collect();
    match failed.first() {
        None => (
            true,
            "ChecksPassed",
            format!(
                "all checks passed: {}",
                findings.iter().map(|f| format!("{} ({})", f.check, f.detail)).collect::<Vec<_>>().join("; ")
            ),
        ),
        Some(first) => (
            false,
            first.reason,
            failed
                .iter()
                .map(|f| {
                    format!(
                        "{}: {}{}",
                        f.check,
                        f.detail,
                        f.fix.as_ref().map(|x| format!(" — {x}")).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

fn http_fix(e: &HttpError, field: &str) -> String {
    if let Some(h) = e.first_contact_hint() {
        return format!("{h} ({field})");
    }
    if let Some(h) = crate::fhir::class::auth_hint(e) {
        return h.to_string();
    }
    match e.status() {
        Some(404) => format!("check {field}: it should be the FHIR base URL (e.g. …/fhir)"),
        _ => format!("check {field} and that the server is up"),
    }
}

/// Which way of reading the source its CapabilityStatement allows, against `export.method`, with a
/// recommendation.
pub fn method_finding(t: &RunTemplate, c: &Capabilities) -> Finding {
    let level = t.export.level;
    let export = offers_export(c, level);
    let unsearchable: Vec<&str> = t
        .export
        .types
        .iter()
        .filter(|ty| !c.resources.is_empty() && !c.has(ty, "search-type"))
        .map(String::as_str)
        .collect();
    let search = level == ExportLevel::System && unsearchable.is_empty();
    let both = if export && search { "; it can also be read by search (export.method: Search)" } else { "" };
    match t.export.method {
        ExportMethod::BulkExport if export => pass("source offers $export", format!("at level {level:?}{both}")),
        ExportMethod::BulkExport => fail(
            "source offers $export",
            "ExportUnsupported",
            format!("its CapabilityStatement lists no $export at level {level:?}"),
            if search {
                "the source can search these types: set spec.export.method: Search (or Auto), or enable Bulk Data on \
                 the server (HAPI: hapi.fhir.bulk_export_enabled)"
            } else {
                "check spec.export.level, or that the server enables Bulk Data (HAPI: hapi.fhir.bulk_export_enabled)"
            },
        ),
        ExportMethod::Search | ExportMethod::Auto if !search => fail(
            "source offers search",
            "SearchUnsupported",
            if level != ExportLevel::System {
                format!("export.level {level:?} cannot be read by search")
            } else {
                format!("its CapabilityStatement lists no search for {}", unsearchable.join(", "))
            },
            if export {
                "set spec.export.method: BulkExport: the source offers $export"
            } else {
                "check spec.export.types"
            },
        ),
        ExportMethod::Search if export => pass(
            "source offers search",
            "by _lastUpdated; it offers $export too, usually the faster choice for large syncs (export.method: BulkExport)",
        ),
        ExportMethod::Search => pass("source offers search", "by _lastUpdated (no $export: Search is the way here)"),
        ExportMethod::Auto if export => pass("source offers $export", "export.method Auto will use $export"),
        ExportMethod::Auto => pass("source offers search", "no $export: export.method Auto will read it by search"),
    }
}

/// Whether the CapabilityStatement offers `$export` at `level`.
pub fn offers_export(c: &Capabilities, level: ExportLevel) -> bool {
    let ops = &c.operations;
    let bulk = c.instantiates.iter().any(|i| i.contains("bulk-data"));
    match level {
        ExportLevel::System => ops.contains("export") || bulk,
        ExportLevel::Patient => {
            ops.contains("patient-export") || c.has("Patient", "$export") || ops.contains("export") || bulk
        }
        ExportLevel::Group => {
            ops.contains("group-export") || c.has("Group", "$export") || ops.contains("export") || bulk
        }
    }
}

async fn metadata(http: &HttpClient) -> Result<Capabilities, HttpError> {
    match tokio::time::timeout(CHECK_TIMEOUT, capabilities::read(http)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout { url: crate::text::redact(http.base()), secs: CHECK_TIMEOUT.as_secs() }),
    }
}

/// Which Pathling generation the target is, what fhirsync does there, and what it cannot do.
fn generation(t: &RunTemplate, c: &Capabilities, ping_and_pull: bool) -> Finding {
    use crate::api::PathlingGeneration;
    use crate::pathling::{Generation, dialect};
    const CHECK: &str = "Pathling generation";
    let detected = dialect::detect(c);
    let (g, why) = match t.target.pathling_generation {
        PathlingGeneration::Auto => (detected.generation, detected.why.clone()),
        PathlingGeneration::V7 => (Generation::V7, "target.pathlingGeneration".to_string()),
        PathlingGeneration::V3 => (Generation::V3, "target.pathlingGeneration".to_string()),
    };
    if ping_and_pull && !g.ping_and_pull() {
        return fail(
            CHECK,
            "PingAndPullUnsupported",
            format!("{} ({why}) has no $import-pnp", g.name()),
            "remove spec.target.pingAndPull and give the sync a staging area",
        );
    }
    let mut detail = format!("{} ({why}): {}", g.name(), g.abilities());
    if !g.deletes() && t.target.apply_deletes {
        detail.push_str(
            "; deletions found at the source cannot be sent: each run that finds some says so (DeletionsUnsupported) and holds the watermark",
        );
    }
    if detected.guessed && t.target.pathling_generation == PathlingGeneration::Auto {
        return fail(CHECK, "ImportUnsupported", detail, "set spec.target.pathlingGeneration: V7 or V3");
    }
    pass(CHECK, detail)
}

/// Checks a server's credentials: a token can be obtained (OAuth), and it is accepted.
async fn credentials(http: &HttpClient, field: &'static str, check: &'static str, out: &mut Vec<Finding>) {
    match tokio::time::timeout(CHECK_TIMEOUT, http.authorize()).await {
        Ok(Ok(true)) => out.push(pass(check, "a credential was obtained and the server accepted it")),
        Ok(Ok(false)) => out.push(pass(check, "none configured (anonymous)")),
        Ok(Err(e)) => {
            out.push(fail(check, "AuthFailed", e.to_string(), format!("fix {field}.auth or the Secret it references")))
        }
        Err(_) => out.push(fail(
            check,
            "AuthFailed",
            "obtaining a token timed out",
            format!("check {field}.auth's token endpoint"),
        )),
    }
}

/// All findings for a run template in `namespace`. The staging probe writes and removes one file.
pub async fn preflight(
    t: &RunTemplate,
    values: &TemplateValues,
    namespace: &str,
    secrets: &dyn SecretSource,
    opts: &Options,
) -> Vec<Finding> {
    let mut out = vec![];
    let probe = format!("preflight-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let setup = match resolve::setup(
        t,
        values,
        resolve::Which { namespace, run: &probe, since: None, verify: None },
        secrets,
        opts,
    )
    .await
    {
        Ok(s) => s,
        Err(SetupError { failure, .. }) => {
            out.push(fail(
                "credentials and settings",
                failure.reason.as_str(),
                failure.message,
                "fix the spec or the Secret it names",
            ));
            return out;
        }
    };
    let ping_and_pull = setup.kind == super::resolve::RunKind::PingAndPull;

    // the source
    if !ping_and_pull {
        let http = setup.source.http();
        match metadata(http).await {
            Ok(c) => {
                out.push(pass("source answers", format!("{} at {}", c.describe(), crate::text::redact(http.base()))));
                out.push(method_finding(t, &c));
                credentials(http, "spec.source", "source credentials", &mut out).await;
            }
            Err(e) => out.push(fail(
                "source answers",
                reason_for(&e, "SourceUnreachable"),
                e.to_string(),
                http_fix(&e, "spec.source.url"),
            )),
        }
    }

    // Pathling
    let http = setup.pathling.http();
    match metadata(http).await {
        Ok(c) => {
            out.push(pass("Pathling answers", format!("{} at {}", c.describe(), crate::text::redact(http.base()))));
            out.push(generation(t, &c, ping_and_pull));
            let op = if ping_and_pull { "import-pnp" } else { "import" };
            if c.operations.contains(op) {
                let verify = if c.operations.contains("export") { "; $export too (drift verification)" } else { "" };
                out.push(pass("Pathling offers $import", format!("${op}{verify}")));
            } else {
                out.push(fail(
                    "Pathling offers $import",
                    "ImportUnsupported",
                    format!("its CapabilityStatement lists no ${op}"),
                    "spec.target.url must be a Pathling server (3.0 or later)",
                ));
            }
            credentials(http, "spec.target", "Pathling credentials", &mut out).await;
        }
        Err(e) => out.push(fail(
            "Pathling answers",
            reason_for(&e, "TargetUnreachable"),
            e.to_string(),
            http_fix(&e, "spec.target.url"),
        )),
    }

    // staging
    if let Some(staging) = &setup.staging {
        let owner = format!("preflight-{probe}");
        let r: Result<(), String> = async {
            staging.claim(&owner).await.map_err(|e| e.to_string())?;
            let mut w = staging.create("probe.000000.ndjson").await.map_err(|e| e.to_string())?;
            w.write(bytes::Bytes::from_static(b"{}\n")).await.map_err(|e| e.to_string())?;
            w.finish().await.map_err(|e| e.to_string())?;
            staging.remove_all(&owner).await.map_err(|e| e.to_string())
        }
        .await;
        match r {
            Ok(()) => out.push(pass("staging is writable", "a probe file was written and removed")),
            Err(e) => out.push(fail(
                "staging is writable",
                "StagingUnwritable",
                e,
                "check spec.staging and the volume's permissions",
            )),
        }
        out.push(pathling_path(t));
    }
    out
}

fn reason_for(e: &HttpError, unreachable: &'static str) -> &'static str {
    crate::fhir::class::classify(e).reason(unreachable, unreachable)
}

/// Whether Pathling's URL of the staging area is well formed (Pathling reads `file:`, `s3a:`,
/// `hdfs:`, and only names ending in `.ndjson`: no query strings).
pub fn pathling_path(t: &RunTemplate) -> Finding {
    const CHECK: &str = "pathlingPath is well formed";
    let raw = match (&t.staging.volume, &t.staging.object_store) {
        (Some(v), _) => &v.pathling_path,
        (_, Some(o)) => &o.pathling_url,
        _ => return pass(CHECK, "pingAndPull: Pathling fetches the files itself"),
    };
    match Url::parse(raw) {
        Ok(u) if u.query().is_some() || u.fragment().is_some() => fail(
            CHECK,
            "InvalidSpec",
            format!("{raw} has a query or fragment"),
            "Pathling skips file names that do not end in .ndjson: drop the query",
        ),
        Ok(u) if u.scheme() == "file" && u.path().starts_with('/') && u.host_str().unwrap_or("").is_empty() => pass(
            CHECK,
            format!(
                "{raw}{}",
                if raw.trim_end_matches('/') == "file:///usr/share/staging"
                    || raw.starts_with("file:///usr/share/staging/")
                {
                    " (under Pathling's default allowableSources)"
                } else {
                    " (it must lie under Pathling's pathling.import.allowableSources)"
                }
            ),
        ),
        Ok(u) if matches!(u.scheme(), "s3a" | "s3" | "hdfs") && u.host_str().is_some_and(|h| !h.is_empty()) => {
            pass(CHECK, format!("{raw} (it must lie under Pathling's pathling.import.allowableSources)"))
        }
        _ => fail(
            CHECK,
            "InvalidSpec",
            format!("{raw} is not a file:///, s3a:// or hdfs:// URL"),
            "write it as Pathling sees the folder, e.g. file:///usr/share/staging",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_at_each_level_from_the_capability_statement() {
        let mut c = Capabilities::default();
        assert!(!offers_export(&c, ExportLevel::System));
        c.operations.insert("patient-export".into());
        assert!(offers_export(&c, ExportLevel::Patient) && !offers_export(&c, ExportLevel::System));
        c.instantiates.push("http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data".into());
        assert!(offers_export(&c, ExportLevel::System) && offers_export(&c, ExportLevel::Group));
    }

    #[test]
    fn check_says_which_method_a_source_supports() {
        let template = |method: &str| -> RunTemplate {
            serde_yaml::from_str(&format!(
                "source: {{url: http://s}}\ntarget: {{url: http://p}}\nstaging: {{volume: {{path: /s, pathlingPath: file:///s}}}}\n\
                 export: {{types: [Patient], method: {method}}}"
            ))
            .unwrap()
        };
        let mut search_only = Capabilities::default();
        search_only.resources.insert("Patient".into(), ["read".to_string(), "search-type".to_string()].into());
        let mut both = search_only.clone();
        both.operations.insert("export".into());
        let mut export_only = Capabilities::default();
        export_only.operations.insert("export".into());
        export_only.resources.insert("Patient".into(), ["read".to_string()].into());
        // (method, capabilities, ok, check, words the finding must hold)
        let table = [
            ("BulkExport", &both, true, "source offers $export", "also be read by search"),
            ("BulkExport", &search_only, false, "source offers $export", "set spec.export.method: Search"),
            ("Search", &search_only, true, "source offers search", "Search is the way here"),
            ("Search", &both, true, "source offers search", "usually the faster choice"),
            ("Search", &export_only, false, "source offers search", "set spec.export.method: BulkExport"),
            ("Auto", &search_only, true, "source offers search", "Auto will read it by search"),
            ("Auto", &both, true, "source offers $export", "Auto will use $export"),
        ];
        for (method, c, ok, check, words) in table {
            let f = method_finding(&template(method), c);
            let text = format!("{} {}", f.detail, f.fix.clone().unwrap_or_default());
            assert_eq!((f.ok, f.check), (ok, check), "{method}: {text}");
            assert!(text.contains(words), "{method}: {text}");
            assert!(!f.blocking, "a method finding never holds a first run: the run says what fails");
        }
    }

    #[test]
    fn pathling_paths() {
        let t = |path: &str| -> RunTemplate {
            serde_yaml::from_str(&format!(
                "source: {{url: http://s}}\ntarget: {{url: http://p}}\nstaging: {{volume: {{path: /s, pathlingPath: {path:?}}}}}"
            ))
            .unwrap()
        };
        assert!(pathling_path(&t("file:///usr/share/staging")).detail.contains("default allowableSources"));
        assert!(pathling_path(&t("file:///data/x")).ok);
        assert!(!pathling_path(&t("file://host/x")).ok);
        assert!(!pathling_path(&t("file:///x?sig=1")).ok);
        assert!(pathling_path(&t("s3a://bucket/prefix")).ok);
        assert!(!pathling_path(&t("/usr/share/staging")).ok);
    }
}
