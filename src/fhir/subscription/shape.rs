//! What a Subscription fhirsync owns looks like, in each of its shapes: a classic R4 criteria
//! Subscription (HAPI, Smile CDR, Firely, Medplum), an R4 Subscriptions Backport Subscription on a
//! topic (Helios; R4B), or an R5 Subscription on a topic — and whether one found on a source differs
//! from it in anything fhirsync controls. Each carries the criteria it serves in a fhirsync extension,
//! so a topic-based one is found again by what the user asked for, not by its topic.

use serde_json::{Value, json};

/// HAPI's channel extension that turns on DELETE notifications.
pub const SEND_DELETES_EXT: &str = "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages";
/// fhirsync's extension naming the criteria a Subscription serves.
pub const CRITERIA_EXT: &str = "https://fhirsync.io/StructureDefinition/criteria";
/// The Subscriptions Backport profile.
pub const BACKPORT_PROFILE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription";
/// Backport: the payload content extension (on `channel._payload`).
pub const PAYLOAD_CONTENT_EXT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
/// Backport: the filter extension (top-level: Helios ignores it elsewhere).
pub const FILTER_EXT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";

/// The owner mark put in `meta.tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub system: String,
    pub code: String,
}

/// How a source's topic-based Subscriptions are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicStyle {
    /// R4 with the Subscriptions Backport: topics are `Basic` resources (Helios).
    BackportBasic,
    /// R4B: Backport-shaped Subscriptions, topics are `SubscriptionTopic` resources.
    BackportTopic,
    /// R5: `Subscription.topic`, `filterBy`, `content`; topics are `SubscriptionTopic` resources.
    R5,
}

/// How a Subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// A classic R4 criteria Subscription: the source PUTs (or POSTs) each resource.
    Criteria,
    /// A topic-based Subscription: the source POSTs notification Bundles.
    Topic {
        style: TopicStyle,
        /// The topic's canonical URL.
        topic: String,
        /// The criteria's search part (`Observation?status=final`), when it has one.
        filter: Option<String>,
        /// `id-only`, `full-resource` or `empty`.
        content: &'static str,
    },
}

/// What one Subscription should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The criteria it serves (the key by which fhirsync finds it again).
    pub criteria: String,
    pub endpoint: String,
    /// `Name: value` lines for `channel.header`.
    pub headers: Vec<String>,
    pub send_deletes: bool,
    pub end: Option<String>,
    pub reason: String,
    pub how: How,
}

fn criteria_ext(c: &str) -> Value {
    json!({"url": CRITERIA_EXT, "valueString": c})
}

impl Desired {
    /// The Subscription resource (status `requested`: only the server activates it).
    pub fn resource(&self, tag: &Tag, id: Option<&str>) -> Value {
        let mut r = match &self.how {
            How::Criteria => {
                let mut channel = json!({
                    "type": "rest-hook",
                    "endpoint": self.endpoint,
                    "payload": "application/fhir+json",
                });
                if !self.headers.is_empty() {
                    channel["header"] = json!(self.headers);
                }
                if self.send_deletes {
                    channel["extension"] = json!([{"url": SEND_DELETES_EXT, "valueBoolean": true}]);
                }
                json!({"resourceType": "Subscription", "criteria": self.criteria, "channel": channel,
                       "extension": [criteria_ext(&self.criteria)]})
            }
            How::Topic { style: TopicStyle::R5, topic, filter, content } => {
                let mut r = json!({
                    "resourceType": "Subscription",
                    "topic": topic,
                    "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "rest-hook"},
                    "endpoint": self.endpoint,
                    "contentType": "application/fhir+json",
                    "content": content,
                    "extension": [criteria_ext(&self.criteria)],
                });
                if !self.headers.is_empty() {
                    r["header"] = json!(self.headers);
                }
                if let Some(f) = filter {
                    r["filterBy"] = json!(filter_by(f));
                }
                r
            }
            How::Topic { topic, filter, content, .. } => {
                let mut channel = json!({
                    "type": "rest-hook",
                    "endpoint": self.endpoint,
                    "payload": "application/fhir+json",
                    "_payload": {"extension": [{"url": PAYLOAD_CONTENT_EXT, "valueCode": content}]},
                });
                if !self.headers.is_empty() {
                    channel["header"] = json!(self.headers);
                }
                let mut ext = vec![criteria_ext(&self.criteria)];
                if let Some(f) = filter {
                    ext.push(json!({"url": FILTER_EXT, "valueString": f}));
                }
                json!({"resourceType": "Subscription", "criteria": topic, "channel": channel, "extension": ext})
            }
        };
        let mut meta = json!({"tag": [{"system": tag.system, "code": tag.code}]});
        if matches!(&self.how, How::Topic { style: TopicStyle::BackportBasic | TopicStyle::BackportTopic, .. }) {
            meta["profile"] = json!([BACKPORT_PROFILE]);
        }
        r["meta"] = meta;
        r["status"] = json!("requested");
        r["reason"] = json!(self.reason);
        if let Some(e) = &self.end {
            r["end"] = json!(e);
        }
        if let Some(id) = id {
            r["id"] = json!(id);
        }
        r
    }

