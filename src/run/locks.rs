//! In-process exclusive locks keyed by a string (one export per source credential, one import per
//! Pathling), remembering who holds them so a waiting run can say what it waits for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A set of named locks.
#[derive(Clone, Default)]
pub struct KeyedLocks {
    inner: Arc<Mutex<HashMap<String, String>>>,
}

/// A held lock; released on drop.
pub struct LockGuard {
    locks: KeyedLocks,
    key: String,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.locks.inner.lock() {
            m.remove(&self.key);
        }
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockGuard({})", self.key)
    }
}

impl KeyedLocks {
    /// Takes `key` for `holder`, or returns the current holder. Re-entrant for the same holder name is
    /// not supported: a holder asks once and keeps the guard.
    pub fn try_lock(&self, key: &str, holder: &str) -> Result<LockGuard, String> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = m.get(key) {
            return Err(h.clone());
        }
        m.insert(key.to_string(), holder.to_string());
        Ok(LockGuard { locks: self.clone(), key: key.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_until_dropped() {
        let l = KeyedLocks::default();
        let g = l.try_lock("src", "ns/run-1").unwrap();
        assert_eq!(l.try_lock("src", "ns/run-2").unwrap_err(), "ns/run-1");
        assert!(l.try_lock("other", "ns/run-2").is_ok());
        drop(g);
        assert!(l.try_lock("src", "ns/run-2").is_ok());
    }
}
