//! The relay's memory budget: every notification's bytes (and every resource read for an `id-only`
//! one) are counted while the relay holds them, from the first chunk read off the socket until
//! Pathling accepted them; past the budget, sources are told to come back. What a source sends can
//! never grow the operator past it, however many send at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

use super::Answer;

/// Bytes held across all syncs, and the most there may be.
#[derive(Debug)]
pub struct Budget {
    held: Arc<AtomicUsize>,
    limit: usize,
    body_max: usize,
}

/// Bytes counted against the budget until dropped.
#[derive(Debug)]
pub struct Held {
    bytes: Bytes,
    size: usize,
    held: Arc<AtomicUsize>,
}

fn full() -> Answer {
    Answer::come_back("the relay holds as many changes as it may; send this again later", 5)
}

fn too_large(max: usize) -> Answer {
    Answer::new(413, format!("a notification is at most {} MiB", max >> 20))
}

impl Budget {
    /// A budget of `limit` bytes, with bodies of at most `body_max`.
    pub fn new(limit: usize, body_max: usize) -> Self {
        Self { held: Arc::default(), limit, body_max }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn take(&self, n: usize) -> bool {
        let before = self.held.fetch_add(n, Ordering::SeqCst);
        if before.saturating_add(n) > self.limit {
            self.held.fetch_sub(n, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Holds bytes already in memory (an in-process caller).
    pub fn hold(&self, bytes: Bytes) -> Result<Held, Answer> {
        if bytes.len() > self.body_max {
            return Err(too_large(self.body_max));
        }
        if !self.take(bytes.len()) {
            return Err(full());
        }
        Ok(Held { size: bytes.len(), bytes, held: self.held.clone() })
    }

    /// Reads a body chunk by chunk, counting each chunk before it is kept: a body over the largest
    /// notification is refused (413) as soon as it is, and one that does not fit the budget (503).
    pub async fn read<S, E>(&self, content_length: Option<u64>, mut body: S) -> Result<Held, Answer>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if content_length.is_some_and(|n| n > self.body_max as u64) {
            return Err(too_large(self.body_max));
        }
        let mut held = Held { bytes: Bytes::new(), size: 0, held: self.held.clone() };
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Answer::new(400, format!("reading the notification: {e}")))?;
            if buf.len() + chunk.len() > self.body_max {
                return Err(too_large(self.body_max));
            }
            if !self.take(chunk.len()) {
                return Err(full());
            }
            held.size += chunk.len();
            buf.extend_from_slice(&chunk);
        }
        held.bytes = buf.freeze();
        Ok(held)
    }

    /// Counts `n` more bytes against `held` (a resource read from the source); false when they do
    /// not fit.
    pub fn grow(&self, held: &mut Held, n: usize) -> bool {
        if !self.take(n) {
            return false;
        }
        held.size += n;
        true
    }
}

impl Default for Held {
    /// Nothing held.
    fn default() -> Self {
        Self { bytes: Bytes::new(), size: 0, held: Arc::default() }
    }
}

impl Held {
    /// The bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Lets go of the bytes (parsed into their own copies), keeping them counted.
    pub fn release(&mut self) -> Bytes {
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.fetch_sub(self.size, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize, size: usize) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures::stream::iter((0..n).map(move |_| Ok(Bytes::from(vec![b'x'; size]))))
    }

    #[tokio::test]
    async fn bodies_are_counted_while_held_and_refused_past_the_budget() {
        let b = Budget::new(100, 60);
        let one = b.read(None, chunks(5, 10)).await.unwrap();
        assert_eq!((one.bytes().len(), b.held()), (50, 50));
        // 50 + 60 > 100: come back later; nothing stays counted
        let e = b.read(None, chunks(6, 10)).await.unwrap_err();
        assert_eq!((e.status, e.retry_after), (503, Some(5)));
        assert_eq!(b.held(), 50);
        // over the largest body: 413, by its length or by what arrived
        assert_eq!(b.read(Some(61), chunks(0, 0)).await.unwrap_err().status, 413);
        assert_eq!(Budget::new(1000, 60).read(None, chunks(7, 10)).await.unwrap_err().status, 413);
        let mut two = b.hold(Bytes::from_static(b"0123456789")).unwrap();
        assert!(b.grow(&mut two, 40));
        assert!(!b.grow(&mut two, 1));
        two.release();
        assert_eq!(b.held(), 100, "released bytes stay counted until dropped");
        drop((one, two));
        assert_eq!(b.held(), 0);
    }
}
