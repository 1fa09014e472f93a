//! Whether resources exist at a server now: a search by `_id` in chunks (one request per chunk), or a
//! read per resource where the server cannot search by `_id`. Used before a deletion is applied (a
//! resource deleted and re-created stays) and before an extra resource is removed from Pathling.

use std::collections::BTreeSet;

use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};

use super::bundle::{EntryRef, Page};
use super::client::{Error, HttpClient, Request, read_capped};
use super::ids::{is_id, is_type};
use crate::text::redact;

/// Ids asked for in one search (about 3 KB of URL).
pub const CHUNK: usize = 50;
/// Largest search answer read.
const PAGE_MAX: usize = 16 << 20;

/// What a server said about a set of ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existence {
    /// These of the asked ids exist; the others do not.
    Alive(BTreeSet<String>),
    /// The server cannot answer this way (the reason, for logs).
    Unsupported(String),
}

fn unsupported_status(s: StatusCode) -> bool {
    super::class::refuses_status(s.as_u16(), super::class::Ask::Search)
}

/// Searches `{Type}?_id=a,b,…` for at most [`CHUNK`] ids. A server that ignores the parameter (it
/// answers ids not asked for, or more than one page) is `Unsupported`.
pub async fn search_ids(http: &HttpClient, resource_type: &str, ids: &[String]) -> Result<Existence, Error> {
    if !is_type(resource_type) || ids.len() > CHUNK || ids.iter().any(|i| !is_id(i)) {
        return Ok(Existence::Unsupported("not a resource type and ids".into()));
    }
    let mut url = http.url_segments(&[resource_type]);
    url.query_pairs_mut()
        .append_pair("_id", &ids.join(","))
        .append_pair("_count", &(ids.len().max(1) * 2).to_string())
        .append_pair("_elements", "id");
    // HAPI answers a search repeated within 60 s from its cache: a resource deleted (or re-created)
    // moments ago would look as it was. Whether it exists now is what the caller acts on.
    let resp = http
        .send(
            Request::new(Method::GET, url.clone())
                .header(ACCEPT, "application/fhir+json")
                .header(reqwest::header::CACHE_CONTROL, "no-cache"),
        )
        .await?;
    let status = resp.status();
    if status != StatusCode::OK {
        let e = Error::from_response(&Method::GET, resp).await;
        return if unsupported_status(status) { Ok(Existence::Unsupported(e.to_string())) } else { Err(e) };
    }
    let body = read_capped(resp, PAGE_MAX, "a search answer").await?;
    let page = match Page::parse(&body) {
        Ok(p) => p,
        Err(m) => return Ok(Existence::Unsupported(format!("{}: {m}", redact(&url)))),
    };
    let asked: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let mut alive = BTreeSet::new();
    for e in page.entries {
        if let EntryRef::Resource(t, id) = e
            && t == resource_type
        {
            if !asked.contains(id.as_str()) {
                return Ok(Existence::Unsupported("the server ignored _id (answered other resources)".into()));
            }
            alive.insert(id);
        }
    }
    if page.next.is_some() && alive.len() < ids.len() {
        return Ok(Existence::Unsupported("the server ignored _id (answered more than one page)".into()));
    }
    Ok(Existence::Alive(alive))
}

/// Reads one resource: `Some(true)` exists, `Some(false)` is gone (404, 410), `None` when the server
/// cannot say.
pub async fn exists(http: &HttpClient, resource_type: &str, id: &str) -> Result<Option<bool>, Error> {
    if !is_type(resource_type) || !is_id(id) {
        return Ok(None);
    }
    let url = http.url_segments(&[resource_type, id]);
    let mut url = url;
    url.query_pairs_mut().append_pair("_elements", "id");
    let resp = http.send(Request::new(Method::GET, url).header(ACCEPT, "application/fhir+json")).await?;
    match resp.status() {
        StatusCode::OK => Ok(Some(true)),
        s if super::class::gone(s.as_u16()) => Ok(Some(false)),
        s if unsupported_status(s) => Ok(None),
        _ => Err(Error::from_response(&Method::GET, resp).await),
    }
}
