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
/// Most files one manifest may list (all its pages together).
pub const MAX_FILES: usize = 200_000;
/// Most pages one manifest may have (Bulk Data STU3 `link` next).
pub const MAX_PAGES: usize = 10_000;
/// Most answers "not ready yet" (202) the pages of one manifest may give once the export is
/// complete, before fhirsync gives up on it.
pub const MAX_PAGE_WAITS: u32 = 60;

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
    /// `_until` (Bulk Data STU3), an instant in RFC 3339: only changes before it.
    pub until: Option<String>,
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
            if let Some(u) = &self.until {
                q.append_pair("_until", u);
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

    /// The same request as a `Parameters` resource (POST kick-off), for a server of this style.
    pub fn parameters(&self, style: Kickoff) -> serde_json::Value {
        use serde_json::json;
        let mut p = vec![json!({"name": "_outputFormat", "valueString": "application/fhir+ndjson"})];
        if let Some(s) = &self.since {
            p.push(json!({"name": "_since", "valueInstant": s}));
        }
        if let Some(u) = &self.until {
            p.push(json!({"name": "_until", "valueInstant": u}));
        }
        // Bulk Data STU4 (POST only) takes one parameter per value; STU2/3 servers read comma lists
        let lists = [("_type", &self.types), ("_elements", &self.elements)];
        for (name, values) in lists.into_iter().filter(|(_, v)| !v.is_empty()) {
            if style == Kickoff::Post {
                p.extend(values.iter().map(|v| json!({"name": name, "valueString": v})));
            } else {
                p.push(json!({"name": name, "valueString": values.join(",")}));
            }
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

/// A link of a paged manifest (Bulk Data STU3 and later: `{"relation": "next", "url": …}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    #[serde(default)]
    pub relation: String,
    #[serde(default)]
    pub url: String,
}

/// The completed export's manifest, validated: every `output[]` type is a resource type, every URL
/// an absolute http(s) URL. Read in every shape Bulk Data has had: STU2/3 (`error`, `extension` as
/// an object, `request`) and STU4 (`outcome`, `extension` as an array, `manifestType`); a paged
/// manifest's pages are merged into one by [`BulkClient::poll`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// STU4's name for `error`: merged into `error` when parsed.
    #[serde(default, skip_serializing)]
    pub outcome: Vec<OutputFile>,
    /// The next page of a paged manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<Link>,
    /// STU4: which kind of manifest this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_type: Option<String>,
    /// Set when the export was organized by a resource type (`organizeOutputBy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_organized_by: Option<String>,
}

/// The one kind of manifest an export's status URL may answer with (STU4 `manifestType`).
const EXPORT_MANIFEST_TYPE: &str = "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest";

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
        let mut m: Manifest =
            serde_json::from_slice(body).map_err(|e| format!("the export manifest is not valid JSON: {e}"))?;
        if let Some(t) = &m.manifest_type
            && t.split('|').next() != Some(EXPORT_MANIFEST_TYPE)
        {
            return Err(format!(
                "the source answered the status poll with a manifest of type {}, not an export manifest (BulkDataManifest)",
                peer_text(t, 120)
            ));
        }
        if let Some(by) = &m.output_organized_by {
            return Err(format!(
                "the manifest's files are organized by {} (organizeOutputBy), which fhirsync never asks for: \
                 such files mix resource types and cannot be imported by type",
                peer_text(by, 64)
            ));
        }
        let mut outcome = std::mem::take(&mut m.outcome);
        m.error.append(&mut outcome);
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
        if m.link.len() > 1 || m.link.iter().any(|l| l.relation != "next") {
            return Err("the manifest's `link` is not one `next` link, as Bulk Data requires".into());
        }
        for url in
            m.output.iter().chain(&m.deleted).chain(&m.error).map(|f| &f.url).chain(m.link.iter().map(|l| &l.url))
        {
            match Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(format!("the manifest lists a URL that is not http(s): {}", peer_text(url, 80)));
                }
            }
        }
        Ok(m)
    }

    /// The next page's URL, taken out of the manifest.
    fn take_next(&mut self) -> Option<String> {
        self.link.pop().map(|l| l.url)
    }

    /// Adds a later page's files (its other fields repeat this page's) and takes its link to the
    /// page after it.
    fn append(&mut self, page: Manifest) -> Result<(), String> {
        if page.transaction_time != self.transaction_time {
            return Err(format!(
                "a page of the manifest has another transactionTime ({}) than its first page ({}): the pages are not of one export",
                peer_text(page.transaction_time.as_deref().unwrap_or("none"), 40),
                peer_text(self.transaction_time.as_deref().unwrap_or("none"), 40)
            ));
        }
        self.output.extend(page.output);
        self.deleted.extend(page.deleted);
        self.error.extend(page.error);
        self.link = page.link;
        let files = self.output.len() + self.deleted.len() + self.error.len();
        if files > MAX_FILES {
            return Err(format!("the manifest's pages list {files} files; fhirsync takes at most {MAX_FILES} per run"));
        }
        Ok(())
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

/// How a source takes a kick-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kickoff {
    /// GET with the parameters in the query (Bulk Data STU2/3); POST with comma lists only when
    /// the query is too long.
    #[default]
    Get,
    /// POST with a Parameters body, one parameter per value (Bulk Data STU4, where GET is gone).
    Post,
}

