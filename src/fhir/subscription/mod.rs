//! Subscriptions on a source server: what kind of Subscriptions it takes, finding the ones fhirsync
//! owns (by `meta.tag`), creating, updating, re-requesting and deleting them; topics in [`topic`],
//! shapes in [`shape`]. No Kubernetes types.

use std::collections::BTreeMap;

use reqwest::header::{ACCEPT, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;

use super::client::{Error, HttpClient, Request};
use crate::text::redact;

mod shape;
pub mod topic;
pub use shape::*;

/// What the source's CapabilityStatement says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub fhir_version: String,
    pub subscription_create: bool,
    pub subscription_search: bool,
    /// `software.name`.
    pub software: String,
    /// Its Subscriptions are topic-based, and how (R4B/R5, or R4 with the Subscriptions Backport —
    /// said in the statement, or known of the server: Helios says nothing of it).
    pub topics: Option<TopicStyle>,
}

impl Capabilities {
    /// Why the source cannot host fhirsync's Subscriptions at all, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        let v = &self.fhir_version;
        if !(v.starts_with("4.0") || v.starts_with("4.3") || v.starts_with('5') || v.starts_with('6')) {
            return Some(format!("the source speaks FHIR {v}; fhirsync manages R4, R4B and R5 Subscriptions"));
        }
        if !self.subscription_create || !self.subscription_search {
            return Some(
                "the source's CapabilityStatement does not list the Subscription resource with create and search \
                 (HAPI: set hapi.fhir.subscription.resthook_enabled: true)"
                    .into(),
            );
        }
        None
    }

    /// Why the source cannot deliver straight into Pathling (`delivery: Direct`), if it cannot.
    pub fn direct_unsupported(&self) -> Option<String> {
        if let Some(why) = self.unsupported() {
            return Some(why);
        }
        if self.topics.is_some() {
            return Some(format!(
                "the source ({}, FHIR {}) has topic-based Subscriptions: it POSTs notification Bundles, which Pathling \
                 cannot take. Set spec.delivery: Relay (fhirsync's receiver writes the changes into spec.target)",
                if self.software.is_empty() { "unnamed" } else { &self.software },
                self.fhir_version
            ));
        }
        if crate::fhir::quirks::posts_resources(&self.software) {
            return Some(
                "Medplum POSTs resources to the bare endpoint, which Pathling cannot take: set spec.delivery: Relay"
                    .into(),
            );
        }
        None
    }
}

/// Reads the kind of Subscriptions from a CapabilityStatement.
pub fn topic_style(v: &Value) -> Option<TopicStyle> {
    let version = v["fhirVersion"].as_str().unwrap_or_default();
    if version.starts_with('5') || version.starts_with('6') {
        return Some(TopicStyle::R5);
    }
    if version.starts_with("4.3") {
        return Some(TopicStyle::BackportTopic);
    }
    let software = v["software"]["name"].as_str().unwrap_or_default();
    let text = v.to_string();
    if text.contains("subscriptions-backport") || crate::fhir::quirks::has_unstated_backport_topics(software) {
        return Some(TopicStyle::BackportBasic);
    }
    None
}

/// What one reconciliation did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Per desired criteria, in spec order.
    pub states: Vec<Existing>,
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub rerequested: Vec<String>,
    pub deleted: Vec<String>,
}

/// Subscription client for one source.
#[derive(Clone, Debug)]
pub struct SubscriptionClient {
    http: HttpClient,
}

fn fhir_json(r: Request) -> Request {
    r.header(ACCEPT, "application/fhir+json")
}

impl SubscriptionClient {
    /// Wraps an HTTP client for the source.
    pub fn new(http: HttpClient) -> Self {
        Self { http }
    }

