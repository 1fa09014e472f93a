//! Reading a Bundle's pages, for every walk through them (history, search): one GET of a page,
//! bounded in bytes (a page too large is asked for again with half its `_count`), and the rules for
//! following its `next` link — the source's own origin only, never back to a recent page.

use std::collections::VecDeque;

use bytes::Bytes;
use reqwest::header::{ACCEPT, CACHE_CONTROL};
use reqwest::{Method, StatusCode};
use url::Url;

use super::client::{Error, HttpClient, Request, read_capped};
use crate::text::redact;

/// Reads one page at `url`, of at most `max` bytes. A larger page is asked for again with half of
/// `*count` (down to 1), which is then kept for the pages after it. Returns the URL read and its body.
/// Sent with `Cache-Control: no-cache` (HAPI serves repeated searches from a cache for a minute).
pub async fn get_page(
    http: &HttpClient,
    url: &Url,
    count: &mut u32,
    max: usize,
    what: &str,
) -> Result<(Url, Bytes), Error> {
    let mut url = url.clone();
    loop {
        let r = Request::new(Method::GET, url.clone())
            .header(ACCEPT, "application/fhir+json")
            .header(CACHE_CONTROL, "no-cache");
        let resp = http.send(r).await?;
        if resp.status() != StatusCode::OK {
            return Err(Error::from_response(&Method::GET, resp).await);
        }
        match read_capped(resp, max, what).await {
            Ok(b) => return Ok((url, b)),
            Err(Error::TooLarge { .. }) if *count > 1 => {
                // large resources: ask for fewer per page
                *count /= 2;
                url = with_param(&url, "_count", &count.to_string());
            }
            Err(e) => return Err(e),
        }
    }
}

/// The `next` links followed so far (the last few), to refuse loops.
#[derive(Debug, Default)]
pub struct Links {
    recent: VecDeque<String>,
}

impl Links {
    /// The page after `url`, when its `next` link may be followed: on the client's origin and not
    /// back to `url` or a recent page. `what` names the walk in errors ("the history").
    pub fn follow(
        &mut self,
        http: &HttpClient,
        url: &Url,
        next: Option<&str>,
        what: &str,
    ) -> Result<Option<Url>, Error> {
        let protocol = |message: String| Error::Protocol { url: redact(url), message };
        let Some(n) = next else { return Ok(None) };
        let n = url.join(n).map_err(|_| protocol("the next link is not a URL".into()))?;
        if !http.same_origin(&n) {
            return Err(protocol(format!(
                "the next link leads to another origin ({}); fhirsync does not send the source's credential there",
                redact(&n)
            )));
        }
        let key = n.as_str().to_string();
        if self.recent.contains(&key) || key == url.as_str() {
            return Err(protocol(format!("{what}'s next links go round in a loop")));
        }
        self.recent.push_back(key);
        if self.recent.len() > 8 {
            self.recent.pop_front();
        }
        Ok(Some(n))
    }
}

/// `url` with the parameter `name` set to `value` (every earlier value of it dropped).
pub fn with_param(url: &Url, name: &str, value: &str) -> Url {
    let mut u = url.clone();
    let pairs: Vec<(String, String)> =
        url.query_pairs().filter(|(k, _)| k != name).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    {
        let mut q = u.query_pairs_mut();
        q.clear();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
        q.append_pair(name, value);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::client::ClientConfig;

    #[test]
    fn next_links_stay_home_and_never_loop() {
        let http = HttpClient::new(&ClientConfig::new(Url::parse("http://h/fhir/").unwrap())).unwrap();
        let u = Url::parse("http://h/fhir/_history?_cursor=abc&_count=100").unwrap();
        assert_eq!(with_param(&u, "_count", "50").as_str(), "http://h/fhir/_history?_cursor=abc&_count=50");
        let mut links = Links::default();
        assert_eq!(links.follow(&http, &u, None, "x").unwrap(), None);
        let n = links.follow(&http, &u, Some("?_cursor=def"), "x").unwrap().unwrap();
        assert_eq!(n.as_str(), "http://h/fhir/_history?_cursor=def");
        let e = links.follow(&http, &n, Some("?_cursor=def"), "the history").unwrap_err().to_string();
        assert!(e.contains("the history's next links go round in a loop"), "{e}");
        let e = links.follow(&http, &n, Some("http://evil/fhir?p=2"), "x").unwrap_err().to_string();
        assert!(e.contains("another origin"), "{e}");
    }
}
