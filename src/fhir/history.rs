//! A source's history (`GET [base]/_history` or `[base]/{Type}/_history` with `_since`): where the
//! deletions of a window are found when an export's manifest lists none. Pages are read bounded
//! (see [`super::bundle`]); `next` links are followed only on the source's own origin, never in a
//! loop, and a history that answers nonsense forever costs a bounded number of requests.

use jiff::Timestamp;
use url::Url;

use super::bundle::{EntryRef, Page};
use super::client::{Error, HttpClient};
use super::paging::{Links, get_page};
use crate::text::redact;

/// Largest history page read; a larger one is asked for again with half the `_count`.
pub const PAGE_MAX: usize = 16 << 20;
/// Entries asked for per page.
pub const PAGE_COUNT: u32 = 100;
/// Most pages one walk reads (10 million entries at the default `_count`).
pub const MAX_PAGES: u32 = 100_000;
/// Pages in a row without entries that still link to a next page before the walk is refused.
pub const MAX_EMPTY_PAGES: u32 = 10;

/// Which history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `[base]/_history`: every type.
    System,
    /// `[base]/{Type}/_history`.
    Type(String),
}

/// The first page's URL: `_since` in UTC with `Z` (a `+` offset breaks servers that read `+` in a
/// query as a space), and `_count`.
pub fn first_page(http: &HttpClient, scope: &Scope, since: Timestamp) -> Url {
    let mut u = match scope {
        Scope::System => http.url("_history"),
        Scope::Type(t) => http.url_segments(&[t, "_history"]),
    };
    u.query_pairs_mut().append_pair("_since", &since.to_string()).append_pair("_count", &PAGE_COUNT.to_string());
    u
}

/// A walk through the pages of one history.
#[derive(Debug)]
pub struct Walk {
    next: Option<Url>,
    count: u32,
    pages: u32,
    empty: u32,
    links: Links,
    /// A broken next link: reported after the page that carried it was used.
    failed: Option<Error>,
}

impl Walk {
    /// Starts at `first`.
    pub fn new(first: Url) -> Self {
        Self { next: Some(first), count: PAGE_COUNT, pages: 0, empty: 0, links: Links::default(), failed: None }
    }

    /// Pages read so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Reads the next page: its deletions (`Type/id`), or `None` when the history has ended.
    pub async fn next_page(&mut self, http: &HttpClient) -> Result<Option<Vec<(String, String)>>, Error> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let Some(url) = self.next.clone() else { return Ok(None) };
        let protocol = |message: String| Error::Protocol { url: redact(&url), message };
        if self.pages >= MAX_PAGES {
            return Err(protocol(format!("the history has more than {MAX_PAGES} pages; fhirsync stops reading it")));
        }
        let (url, body) = get_page(http, &url, &mut self.count, PAGE_MAX, "a history page").await?;
        let page = Page::parse(&body).map_err(protocol)?;
        drop(body);
        self.pages += 1;
        self.empty = if page.entries.is_empty() { self.empty + 1 } else { 0 };
        let next = if page.next.is_some() && self.empty > MAX_EMPTY_PAGES {
            Err(protocol(format!("{} pages in a row without entries still link to a next page", self.empty)))
        } else {
            self.links.follow(http, &url, page.next.as_deref(), "the history")
        };
        self.next = next.unwrap_or_else(|e| {
            self.failed = Some(e);
            None
        });
        Ok(Some(
            page.entries
                .into_iter()
                .filter_map(|e| match e {
                    EntryRef::Deleted(t, id) => Some((t, id)),
                    _ => None,
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let http =
            HttpClient::new(&super::super::client::ClientConfig::new(Url::parse("http://h/fhir/").unwrap())).unwrap();
        let since: Timestamp = "2026-11-26T03:00:00+01:00".parse().unwrap();
        assert_eq!(
            first_page(&http, &Scope::System, since).as_str(),
            "http://h/fhir/_history?_since=2026-11-26T02%3A00%3A00Z&_count=100"
        );
        assert_eq!(first_page(&http, &Scope::Type("Patient".into()), since).path(), "/fhir/Patient/_history");
    }
}
