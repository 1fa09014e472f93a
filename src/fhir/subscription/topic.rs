//! SubscriptionTopics for topic-based sources: a topic whose triggers cover a resource type (create,
//! update and delete) and that can filter by the criteria's parameters is looked for first; else
//! fhirsync creates one, tagged as its own, and removes it with the sync. On R4 (Helios) a topic is a
//! `Basic` resource coded `SubscriptionTopic` with the R5 topic's elements as extensions; on R4B and
//! R5 it is a `SubscriptionTopic`.

use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::{Value, json};

use super::{Tag, TopicStyle};
use crate::fhir::client::{Error, HttpClient, Request, read_capped};
use crate::text::redact;

const EXT_URL: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.url";
const EXT_STATUS: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.status";
const EXT_TRIGGER: &str = "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.resourceTrigger";
const EXT_FILTER: &str = "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.canFilterBy";
const FHIR_TYPES: &str = "http://hl7.org/fhir/fhir-types";
/// Largest search answer read (parsed whole: kept small; a page of 100 topics is ~200 KiB).
const PAGE_MAX: usize = 1 << 20;
const INTERACTIONS: [&str; 3] = ["create", "update", "delete"];

/// A topic as fhirsync reads one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub url: String,
    pub id: Option<String>,
    /// Resource types it triggers on for create, update and delete alike.
    pub types: Vec<String>,
    /// (resource type, parameter) pairs it can filter by.
    pub filters: Vec<(String, String)>,
    /// It carries fhirsync's owner tag.
    pub owned: bool,
}

impl Topic {
    /// Whether it covers `type_` with every parameter in `params`.
    pub fn covers(&self, type_: &str, params: &[String]) -> bool {
        self.types.iter().any(|t| t == type_)
            && params.iter().all(|p| self.filters.iter().any(|(t, f)| (t == type_ || t.is_empty()) && f == p))
    }
}

fn type_name(uri: &str) -> String {
    uri.rsplit('/').next().unwrap_or(uri).to_string()
}

fn owned_by(v: &Value, tag: &Tag) -> bool {
    v["meta"]["tag"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["system"] == tag.system.as_str() && t["code"] == tag.code.as_str()))
}

/// Reads a topic from a `Basic` (R4) or a `SubscriptionTopic` (R4B/R5); `None` when it is not one.
pub fn read_topic(v: &Value, tag: &Tag) -> Option<Topic> {
    let id = v["id"].as_str().map(str::to_string);
    match v["resourceType"].as_str()? {
        "Basic" => {
            let coded = v["code"]["coding"].as_array()?.iter().any(|c| c["code"] == "SubscriptionTopic");
            if !coded {
                return None;
            }
            let exts = v["extension"].as_array()?;
            let url = exts.iter().find(|e| e["url"] == EXT_URL)?["valueUri"].as_str()?.to_string();
            let mut types = vec![];
            let mut filters = vec![];
            for e in exts {
                let sub = e["extension"].as_array().cloned().unwrap_or_default();
                let get = |n: &str| sub.iter().filter(|x| x["url"] == n).collect::<Vec<_>>();
                if e["url"] == EXT_TRIGGER {
                    let r = get("resource").first().and_then(|x| x["valueUri"].as_str()).map(type_name);
                    let i: Vec<&str> =
                        get("supportedInteraction").iter().filter_map(|x| x["valueCode"].as_str()).collect();
                    if let Some(r) = r
                        && INTERACTIONS.iter().all(|w| i.contains(w))
                    {
                        types.push(r);
                    }
                } else if e["url"] == EXT_FILTER {
                    let r =
                        get("resource").first().and_then(|x| x["valueUri"].as_str()).map(type_name).unwrap_or_default();
                    if let Some(p) = get("filterParameter").first().and_then(|x| x["valueString"].as_str()) {
                        filters.push((r, p.to_string()));
                    }
                }
            }
            Some(Topic { url, id, types, filters, owned: owned_by(v, tag) })
        }
        "SubscriptionTopic" => {
            let url = v["url"].as_str()?.to_string();
            let types = v["resourceTrigger"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| {
                    let i: Vec<&str> =
                        t["supportedInteraction"].as_array().into_iter().flatten().filter_map(|x| x.as_str()).collect();
                    INTERACTIONS.iter().all(|w| i.contains(w))
                })
                .filter_map(|t| t["resource"].as_str().map(type_name))
                .collect();
            let filters = v["canFilterBy"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| {
                    Some((
                        f["resource"].as_str().map(type_name).unwrap_or_default(),
                        f["filterParameter"].as_str()?.to_string(),
                    ))
                })
                .collect();
            Some(Topic { url, id, types, filters, owned: owned_by(v, tag) })
        }
        _ => None,
    }
}

