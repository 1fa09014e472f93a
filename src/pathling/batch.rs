//! Pathling's `batch` (`POST [base]` with a Bundle) and single `PUT`s, as the relay writes changes.
//! Pathling applies DELETE entries at once and merges PUTs per type at the end, and fails the whole
//! request on one bad entry (a DELETE of an absent resource too): the relay sends only PUTs in a
//! batch, each checked before, and deletes one by one (404 = done).

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{PathlingClient, busy_if_503};
use crate::fhir::bundle::BoundedVec;
use crate::fhir::client::{Error, Request, read_capped};
use crate::fhir::ids::{is_id, is_type};
use crate::text::redact;

/// Most entries in one batch.
pub const MAX_ENTRIES: usize = 1000;

/// One resource to write.
#[derive(Debug, Clone, Copy)]
pub struct Put<'a> {
    pub type_: &'a str,
    pub id: &'a str,
    pub resource: &'a RawValue,
}

#[derive(Serialize)]
struct Bundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    #[serde(rename = "type")]
    type_: &'static str,
    entry: Vec<Entry<'a>>,
}

#[derive(Serialize)]
struct Entry<'a> {
    resource: &'a RawValue,
    request: EntryRequest,
}

#[derive(Serialize)]
struct EntryRequest {
    method: &'static str,
    url: String,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(default)]
    entry: BoundedVec<AnswerEntry, MAX_ENTRIES>,
}

#[derive(Deserialize)]
struct AnswerEntry {
    #[serde(default)]
    response: Option<AnswerResponse>,
}

#[derive(Deserialize)]
struct AnswerResponse {
    #[serde(default)]
    status: Option<String>,
}

impl PathlingClient {
    /// Writes `puts` in one `batch` Bundle. `Ok` only when Pathling answered a batch-response with a
    /// 200/201 for every entry.
    pub async fn batch_put(&self, puts: &[Put<'_>]) -> Result<(), Error> {
        // the base itself, without a trailing slash (Spring matches `/fhir`, not `/fhir/`)
        let mut url = self.http.base().clone();
        url.set_query(None);
        let path = url.path().trim_end_matches('/').to_string();
        url.set_path(&path);
        let protocol = |message: String| Error::Protocol { url: redact(&url), message };
        if puts.len() > MAX_ENTRIES || puts.iter().any(|p| !is_type(p.type_) || !is_id(p.id)) {
            return Err(protocol("refusing a batch of invalid or too many entries".into()));
        }
        let bundle = Bundle {
            resource_type: "Bundle",
            type_: "batch",
            entry: puts
                .iter()
                .map(|p| Entry {
                    resource: p.resource,
                    request: EntryRequest { method: "PUT", url: format!("{}/{}", p.type_, p.id) },
                })
                .collect(),
        };
        let body = serde_json::to_vec(&bundle).map_err(|e| protocol(e.to_string()))?;
        // Pathling echoes each resource: the answer is about the size of the batch
        let answer_max = body.len().saturating_mul(2).saturating_add(1 << 20);
        let r = Request::new(Method::POST, url.clone())
            .header(ACCEPT, "application/fhir+json")
            .header(CONTENT_TYPE, "application/fhir+json")
            .body(body);
        let resp = self.http.send(r).await?;
        if resp.status() != StatusCode::OK {
            return Err(busy_if_503(Error::from_response(&Method::POST, resp).await));
        }
        let body = read_capped(resp, answer_max, "the batch answer").await?;
        let a: Answer = serde_json::from_slice(&body).map_err(|_| {
            protocol(format!("the batch was answered with {}", crate::text::describe_text_body(&body, None)))
        })?;
        if a.resource_type.as_deref() != Some("Bundle") || a.entry.0.len() != puts.len() {
            return Err(protocol(format!(
                "the batch answer lists {} entries for {} sent; nothing is counted as written",
                a.entry.0.len(),
                puts.len()
            )));
        }
        let bad = a.entry.0.iter().filter(|e| {
            !e.response
                .as_ref()
                .and_then(|r| r.status.as_deref())
                .is_some_and(|s| s.starts_with("200") || s.starts_with("201"))
        });
        match bad.count() {
            0 => Ok(()),
            n => Err(protocol(format!("{n} entries of the batch were not written"))),
        }
    }

    /// Writes one resource (`PUT [base]/{Type}/{id}`).
    pub async fn put(&self, p: Put<'_>) -> Result<(), Error> {
        if !is_type(p.type_) || !is_id(p.id) {
            return Err(Error::Protocol { url: redact(self.http.base()), message: "invalid type or id".into() });
        }
        let url = self.http.url_segments(&[p.type_, p.id]);
        let r = Request::new(Method::PUT, url)
            .header(ACCEPT, "application/fhir+json")
            .header(CONTENT_TYPE, "application/fhir+json")
            .body(p.resource.get().as_bytes().to_vec());
        let resp = self.http.send(r).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(busy_if_503(Error::from_response(&Method::PUT, resp).await))
    }
}
