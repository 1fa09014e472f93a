//! The fence: whether this process may act now. With leader election, a leader may act only while
//! its last renewal of the Lease is fresh — until the instant that renewal was *sent* plus the renew
//! deadline (two thirds of the lease). A standby takes the lease only after a whole lease duration
//! since it last saw the lease change, which is later than that: a leader that was paused (SIGSTOP,
//! a long GC-like stall, a frozen VM) and wakes up finds its fence lapsed and stops before its next
//! externally visible step, whatever its tasks were doing. Without election the fence is open.
//!
//! Checked by the run engine before every step (and raced against each step), by the one status
//! writer before every write, by the relay before it takes a notification, and by cleanup.

use std::future::Future as _;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Whether this process may act; cheap to clone (one per process, shared).
#[derive(Clone, Debug, Default)]
pub struct Fence(Arc<Mutex<State>>);

#[derive(Debug, Default, Clone, Copy)]
enum State {
    /// No election: always holds.
    #[default]
    Open,
    /// Holds until this instant (`None`: not yet, or no more).
    Until(Option<Instant>),
}

impl Fence {
    /// A fence that always holds (no leader election; `fhirsync sync-once`).
    pub fn open() -> Self {
        Self::default()
    }

    /// A fence for leader election: it holds only after [`Fence::renewed`].
    pub fn lease() -> Self {
        Self(Arc::new(Mutex::new(State::Until(None))))
    }

    /// This process's fence (open until [`Fence::elect`]): the one the operator's status writer,
    /// run engine and relay check.
    pub fn process() -> Self {
        static PROCESS: std::sync::OnceLock<Fence> = std::sync::OnceLock::new();
        PROCESS.get_or_init(Fence::open).clone()
    }

    /// This process takes part in leader election: from now on it acts only while renewed.
    pub fn elect(&self) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*s, State::Open) {
            *s = State::Until(None);
        }
    }

    fn state(&self) -> State {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A renewal sent at `sent` succeeded: the fence holds for `valid` from then.
    pub fn renewed(&self, sent: Instant, valid: Duration) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Until(u) = &mut *s {
            let until = sent + valid;
            *u = Some(u.map_or(until, |old| old.max(until)));
        }
    }

    /// The lease is gone (lost, released): the fence stops holding at once.
    pub fn revoke(&self) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Until(u) = &mut *s {
            *u = None;
        }
    }

    /// Whether this process may act now.
    pub fn holds(&self) -> bool {
        match self.state() {
            State::Open => true,
            State::Until(u) => u.is_some_and(|u| Instant::now() < u),
        }
    }

    /// Resolves when the fence stops holding (never, for an open fence). It checks the clock on
    /// every poll — after a pause, it is ready at the first poll, before any timer has fired.
    pub fn lapsed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let me = self.clone();
        let mut sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(move |cx| {
            loop {
                let until = match me.state() {
                    State::Open => return Poll::Pending, // never lapses; nothing to wake for
                    State::Until(None) => return Poll::Ready(()),
                    State::Until(Some(u)) if Instant::now() >= u => return Poll::Ready(()),
                    State::Until(Some(u)) => tokio::time::Instant::from_std(u),
                };
                let s = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                if s.deadline() != until {
                    s.as_mut().reset(until);
                }
                if s.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // the timer fired: look at the clock (and a renewal) again
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_holds_only_while_its_last_renewal_is_fresh() {
        let open = Fence::open();
        assert!(open.holds());
        open.revoke();
        assert!(open.holds(), "without election there is nothing to lose");

        let f = Fence::lease();
        assert!(!f.holds(), "a standby does not act");
        let t = Instant::now();
        f.renewed(t, Duration::from_secs(10));
        assert!(f.holds());
        f.renewed(t - Duration::from_secs(20), Duration::from_secs(10));
        assert!(f.holds(), "an older renewal's answer arriving late does not shorten it");
        let stale = Fence::lease();
        stale.renewed(Instant::now() - Duration::from_secs(11), Duration::from_secs(10));
        assert!(!stale.holds(), "a renewal sent longer ago than its validity (the process was paused)");
        f.revoke();
        assert!(!f.holds());
    }

    #[tokio::test]
    async fn lapsed_wakes_when_the_fence_runs_out_and_follows_renewals() {
        let f = Fence::lease();
        f.renewed(Instant::now(), Duration::from_millis(50));
        let t = Instant::now();
        let g = f.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            g.renewed(Instant::now(), Duration::from_millis(100));
        });
        f.lapsed().await;
        assert!(t.elapsed() >= Duration::from_millis(100), "the renewal moved the end: {:?}", t.elapsed());
        assert!(!f.holds());
        let open = Fence::open();
        assert!(tokio::time::timeout(Duration::from_millis(20), open.lapsed()).await.is_err());
    }
}