    /// Whether an existing Subscription differs in anything fhirsync controls.
    pub fn differs_from(&self, existing: &Value) -> bool {
        let want = self.resource(&Tag { system: String::new(), code: String::new() }, None);
        let end_same = match (&self.end, existing["end"].as_str()) {
            (None, None) => true,
            (Some(a), Some(b)) => same_instant(a, b),
            _ => false,
        };
        let strs = |v: &Value| -> Vec<String> {
            v.as_array().map(|a| a.iter().filter_map(|h| h.as_str().map(str::to_string)).collect()).unwrap_or_default()
        };
        let ext = |v: &Value, url: &str| -> Option<Value> {
            v["extension"].as_array().and_then(|a| a.iter().find(|e| e["url"] == url)).cloned()
        };
        if !end_same || criteria_of(existing) != self.criteria {
            return true;
        }
        match &self.how {
            How::Topic { style: TopicStyle::R5, .. } => {
                ["topic", "endpoint", "contentType", "content"].iter().any(|k| existing[*k] != want[*k])
                    || existing["channelType"]["code"] != want["channelType"]["code"]
                    || strs(&existing["header"]) != strs(&want["header"])
                    || existing.get("filterBy").cloned().unwrap_or(Value::Null)
                        != want.get("filterBy").cloned().unwrap_or(Value::Null)
            }
            How::Criteria | How::Topic { .. } => {
                let (ch, wch) = (&existing["channel"], &want["channel"]);
                let deletes = |c: &Value| ext(c, SEND_DELETES_EXT).is_some_and(|e| e["valueBoolean"] == true);
                existing["criteria"] != want["criteria"]
                    || ["type", "endpoint", "payload"].iter().any(|k| ch[*k] != wch[*k])
                    || strs(&ch["header"]) != strs(&wch["header"])
                    || deletes(ch) != deletes(wch)
                    || ext(&ch["_payload"], PAYLOAD_CONTENT_EXT).map(|e| e["valueCode"].clone())
                        != ext(&wch["_payload"], PAYLOAD_CONTENT_EXT).map(|e| e["valueCode"].clone())
                    || ext(existing, FILTER_EXT).map(|e| e["valueString"].clone())
                        != ext(&want, FILTER_EXT).map(|e| e["valueString"].clone())
            }
        }
    }
}

