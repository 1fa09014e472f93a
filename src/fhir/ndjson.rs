//! NDJSON read line by line from a byte stream with a bound on the line length: a longer line is
//! reported by its length and skipped, never held in memory. Blank lines are skipped.

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

/// One line of an NDJSON stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line (without its newline).
    Text(Bytes),
    /// A line longer than the bound: only its length is known.
    TooLong(u64),
}

/// Reads lines of at most `max` bytes from `stream`.
pub struct Lines<S> {
    stream: S,
    buf: BytesMut,
    max: usize,
    /// Length of an over-long line being skipped.
    skipping: Option<u64>,
    done: bool,
}

impl<S, E> Lines<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    /// Lines of `stream`, each at most `max` bytes.
    pub fn new(stream: S, max: usize) -> Self {
        Self { stream, buf: BytesMut::new(), max, skipping: None, done: false }
    }

    /// The next non-blank line, `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Line, E>> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf) {
                let mut line = self.buf.split_to(i + 1);
                line.truncate(i);
                if let Some(n) = self.skipping.take() {
                    return Some(Ok(Line::TooLong(n + i as u64)));
                }
                if i > self.max {
                    return Some(Ok(Line::TooLong(i as u64)));
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(Ok(Line::Text(line.freeze())));
            }
            if self.buf.len() > self.max || self.skipping.is_some() {
                // an over-long line: drop what is buffered, remember its length
                *self.skipping.get_or_insert(0) += self.buf.len() as u64;
                self.buf.clear();
            }
            if self.done {
                if let Some(n) = self.skipping.take() {
                    return Some(Ok(Line::TooLong(n)));
                }
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                let rest = std::mem::take(&mut self.buf).freeze();
                return Some(Ok(Line::Text(rest)));
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Some(Err(e)),
                None => self.done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn all(chunks: Vec<&'static [u8]>, max: usize) -> Vec<Line> {
        let s = futures::stream::iter(chunks.into_iter().map(|c| Ok::<_, ()>(Bytes::from_static(c))));
        let mut l = Lines::new(s, max);
        let mut out = vec![];
        while let Some(x) = l.next().await {
            out.push(x.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn lines_across_chunks_blank_lines_and_a_tail() {
        let got = all(vec![b"{\"a\":1}\n{\"b\"", b":2}\n\n  \n{\"c\":3}"], 100).await;
        let t = |s: &'static str| Line::Text(Bytes::from_static(s.as_bytes()));
        assert_eq!(got, vec![t("{\"a\":1}"), t("{\"b\":2}"), t("{\"c\":3}")]);
    }

    #[tokio::test]
    async fn over_long_lines_are_measured_not_kept() {
        let got =
            all(vec![b"short\n", b"0123456789", b"0123456789", b"01\nok\n", b"0123456789ab\n", b"9999999999999"], 8)
                .await;
        let t = |s: &'static str| Line::Text(Bytes::from_static(s.as_bytes()));
        assert_eq!(got, vec![t("short"), Line::TooLong(22), t("ok"), Line::TooLong(12), Line::TooLong(13)]);
    }
}
