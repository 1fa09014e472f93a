//! Text that crosses a trust boundary, made fit for status, Events and logs: URLs without their
//! secrets, and peer text bounded and stripped of control characters. The lowest layer: every other
//! module may use it, it uses none of them.

use url::Url;

/// Longest peer text (an OperationOutcome's diagnostics, an error body, an `X-Progress`) that reaches
/// a status message, an Event or a log line.
pub const PEER_TEXT_MAX: usize = 300;

/// A URL fit for messages and logs: no user info, no query string (capability URLs carry secrets in
/// it), no fragment. A removed query shows as `?…`, unescaped.
pub fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_fragment(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?…");
    }
    s
}

/// [`redact`] for a URL given as text; text that is not a URL shows as `(invalid URL)`.
pub fn redact_str(url: &str) -> String {
    Url::parse(url).map(|u| redact(&u)).unwrap_or_else(|_| "(invalid URL)".into())
}

/// Peer text bounded to `max` characters: control characters (newlines, escape sequences, bidi
/// overrides) become spaces, runs of white space collapse, and a cut is marked with `…`.
pub fn peer_text(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max.saturating_mul(4)) + 4);
    let (mut n, mut space, mut cut) = (0usize, false, false);
    for c in s.chars() {
        let c = if c.is_control() || is_format_char(c) { ' ' } else { c };
        if c.is_whitespace() {
            space = n > 0;
            continue;
        }
        let need = if space { 2 } else { 1 };
        if n + need > max {
            cut = true;
            break;
        }
        if space {
            out.push(' ');
            n += 1;
            space = false;
        }
        out.push(c);
        n += 1;
    }
    if cut {
        out.push('…');
    }
    out
}

/// Invisible formatting characters that can reorder or hide text (bidi controls, zero-width).
fn is_format_char(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Describes an error body for a person: an HTML page by its title (never its markup), other text
/// bounded by [`peer_text`]. `content_type` is the response's Content-Type, when known.
pub fn describe_text_body(body: &[u8], content_type: Option<&str>) -> String {
    let text = String::from_utf8_lossy(body);
    let trimmed = text.trim_start();
    let html = content_type.is_some_and(|c| c.to_ascii_lowercase().contains("html"))
        || trimmed.get(..15).is_some_and(|s| s.to_ascii_lowercase().starts_with("<!doctype html"))
        || trimmed.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("<html"));
    if html {
        return match html_title(&text) {
            Some(t) => format!("an HTML page titled {:?}", peer_text(&t, 80)),
            None => "an HTML page".into(),
        };
    }
    peer_text(&text, PEER_TEXT_MAX)
}

fn html_title(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let start = lower.find("<title")?;
    let open_end = start + lower[start..].find('>')? + 1;
    let end = open_end + lower[open_end..].find("</title")?;
    Some(text.get(open_end..end)?.trim().to_string()).filter(|t| !t.is_empty())
}

/// Cuts `s` to at most `max` bytes on a character boundary (for fields with a byte limit).
pub fn cut_bytes(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push('…');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_no_secret_and_no_escaped_ellipsis() {
        let u = Url::parse("https://u:p@blob.example/f.ndjson?sig=SECRET#frag").unwrap();
        assert_eq!(redact(&u), "https://blob.example/f.ndjson?…");
        let u = Url::parse("http://h:8080/fhir/$export?_type=Patient").unwrap();
        assert_eq!(redact(&u), "http://h:8080/fhir/$export?…");
        assert_eq!(redact_str("not a url"), "(invalid URL)");
    }

    #[test]
    fn peer_text_is_bounded_and_flat() {
        assert_eq!(peer_text("  a\n\tb\u{1b}[31m  c ", 100), "a b [31m c");
        assert_eq!(peer_text("abcdef", 3), "abc…");
        assert_eq!(peer_text("abc", 3), "abc");
        assert_eq!(peer_text("ab cd", 3), "ab…");
        assert_eq!(peer_text("x\u{202E}y", 10), "x y");
        let long = "z".repeat(10_000);
        assert_eq!(peer_text(&long, PEER_TEXT_MAX).chars().count(), PEER_TEXT_MAX + 1);
    }

    #[test]
    fn html_bodies_are_described_by_their_title() {
        let page = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>...</body></html>";
        assert_eq!(describe_text_body(page, None), "an HTML page titled \"404 Not Found\"");
        assert_eq!(describe_text_body(b"<html><body>x</body></html>", Some("text/html")), "an HTML page");
        assert_eq!(describe_text_body(b"plain failure\n", Some("text/plain")), "plain failure");
    }

    #[test]
    fn cut_bytes_respects_char_boundaries() {
        let mut s = "ééééé".to_string();
        cut_bytes(&mut s, 6);
        assert!(s.len() <= 6 && s.ends_with('…'), "{s}");
        let mut s = "short".to_string();
        cut_bytes(&mut s, 10);
        assert_eq!(s, "short");
    }
}
