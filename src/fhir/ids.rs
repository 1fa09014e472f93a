//! Resource types and ids taken from a peer, checked against FHIR's grammar before they become a
//! path, a URL segment, a file name or a status key. Ids made only of dots (`.`, `..`) are refused
//! although the grammar allows them: they would walk a URL path.

use serde::Deserialize;

/// What is read of a resource before it is trusted: its type, id and `meta.lastUpdated` (unchecked:
/// run them through [`is_type`] and [`is_id`]).
#[derive(Deserialize, Debug, Default)]
pub struct ResourceHead {
    #[serde(rename = "resourceType", default)]
    pub resource_type: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub meta: Option<ResourceMeta>,
}

/// `meta` of a [`ResourceHead`].
#[derive(Deserialize, Debug, Default)]
pub struct ResourceMeta {
    #[serde(rename = "lastUpdated", default)]
    pub last_updated: Option<String>,
}

/// Most distinct resource types one export may name (FHIR R5 has fewer than 160).
pub const MAX_TYPES: usize = 256;

/// Whether `t` is a resource type name: `[A-Z][A-Za-z]{0,63}`.
pub fn is_type(t: &str) -> bool {
    let b = t.as_bytes();
    (1..=64).contains(&b.len()) && b[0].is_ascii_uppercase() && b.iter().all(u8::is_ascii_alphabetic)
}

/// Whether `id` is a usable resource id: `[A-Za-z0-9\-\.]{1,64}`, not only dots.
pub fn is_id(id: &str) -> bool {
    let b = id.as_bytes();
    (1..=64).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.')
        && !b.iter().all(|c| *c == b'.')
}

/// A reference such as `Patient/123`, `Patient/123/_history/2` or an absolute URL ending in one, as
/// (type, id) — only when both are well formed and nothing is percent-encoded or dot-walked.
pub fn reference(url: &str) -> Option<(String, String)> {
    let path = url.split(['?', '#']).next()?;
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let segs = match segs.iter().position(|s| *s == "_history") {
        Some(i) if i + 2 == segs.len() && segs[i + 1].bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') => {
            &segs[..i]
        }
        Some(_) => return None,
        None => &segs[..],
    };
    let [.., t, id] = segs else { return None };
    (is_type(t) && is_id(id)).then(|| (t.to_string(), id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        for ok in ["Patient", "Observation", "A"] {
            assert!(is_type(ok), "{ok}");
        }
        for bad in ["", "patient", "Pat-ient", "Patient1", "Pätient", "..", &"A".repeat(65)] {
            assert!(!is_type(bad), "{bad:?}");
        }
        for ok in ["123", "a-b.c", "A.1", &"x".repeat(64)] {
            assert!(is_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "...", "a/b", "%2e%2e", "a b", &"x".repeat(65)] {
            assert!(!is_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn references_from_peers() {
        let table: &[(&str, Option<(&str, &str)>)] = &[
            ("Patient/123", Some(("Patient", "123"))),
            ("https://s/fhir/Observation/o-1/_history/3", Some(("Observation", "o-1"))),
            ("Patient/123?x=1", Some(("Patient", "123"))),
            ("123", None),
            ("Patient/..", None),
            ("Patient/%2e%2e", None),
            ("X/Patient/.", None),
            ("Patient/.", None),
            ("Patient/1/_history/../x", None),
            ("patient/1", None),
        ];
        for (input, want) in table {
            let want = want.map(|(t, i)| (t.to_string(), i.to_string()));
            assert_eq!(reference(input), want, "{input}");
        }
    }
}
