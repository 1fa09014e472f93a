//! In-process locks keyed by a string, each held by at most `capacity` holders at once (exports per
//! source credential, one import per Pathling), granted first come, first served. A waiter sleeps
//! until a slot frees (no polling) and learns its position in the queue whenever it changes; a waiter
//! that gives up (its future dropped) leaves the queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// A set of named, fair locks.
#[derive(Clone, Default)]
pub struct KeyedLocks {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    next_ticket: u64,
    keys: HashMap<String, Key>,
}

struct Key {
    holders: Vec<(u64, String)>,
    waiters: VecDeque<(u64, String)>,
    changed: watch::Sender<()>,
}

/// Where a waiter stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Waiters ahead of this one.
    pub ahead: usize,
    /// Who holds the lock now (one of the holders).
    pub holder: Option<String>,
}

/// A held lock; released on drop.
pub struct LockGuard {
    locks: KeyedLocks,
    key: String,
    ticket: u64,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockGuard({})", self.key)
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.locks.leave(&self.key, self.ticket);
    }
}

/// A place in a queue; leaves it on drop (a waiter that gave up).
struct Waiting {
    locks: KeyedLocks,
    key: String,
    ticket: u64,
    armed: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.armed {
            self.locks.leave(&self.key, self.ticket);
        }
    }
}

impl KeyedLocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes `ticket` as holder or waiter of `key`, waking the others.
    fn leave(&self, key: &str, ticket: u64) {
        let mut g = self.lock();
        let Some(k) = g.keys.get_mut(key) else { return };
        k.holders.retain(|(t, _)| *t != ticket);
        k.waiters.retain(|(t, _)| *t != ticket);
        k.changed.send_replace(());
        if k.holders.is_empty() && k.waiters.is_empty() {
            g.keys.remove(key);
        }
    }

    /// Waits for a slot of `key` (at most `capacity` holders) in FIFO order and takes it for
    /// `holder`. `on_wait` is called with the waiter's position whenever it changes (not when a slot
    /// is free at once).
    pub async fn acquire(
        &self,
        key: &str,
        holder: &str,
        capacity: usize,
        mut on_wait: impl FnMut(&Position),
    ) -> LockGuard {
        let capacity = capacity.max(1);
        let (ticket, mut rx) = {
            let mut g = self.lock();
            g.next_ticket += 1;
            let ticket = g.next_ticket;
            let k = g.keys.entry(key.to_string()).or_insert_with(new_key);
            k.waiters.push_back((ticket, holder.to_string()));
            (ticket, k.changed.subscribe())
        };
        let mut waiting = Waiting { locks: self.clone(), key: key.to_string(), ticket, armed: true };
        let mut last: Option<Position> = None;
        loop {
            let pos = {
                let mut g = self.lock();
                // the entry lives while we wait in it; should it not, we queue again
                let k = g.keys.entry(key.to_string()).or_insert_with(new_key);
                if !k.waiters.iter().any(|(t, _)| *t == ticket) {
                    k.waiters.push_back((ticket, holder.to_string()));
                }
                if k.holders.len() < capacity && k.waiters.front().is_some_and(|(t, _)| *t == ticket) {
                    let entry = k.waiters.pop_front().unwrap_or((ticket, holder.to_string()));
                    k.holders.push(entry);
                    k.changed.send_replace(());
                    waiting.armed = false;
                    return LockGuard { locks: self.clone(), key: key.to_string(), ticket };
                }
                let idx = k.waiters.iter().position(|(t, _)| *t == ticket).unwrap_or(0);
                Position { ahead: idx, holder: k.holders.first().map(|(_, h)| h.clone()) }
            };
            if last.as_ref() != Some(&pos) {
                on_wait(&pos);
                last = Some(pos);
            }
            if rx.changed().await.is_err() {
                // the entry was replaced: follow the new one
                rx = self.lock().keys.entry(key.to_string()).or_insert_with(new_key).changed.subscribe();
            }
        }
    }

    /// Takes `key` if it is free and nobody waits; otherwise returns a holder.
    pub fn try_lock(&self, key: &str, holder: &str) -> Result<LockGuard, String> {
        let mut g = self.lock();
        if let Some(k) = g.keys.get(key) {
            return Err(k.holders.first().or(k.waiters.front()).map(|(_, h)| h.clone()).unwrap_or_default());
        }
        g.next_ticket += 1;
        let ticket = g.next_ticket;
        let mut k = new_key();
        k.holders.push((ticket, holder.to_string()));
        g.keys.insert(key.to_string(), k);
        Ok(LockGuard { locks: self.clone(), key: key.to_string(), ticket })
    }
}

fn new_key() -> Key {
    Key { holders: Vec::new(), waiters: VecDeque::new(), changed: watch::channel(()).0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exclusive_until_dropped() {
        let l = KeyedLocks::default();
        let g = l.try_lock("src", "ns/run-1").unwrap();
        assert_eq!(l.try_lock("src", "ns/run-2").unwrap_err(), "ns/run-1");
        assert!(l.try_lock("other", "ns/run-2").is_ok());
        drop(g);
        assert!(l.try_lock("src", "ns/run-2").is_ok());
    }

    #[tokio::test]
    async fn first_come_first_served_with_positions() {
        let l = KeyedLocks::default();
        let g1 = l.acquire("p", "r1", 1, |_| {}).await;
        let order = Arc::new(Mutex::new(vec![]));
        let positions = Arc::new(Mutex::new(vec![]));
        let mut tasks = vec![];
        for i in 2..=4 {
            let (l, order, positions) = (l.clone(), order.clone(), positions.clone());
            tasks.push(tokio::spawn(async move {
                let g = l.acquire("p", &format!("r{i}"), 1, |p| positions.lock().unwrap().push((i, p.ahead))).await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(g);
            }));
            tokio::time::sleep(Duration::from_millis(10)).await; // queue in order 2, 3, 4
        }
        // a waiter that gives up leaves the queue
        let quitter = tokio::time::timeout(Duration::from_millis(10), l.acquire("p", "r5", 1, |_| {})).await;
        assert!(quitter.is_err());
        drop(g1);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![2, 3, 4]);
        let p = positions.lock().unwrap().clone();
        assert!(p.contains(&(4, 2)) && p.contains(&(4, 1)) && p.contains(&(4, 0)), "{p:?}");
        assert!(l.try_lock("p", "r6").is_ok(), "the queue is empty again");
    }

    #[tokio::test]
    async fn a_capacity_admits_that_many_at_once() {
        let l = KeyedLocks::default();
        let a = l.acquire("s", "a", 2, |_| {}).await;
        let _b = l.acquire("s", "b", 2, |_| {}).await;
        let third = tokio::time::timeout(Duration::from_millis(10), l.acquire("s", "c", 2, |_| {})).await;
        assert!(third.is_err(), "a third waits");
        drop(a);
        let c = tokio::time::timeout(Duration::from_millis(100), l.acquire("s", "c", 2, |_| {})).await;
        assert!(c.is_ok(), "and gets the freed slot");
    }
}
