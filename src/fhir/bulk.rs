//! FHIR Bulk Data export: kick-off, status polling, manifest, file download, cancel/release.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use reqwest::header::{ACCEPT, ACCEPT_ENCODING, CONTENT_LOCATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use url::Url;

use super::client::{Error, HttpClient, Request, body_error, redact};
use super::retry::retry_after;

/// Export level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    System,
    Patient,
    Group(String),
}

/// One `$export` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub level: Level,
    pub types: Vec<String>,
    pub type_filters: Vec<String>,
    pub elements: Vec<String>,
    /// `_since`, an instant in RFC 3339.
    pub since: Option<String>,
}

impl ExportRequest {
    /// The kick-off URL (GET form): parameters in the query string, `_type` as one comma list.
    pub fn url(&self, client: &HttpClient) -> Url {
        let path = match &self.level {
            Level::System => "$export".to_string(),
            Level::Patient => "Patient/$export".to_string(),
            Level::Group(id) => format!("Group/{id}/$export"),
        };
        let mut url = client.url(&path);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("_outputFormat", "application/fhir+ndjson");
            if let Some(s) = &self.since {
                q.append_pair("_since", s);
            }
            if !self.types.is_empty() {
                q.append_pair("_type", &self.types.join(","));
            }
            if !self.elements.is_empty() {
                q.append_pair("_elements", &self.elements.join(","));
            }
            for f in &self.type_filters {
                // commas inside one filter are escaped so a server splitting on ',' keeps it whole
                q.append_pair("_typeFilter", &f.replace(',', "%2C"));
            }
        }
        url
    }
}

impl ExportRequest {
    /// The same request as a `Parameters` resource (POST kick-off).
    pub fn parameters(&self) -> serde_json::Value {
        use serde_json::json;
        let mut p = vec![json!({"name": "_outputFormat", "valueString": "application/fhir+ndjson"})];
        if let Some(s) = &self.since {
            p.push(json!({"name": "_since", "valueInstant": s}));
        }
        if !self.types.is_empty() {
            p.push(json!({"name": "_type", "valueString": self.types.join(",")}));
        }
        if !self.elements.is_empty() {
            p.push(json!({"name": "_elements", "valueString": self.elements.join(",")}));
        }
        for f in &self.type_filters {
            p.push(json!({"name": "_typeFilter", "valueString": f}));
        }
        json!({"resourceType": "Parameters", "parameter": p})
    }
}

/// Result of a kick-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kickoff {
    /// Accepted; poll this status URL.
    Accepted { status_url: String },
    /// The server is busy (429, or a transient error): try again after the wait.
    Busy { wait: Option<Duration>, message: String },
}

/// One output entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    #[serde(rename = "type", default)]
    pub type_: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// The completed export's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub transaction_time: Option<String>,
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default = "default_true")]
    pub requires_access_token: bool,
    #[serde(default)]
    pub output: Vec<OutputFile>,
    #[serde(default)]
    pub deleted: Vec<OutputFile>,
    #[serde(default)]
    pub error: Vec<OutputFile>,
}

fn default_true() -> bool {
    true
}

/// Result of one status poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    /// Still running.
    InProgress { progress: Option<String>, wait: Option<Duration> },
    /// Done.
    Complete(Box<Manifest>),
    /// Rate limited or a transient error: poll again after the wait.
    Retry { wait: Option<Duration>, message: String, throttled: bool },
    /// The job failed (or is gone); do not poll again.
    Failed { status: u16, message: String },
}

/// Bulk Data client for one source server.
#[derive(Clone, Debug)]
pub struct BulkClient {
    http: HttpClient,
}

impl BulkClient {
    /// Wraps an HTTP client for the source.
    pub fn new(http: HttpClient) -> Self {
        Self { http }
    }

    /// The underlying HTTP client.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// Sends the kick-off request (`Prefer: respond-async`).
    pub async fn kickoff(&self, req: &ExportRequest) -> Result<Kickoff, Error> {
        let url = req.url(&self.http);
        let r = Request::new(Method::GET, url.clone())
            .header(ACCEPT, "application/fhir+json")
            .header(reqwest::header::HeaderName::from_static("prefer"), "respond-async");
        let resp = self.http.send(r).await?;
        if matches!(resp.status(), StatusCode::METHOD_NOT_ALLOWED | StatusCode::URI_TOO_LONG) {
            // POST-only servers (Bulk Data STU4) and very long _typeFilter lists: the same request as
            // a Parameters body
            let mut post_url = url.clone();
            post_url.set_query(None);
            let r = Request::new(Method::POST, post_url)
                .header(ACCEPT, "application/fhir+json")
                .header(CONTENT_TYPE, "application/fhir+json")
                .header(reqwest::header::HeaderName::from_static("prefer"), "respond-async")
                .body(serde_json::to_vec(&req.parameters()).unwrap_or_default());
            let resp = self.http.send(r).await?;
            return self.kickoff_response(&url, Method::POST, resp).await;
        }
        self.kickoff_response(&url, Method::GET, resp).await
    }

