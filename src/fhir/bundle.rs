//! Search and history Bundles read from a peer, bounded: a page is read up to a byte cap, its entries
//! are counted as they are parsed (a page of a million empty entries is refused, not allocated), and
//! only the parts fhirsync uses are kept — a DELETE's `Type/id`, a resource's type and id, the `next`
//! link. Resources inside entries are skipped without being built.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

use super::ids;

/// Most entries read from one page (servers cap `_count` far below this).
pub const MAX_ENTRIES: usize = 10_000;
/// Most links read from one page.
const MAX_LINKS: usize = 64;

/// A sequence of at most `N` elements; a longer one is a parse error, raised while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedVec<T, const N: usize>(pub Vec<T>);

impl<T, const N: usize> Default for BoundedVec<T, N> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = BoundedVec<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an array of at most {N} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(x) = seq.next_element()? {
                    if out.len() == N {
                        return Err(de::Error::custom(format!("more than {N} elements")));
                    }
                    out.push(x);
                }
                Ok(BoundedVec(out))
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

impl<T: serde::Serialize, const N: usize> serde::Serialize for BoundedVec<T, N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// What one entry says, reduced to what fhirsync uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryRef {
    /// `request.method` DELETE of a well-formed `Type/id`.
    Deleted(String, String),
    /// An entry carrying a resource with a well-formed type and id.
    Resource(String, String),
    /// Anything else (a create or update without a readable resource, malformed references).
    Other,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    #[serde(default)]
    request: Option<RawRequest>,
    #[serde(default)]
    resource: Option<RawResource>,
}

#[derive(serde::Deserialize)]
struct RawRequest {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

/// A resource's head; every other element is skipped unbuilt.
#[derive(serde::Deserialize)]
struct RawResource {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(serde::Deserialize)]
struct RawLink {
    #[serde(default)]
    relation: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(bound(deserialize = "E: Deserialize<'de>"))]
struct RawBundle<E, const N: usize> {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(default)]
    link: BoundedVec<RawLink, MAX_LINKS>,
    #[serde(default = "BoundedVec::default")]
    entry: BoundedVec<E, N>,
}

/// Parses a Bundle of at most `N` entries of shape `E` (the caller says what an entry keeps):
/// its entries and its `next` link. Anything but a Bundle is an error that says what came instead.
pub fn parse_entries<'de, E: Deserialize<'de>, const N: usize>(
    body: &'de [u8],
) -> Result<(Vec<E>, Option<String>), String> {
    let b: RawBundle<E, N> = serde_json::from_slice(body).map_err(|e| {
        if body.first().is_some_and(|c| *c == b'{') {
            format!("the answer is not a readable Bundle: {e}")
        } else {
            format!("the answer is not JSON ({})", crate::text::describe_text_body(body, None))
        }
    })?;
    match b.resource_type.as_deref() {
        Some("Bundle") => {}
        Some("OperationOutcome") => return Err("the answer is an OperationOutcome, not a Bundle".into()),
        other => {
            return Err(format!(
                "the answer is a {}, not a Bundle",
                crate::text::peer_text(other.unwrap_or("JSON object without resourceType"), 64)
            ));
        }
    }
    let next = b.link.0.into_iter().find(|l| l.relation.as_deref() == Some("next")).and_then(|l| l.url);
    Ok((b.entry.0, next))
}

/// One page of a Bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Every entry, in order, reduced.
    pub entries: Vec<EntryRef>,
    /// The `next` link, as sent (the caller decides whether to follow it).
    pub next: Option<String>,
}

impl Page {
    /// Parses a Bundle page of at most [`MAX_ENTRIES`] entries. Anything but a Bundle is an error
    /// that says what came instead.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        Self::parse_bounded::<MAX_ENTRIES>(body)
    }

    /// Parses a Bundle of at most `N` entries.
    pub fn parse_bounded<const N: usize>(body: &[u8]) -> Result<Self, String> {
        let (entries, next) = parse_entries::<RawEntry, N>(body)?;
        let entries = entries
            .into_iter()
            .map(|e| {
                if let Some(r) = &e.request
                    && r.method.as_deref().is_some_and(|m| m.eq_ignore_ascii_case("DELETE"))
                {
                    return match r.url.as_deref().and_then(ids::reference) {
                        Some((t, id)) => EntryRef::Deleted(t, id),
                        None => EntryRef::Other,
                    };
                }
                match e.resource {
                    Some(RawResource { resource_type: Some(t), id: Some(id) })
                        if ids::is_type(&t) && ids::is_id(&id) =>
                    {
                        EntryRef::Resource(t, id)
                    }
                    _ => EntryRef::Other,
                }
            })
            .collect();
        Ok(Page { entries, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_keep_what_is_used() {
        let body = br#"{"resourceType":"Bundle","type":"history",
            "link":[{"relation":"self","url":"http://s/fhir/_history"},{"relation":"next","url":"http://s/fhir/_history?_cursor=2"}],
            "entry":[
              {"fullUrl":"http://s/fhir/Patient/p1","request":{"method":"DELETE","url":"Patient/p1"},"response":{"status":"204"}},
              {"resource":{"resourceType":"Patient","id":"p2","name":[{"family":"X"}],"text":{"div":"<div/>"}},"request":{"method":"PUT","url":"Patient/p2"}},
              {"request":{"method":"DELETE","url":"../../etc/passwd"}},
              {"request":{"method":"POST","url":"Patient"}}
            ]}"#;
        let p = Page::parse(body).unwrap();
        assert_eq!(p.next.as_deref(), Some("http://s/fhir/_history?_cursor=2"));
        assert_eq!(
            p.entries,
            vec![
                EntryRef::Deleted("Patient".into(), "p1".into()),
                EntryRef::Resource("Patient".into(), "p2".into()),
                EntryRef::Other,
                EntryRef::Other
            ]
        );
    }

    #[test]
    fn hostile_pages_are_refused_while_parsing() {
        let many = format!(r#"{{"resourceType":"Bundle","entry":[{}]}}"#, vec!["{}"; MAX_ENTRIES + 1].join(","));
        let e = Page::parse(many.as_bytes()).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        let links = format!(r#"{{"resourceType":"Bundle","link":[{}]}}"#, vec!["{}"; 100].join(","));
        assert!(Page::parse(links.as_bytes()).is_err());
        assert!(Page::parse(br#"{"resourceType":"OperationOutcome"}"#).unwrap_err().contains("OperationOutcome"));
        assert!(Page::parse(b"<html><title>Login</title></html>").unwrap_err().contains("not JSON"));
        assert!(Page::parse(br#"{"resourceType":"Patient"}"#).unwrap_err().contains("Patient"));
    }
}