/// The topic fhirsync creates for `type_`, filterable by `params`.
pub fn topic_resource(style: TopicStyle, tag: &Tag, url: &str, type_: &str, params: &[String]) -> Value {
    let sd = format!("http://hl7.org/fhir/StructureDefinition/{type_}");
    let meta = json!({"tag": [{"system": tag.system, "code": tag.code}]});
    match style {
        TopicStyle::BackportBasic => {
            let mut trigger = vec![json!({"url": "resource", "valueUri": sd})];
            trigger.extend(INTERACTIONS.iter().map(|i| json!({"url": "supportedInteraction", "valueCode": i})));
            let mut ext = vec![
                json!({"url": EXT_URL, "valueUri": url}),
                json!({"url": EXT_STATUS, "valueCode": "active"}),
                json!({"url": EXT_TRIGGER, "extension": trigger}),
            ];
            ext.extend(params.iter().map(|p| {
                json!({"url": EXT_FILTER, "extension": [{"url": "resource", "valueUri": type_}, {"url": "filterParameter", "valueString": p}]})
            }));
            json!({"resourceType": "Basic", "meta": meta,
                   "code": {"coding": [{"system": FHIR_TYPES, "code": "SubscriptionTopic"}]}, "extension": ext})
        }
        TopicStyle::BackportTopic | TopicStyle::R5 => json!({
            "resourceType": "SubscriptionTopic", "meta": meta, "url": url, "status": "active",
            "resourceTrigger": [{"resource": sd, "supportedInteraction": INTERACTIONS}],
            "canFilterBy": params.iter().map(|p| json!({"resource": type_, "filterParameter": p})).collect::<Vec<_>>(),
        }),
    }
}

/// Topics on one source.
#[derive(Clone, Debug)]
pub struct TopicClient {
    http: HttpClient,
    style: TopicStyle,
}

impl TopicClient {
    pub fn new(http: HttpClient, style: TopicStyle) -> Self {
        Self { http, style }
    }

    fn search_url(&self, owned: Option<&Tag>) -> url::Url {
        let (path, code) = match self.style {
            TopicStyle::BackportBasic => ("Basic", Some(format!("{FHIR_TYPES}|SubscriptionTopic"))),
            _ => ("SubscriptionTopic", None),
        };
        let mut u = self.http.url(path);
        {
            let mut q = u.query_pairs_mut();
            if let Some(t) = owned {
                q.append_pair("_tag", &format!("{}|{}", t.system, t.code));
            } else if let Some(c) = code {
                q.append_pair("code", &c);
            }
            q.append_pair("_count", "100");
        }
        u
    }

