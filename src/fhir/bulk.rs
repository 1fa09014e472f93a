//! FHIR Bulk Data export: kick-off, status polling, manifest, file download, cancel/release.
//! Everything a source sends is bounded and validated here, at the edge: the manifest's size, its
//! resource types and URLs, the `X-Progress` text.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use reqwest::header::{ACCEPT, ACCEPT_ENCODING, CONTENT_LOCATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use url::Url;

use super::client::{Error, HttpClient, Request, body_error, peer_url, read_capped};
use super::ids::{MAX_TYPES, is_type};
use super::retry::retry_after;
use crate::text::{peer_text, redact};

/// Largest manifest read (about 100,000 files); a bigger one fails the run with a clear message.
pub const MANIFEST_MAX: usize = 16 << 20;
/// Most files one manifest may list.
pub const MAX_FILES: usize = 200_000;

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
        let mut url = match &self.level {
            Level::System => client.url("$export"),
            Level::Patient => client.url("Patient/$export"),
            Level::Group(id) => client.url_segments(&["Group", id, "$export"]),
        };
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

/// One output entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    #[serde(rename = "type", default)]
    pub type_: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// The completed export's manifest, validated: every `output[]` type is a resource type, every URL
/// an absolute http(s) URL.
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

impl Manifest {
    /// Parses and validates a manifest body. A body is a manifest only if it is one: an object with
    /// an `output` array and no `resourceType` — some servers report a failed job as `200` with an
    /// OperationOutcome, and taking that for "no files" would move the watermark past the window.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let shape: Shape =
            serde_json::from_slice(body).map_err(|e| format!("the export manifest is not valid JSON: {e}"))?;
        if let Some(rt) = shape.resource_type {
            if rt == "OperationOutcome" {
                let oo: crate::fhir::outcome::OperationOutcome = serde_json::from_slice(body).unwrap_or_default();
                return Err(format!(
                    "the source answered the status poll with 200 and an OperationOutcome instead of a manifest: \
                     the export failed on the source ({})",
                    oo.summary()
                ));
            }
            return Err(format!(
                "the source answered the status poll with 200 and a {} resource instead of an export manifest",
                peer_text(&rt, 64)
            ));
        }
        if !shape.has_output {
            return Err("the source answered the status poll with 200 but the body has no `output` array: \
                        it is not an export manifest"
                .into());
        }
        let m: Manifest =
            serde_json::from_slice(body).map_err(|e| format!("the export manifest is not valid JSON: {e}"))?;
        let files = m.output.len() + m.deleted.len() + m.error.len();
        if files > MAX_FILES {
            return Err(format!("the manifest lists {files} files; fhirsync takes at most {MAX_FILES} per run"));
        }
        let mut types = BTreeSet::new();
        for f in &m.output {
            if !is_type(&f.type_) {
                return Err(format!(
                    "the manifest lists an output of type {:?}, which is not a FHIR resource type",
                    peer_text(&f.type_, 64)
                ));
            }
            types.insert(f.type_.as_str());
        }
        if types.len() > MAX_TYPES {
            return Err(format!(
                "the manifest lists {} resource types; FHIR has fewer than {MAX_TYPES}: refusing it",
                types.len()
            ));
        }
        for f in m.output.iter().chain(&m.deleted).chain(&m.error) {
            match Url::parse(&f.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(format!(
                        "the manifest lists a file URL that is not http(s): {}",
                        peer_text(&f.url, 80)
                    ));
                }
            }
        }
        Ok(m)
    }
}

/// What is read of a status body before it is taken as a manifest.
#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(rename = "output", default, deserialize_with = "present")]
    has_output: bool,
}

/// True when the field is present as an array (its content is read later, typed).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    use serde::de::IgnoredAny;
    struct IsArray;
    impl<'de> serde::de::Visitor<'de> for IsArray {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(true)
        }
        fn visit_unit<E>(self) -> Result<bool, E> {
            Ok(false)
        }
    }
    d.deserialize_any(IsArray)
}

/// Result of one status poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    /// Still running; `X-Progress` (bounded) and the server's `Retry-After`.
    InProgress { progress: Option<String>, wait: Option<Duration> },
    /// Done.
    Complete(Box<Manifest>),
}

