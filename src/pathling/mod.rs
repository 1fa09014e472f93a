//! Pathling server client: `$import`, `$import-pnp`, `$job`, single-resource `DELETE`, and `$export`
//! (in [`export`]).
//! No Kubernetes types. Answers are validated here: a `$job` that answers 200 counts as done only
//! when its body is the import's result.

use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_LOCATION, CONTENT_TYPE, HeaderName};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

use crate::fhir::client::{Error, HttpClient, Request, peer_url, read_capped};
use crate::fhir::ids::{is_id, is_type};
use crate::fhir::outcome::OperationOutcome;
use crate::fhir::retry::retry_after;
use crate::text::{describe_text_body, peer_text, redact};

mod batch;
pub mod dialect;
mod export;
pub use batch::{MAX_ENTRIES as BATCH_MAX, Put};
pub use dialect::{Detected, Generation};
pub use export::{ExportPoll, export_manifest};

/// Largest `$job` result read.
const RESULT_MAX: usize = 8 << 20;

/// One file to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportInput {
    pub resource_type: String,
    pub url: String,
}

/// What a finished import reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImportResult {
    /// Pathling's `transactionTime` (its clock at completion).
    pub transaction_time: Option<String>,
    /// The `output.inputUrl` values: one per input Pathling handled.
    pub input_urls: Vec<String>,
    /// Whether the result lists its inputs at all (V3 does; V7 answers an OperationOutcome).
    pub lists_inputs: bool,
}

/// What a `$import` submission gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// An asynchronous job to poll.
    Job(String),
    /// Done at once (a server that answered synchronously), with its validated result.
    Done(ImportResult),
}

/// Result of polling a `$job`.
#[derive(Debug, Clone, PartialEq)]
pub enum JobPoll {
    /// Running.
    Running { progress: Option<String>, wait: Option<Duration> },
    /// Finished, with its validated result.
    Done(ImportResult),
    /// 404: the job is unknown (Pathling restarted; its jobs live in memory).
    Lost,
}

/// Parameters for `$import-pnp`.
#[derive(Debug, Clone, Default)]
pub struct PnpRequest {
    pub export_url: String,
    pub save_mode: String,
    pub types: Vec<String>,
    pub since: Option<String>,
    pub type_filters: Vec<String>,
    pub elements: Vec<String>,
}

/// Pathling client. It speaks the generation the server is ([`dialect`]): given by the spec, or read
/// from the CapabilityStatement once, before the first request that depends on it.
#[derive(Clone, Debug)]
pub struct PathlingClient {
    http: HttpClient,
    /// `target.pathlingGeneration` when it says.
    forced: Option<Generation>,
    detected: std::sync::Arc<tokio::sync::OnceCell<Detected>>,
}

fn prefer_async(r: Request) -> Request {
    r.header(HeaderName::from_static("prefer"), "respond-async")
}

impl PathlingClient {
    /// Wraps an HTTP client for Pathling.
    pub fn new(http: HttpClient) -> Self {
        Self { http, forced: None, detected: Default::default() }
    }

    /// The generation the spec says the server is (`None`: read it from the server).
    pub fn with_generation(mut self, g: Option<Generation>) -> Self {
        self.forced = g;
        self
    }

    /// The server's generation: the spec's, or what its CapabilityStatement says (read once; a
    /// failed read is tried again next time).
    pub async fn generation(&self) -> Result<Detected, Error> {
        if let Some(g) = self.forced {
            return Ok(Detected { generation: g, why: "target.pathlingGeneration".into(), guessed: false });
        }
        self.detected
            .get_or_try_init(|| async {
                crate::fhir::capabilities::read(&self.http).await.map(|c| dialect::detect(&c))
            })
            .await
            .cloned()
    }

    /// The underlying HTTP client.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The `$import` Parameters body (valueCode / valueUrl exactly, saveMode explicit), serialised
    /// straight from typed parts (a JSON tree would cost kilobytes per file).
    pub fn import_body(inputs: &[ImportInput], save_mode: &str) -> Vec<u8> {
        let mut parameter =
            vec![Param::code("inputFormat", "application/fhir+ndjson"), Param::code("saveMode", save_mode)];
        parameter.extend(inputs.iter().map(|i| Param {
            name: "input",
            part: vec![
                Param::code("resourceType", &i.resource_type),
                Param { value_url: Some(&i.url), ..Param::new("url") },
            ],
            ..Param::new("input")
        }));
        serde_json::to_vec(&Parameters { resource_type: "Parameters", parameter }).unwrap_or_default()
    }

