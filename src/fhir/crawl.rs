//! Reading one resource type by FHIR search, for sources without a usable bulk export: a keyset
//! walk in `_lastUpdated` order (`_lastUpdated=ge{edge}&_lastUpdated=le{upTo}&_sort=_lastUpdated`).
//!
//! Why keyset and not the server's `next` links: those page by offset or cursor over a result that
//! changes while it is read. A resource updated mid-crawl leaves its place, the pages after it shift,
//! and an unchanged resource can fall between two pages — older than the next watermark, so no later
//! run would bring it. Asking again from the last instant read cannot skip anything: every resource
//! updated after the crawl began is newer than what it has read. `next` is followed only inside one
//! instant that holds more resources than a page. What is read is checked: the order (a server that
//! ignores `_sort` is refused, not trusted), the window, the type.

use std::collections::HashSet;

use jiff::Timestamp;
use serde::Deserialize;
use serde_json::value::RawValue;
use url::Url;

use super::bundle::{MAX_ENTRIES, parse_entries};
use super::client::{Error, HttpClient};
use super::paging::{Links, get_page};
use crate::text::{peer_text, redact};

/// Largest search page read; a larger one is asked for again with half the `_count`.
pub const PAGE_MAX: usize = 16 << 20;
/// Resources asked for per page (servers cap it lower: HAPI at 1,000 by default).
pub const PAGE_COUNT: u32 = 1000;
/// Most pages one type's crawl reads.
pub const MAX_PAGES: u32 = 100_000;
/// Pages in a row that bring nothing new before the crawl is refused.
pub const MAX_STALE_PAGES: u32 = 10;
/// Most resources of one type that may share one `lastUpdated` instant (their ids are remembered).
pub const MAX_EDGE: usize = 200_000;

/// What to read: one type, its filter, up to an instant.
#[derive(Debug, Clone)]
pub struct Query {
    pub resource_type: String,
    /// Search parameters from the type's `_typeFilter`, and `_elements`.
    pub params: Vec<(String, String)>,
    /// The crawl's upper bound (`le`).
    pub up_to: Timestamp,
}

/// One resource read: its NDJSON line (without the newline), its id and its `lastUpdated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub line: Vec<u8>,
    pub id: String,
    pub at: Timestamp,
}

/// A crawl of one type.
#[derive(Debug)]
pub struct Crawl {
    query: Query,
    /// Every resource updated up to here has been read (or lies before the window).
    after: Option<Timestamp>,
    /// The last instant read, and the ids read at it (more may follow at the same instant).
    edge: Option<(Timestamp, HashSet<String>)>,
    /// A `next` link being followed inside one crowded instant.
    next: Option<Url>,
    done: bool,
    count: u32,
    pages: u32,
    stale: u32,
    links: Links,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(default)]
    search: Option<EntrySearch>,
    #[serde(default, borrow)]
    resource: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct EntrySearch {
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    meta: Option<Meta>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "lastUpdated", default)]
    last_updated: Option<String>,
}

impl Crawl {
    /// A crawl of `query` that goes on after `after` (a resumed crawl; for a new one, `_since`).
    pub fn new(query: Query, after: Option<Timestamp>) -> Self {
        Self {
            query,
            after,
            edge: None,
            next: None,
            done: false,
            count: PAGE_COUNT,
            pages: 0,
            stale: 0,
            links: Links::default(),
        }
    }

    /// Whether the type has been read to its end.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The keyset query from where the crawl is.
    pub fn url(&self, http: &HttpClient) -> Url {
        let mut u = http.url_segments(&[&self.query.resource_type]);
        {
            let mut q = u.query_pairs_mut();
            for (k, v) in &self.query.params {
                q.append_pair(k, v);
            }
            if let Some(low) = self.edge.as_ref().map(|(t, _)| *t).or(self.after) {
                q.append_pair("_lastUpdated", &format!("ge{}", millis(low)));
            }
            q.append_pair("_lastUpdated", &format!("le{}", millis(self.query.up_to)));
            q.append_pair("_sort", "_lastUpdated");
            q.append_pair("_count", &self.count.to_string());
        }
        u
    }

