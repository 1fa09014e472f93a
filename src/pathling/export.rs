//! Pathling's bulk `$export` (3.0), as a verification uses it: the ids Pathling holds per type
//! (`_type`, `_elements=id`). Kicked off by GET (Pathling's job cache keys on the URL), polled at
//! `$job` with `Accept: application/json` (the plain Bulk Data manifest), files read from `$result`.

use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{PathlingClient, busy_if_503, job_location, prefer_async};
use crate::fhir::bulk::{MANIFEST_MAX, Manifest, OutputFile};
use crate::fhir::client::{Error, peer_url, read_capped};
use crate::fhir::retry::retry_after;
use crate::text::{peer_text, redact};

/// Result of polling an export job.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportPoll {
    Running {
        progress: Option<String>,
        wait: Option<std::time::Duration>,
    },
    Done(Box<Manifest>),
    /// 404: Pathling forgot the job (restarted).
    Lost,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(default)]
    output: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ParamsManifest {
    #[serde(default)]
    parameter: crate::fhir::bundle::BoundedVec<Param, { crate::fhir::bulk::MAX_FILES }>,
}

#[derive(Deserialize)]
struct Param {
    #[serde(default)]
    name: String,
    #[serde(rename = "valueInstant", default)]
    value_instant: Option<String>,
    #[serde(default)]
    part: crate::fhir::bundle::BoundedVec<Part, 8>,
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    name: String,
    #[serde(rename = "valueCode", default)]
    value_code: Option<String>,
    #[serde(rename = "valueUri", default)]
    value_uri: Option<String>,
    #[serde(rename = "valueUrl", default)]
    value_url: Option<String>,
}

/// Reads a finished export's answer: the plain manifest, or the `Parameters` form Pathling sends
/// when it is asked for FHIR JSON. Anything else (an OperationOutcome, a body without `output`) is
/// an error — never an empty export, which would read as "Pathling holds nothing".
pub fn export_manifest(body: &[u8]) -> Result<Manifest, String> {
    let p: Probe = serde_json::from_slice(body)
        .map_err(|_| format!("the export job answered 200 with {}", crate::text::describe_text_body(body, None)))?;
    match p.resource_type.as_deref() {
        None if p.output.is_some() => Manifest::parse(body),
        Some("Parameters") => {
            let pm: ParamsManifest = serde_json::from_slice(body).map_err(|e| format!("the export result: {e}"))?;
            let mut m = Manifest { requires_access_token: true, ..Default::default() };
            for p in pm.parameter.0 {
                match p.name.as_str() {
                    "transactionTime" => m.transaction_time = p.value_instant,
                    "output" | "error" => {
                        let get = |n: &str| p.part.0.iter().find(|x| x.name == n);
                        let type_ = get("type").and_then(|x| x.value_code.clone()).unwrap_or_default();
                        let url =
                            get("url").and_then(|x| x.value_uri.clone().or(x.value_url.clone())).unwrap_or_default();
                        let f = OutputFile { type_, url, count: None };
                        if p.name == "output" { m.output.push(f) } else { m.error.push(f) }
                    }
                    _ => {}
                }
            }
            let json = serde_json::to_vec(&m).map_err(|e| e.to_string())?;
            Manifest::parse(&json)
        }
        Some(other) => {
            Err(format!("the export job answered 200 with a {} instead of a manifest", peer_text(other, 64)))
        }
        None => Err("the export job answered 200 with JSON that is not a manifest (no output)".into()),
    }
}

impl PathlingClient {
    /// Kicks off an export of the ids of `types` (all types when empty); returns the `$job` URL.
    pub async fn export_ids(&self, types: &[String]) -> Result<String, Error> {
        let mut url = self.http.url("$export");
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("_outputFormat", "application/fhir+ndjson");
            if !types.is_empty() {
                q.append_pair("_type", &types.join(","));
            }
            q.append_pair("_elements", "id");
        }
        let r = prefer_async(reqwest_get(url.clone()).header(ACCEPT, "application/fhir+json"));
        let resp = self.http.send(r).await?;
        if resp.status() == StatusCode::ACCEPTED {
            return job_location(&url, &resp, "$export");
        }
        Err(busy_if_503(Error::from_response(&Method::GET, resp).await))
    }

    /// Polls an export job once.
    pub async fn poll_export(&self, job_url: &str) -> Result<ExportPoll, Error> {
        let url = peer_url(job_url)?;
        let resp = self.http.send(reqwest_get(url.clone()).header(ACCEPT, "application/json")).await?;
        match resp.status() {
            StatusCode::ACCEPTED => {
                let progress =
                    resp.headers().get("x-progress").and_then(|v| v.to_str().ok()).map(|s| peer_text(s, 100));
                Ok(ExportPoll::Running { progress, wait: retry_after(resp.headers()) })
            }
            StatusCode::OK => {
                let body = read_capped(resp, MANIFEST_MAX, "the export manifest").await?;
                export_manifest(&body)
                    .map(|m| ExportPoll::Done(Box::new(m)))
                    .map_err(|message| Error::Protocol { url: redact(&url), message })
            }
            StatusCode::NOT_FOUND => Ok(ExportPoll::Lost),
            _ => Err(busy_if_503(Error::from_response(&Method::GET, resp).await)),
        }
    }

    /// A client for reading the export's files (on Pathling's origin, with its credential).
    pub fn files(&self) -> crate::fhir::bulk::BulkClient {
        crate::fhir::bulk::BulkClient::new(self.http.clone())
    }
}

fn reqwest_get(url: url::Url) -> crate::fhir::client::Request {
    crate::fhir::client::Request::new(Method::GET, url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_in_both_forms_and_nothing_else() {
        let plain = br#"{"transactionTime":"2026-11-26T03:00:00Z","request":"x","requiresAccessToken":false,
            "output":[{"type":"Patient","url":"http://p/fhir/$result?job=1&file=Patient.00000.ndjson"}],"error":[]}"#;
        assert_eq!(export_manifest(plain).unwrap().output.len(), 1);
        let params = br#"{"resourceType":"Parameters","parameter":[{"name":"transactionTime","valueInstant":"2026-11-26T03:00:00Z"},
            {"name":"output","part":[{"name":"type","valueCode":"Patient"},{"name":"url","valueUri":"http://p/fhir/$result?job=1&file=a.ndjson"}]}]}"#;
        let m = export_manifest(params).unwrap();
        assert_eq!((m.output[0].type_.as_str(), m.output.len()), ("Patient", 1));
        for bad in [&br#"{"resourceType":"OperationOutcome"}"#[..], br#"{"ok":1}"#, b"<html/>"] {
            assert!(export_manifest(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