/// The criteria an existing Subscription serves: fhirsync's extension, else its `criteria`.
pub fn criteria_of(v: &Value) -> String {
    v["extension"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["url"] == CRITERIA_EXT))
        .and_then(|e| e["valueString"].as_str())
        .or_else(|| v["criteria"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// R5 `filterBy` entries of a search such as `Observation?status=final&code=x`.
fn filter_by(search: &str) -> Vec<Value> {
    let (t, q) = search.split_once('?').unwrap_or((search, ""));
    url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| json!({"resourceType": t, "filterParameter": k, "value": v}))
        .collect()
}

/// The resource type and search parameter names of a criteria (`Observation?status=final` →
/// `Observation`, `[status]`); `None` for criteria that name no single type (`[*]`).
pub fn criteria_parts(c: &str) -> Option<(String, Vec<String>)> {
    let (t, q) = c.split_once('?').unwrap_or((c, ""));
    if !super::super::ids::is_type(t) {
        return None;
    }
    let params =
        url::form_urlencoded::parse(q.as_bytes()).map(|(k, _)| k.split(':').next().unwrap_or("").to_string()).collect();
    Some((t.to_string(), params))
}

fn same_instant(a: &str, b: &str) -> bool {
    match (a.parse::<jiff::Timestamp>(), b.parse::<jiff::Timestamp>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A Subscription found on the source.
#[derive(Debug, Clone, PartialEq)]
pub struct Existing {
    pub id: String,
    /// The criteria it serves (see [`criteria_of`]).
    pub criteria: String,
    pub status: String,
    pub error: String,
    pub resource: Value,
}

impl Existing {
    /// Reads one from a resource.
    pub fn from(v: Value) -> Option<Self> {
        Some(Self {
            id: v["id"].as_str()?.to_string(),
            criteria: criteria_of(&v),
            status: v["status"].as_str().unwrap_or_default().to_string(),
            error: v["error"].as_str().unwrap_or_default().to_string(),
            resource: v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(how: How) -> Desired {
        Desired {
            criteria: "Observation?status=final".into(),
            endpoint: "https://relay/fss/ns/n".into(),
            headers: vec!["Authorization: Bearer x".into()],
            send_deletes: true,
            end: Some("2027-01-01T00:00:00Z".into()),
            reason: "r".into(),
            how,
        }
    }

    fn tag() -> Tag {
        Tag { system: "https://fhirsync.io/owner".into(), code: "ns/n/uid".into() }
    }

    #[test]
    fn each_shape_and_its_echo() {
        let backport = How::Topic {
            style: TopicStyle::BackportBasic,
            topic: "https://fhirsync.io/topic/u/Observation".into(),
            filter: Some("Observation?status=final".into()),
            content: "id-only",
        };
        let r5 = How::Topic {
            style: TopicStyle::R5,
            topic: "https://fhirsync.io/topic/u/Observation".into(),
            filter: Some("Observation?status=final".into()),
            content: "id-only",
        };
        for how in [How::Criteria, backport, r5] {
            let r = d(how.clone()).resource(&tag(), Some("7"));
            assert_eq!(r["status"], "requested");
            assert_eq!(criteria_of(&r), "Observation?status=final", "{r}");
            // a server echoes it back with its own additions and another instant format: no change
            let mut echoed = r.clone();
            echoed["status"] = json!("active");
            echoed["end"] = json!("2027-01-01T00:00:00.000+00:00");
            echoed["meta"]["versionId"] = json!("3");
            assert!(!d(how.clone()).differs_from(&echoed), "{how:?}");
            let mut other = d(how.clone());
            other.endpoint = "https://elsewhere/fss/ns/n".into();
            assert!(other.differs_from(&echoed), "{how:?}");
            let mut other = d(how.clone());
            other.headers = vec!["Authorization: Bearer rotated".into()];
            assert!(other.differs_from(&echoed), "{how:?}");
        }
        let r = d(How::Topic {
            style: TopicStyle::BackportBasic,
            topic: "t".into(),
            filter: Some("Observation?status=final".into()),
            content: "full-resource",
        })
        .resource(&tag(), None);
        assert_eq!(r["criteria"], "t");
        assert_eq!(r["meta"]["profile"][0], BACKPORT_PROFILE);
        assert_eq!(r["channel"]["_payload"]["extension"][0]["valueCode"], "full-resource");
        assert!(r["extension"].as_array().unwrap().iter().any(|e| e["url"] == FILTER_EXT));
        let r = d(How::Criteria).resource(&tag(), None);
        assert_eq!(r["channel"]["extension"][0]["url"], SEND_DELETES_EXT);
        assert_eq!(
            criteria_parts("Observation?status=final&code:text=x"),
            Some(("Observation".into(), vec!["status".into(), "code".into()]))
        );
        assert_eq!(criteria_parts("[*]"), None);
    }
}
