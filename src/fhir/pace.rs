//! A request pace per server: at most N requests a second, spaced evenly, shared by every client
//! of the same server, credential and rate in the process (many runs of one source share it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// Spaces requests `1/N` seconds apart.
#[derive(Debug)]
pub struct Pace {
    gap: Duration,
    next: Mutex<Instant>,
}

impl Pace {
    /// A pace of `per_second` requests (at least 1).
    pub fn new(per_second: u32) -> Self {
        Self { gap: Duration::from_secs(1) / per_second.max(1), next: Mutex::new(Instant::now()) }
    }

    /// The pace for `key` (server, credential and rate), shared with every live client of it.
    pub fn shared(key: &str, per_second: u32) -> Arc<Pace> {
        static PACES: OnceLock<Mutex<HashMap<String, Weak<Pace>>>> = OnceLock::new();
        let mut m = PACES.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = m.get(key).and_then(Weak::upgrade) {
            return p;
        }
        if m.len() >= 256 {
            m.retain(|_, w| w.strong_count() > 0);
        }
        let p = Arc::new(Pace::new(per_second));
        m.insert(key.to_string(), Arc::downgrade(&p));
        p
    }

    /// Waits for this request's turn.
    pub async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + self.gap;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_are_spaced_and_a_pace_is_shared() {
        let a = Pace::shared("http://h|x|10", 10);
        let b = Pace::shared("http://h|x|10", 10);
        assert!(Arc::ptr_eq(&a, &b), "clients of one server and credential share one pace");
        let start = Instant::now();
        for _ in 0..5 {
            a.wait().await;
            b.wait().await;
        }
        // ten requests at 10/s: the first at once, the last 0.9 s later
        assert_eq!(start.elapsed(), Duration::from_millis(900));
        assert!(!Arc::ptr_eq(&a, &Pace::shared("http://h|y|10", 10)), "another credential, another pace");
    }
}
