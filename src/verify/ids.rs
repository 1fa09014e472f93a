//! The key of one resource in a verification: `Type id`, and a trailing `\tp` when the resource
//! changed after the instant from which changes are still pending. Keys sort by type, then id; a
//! key with the mark sorts right after the same key without it (ids never hold bytes below `\t`).

use jiff::Timestamp;

use crate::fhir::ids::{ResourceHead, is_id, is_type};

/// Mark of a pending resource.
pub const PENDING: &[u8] = b"\tp";

/// The key of an NDJSON line (a resource, full or reduced to `resourceType`, `id`, `meta`), or `None`
/// when the line is not a resource with a valid type and id. Every other element is skipped unbuilt.
pub fn key(line: &[u8], pending_after: Option<Timestamp>) -> Option<Vec<u8>> {
    let h: ResourceHead = serde_json::from_slice(line).ok()?;
    let (t, id) = (h.resource_type?, h.id?);
    if !is_type(&t) || !is_id(&id) {
        return None;
    }
    let mut k = Vec::with_capacity(t.len() + id.len() + 3);
    k.extend_from_slice(t.as_bytes());
    k.push(b' ');
    k.extend_from_slice(id.as_bytes());
    let pending = pending_after.is_some_and(|after| {
        h.meta.and_then(|m| m.last_updated).and_then(|l| l.parse::<Timestamp>().ok()).is_some_and(|l| l > after)
    });
    if pending {
        k.extend_from_slice(PENDING);
    }
    Some(k)
}

/// Splits a key into (type, id, pending).
pub fn split(key: &[u8]) -> (&[u8], &[u8], bool) {
    let (body, pending) = match key.strip_suffix(PENDING) {
        Some(b) => (b, true),
        None => (key, false),
    };
    match memchr::memchr(b' ', body) {
        Some(i) => (&body[..i], &body[i + 1..], pending),
        None => (body, b"", pending),
    }
}

/// The key without its pending mark.
pub fn bare(key: &[u8]) -> &[u8] {
    key.strip_suffix(PENDING).unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_lines() {
        let after: Timestamp = "2026-11-26T00:00:00Z".parse().unwrap();
        let table: &[(&str, Option<&str>)] = &[
            (
                r#"{"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"2026-11-25T00:00:00Z"}}"#,
                Some("Patient p1"),
            ),
            (
                r#"{"resourceType":"Patient","id":"p2","meta":{"lastUpdated":"2026-11-26T01:00:00+00:00"}}"#,
                Some("Patient p2\tp"),
            ),
            (
                r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"}}"#,
                Some("Observation o1"),
            ),
            (r#"{"resourceType":"Patient","id":"../x"}"#, None),
            (r#"{"resourceType":"patient","id":"x"}"#, None),
            (r#"{"id":"x"}"#, None),
            ("not json", None),
        ];
        for (line, want) in table {
            let got = key(line.as_bytes(), Some(after)).map(|k| String::from_utf8(k).unwrap());
            assert_eq!(got.as_deref(), *want, "{line}");
        }
        assert_eq!(split(b"Patient p2\tp"), (&b"Patient"[..], &b"p2"[..], true));
        assert_eq!(bare(b"Patient p2\tp"), b"Patient p2");
    }
}