    /// The underlying HTTP client.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    async fn json(&self, req: Request) -> Result<(StatusCode, Option<Url>, Value), Error> {
        let method = req.method.clone();
        let resp = self.http.send(req).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(Error::from_response(&method, resp).await);
        }
        let loc =
            resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()).and_then(|l| self.http.base().join(l).ok());
        let url = resp.url().clone();
        let body = resp.bytes().await.map_err(|e| super::client::body_error(&url, e))?;
        let v = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
        Ok((status, loc, v))
    }

    /// Reads `/metadata`.
    pub async fn capabilities(&self) -> Result<Capabilities, Error> {
        let (_, _, v) = self.json(fhir_json(Request::new(Method::GET, self.http.url("metadata")))).await?;
        if v["resourceType"] != "CapabilityStatement" {
            return Err(Error::Protocol {
                url: redact(&self.http.url("metadata")),
                message: "the source's /metadata is not a CapabilityStatement: is source.url a FHIR base?".into(),
            });
        }
        let sub = v["rest"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["resource"].as_array().into_iter().flatten())
            .find(|r| r["type"] == "Subscription");
        let has = |code: &str| {
            sub.and_then(|s| s["interaction"].as_array()).is_some_and(|a| a.iter().any(|i| i["code"] == code))
        };
        Ok(Capabilities {
            fhir_version: crate::text::peer_text(v["fhirVersion"].as_str().unwrap_or("unknown"), 32),
            subscription_create: has("create"),
            subscription_search: has("search-type"),
            software: crate::text::peer_text(v["software"]["name"].as_str().unwrap_or_default(), 64),
            topics: topic_style(&v),
        })
    }

    /// All Subscriptions carrying the owner tag (following `next` links; filtered client-side too,
    /// for servers that ignore `_tag`).
    pub async fn find_owned(&self, tag: &Tag) -> Result<Vec<Existing>, Error> {
        let mut url = self.http.url("Subscription");
        url.query_pairs_mut().append_pair("_tag", &format!("{}|{}", tag.system, tag.code)).append_pair("_count", "100");
        let mut out = vec![];
        for _ in 0..100 {
            let (_, _, bundle) = self.json(fhir_json(Request::new(Method::GET, url.clone()))).await?;
            for e in bundle["entry"].as_array().into_iter().flatten() {
                let r = &e["resource"];
                let owned = r["meta"]["tag"].as_array().is_some_and(|t| {
                    t.iter().any(|t| t["system"] == tag.system.as_str() && t["code"] == tag.code.as_str())
                });
                if r["resourceType"] == "Subscription"
                    && owned
                    && let Some(x) = Existing::from(r.clone())
                {
                    out.push(x);
                }
            }
            let next = bundle["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .and_then(|u| self.http.base().join(u).ok());
            match next {
                Some(n) if self.http.same_origin(&n) => url = n,
                _ => break,
            }
        }
        Ok(out)
    }

    async fn write(&self, method: Method, url: Url, resource: &Value) -> Result<Existing, Error> {
        let req = fhir_json(Request::new(method, url.clone()))
            .header(CONTENT_TYPE, "application/fhir+json")
            .header(reqwest::header::HeaderName::from_static("prefer"), "return=representation")
            .body(serde_json::to_vec(resource).unwrap_or_default());
        let (_, loc, v) = self.json(req).await?;
        if let Some(x) = Existing::from(v) {
            return Ok(x);
        }
        // no body: read it back from the Location (…/Subscription/{id}/_history/{v})
        let id = loc
            .as_ref()
            .and_then(|l| {
                let segs: Vec<&str> = l.path_segments()?.collect();
                let i = segs.iter().position(|s| *s == "Subscription")?;
                segs.get(i + 1).map(|s| s.to_string())
            })
            .or_else(|| resource["id"].as_str().map(str::to_string))
            .ok_or_else(|| Error::Protocol {
                url: redact(&url),
                message: "the server returned no Subscription id".into(),
            })?;
        self.read(&id).await?.ok_or_else(|| Error::Protocol {
            url: redact(&url),
            message: format!("Subscription/{id} vanished right after it was written"),
        })
    }

    /// Creates a Subscription.
    pub async fn create(&self, resource: &Value) -> Result<Existing, Error> {
        self.write(Method::POST, self.http.url("Subscription"), resource).await
    }

    /// Replaces a Subscription.
    pub async fn update(&self, id: &str, resource: &Value) -> Result<Existing, Error> {
        self.write(Method::PUT, self.http.url(&format!("Subscription/{id}")), resource).await
    }

    /// Reads one; `None` when it is gone.
    pub async fn read(&self, id: &str) -> Result<Option<Existing>, Error> {
        match self.json(fhir_json(Request::new(Method::GET, self.http.url(&format!("Subscription/{id}"))))).await {
            Ok((_, _, v)) => Ok(Existing::from(v)),
            Err(e) if e.status().is_some_and(crate::fhir::class::gone) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes one; already gone counts as done.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        match self.json(fhir_json(Request::new(Method::DELETE, self.http.url(&format!("Subscription/{id}"))))).await {
            Ok(_) => Ok(()),
            Err(e) if e.status().is_some_and(crate::fhir::class::gone) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Makes the source hold exactly one owned Subscription per desired criteria: creates missing
    /// ones, updates changed ones, removes duplicates and ones whose criteria left the spec, and
    /// re-requests those in `error`/`off` when `may_retry(criteria)` allows.
    pub async fn reconcile(
        &self,
        tag: &Tag,
        desired: &[Desired],
        may_retry: impl Fn(&str) -> bool,
    ) -> Result<Outcome, Error> {
        let mut by_criteria: BTreeMap<String, Vec<Existing>> = BTreeMap::new();
        for e in self.find_owned(tag).await? {
            by_criteria.entry(e.criteria.clone()).or_default().push(e);
        }
        let mut out = Outcome::default();
        for d in desired {
            let state = match by_criteria.remove(&d.criteria) {
                None => {
                    let c = self.create(&d.resource(tag, None)).await?;
                    out.created.push(d.criteria.clone());
                    c
                }
                Some(mut list) => {
                    list.sort_by_key(|e| (e.status != "active", e.id.clone()));
                    let keep = list.remove(0);
                    for dup in list {
                        self.delete(&dup.id).await?;
                        out.deleted.push(dup.id);
                    }
                    if d.differs_from(&keep.resource) {
                        out.updated.push(d.criteria.clone());
                        self.update(&keep.id, &d.resource(tag, Some(&keep.id))).await?
                    } else if matches!(keep.status.as_str(), "error" | "off") && may_retry(&d.criteria) {
                        out.rerequested.push(d.criteria.clone());
                        self.update(&keep.id, &d.resource(tag, Some(&keep.id))).await?
                    } else {
                        keep
                    }
                }
            };
            out.states.push(state);
        }
        for (_, list) in by_criteria {
            for gone in list {
                self.delete(&gone.id).await?;
                out.deleted.push(gone.id);
            }
        }
        Ok(out)
    }

    /// Removes every owned Subscription; returns how many.
    pub async fn remove_all(&self, tag: &Tag) -> Result<usize, Error> {
        let owned = self.find_owned(tag).await?;
        for e in &owned {
            self.delete(&e.id).await?;
        }
        Ok(owned.len())
    }
}

/// Parses `Name: value` lines (blank lines ignored).
pub fn header_lines(text: &str) -> Result<Vec<String>, String> {
    let mut out = vec![];
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        match l.split_once(':') {
            Some((name, _)) if !name.trim().is_empty() && !name.contains(' ') => out.push(l.to_string()),
            _ => return Err(format!("line {} is not a \"Name: value\" header", n + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_and_capabilities() {
        assert_eq!(header_lines("Authorization: Bearer x\n\nX-A: b\n").unwrap().len(), 2);
        assert!(header_lines("not a header").is_err());
        let caps = |v: Value| Capabilities {
            fhir_version: v["fhirVersion"].as_str().unwrap().into(),
            subscription_create: true,
            subscription_search: true,
            software: v["software"]["name"].as_str().unwrap_or_default().into(),
            topics: topic_style(&v),
        };
        let r5 = caps(json!({"fhirVersion": "5.0.0"}));
        assert!(r5.unsupported().is_none());
        assert!(r5.direct_unsupported().unwrap().contains("spec.delivery: Relay"));
        let helios = caps(json!({"fhirVersion": "4.0.1", "software": {"name": "Helios FHIR Server"}}));
        assert_eq!(helios.topics, Some(TopicStyle::BackportBasic));
        assert!(helios.direct_unsupported().unwrap().contains("topic-based"));
        let backport = caps(
            json!({"fhirVersion": "4.0.1", "implementationGuide": ["http://hl7.org/fhir/uv/subscriptions-backport/ImplementationGuide/hl7.fhir.uv.subscriptions-backport"]}),
        );
        assert_eq!(backport.topics, Some(TopicStyle::BackportBasic));
        let hapi = caps(json!({"fhirVersion": "4.0.1", "software": {"name": "HAPI FHIR Server"}}));
        assert!(hapi.direct_unsupported().is_none() && hapi.topics.is_none());
        let medplum = caps(json!({"fhirVersion": "4.0.1", "software": {"name": "Medplum"}}));
        assert!(medplum.direct_unsupported().unwrap().contains("Medplum"));
        let mut c = caps(json!({"fhirVersion": "4.0.1"}));
        c.subscription_create = false;
        assert!(c.unsupported().unwrap().contains("resthook_enabled"));
    }
}