    /// The `$import-pnp` Parameters body.
    pub fn pnp_body(req: &PnpRequest) -> Value {
        let mut params = vec![
            json!({"name": "exportUrl", "valueUrl": req.export_url}),
            json!({"name": "inputFormat", "valueCode": "application/fhir+ndjson"}),
            json!({"name": "saveMode", "valueCode": req.save_mode}),
        ];
        for t in &req.types {
            params.push(json!({"name": "_type", "valueString": t}));
        }
        if let Some(s) = &req.since {
            params.push(json!({"name": "_since", "valueInstant": s}));
        }
        for f in &req.type_filters {
            params.push(json!({"name": "_typeFilter", "valueString": f}));
        }
        for e in &req.elements {
            params.push(json!({"name": "_elements", "valueString": e}));
        }
        json!({"resourceType": "Parameters", "parameter": params})
    }

    /// The `$import` body of Pathling 7.x: one `source` part per file, each with its `mode` as a
    /// valueCode — 7.x defaults to overwrite and ignores a mode sent any other way.
    pub fn import_body_v7(inputs: &[ImportInput], save_mode: &str) -> Vec<u8> {
        let parameter = inputs
            .iter()
            .map(|i| Param {
                part: vec![
                    Param::code("resourceType", &i.resource_type),
                    Param { value_url: Some(&i.url), ..Param::new("url") },
                    Param::code("mode", save_mode),
                ],
                ..Param::new("source")
            })
            .collect();
        serde_json::to_vec(&Parameters { resource_type: "Parameters", parameter }).unwrap_or_default()
    }

    /// Submits `$import` in the server's dialect.
    pub async fn import(&self, inputs: &[ImportInput], save_mode: &str) -> Result<Submitted, Error> {
        match self.generation().await?.generation {
            Generation::V3 => self.submit("$import", Self::import_body(inputs, save_mode)).await.map(Submitted::Job),
            Generation::V7 => self.submit_v7(Self::import_body_v7(inputs, save_mode)).await,
        }
    }

    /// 7.x answers `202` with a job when asked to (as fhirsync always asks), else `200` when done.
    /// It keys asynchronous jobs by URL and headers, not by body: a second import with other files
    /// would be handed the first one's job (and never run), so each submission carries a nonce.
    async fn submit_v7(&self, body: Vec<u8>) -> Result<Submitted, Error> {
        let mut url = self.http.url("$import");
        url.query_pairs_mut().append_pair("nonce", &uuid::Uuid::new_v4().simple().to_string());
        let resp = self.post_async(&url, body).await?;
        match resp.status() {
            StatusCode::ACCEPTED => job_location(&url, &resp, "$import").map(Submitted::Job),
            StatusCode::OK => {
                let ctype = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
                let body = read_capped(resp, RESULT_MAX, "the import result").await?;
                import_result(&body, ctype.as_deref(), Generation::V7)
                    .map(Submitted::Done)
                    .map_err(|message| Error::Protocol { url: redact(&url), message })
            }
            _ => Err(busy_if_503(Error::from_response(&Method::POST, resp).await)),
        }
    }

    /// Submits `$import-pnp`; returns the `$job` URL.
    pub async fn import_pnp(&self, req: &PnpRequest) -> Result<String, Error> {
        self.submit("$import-pnp", serde_json::to_vec(&Self::pnp_body(req)).unwrap_or_default()).await
    }

    /// POSTs a Parameters body asking for an asynchronous answer.
    async fn post_async(&self, url: &Url, body: Vec<u8>) -> Result<reqwest::Response, Error> {
        let r = prefer_async(
            Request::new(Method::POST, url.clone())
                .header(ACCEPT, "application/fhir+json")
                .header(CONTENT_TYPE, "application/fhir+json")
                .body(body),
        );
        self.http.send(r).await
    }

    async fn submit(&self, op: &str, body: Vec<u8>) -> Result<String, Error> {
        let url = self.http.url(op);
        let resp = self.post_async(&url, body).await?;
        if resp.status() == StatusCode::ACCEPTED {
            return job_location(&url, &resp, op);
        }
        Err(busy_if_503(Error::from_response(&Method::POST, resp).await))
    }

    /// Polls a `$job` URL once.
    pub async fn poll_job(&self, job_url: &str) -> Result<JobPoll, Error> {
        let url = peer_url(job_url)?;
        let r = Request::new(Method::GET, url.clone()).header(ACCEPT, "application/fhir+json");
        let resp = self.http.send(r).await?;
        match resp.status() {
            StatusCode::ACCEPTED => {
                let progress =
                    resp.headers().get("x-progress").and_then(|v| v.to_str().ok()).map(|s| peer_text(s, 100));
                Ok(JobPoll::Running { progress, wait: retry_after(resp.headers()) })
            }
            StatusCode::OK => {
                let ctype = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
                let body = read_capped(resp, RESULT_MAX, "the import result").await?;
                let generation = self.generation().await?.generation;
                import_result(&body, ctype.as_deref(), generation)
                    .map(JobPoll::Done)
                    .map_err(|message| Error::Protocol { url: redact(&url), message })
            }
            StatusCode::NOT_FOUND => Ok(JobPoll::Lost),
            _ => Err(busy_if_503(Error::from_response(&Method::GET, resp).await)),
        }
    }

