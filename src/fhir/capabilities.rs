//! A server's CapabilityStatement (`GET [base]/metadata`), read once and bounded: FHIR version,
//! software, system operations and interactions, and per-type interactions.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::client::{Error, HttpClient, Request, read_capped};
use crate::text::{peer_text, redact};

/// Largest CapabilityStatement read (HAPI's is about 1 MB).
pub const METADATA_MAX: usize = 8 << 20;

/// What a CapabilityStatement says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `fhirVersion`, e.g. `4.0.1`.
    pub fhir_version: String,
    /// `software.name` and `software.version`.
    pub software: Option<String>,
    /// System-level operation names (`export`, `import`, `job`), without `$`.
    pub operations: BTreeSet<String>,
    /// System-level interactions (`history-system`, `batch`, `transaction`).
    pub system_interactions: BTreeSet<String>,
    /// Per resource type: its interactions (`read`, `history-type`, `create`, `search-type`) and its
    /// type-level operations (as `$export`).
    pub resources: BTreeMap<String, BTreeSet<String>>,
    /// `instantiates` canonicals (e.g. the Bulk Data server CapabilityStatement).
    pub instantiates: Vec<String>,
}

impl Capabilities {
    /// Parses a CapabilityStatement.
    pub fn parse(v: &Value) -> Option<Self> {
        if v["resourceType"] != "CapabilityStatement" {
            return None;
        }
        let text = |v: &Value| v.as_str().map(|s| peer_text(s, 64));
        let mut c = Capabilities {
            fhir_version: text(&v["fhirVersion"]).unwrap_or_else(|| "unknown".into()),
            software: text(&v["software"]["name"]).map(|n| match text(&v["software"]["version"]) {
                Some(ver) => format!("{n} {ver}"),
                None => n,
            }),
            instantiates: v["instantiates"].as_array().into_iter().flatten().filter_map(text).take(20).collect(),
            ..Default::default()
        };
        let name = |o: &Value| text(&o["name"]).map(|n| n.trim_start_matches('$').to_string());
        for rest in v["rest"].as_array().into_iter().flatten().filter(|r| r["mode"] != "client").take(4) {
            c.operations.extend(rest["operation"].as_array().into_iter().flatten().filter_map(name).take(500));
            c.system_interactions
                .extend(rest["interaction"].as_array().into_iter().flatten().filter_map(|i| text(&i["code"])).take(50));
            for r in rest["resource"].as_array().into_iter().flatten().take(1000) {
                let Some(t) = r["type"].as_str().filter(|t| super::ids::is_type(t)) else { continue };
                let set = c.resources.entry(t.to_string()).or_default();
                set.extend(r["interaction"].as_array().into_iter().flatten().filter_map(|i| text(&i["code"])).take(50));
                set.extend(
                    r["operation"].as_array().into_iter().flatten().filter_map(name).map(|n| format!("${n}")).take(100),
                );
            }
        }
        Some(c)
    }

    /// Whether the server lists interaction `code` for `resource_type`.
    pub fn has(&self, resource_type: &str, code: &str) -> bool {
        self.resources.get(resource_type).is_some_and(|s| s.contains(code))
    }

    /// A one-line description: `Pathling 3.0.0, FHIR 4.0.1`.
    pub fn describe(&self) -> String {
        match &self.software {
            Some(s) => format!("{s}, FHIR {}", self.fhir_version),
            None => format!("FHIR {}", self.fhir_version),
        }
    }
}

/// Reads `[base]/metadata`. A server that answers with something else than a CapabilityStatement
/// gets an error that says its URL is probably not a FHIR base.
pub async fn read(http: &HttpClient) -> Result<Capabilities, Error> {
    let url = http.url("metadata");
    let resp = http.send(Request::new(Method::GET, url.clone()).header(ACCEPT, "application/fhir+json")).await?;
    let not_fhir = |what: String| Error::Protocol {
        url: redact(&url),
        message: format!("{what}: is {} the FHIR base URL (e.g. …/fhir)?", redact(http.base())),
    };
    if resp.status() != StatusCode::OK {
        let e = Error::from_response(&Method::GET, resp).await;
        return match e {
            Error::Status { status: 404, message, .. } => Err(not_fhir(format!("answered 404 ({message})"))),
            e => Err(e),
        };
    }
    let body = read_capped(resp, METADATA_MAX, "the CapabilityStatement").await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| not_fhir(format!("answered 200 with {}", crate::text::describe_text_body(&body, None))))?;
    Capabilities::parse(&v).ok_or_else(|| not_fhir("answered 200 but not with a CapabilityStatement".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_matters() {
        let v = json!({"resourceType":"CapabilityStatement","fhirVersion":"4.0.1",
            "software":{"name":"Pathling","version":"3.0.0"},
            "rest":[{"mode":"server","interaction":[{"code":"history-system"},{"code":"batch"}],
                "operation":[{"name":"import"},{"name":"$export"}],
                "resource":[{"type":"Patient","interaction":[{"code":"read"},{"code":"history-type"}],
                              "operation":[{"name":"export"}]},
                            {"type":"../bad","interaction":[{"code":"read"}]}]}]});
        let c = Capabilities::parse(&v).unwrap();
        assert_eq!(c.describe(), "Pathling 3.0.0, FHIR 4.0.1");
        assert!(c.operations.contains("import") && c.operations.contains("export"));
        assert!(c.system_interactions.contains("history-system"));
        assert!(c.has("Patient", "history-type") && c.has("Patient", "$export"));
        assert_eq!(c.resources.len(), 1);
        assert!(Capabilities::parse(&json!({"resourceType":"Patient"})).is_none());
    }
}