    async fn kickoff_response(&self, url: &Url, method: Method, resp: reqwest::Response) -> Result<Kickoff, Error> {
        let status = resp.status();
        if status == StatusCode::ACCEPTED || status == StatusCode::OK && resp.headers().contains_key(CONTENT_LOCATION) {
            let loc =
                resp.headers().get(CONTENT_LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| Error::Protocol {
                    url: redact(url),
                    message: "kick-off answered 202 without a Content-Location status URL".into(),
                })?;
            let status_url = url.join(loc).map_err(|_| Error::Protocol {
                url: redact(url),
                message: "kick-off returned an invalid Content-Location".into(),
            })?;
            return Ok(Kickoff::Accepted { status_url: status_url.to_string() });
        }
        let wait = retry_after(resp.headers());
        let err = Error::from_response(&method, resp).await;
        if err.is_transient() {
            return Ok(Kickoff::Busy { wait, message: err.to_string() });
        }
        Err(err)
    }

    /// Polls the status URL once.
    pub async fn poll(&self, status_url: &str) -> Result<Poll, Error> {
        let url = parse(status_url)?;
        let r = Request::new(Method::GET, url.clone()).header(ACCEPT, "application/json");
        let resp = match self.http.send(r).await {
            Ok(r) => r,
            Err(e) if e.is_transient() => {
                return Ok(Poll::Retry { wait: None, message: e.to_string(), throttled: false });
            }
            Err(e) => return Err(e),
        };
        let status = resp.status();
        let wait = retry_after(resp.headers());
        if status == StatusCode::ACCEPTED {
            let progress = resp
                .headers()
                .get("x-progress")
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(100).collect::<String>());
            return Ok(Poll::InProgress { progress, wait });
        }
        if status == StatusCode::OK {
            let body = resp.bytes().await.map_err(|e| body_error(&url, e))?;
            let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| Error::Protocol {
                url: redact(&url),
                message: format!("the export manifest is not valid JSON: {e}"),
            })?;
            return Ok(Poll::Complete(Box::new(manifest)));
        }
        let err = Error::from_response(&Method::GET, resp).await;
        match &err {
            Error::Status { transient: true, message, status, .. } => {
                Ok(Poll::Retry { wait, message: message.clone(), throttled: *status == 429 })
            }
            Error::Status { status, message, .. } => Ok(Poll::Failed { status: *status, message: message.clone() }),
            _ => Err(err),
        }
    }

    /// Cancels a running export or releases a finished one (`DELETE` the status URL). A 404 (already
    /// gone) counts as done.
    pub async fn release(&self, status_url: &str) -> Result<(), Error> {
        let url = parse(status_url)?;
        let resp = self.http.send(Request::new(Method::DELETE, url)).await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND || resp.status() == StatusCode::GONE {
            return Ok(());
        }
        Err(Error::from_response(&Method::DELETE, resp).await)
    }

    /// Opens one output file as a byte stream (gzip-decoded). The token is sent only when the manifest
    /// requires it and the file lives on the source's origin.
    pub async fn download(
        &self,
        file_url: &str,
        requires_access_token: bool,
    ) -> Result<impl Stream<Item = Result<Bytes, Error>> + Send + 'static + use<>, Error> {
        let url = parse(file_url)?;
        let r = Request::new(Method::GET, url.clone())
            .header(ACCEPT, "application/fhir+ndjson")
            .header(ACCEPT_ENCODING, "gzip")
            .credentials(requires_access_token);
        let resp = self.http.send(r).await?;
        if !resp.status().is_success() {
            return Err(Error::from_response(&Method::GET, resp).await);
        }
        let gz = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"))
            || resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("gzip"));
        let u2 = url.clone();
        let raw = resp.bytes_stream().map_err(move |e| body_error(&u2, e));
        if gz { Ok(futures::future::Either::Left(gunzip(raw, url))) } else { Ok(futures::future::Either::Right(raw)) }
    }
}

fn gunzip(
    raw: impl Stream<Item = Result<Bytes, Error>> + Send + 'static,
    url: Url,
) -> impl Stream<Item = Result<Bytes, Error>> + Send + 'static {
    use async_compression::tokio::bufread::GzipDecoder;
    use tokio_util::io::{ReaderStream, StreamReader};
    let reader = StreamReader::new(raw.map_err(std::io::Error::other));
    let mut dec = GzipDecoder::new(reader);
    dec.multiple_members(true);
    ReaderStream::new(dec).map_err(move |e| Error::Transport { url: redact(&url), message: format!("gzip: {e}") })
}

fn parse(u: &str) -> Result<Url, Error> {
    Url::parse(u).map_err(|_| Error::Protocol { url: "(invalid)".into(), message: format!("not a URL: {u:.80}") })
}