    /// Reads the next page: the resources it brings that were not read before, or `None` when the
    /// type has been read to its end. A failed request changes nothing: the same page is asked for
    /// again by the next call.
    pub async fn next_page(&mut self, http: &HttpClient) -> Result<Option<Vec<Item>>, Error> {
        if self.done {
            return Ok(None);
        }
        let url = self.next.clone().unwrap_or_else(|| self.url(http));
        let protocol = |message: String| Error::Protocol { url: redact(&url), message };
        if self.pages >= MAX_PAGES {
            return Err(protocol(format!(
                "the search of {} has more than {MAX_PAGES} pages; fhirsync stops reading it",
                self.query.resource_type
            )));
        }
        let (url, body) = get_page(http, &url, &mut self.count, PAGE_MAX, "a search page").await?;
        let (entries, next) = parse_entries::<Entry, MAX_ENTRIES>(&body).map_err(protocol)?;
        let mut items = Vec::with_capacity(entries.len());
        for e in entries {
            if e.search.and_then(|s| s.mode).is_some_and(|m| m != "match") {
                continue; // included resources and OperationOutcomes
            }
            let Some(raw) = e.resource else { continue };
            let head: Head =
                serde_json::from_str(raw.get()).map_err(|e| protocol(format!("an entry is unreadable: {e}")))?;
            if head.resource_type.as_deref() != Some(self.query.resource_type.as_str()) {
                continue;
            }
            let id = head
                .id
                .filter(|i| super::ids::is_id(i))
                .ok_or_else(|| protocol(format!("a {} without a valid id", self.query.resource_type)))?;
            let at = head.meta.and_then(|m| m.last_updated).and_then(|t| t.parse::<Timestamp>().ok()).ok_or_else(|| {
                protocol(format!(
                    "{}/{} has no readable meta.lastUpdated: this source cannot be read by search in _lastUpdated order; use export.method: BulkExport",
                    self.query.resource_type,
                    peer_text(&id, 64)
                ))
            })?;
            items.push(Item { line: minify(raw.get()), id, at });
        }
        drop(body);
        self.pages += 1;
        let edge_before = self.edge.as_ref().map(|(t, _)| *t);
        let fresh = self.take(items, next.is_some()).map_err(protocol)?;
        self.stale = if fresh.is_empty() { self.stale + 1 } else { 0 };
        if self.stale > MAX_STALE_PAGES {
            return Err(protocol(format!("{} search pages in a row brought nothing new", self.stale)));
        }
        let moved = self.edge.as_ref().map(|(t, _)| *t) != edge_before;
        // a later instant reached: ask again from it; still inside one crowded instant: its next page
        // (`take` ended the crawl when the page had no next link)
        self.next =
            if self.done || moved { None } else { self.links.follow(http, &url, next.as_deref(), "the search")? };
        Ok(Some(fresh))
    }

    /// Keeps what a page brings that is new, in order, and moves the crawl on.
    fn take(&mut self, items: Vec<Item>, has_next: bool) -> Result<Vec<Item>, String> {
        let mut out = vec![];
        let mut prev: Option<Timestamp> = None;
        let mut beyond = false;
        for it in items {
            if prev.is_some_and(|p| it.at < p) {
                return Err(format!(
                    "the source does not return {} in _lastUpdated order (_sort=_lastUpdated): a search that cannot rely on \
                     the order could miss resources; use export.method: BulkExport",
                    self.query.resource_type
                ));
            }
            prev = Some(it.at);
            if it.at > self.query.up_to {
                beyond = true; // the source ignored `le`: what follows is for the next run
                break;
            }
            if self.after.is_some_and(|a| it.at <= a) {
                continue;
            }
            match &mut self.edge {
                Some((e, _)) if it.at < *e => continue,
                Some((e, ids)) if it.at == *e => {
                    if ids.contains(&it.id) {
                        continue;
                    }
                    if ids.len() >= MAX_EDGE {
                        return Err(format!(
                            "more than {MAX_EDGE} {} resources share the lastUpdated instant {e}; fhirsync cannot page through them safely",
                            self.query.resource_type
                        ));
                    }
                    ids.insert(it.id.clone());
                }
                _ => {
                    if let Some((e, _)) = self.edge.take() {
                        self.after = Some(e);
                    }
                    self.edge = Some((it.at, HashSet::from([it.id.clone()])));
                }
            }
            out.push(it);
        }
        if beyond || !has_next {
            self.done = true;
        }
        Ok(out)
    }
}