/// Bulk Data client for one source server.
#[derive(Clone, Debug)]
pub struct BulkClient {
    http: HttpClient,
}

fn prefer() -> reqwest::header::HeaderName {
    reqwest::header::HeaderName::from_static("prefer")
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

    /// Sends the kick-off request (`Prefer: respond-async`); returns the status URL.
    pub async fn kickoff(&self, req: &ExportRequest) -> Result<String, Error> {
        let url = req.url(&self.http);
        // `no-cache`: HAPI hands an identical kick-off an earlier job still running, whose window
        // may not be this run's
        let r = Request::new(Method::GET, url.clone())
            .header(ACCEPT, "application/fhir+json")
            .header(prefer(), "respond-async")
            .header(reqwest::header::CACHE_CONTROL, "no-cache");
        let resp = self.http.send(r).await?;
        if matches!(resp.status(), StatusCode::METHOD_NOT_ALLOWED | StatusCode::URI_TOO_LONG) {
            // POST-only servers (Bulk Data STU4) and very long _typeFilter lists: the same request as
            // a Parameters body
            let mut post_url = url.clone();
            post_url.set_query(None);
            let r = Request::new(Method::POST, post_url)
                .header(ACCEPT, "application/fhir+json")
                .header(CONTENT_TYPE, "application/fhir+json")
                .header(prefer(), "respond-async")
                .header(reqwest::header::CACHE_CONTROL, "no-cache")
                .body(serde_json::to_vec(&req.parameters()).unwrap_or_default());
            let resp = self.http.send(r).await?;
            return kickoff_answer(&url, Method::POST, resp).await;
        }
        kickoff_answer(&url, Method::GET, resp).await
    }

    /// Polls the status URL once.
    pub async fn poll(&self, status_url: &str) -> Result<Poll, Error> {
        let url = peer_url(status_url)?;
        let r = Request::new(Method::GET, url.clone()).header(ACCEPT, "application/json");
        let resp = self.http.send(r).await?;
        let status = resp.status();
        if status == StatusCode::ACCEPTED {
            let progress = resp.headers().get("x-progress").and_then(|v| v.to_str().ok()).map(|s| peer_text(s, 100));
            return Ok(Poll::InProgress { progress, wait: retry_after(resp.headers()) });
        }
        if status == StatusCode::OK {
            let body = read_capped(resp, MANIFEST_MAX, "the export manifest").await?;
            let manifest = Manifest::parse(&body).map_err(|message| Error::Protocol { url: redact(&url), message })?;
            drop(body);
            return Ok(Poll::Complete(Box::new(manifest)));
        }
        Err(Error::from_response(&Method::GET, resp).await)
    }

    /// Cancels a running export or releases a finished one (`DELETE` the status URL). A 404 (already
    /// gone) counts as done.
    pub async fn release(&self, status_url: &str) -> Result<(), Error> {
        let url = peer_url(status_url)?;
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
        let url = peer_url(file_url)?;
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

async fn kickoff_answer(url: &Url, method: Method, resp: reqwest::Response) -> Result<String, Error> {
    let status = resp.status();
    if status == StatusCode::ACCEPTED || status == StatusCode::OK && resp.headers().contains_key(CONTENT_LOCATION) {
        let loc =
            resp.headers().get(CONTENT_LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| Error::Protocol {
                url: redact(url),
                message: "kick-off answered 202 without a Content-Location status URL".into(),
            })?;
        let status_url = url.join(loc).ok().filter(|u| matches!(u.scheme(), "http" | "https")).ok_or_else(|| {
            Error::Protocol { url: redact(url), message: "kick-off returned an invalid Content-Location".into() }
        })?;
        return Ok(status_url.to_string());
    }
    let err = Error::from_response(&method, resp).await;
    // Helios answers its per-tenant export cap with 400 "too many concurrent exports": it is busy,
    // not a bad request
    match &err {
        Error::Status { status: 400, message, .. } if message.to_ascii_lowercase().contains("too many concurrent") => {
            Err(err.into_busy())
        }
        _ => Err(err),
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
    ReaderStream::new(dec).map_err(move |e| gzip_error(&url, e))
}

/// What a failed gzip stream means: a broken connection stays the transport error it was (so it is
/// retried exactly like a broken plain download), a stream that ends early is a broken connection,
/// and only bytes that are not gzip are a protocol error.
fn gzip_error(url: &Url, e: std::io::Error) -> Error {
    let kind = e.kind();
    let text = e.to_string();
    if let Some(inner) = e.into_inner()
        && let Ok(original) = inner.downcast::<Error>()
    {
        return *original;
    }
    if kind == std::io::ErrorKind::UnexpectedEof {
        return Error::Transport {
            url: redact(url),
            message: "the gzip stream ended before its end: the connection broke".into(),
            connect: false,
        };
    }
    Error::Protocol { url: redact(url), message: format!("gzip: {}", peer_text(&text, 200)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broken_gzip_download_is_a_broken_connection() {
        let url = Url::parse("http://s/f.ndjson").unwrap();
        let broken = Error::Transport { url: "http://s/f.ndjson".into(), message: "reset".into(), connect: false };
        type Case = (&'static str, Vec<Result<Bytes, Error>>, &'static str);
        let table: Vec<Case> = vec![
            ("the connection broke mid-stream", vec![Ok(gz(b"{}\n")[..12].to_vec().into()), Err(broken)], "transport"),
            ("the stream ended early", vec![Ok(gz(b"{\"a\":1}\n")[..15].to_vec().into())], "transport"),
            ("not gzip at all", vec![Ok(Bytes::from_static(b"plain text, not gzip"))], "protocol"),
        ];
        for (what, chunks, want) in table {
            let out: Result<Vec<Bytes>, Error> = gunzip(futures::stream::iter(chunks), url.clone()).try_collect().await;
            let got = match out {
                Err(Error::Transport { .. }) => "transport",
                Err(Error::Protocol { .. }) => "protocol",
                other => panic!("{what}: {other:?}"),
            };
            assert_eq!(got, want, "{what}");
        }
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn manifests_are_validated_at_the_edge() {
        let ok = br#"{"transactionTime":"2026-11-26T03:00:00Z","output":[{"type":"Patient","url":"https://s/f/1.ndjson","count":2}]}"#;
        assert_eq!(Manifest::parse(ok).unwrap().output.len(), 1);
        let empty = br#"{"transactionTime":"2026-11-26T03:00:00Z","request":"x","output":[]}"#;
        assert!(Manifest::parse(empty).unwrap().output.is_empty(), "an export with no changes is a manifest");
        let table: &[(&[u8], &str)] = &[
            (br#"{"output":[{"type":"../x","url":"https://s/f"}]}"#, "not a FHIR resource type"),
            (br#"{"output":[{"type":"Patient","url":"file:///etc/passwd"}]}"#, "not http(s)"),
            (br#"{"output":[],"error":[{"type":"OperationOutcome","url":"ftp://x/y"}]}"#, "not http(s)"),
            (b"<html>", "not valid JSON"),
            (
                br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"job failed"}]}"#,
                "the export failed on the source (exception: job failed)",
            ),
            (br#"{"resourceType":"Parameters","parameter":[]}"#, "a Parameters resource instead"),
            (br#"{"transactionTime":"2026-11-26T03:00:00Z"}"#, "no `output` array"),
            (br#"{"transactionTime":"2026-11-26T03:00:00Z","output":null}"#, "no `output` array"),
        ];
        for (body, want) in table {
            let e = Manifest::parse(body).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let many: Vec<String> = (0..300)
            .map(|i| {
                let t: String = format!("T{i}")
                    .chars()
                    .map(|c| if c.is_ascii_digit() { (b'a' + c as u8 - b'0') as char } else { c })
                    .collect();
                format!(r#"{{"type":"{t}","url":"https://s/{i}.ndjson"}}"#)
            })
            .collect();
        let body = format!(r#"{{"output":[{}]}}"#, many.join(","));
        assert!(Manifest::parse(body.as_bytes()).unwrap_err().contains("resource types"));
    }
}