    /// Cancels or forgets a job (`DELETE $job?id=`); 404 counts as done.
    pub async fn delete_job(&self, job_url: &str) -> Result<(), Error> {
        let url = peer_url(job_url)?;
        let resp = self.http.send(Request::new(Method::DELETE, url)).await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(Error::from_response(&Method::DELETE, resp).await)
    }

    /// Deletes one resource; a 404 (already absent) counts as done. Type and id must be well formed.
    /// Pathling 7.x has no DELETE: that is said, never sent.
    pub async fn delete_resource(&self, resource_type: &str, id: &str) -> Result<(), Error> {
        if !self.generation().await?.generation.deletes() {
            return Err(Error::Unsupported {
                url: redact(self.http.base()),
                what: "DELETE of a single resource (Pathling Server 7.x has none)".into(),
            });
        }
        if !is_type(resource_type) || !is_id(id) {
            return Err(Error::Protocol {
                url: redact(self.http.base()),
                message: format!(
                    "refusing to delete {:?}/{:?}: not a resource type and id",
                    peer_text(resource_type, 64),
                    peer_text(id, 64)
                ),
            });
        }
        let url = self.http.url_segments(&[resource_type, id]);
        let resp = self.http.send(Request::new(Method::DELETE, url).header(ACCEPT, "application/fhir+json")).await?;
        if resp.status().is_success() || crate::fhir::class::gone(resp.status().as_u16()) {
            return Ok(());
        }
        Err(Error::from_response(&Method::DELETE, resp).await)
    }
}

/// Pathling answers 503 while another import holds its one import slot: busy, not broken.
fn busy_if_503(e: Error) -> Error {
    if e.status() == Some(503) { e.into_busy() } else { e }
}

/// A Parameters resource, written from typed parts.
#[derive(Serialize)]
struct Parameters<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    parameter: Vec<Param<'a>>,
}

#[derive(Serialize)]
struct Param<'a> {
    name: &'static str,
    #[serde(rename = "valueCode", skip_serializing_if = "Option::is_none")]
    value_code: Option<&'a str>,
    #[serde(rename = "valueUrl", skip_serializing_if = "Option::is_none")]
    value_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    part: Vec<Param<'a>>,
}

impl<'a> Param<'a> {
    fn new(name: &'static str) -> Self {
        Self { name, value_code: None, value_url: None, part: vec![] }
    }
    fn code(name: &'static str, v: &'a str) -> Self {
        Self { value_code: Some(v), ..Self::new(name) }
    }
}

/// The parts of an import result fhirsync reads (typed: a JSON tree would cost kilobytes per file).
#[derive(Deserialize)]
struct ResultBody {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(default)]
    parameter: Vec<ResultParam>,
}

#[derive(Deserialize)]
struct ResultParam {
    #[serde(default)]
    name: String,
    #[serde(rename = "valueString", default)]
    value_string: Option<String>,
    #[serde(rename = "valueInstant", default)]
    value_instant: Option<String>,
    #[serde(default)]
    part: Vec<ResultPart>,
}

#[derive(Deserialize)]
struct ResultPart {
    #[serde(default)]
    name: String,
    #[serde(rename = "valueUrl", default)]
    value_url: Option<String>,
    #[serde(rename = "valueUri", default)]
    value_uri: Option<String>,
}