/// Sources that refused a GET kick-off (405) and took a POST, by base URL, for this process: their
/// later kick-offs POST first. Bounded: forgotten all at once when full.
static POST_FIRST: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);
const POST_FIRST_MAX: usize = 10_000;

fn kickoff_style(base: &str) -> Kickoff {
    let known = POST_FIRST.lock().unwrap_or_else(|p| p.into_inner());
    if known.contains(base) { Kickoff::Post } else { Kickoff::Get }
}

fn learn_kickoff_style(base: &str, style: Kickoff) {
    let mut known = POST_FIRST.lock().unwrap_or_else(|p| p.into_inner());
    match style {
        Kickoff::Post => {
            if known.len() >= POST_FIRST_MAX {
                known.clear();
            }
            known.insert(base.to_string());
        }
        Kickoff::Get => {
            known.remove(base);
        }
    }
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

    /// Sends the kick-off request (`Prefer: respond-async`); returns the status URL. GET with a
    /// query first (Bulk Data STU2/3); POST with a Parameters body when GET is refused (405: a
    /// Bulk Data STU4 server, remembered for this source's later kick-offs, which then POST first)
    /// or the query is too long (414).
    pub async fn kickoff(&self, req: &ExportRequest) -> Result<String, Error> {
        let url = req.url(&self.http);
        let learned = kickoff_style(self.http.base().as_str());
        let first = if learned == Kickoff::Post { Method::POST } else { Method::GET };
        let resp = self.send_kickoff(req, &url, first.clone(), learned).await?;
        let refused = resp.status() == StatusCode::METHOD_NOT_ALLOWED;
        let retry = match (&first, resp.status()) {
            (&Method::GET, StatusCode::METHOD_NOT_ALLOWED) => Some((Method::POST, Kickoff::Post)),
            (&Method::GET, StatusCode::URI_TOO_LONG) => Some((Method::POST, Kickoff::Get)),
            (&Method::POST, StatusCode::METHOD_NOT_ALLOWED) => Some((Method::GET, Kickoff::Get)),
            _ => None,
        };
        let Some((method, style)) = retry else { return kickoff_answer(&url, first, resp).await };
        let resp = self.send_kickoff(req, &url, method.clone(), style).await?;
        let answer = kickoff_answer(&url, method.clone(), resp).await;
        if refused && answer.is_ok() {
            learn_kickoff_style(
                self.http.base().as_str(),
                if method == Method::POST { Kickoff::Post } else { Kickoff::Get },
            );
        }
        answer
    }

    async fn send_kickoff(
        &self,
        req: &ExportRequest,
        url: &Url,
        method: Method,
        style: Kickoff,
    ) -> Result<reqwest::Response, Error> {
        // `no-cache`: HAPI hands an identical kick-off an earlier job still running, whose window
        // may not be this run's
        let r = if method == Method::POST {
            let mut post_url = url.clone();
            post_url.set_query(None);
            Request::new(Method::POST, post_url)
                .header(CONTENT_TYPE, "application/fhir+json")
                .body(serde_json::to_vec(&req.parameters(style)).unwrap_or_default())
        } else {
            Request::new(Method::GET, url.clone())
        };
        let r = r
            .header(ACCEPT, "application/fhir+json")
            .header(prefer(), "respond-async")
            .header(reqwest::header::CACHE_CONTROL, "no-cache");
        self.http.send(r).await
    }

    /// Polls the status URL once.
    pub async fn poll(&self, status_url: &str) -> Result<Poll, Error> {
        let url = peer_url(status_url)?;
        match self.poll_page(&url).await? {
            Poll::Complete(first) => Ok(Poll::Complete(Box::new(self.rest_of_pages(&url, *first).await?))),
            running => Ok(running),
        }
    }

    /// One GET of a manifest URL (the status URL or a later page): `202` is still running, `200`
    /// a manifest page, validated.
    async fn poll_page(&self, url: &Url) -> Result<Poll, Error> {
        let resp = self.http.send(Request::new(Method::GET, url.clone()).header(ACCEPT, "application/json")).await?;
        match resp.status() {
            StatusCode::ACCEPTED => {
                let progress =
                    resp.headers().get("x-progress").and_then(|v| v.to_str().ok()).map(|s| peer_text(s, 100));
                Ok(Poll::InProgress { progress, wait: retry_after(resp.headers()) })
            }
            StatusCode::OK => {
                let body = read_capped(resp, MANIFEST_MAX, "the export manifest").await?;
                let m = Manifest::parse(&body).map_err(|message| Error::Protocol { url: redact(url), message })?;
                Ok(Poll::Complete(Box::new(m)))
            }
            _ => Err(Error::from_response(&Method::GET, resp).await),
        }
    }

    /// Reads the pages after the first of a paged manifest (`link` next) and merges their files
    /// into it: a manifest with a next link is never taken as complete. Each page is read once, on
    /// the status URL's origin (the token goes nowhere else); a page not ready yet (202) is waited
    /// for as its `Retry-After` says, at most [`MAX_PAGE_WAITS`] times in all.
    async fn rest_of_pages(&self, status_url: &Url, mut m: Manifest) -> Result<Manifest, Error> {
        let protocol = |url: &Url, message: String| Error::Protocol { url: redact(url), message };
        let mut seen = std::collections::HashSet::from([status_url.to_string()]);
        let mut waits = 0u32;
        while let Some(next) = m.take_next() {
            let url = peer_url(&next)?;
            if url.origin() != status_url.origin() {
                return Err(protocol(
                    status_url,
                    "the manifest's next page is on another origin than its status URL: fhirsync does not follow it \
                     (the source's credentials go only to the source)"
                        .into(),
                ));
            }
            if !seen.insert(url.to_string()) {
                return Err(protocol(&url, "the manifest's pages link back to an earlier page".into()));
            }
            if seen.len() > MAX_PAGES {
                return Err(protocol(&url, format!("the manifest has more than {MAX_PAGES} pages")));
            }
            loop {
                match self.poll_page(&url).await? {
                    Poll::Complete(page) => {
                        m.append(*page).map_err(|message| protocol(&url, message))?;
                        break;
                    }
                    Poll::InProgress { wait, .. } => {
                        waits += 1;
                        if waits > MAX_PAGE_WAITS {
                            return Err(protocol(
                                &url,
                                format!(
                                    "the manifest's pages answered \"not ready\" (202) {MAX_PAGE_WAITS} times after the export was complete"
                                ),
                            ));
                        }
                        let wait = wait.unwrap_or(Duration::from_secs(1));
                        tokio::time::sleep(wait.clamp(Duration::from_millis(100), Duration::from_secs(5))).await;
                    }
                }
            }
        }
        Ok(m)
    }

    /// Cancels a running export or releases a finished one (`DELETE` the status URL). A 404 (already
    /// gone) counts as done.
    pub async fn release(&self, status_url: &str) -> Result<(), Error> {
        let url = peer_url(status_url)?;
        let resp = self.http.send(Request::new(Method::DELETE, url)).await?;
        if resp.status().is_success() || super::class::gone(resp.status().as_u16()) {
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
    // a server's own word for "busy" (Helios's export cap): waited out, not a bad request
    match &err {
        Error::Status { status, message, .. } if super::quirks::export_cap_is_busy(*status, message) => {
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

    #[test]
    fn every_bulk_data_shape_is_read() {
        // STU4: `outcome` for `error`, `extension` an array, `manifestType`, no `request`
        let stu4 = br#"{"manifestType":"http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest|4.0.0",
            "transactionTime":"2026-11-26T03:00:00Z","requiresAccessToken":true,"outputFormat":"application/fhir+ndjson",
            "output":[{"type":"Patient","url":"https://s/f/1.ndjson","fileSize":100}],
            "outcome":[{"url":"https://s/f/oo.ndjson","countSeverity":[{"code":"error","count":1}]}],
            "extension":[{"url":"http://example.org/x","valueBoolean":true}]}"#;
        let m = Manifest::parse(stu4).unwrap();
        assert_eq!((m.output.len(), m.error.len()), (1, 1), "outcome[] is read as error[]");
        // STU3: `extension` an object, a next link
        let stu3 = br#"{"transactionTime":"2026-11-26T03:00:00Z","request":"x","output":[],"error":[],
            "extension":{"https://example.com/extra":true},"link":[{"relation":"next","url":"https://s/status/1?page=2"}]}"#;
        assert_eq!(Manifest::parse(stu3).unwrap().link.len(), 1);
        let table: &[(&[u8], &str)] = &[
            (
                br#"{"manifestType":"http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkSubmitStatusManifest","output":[]}"#,
                "not an export manifest",
            ),
            (br#"{"outputOrganizedBy":"Patient","output":[{"url":"https://s/f/1.ndjson"}]}"#, "organizeOutputBy"),
            (
                br#"{"output":[],"link":[{"relation":"next","url":"https://s/2"},{"relation":"next","url":"https://s/3"}]}"#,
                "one `next` link",
            ),
            (br#"{"output":[],"link":[{"relation":"next","url":"file:///etc/passwd"}]}"#, "not http(s)"),
        ];
        for (body, want) in table {
            let e = Manifest::parse(body).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn pages_of_one_export_are_merged_and_pages_of_another_refused() {
        let page = |tt: &str, n: usize| Manifest {
            transaction_time: Some(tt.into()),
            output: (0..n)
                .map(|i| OutputFile { type_: "Patient".into(), url: format!("https://s/{i}"), count: None })
                .collect(),
            ..Default::default()
        };
        let mut m = page("t1", 2);
        let mut second = page("t1", 3);
        second.link = vec![Link { relation: "next".into(), url: "https://s/status?page=3".into() }];
        m.append(second).unwrap();
        assert_eq!(m.output.len(), 5);
        assert_eq!(m.take_next().as_deref(), Some("https://s/status?page=3"), "the second page's link leads on");
        assert!(m.append(page("t2", 1)).unwrap_err().contains("not of one export"));
        assert!(m.append(page("t1", MAX_FILES)).unwrap_err().contains("at most"));
    }
}
