//! Pathling server client: `$import`, `$import-pnp`, `$job`, single-resource `DELETE`.
//! No Kubernetes types.

use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_LOCATION, CONTENT_TYPE, HeaderName};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use url::Url;

use crate::fhir::client::{Error, HttpClient, Request, redact};
use crate::fhir::retry::retry_after;

/// One file to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportInput {
    pub resource_type: String,
    pub url: String,
}

/// Result of submitting an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submit {
    /// Accepted: poll this `$job` URL.
    Accepted { job_url: String },
    /// Pathling is busy with another import (503) or transiently failing: retry later.
    Busy { wait: Option<Duration>, message: String },
}

/// Result of polling a `$job`.
#[derive(Debug, Clone, PartialEq)]
pub enum JobPoll {
    /// Running.
    Running { progress: Option<String>, wait: Option<Duration> },
    /// Finished; the result Parameters.
    Done(Value),
    /// 503: another import holds Pathling; delete this job and resubmit later.
    Busy { wait: Option<Duration>, message: String },
    /// 404: the job is unknown (Pathling restarted): resubmit.
    Lost,
    /// The import failed.
    Failed { status: u16, message: String },
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

/// Pathling client.
#[derive(Clone, Debug)]
pub struct PathlingClient {
    http: HttpClient,
}

fn prefer_async(r: Request) -> Request {
    r.header(HeaderName::from_static("prefer"), "respond-async")
}

impl PathlingClient {
    /// Wraps an HTTP client for Pathling.
    pub fn new(http: HttpClient) -> Self {
        Self { http }
    }

    /// The `$import` Parameters body (valueCode / valueUrl exactly, saveMode explicit).
    pub fn import_body(inputs: &[ImportInput], save_mode: &str) -> Value {
        let mut params = vec![
            json!({"name": "inputFormat", "valueCode": "application/fhir+ndjson"}),
            json!({"name": "saveMode", "valueCode": save_mode}),
        ];
        for i in inputs {
            params.push(json!({"name": "input", "part": [
                {"name": "resourceType", "valueCode": i.resource_type},
                {"name": "url", "valueUrl": i.url}
            ]}));
        }
        json!({"resourceType": "Parameters", "parameter": params})
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

    /// Submits `$import`.
    pub async fn import(&self, inputs: &[ImportInput], save_mode: &str) -> Result<Submit, Error> {
        self.submit("$import", Self::import_body(inputs, save_mode)).await
    }

    /// Submits `$import-pnp`.
    pub async fn import_pnp(&self, req: &PnpRequest) -> Result<Submit, Error> {
        self.submit("$import-pnp", Self::pnp_body(req)).await
    }

    async fn submit(&self, op: &str, body: Value) -> Result<Submit, Error> {
        let url = self.http.url(op);
        let r = prefer_async(
            Request::new(Method::POST, url.clone())
                .header(ACCEPT, "application/fhir+json")
                .header(CONTENT_TYPE, "application/fhir+json")
                .body(serde_json::to_vec(&body).unwrap_or_default()),
        );
        let resp = match self.http.send(r).await {
            Ok(r) => r,
            Err(e) if e.is_transient() => return Ok(Submit::Busy { wait: None, message: e.to_string() }),
            Err(e) => return Err(e),
        };
        if resp.status() == StatusCode::ACCEPTED {
            let loc = resp.headers().get(CONTENT_LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
                Error::Protocol { url: redact(&url), message: format!("{op} answered 202 without Content-Location") }
            })?;
            let job = url
                .join(loc)
                .map_err(|_| Error::Protocol { url: redact(&url), message: "invalid Content-Location".into() })?;
            return Ok(Submit::Accepted { job_url: job.to_string() });
        }
        let wait = retry_after(resp.headers());
        let err = Error::from_response(&Method::POST, resp).await;
        if err.is_transient() {
            return Ok(Submit::Busy { wait, message: err.to_string() });
        }
        Err(err)
    }

    /// Polls a `$job` URL once.
    pub async fn poll_job(&self, job_url: &str) -> Result<JobPoll, Error> {
        let url = parse(job_url)?;
        let r = Request::new(Method::GET, url).header(ACCEPT, "application/fhir+json");
        let resp = match self.http.send(r).await {
            Ok(r) => r,
            Err(e) if e.is_transient() => return Ok(JobPoll::Running { progress: None, wait: None }),
            Err(e) => return Err(e),
        };
        let status = resp.status();
        let wait = retry_after(resp.headers());
        match status {
            StatusCode::ACCEPTED => {
                let progress = resp.headers().get("x-progress").and_then(|v| v.to_str().ok()).map(str::to_string);
                Ok(JobPoll::Running { progress, wait })
            }
            StatusCode::OK => {
                let body = resp.bytes().await.unwrap_or_default();
                Ok(JobPoll::Done(serde_json::from_slice(&body).unwrap_or(Value::Null)))
            }
            StatusCode::NOT_FOUND => Ok(JobPoll::Lost),
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                let err = Error::from_response(&Method::GET, resp).await;
                Ok(JobPoll::Busy { wait, message: err.to_string() })
            }
            _ => {
                let err = Error::from_response(&Method::GET, resp).await;
                match err {
                    Error::Status { transient: true, .. } => Ok(JobPoll::Running { progress: None, wait }),
                    Error::Status { status, message, .. } => Ok(JobPoll::Failed { status, message }),
                    e => Err(e),
                }
            }
        }
    }

    /// Cancels or forgets a job (`DELETE $job?id=`); 404 counts as done.
    pub async fn delete_job(&self, job_url: &str) -> Result<(), Error> {
        let url = parse(job_url)?;
        let resp = self.http.send(Request::new(Method::DELETE, url)).await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(Error::from_response(&Method::DELETE, resp).await)
    }

    /// Deletes one resource; a 404 (already absent) counts as done.
    pub async fn delete_resource(&self, resource_type: &str, id: &str) -> Result<(), Error> {
        let url = self.http.url(&format!("{resource_type}/{id}"));
        let resp = self.http.send(Request::new(Method::DELETE, url).header(ACCEPT, "application/fhir+json")).await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND || resp.status() == StatusCode::GONE {
            return Ok(());
        }
        Err(Error::from_response(&Method::DELETE, resp).await)
    }
}

fn parse(u: &str) -> Result<Url, Error> {
    Url::parse(u).map_err(|_| Error::Protocol { url: "(invalid)".into(), message: format!("not a URL: {u:.80}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_body_uses_value_code_and_url() {
        let b = PathlingClient::import_body(
            &[ImportInput { resource_type: "Patient".into(), url: "file:///s/Patient.0000.ndjson".into() }],
            "merge",
        );
        assert_eq!(b["resourceType"], "Parameters");
        assert_eq!(b["parameter"][1]["valueCode"], "merge");
        assert_eq!(b["parameter"][2]["part"][0]["valueCode"], "Patient");
        assert_eq!(b["parameter"][2]["part"][1]["valueUrl"], "file:///s/Patient.0000.ndjson");
    }
}