    /// The topics a search finds (one page of at most 100; a source that cannot search answers none).
    async fn search(&self, tag: &Tag, owned: bool) -> Result<Vec<Topic>, Error> {
        let url = self.search_url(owned.then_some(tag));
        let resp =
            self.http.send(Request::new(Method::GET, url.clone()).header(ACCEPT, "application/fhir+json")).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let e = Error::from_response(&Method::GET, resp).await;
            // a source that cannot search these has no topics of fhirsync's
            return if status.is_client_error() && !matches!(status.as_u16(), 401 | 403 | 429) {
                Ok(vec![])
            } else {
                Err(e)
            };
        }
        let body = read_capped(resp, PAGE_MAX, "a topic search").await?;
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            tracing::debug!(url = %redact(&url), "a topic search answered something that is not JSON");
            return Ok(vec![]);
        };
        Ok(v["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| read_topic(&e["resource"], tag))
            .filter(|t| !owned || t.owned)
            .collect())
    }

    /// A topic covering `type_` and `params`: fhirsync's own, else one already on the source, else a
    /// new one of fhirsync's at `new_url`.
    pub async fn ensure(&self, tag: &Tag, type_: &str, params: &[String], new_url: &str) -> Result<Topic, Error> {
        let own = self.search(tag, true).await?;
        if let Some(t) = own.iter().find(|t| t.url == new_url && t.covers(type_, params)) {
            return Ok(t.clone());
        }
        // (ours too: a source that ignores `_tag` answered the first search with nothing)
        if let Some(t) = self
            .search(tag, false)
            .await?
            .into_iter()
            .find(|t| (!t.owned || t.url == new_url) && t.covers(type_, params))
        {
            return Ok(t);
        }
        let body = topic_resource(self.style, tag, new_url, type_, params);
        let stale = own.iter().find(|t| t.url == new_url).and_then(|t| t.id.clone());
        let (method, url) = match &stale {
            // ours, but it cannot filter by a parameter the criteria gained: replace it
            Some(id) => (Method::PUT, self.http.url_segments(&[body["resourceType"].as_str().unwrap_or("Basic"), id])),
            None => (Method::POST, self.http.url(body["resourceType"].as_str().unwrap_or("Basic"))),
        };
        let mut body = body;
        if let Some(id) = &stale {
            body["id"] = json!(id);
        }
        let req = Request::new(method.clone(), url)
            .header(ACCEPT, "application/fhir+json")
            .header(CONTENT_TYPE, "application/fhir+json")
            .body(serde_json::to_vec(&body).unwrap_or_default());
        let resp = self.http.send(req).await?;
        if !resp.status().is_success() {
            return Err(Error::from_response(&method, resp).await);
        }
        let mut t = read_topic(&body, tag).unwrap_or(Topic {
            url: new_url.into(),
            id: None,
            types: vec![type_.into()],
            filters: vec![],
            owned: true,
        });
        t.owned = true;
        Ok(t)
    }

    /// Removes fhirsync's topics whose URL is not in `keep`; returns how many.
    pub async fn remove_owned(&self, tag: &Tag, keep: &[String]) -> Result<usize, Error> {
        let path = if self.style == TopicStyle::BackportBasic { "Basic" } else { "SubscriptionTopic" };
        let mut n = 0;
        for t in self.search(tag, true).await? {
            let Some(id) = t.id.as_deref().filter(|_| !keep.contains(&t.url)) else { continue };
            let resp = self.http.send(Request::new(Method::DELETE, self.http.url_segments(&[path, id]))).await?;
            if !(resp.status().is_success() || crate::fhir::class::gone(resp.status().as_u16())) {
                return Err(Error::from_response(&Method::DELETE, resp).await);
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag() -> Tag {
        Tag { system: "https://fhirsync.io/owner".into(), code: "ns/n/u".into() }
    }

    #[test]
    fn topics_are_written_and_read_in_both_shapes() {
        for style in [TopicStyle::BackportBasic, TopicStyle::R5] {
            let r = topic_resource(
                style,
                &tag(),
                "https://fhirsync.io/topic/u/Observation",
                "Observation",
                &["status".into()],
            );
            let t = read_topic(&r, &tag()).unwrap();
            assert_eq!(t.url, "https://fhirsync.io/topic/u/Observation");
            assert!(t.owned && t.covers("Observation", &["status".into()]), "{t:?}");
            assert!(!t.covers("Observation", &["code".into()]) && !t.covers("Patient", &[]));
        }
        // a topic without delete does not cover a type: deletes would be missed
        let helios = json!({"resourceType":"Basic","code":{"coding":[{"system":FHIR_TYPES,"code":"SubscriptionTopic"}]},
            "extension":[{"url":EXT_URL,"valueUri":"http://example.org/topic/patient"},
              {"url":EXT_TRIGGER,"extension":[{"url":"resource","valueUri":"http://hl7.org/fhir/StructureDefinition/Patient"},
                 {"url":"supportedInteraction","valueCode":"create"},{"url":"supportedInteraction","valueCode":"update"}]}]});
        let t = read_topic(&helios, &tag()).unwrap();
        assert!(!t.owned && !t.covers("Patient", &[]));
        assert_eq!(read_topic(&json!({"resourceType":"Basic","code":{"coding":[{"code":"other"}]}}), &tag()), None);
    }
}