/// Validates a finished import's body: Pathling's result Parameters (V3), or (V7) an OperationOutcome
/// that reports no error — and not whatever a proxy put there.
pub fn import_result(body: &[u8], content_type: Option<&str>, generation: Generation) -> Result<ImportResult, String> {
    let v: ResultBody = serde_json::from_slice(body).map_err(|_| {
        format!(
            "the import job answered 200 with {} instead of its result; is target.url Pathling's FHIR base?",
            describe_text_body(body, content_type)
        )
    })?;
    match v.resource_type.as_deref() {
        Some("Parameters") => {}
        Some("OperationOutcome") if generation == Generation::V7 => {
            let oo = OperationOutcome::parse(body).unwrap_or_default();
            if oo.has_errors() || oo.issue.is_empty() {
                return Err(format!("the import job answered 200 with an OperationOutcome: {}", oo.summary()));
            }
            return Ok(ImportResult { lists_inputs: false, ..Default::default() });
        }
        Some("OperationOutcome") => {
            let oo = OperationOutcome::parse(body).unwrap_or_default();
            return Err(format!("the import job answered 200 with an OperationOutcome: {}", oo.summary()));
        }
        other => {
            return Err(format!(
                "the import job answered 200 with {} instead of Parameters",
                other.map(|t| peer_text(t, 64)).unwrap_or_else(|| "JSON that is not a FHIR resource".into())
            ));
        }
    }
    let mut r = ImportResult { lists_inputs: true, ..Default::default() };
    for p in v.parameter {
        match p.name.as_str() {
            "transactionTime" => r.transaction_time = p.value_string.or(p.value_instant).map(|s| peer_text(&s, 64)),
            "output" => r.input_urls.extend(
                p.part.into_iter().filter(|x| x.name == "inputUrl").filter_map(|x| x.value_url.or(x.value_uri)),
            ),
            _ => {}
        }
    }
    Ok(r)
}

/// The job an asynchronous kick-off (`202`) points at: its `Content-Location`, resolved against
/// the request's URL, http(s) only.
fn job_location(url: &Url, resp: &reqwest::Response, op: &str) -> Result<String, Error> {
    let loc = resp.headers().get(CONTENT_LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| Error::Protocol {
        url: redact(url),
        message: format!("{op} answered 202 without Content-Location"),
    })?;
    let job = url
        .join(loc)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| Error::Protocol { url: redact(url), message: "invalid Content-Location".into() })?;
    Ok(job.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_body_uses_value_code_and_url() {
        let b: Value = serde_json::from_slice(&PathlingClient::import_body(
            &[ImportInput { resource_type: "Patient".into(), url: "file:///s/Patient.0000.ndjson".into() }],
            "merge",
        ))
        .unwrap();
        assert_eq!(b["resourceType"], "Parameters");
        assert_eq!(b["parameter"][1]["valueCode"], "merge");
        assert_eq!(b["parameter"][2]["part"][0]["valueCode"], "Patient");
        assert_eq!(b["parameter"][2]["part"][1]["valueUrl"], "file:///s/Patient.0000.ndjson");
    }

    #[test]
    fn a_200_counts_only_with_the_import_result() {
        let ok = br#"{"resourceType":"Parameters","parameter":[{"name":"transactionTime","valueString":"2026-11-26T03:00:00Z"},
            {"name":"output","part":[{"name":"inputUrl","valueUrl":"file:///s/a.ndjson"}]}]}"#;
        let r = import_result(ok, None, Generation::V3).unwrap();
        assert_eq!(r.input_urls, vec!["file:///s/a.ndjson".to_string()]);
        let table: &[(&[u8], &str)] = &[
            (b"<html><title>Gateway</title></html>", "an HTML page titled \"Gateway\""),
            (br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"disk full"}]}"#, "disk full"),
            (br#"{"resourceType":"Bundle"}"#, "Bundle instead of Parameters"),
            (br#"{"ok":true}"#, "not a FHIR resource"),
        ];
        for (body, want) in table {
            let e = import_result(body, None, Generation::V3).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        // Pathling 7.x reports a finished import as an informational OperationOutcome
        let done = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational","diagnostics":"Data import completed successfully"}]}"#;
        assert!(!import_result(done, None, Generation::V7).unwrap().lists_inputs);
        let failed = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics":"bad file"}]}"#;
        assert!(import_result(failed, None, Generation::V7).unwrap_err().contains("bad file"));
        assert!(import_result(br#"{"resourceType":"OperationOutcome","issue":[]}"#, None, Generation::V7).is_err());
    }

    #[test]
    fn a_v7_import_sends_each_mode_as_a_value_code() {
        let inputs = [
            ImportInput { resource_type: "Patient".into(), url: "file:///s/Patient.0000.ndjson".into() },
            ImportInput { resource_type: "Observation".into(), url: "file:///s/Observation.0001.ndjson".into() },
        ];
        let b: Value = serde_json::from_slice(&PathlingClient::import_body_v7(&inputs, "merge")).unwrap();
        let p = b["parameter"].as_array().unwrap();
        assert_eq!(p.len(), 2, "one source part per file, nothing else: {b}");
        for (part, input) in p.iter().zip(&inputs) {
            assert_eq!(part["name"], "source");
            assert_eq!(part["part"][0], json!({"name": "resourceType", "valueCode": input.resource_type}));
            assert_eq!(part["part"][1], json!({"name": "url", "valueUrl": input.url}));
            assert_eq!(part["part"][2], json!({"name": "mode", "valueCode": "merge"}));
        }
    }
}