/// An instant as servers parse it: UTC, at most milliseconds, rounded down (a lower bound that
/// reads a little more, an upper bound that leaves a little for the next run).
pub fn millis(t: Timestamp) -> String {
    let r = jiff::TimestampRound::new().smallest(jiff::Unit::Millisecond).mode(jiff::RoundMode::Trunc);
    t.round(r).unwrap_or(t).to_string()
}

/// A resource's JSON on one line: whitespace outside strings removed, everything else kept byte
/// for byte (decimals keep their precision, which a parse and print would not).
pub fn minify(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        format!("2026-12-01T00:00:{s}Z").parse().unwrap()
    }

    fn item(id: &str, at: &str) -> Item {
        Item { line: vec![], id: id.into(), at: t(at) }
    }

    fn crawl(after: Option<&str>) -> Crawl {
        let q = Query { resource_type: "Patient".into(), params: vec![], up_to: t("50") };
        Crawl::new(q, after.map(t))
    }

    fn ids(v: &[Item]) -> Vec<&str> {
        v.iter().map(|i| i.id.as_str()).collect()
    }

    #[test]
    fn a_page_keeps_only_what_is_new_and_moves_the_edge() {
        // (after, pages as (items, has next), what each page keeps)
        type Page<'a> = (Vec<(&'a str, &'a str)>, bool);
        type Case<'a> = (Option<&'a str>, Vec<Page<'a>>, Vec<Vec<&'a str>>);
        let table: Vec<Case> = vec![
            // the second query starts at the first page's last instant: a and b come again
            (
                None,
                vec![
                    (vec![("a", "01"), ("b", "02"), ("c", "02")], true),
                    (vec![("b", "02"), ("c", "02"), ("d", "03")], false),
                ],
                vec![vec!["a", "b", "c"], vec!["d"]],
            ),
            // a server that rounds `ge` down to the second sends older ones again: dropped
            (Some("05"), vec![(vec![("x", "04"), ("y", "05"), ("z", "06")], false)], vec![vec!["z"]]),
            // a server that ignores `le` stops the crawl at the bound
            (None, vec![(vec![("a", "49"), ("late", "51"), ("later", "52")], true)], vec![vec!["a"]]),
        ];
        for (after, pages, want) in table {
            let mut c = crawl(after);
            for ((items, next), want) in pages.into_iter().zip(want) {
                let got = c.take(items.into_iter().map(|(i, a)| item(i, a)).collect(), next).unwrap();
                assert_eq!(ids(&got), want);
            }
            assert!(c.done());
        }
    }

    #[test]
    fn an_unsorted_source_is_refused() {
        let mut c = crawl(None);
        let e = c.take(vec![item("a", "03"), item("b", "01")], true).unwrap_err();
        assert!(e.contains("_lastUpdated order"), "{e}");
    }

    #[test]
    fn the_edge_moves_only_forward() {
        let mut c = crawl(None);
        c.take(vec![item("a", "01"), item("b", "02")], true).unwrap();
        assert_eq!(c.after, Some(t("01")));
        assert_eq!(c.edge.as_ref().map(|(e, _)| *e), Some(t("02")));
        // a resumed crawl asks from its `after`, never for what lies before it
        let http =
            HttpClient::new(&super::super::client::ClientConfig::new(Url::parse("http://h/fhir/").unwrap())).unwrap();
        let u = crawl(Some("05")).url(&http);
        assert_eq!(millis("2026-12-02T03:22:32.176009859Z".parse().unwrap()), "2026-12-02T03:22:32.176Z");
        assert_eq!(
            u.as_str(),
            "http://h/fhir/Patient?_lastUpdated=ge2026-12-01T00%3A00%3A05Z&_lastUpdated=le2026-12-01T00%3A00%3A50Z&_sort=_lastUpdated&_count=1000"
        );
    }

    #[test]
    fn minify_keeps_strings_and_numbers() {
        let pretty = "{\n  \"resourceType\" : \"Observation\",\n  \"valueQuantity\": { \"value\": 1.50 },\n  \"note\": [{\"text\": \"a \\\" b\\n  c\"}]\n}";
        assert_eq!(
            String::from_utf8(minify(pretty)).unwrap(),
            r#"{"resourceType":"Observation","valueQuantity":{"value":1.50},"note":[{"text":"a \" b\n  c"}]}"#
        );
    }
}
