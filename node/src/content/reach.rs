//! Whether a layer's blob can be read from its registry right now.
//!
//! A fetch that failed is remembered for a while (about one read timeout): reads that need
//! spans not cached then fail at once instead of each waiting through the registry's retries
//! again. Without it, one read(2) of a dead registry takes several timeouts: the kernel
//! retries a failed readahead as a smaller read, and every reader that waited on the same
//! span starts its own fetch after the first one failed. Cached spans still read. After
//! the hold, the next fetch tries the registry again, so reads recover once it is back.
//!
//! It also carries the layer's verdict: once background verification finds the layer
//! inconsistent with its index, the layer is poisoned and every read of it fails.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// The reachability of one layer's blob (one per mount: memory is fixed per layer).
pub struct Reachability {
    what: String,
    hold: Duration,
    /// When the last failure happened, while it is remembered.
    failed_at: Mutex<Option<Instant>>,
    /// The layer proved inconsistent with its index: nothing of it is served any more.
    poisoned: AtomicBool,
}

impl Reachability {
    /// `what` names the blob in logs; failures are remembered for `hold`.
    pub fn new(what: impl Into<String>, hold: Duration) -> Reachability {
        Reachability {
            what: what.into(),
            hold,
            failed_at: Mutex::new(None),
            poisoned: AtomicBool::new(false),
        }
    }

    /// From now on every read of the layer fails (it does not match its index).
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Relaxed);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Relaxed)
    }

    /// `Some(age of the failure)` while a recent failure says fetching is pointless.
    pub fn down_since(&self) -> Option<Duration> {
        let at = (*self.failed_at.lock().ok()?)?;
        let age = at.elapsed();
        (age < self.hold).then_some(age)
    }

    /// How long a failure is remembered.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Records a failed fetch (or a read that timed out waiting for one).
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let Ok(mut at) = self.failed_at.lock() else {
            return;
        };
        let fresh = !at.is_some_and(|t| t.elapsed() < self.hold);
        *at = Some(Instant::now());
        drop(at);
        // Logged once per outage (and each hold), not for every read answered at once.
        if fresh {
            warn!(blob = self.what, hold = ?self.hold, %error, "registry unreachable: reads of uncached spans fail at once for the hold");
        }
    }

    /// Records a successful fetch: the registry answers again.
    pub fn succeeded(&self) {
        let Ok(mut at) = self.failed_at.lock() else {
            return;
        };
        if at.take().is_some() {
            drop(at);
            info!(blob = self.what, "registry reachable again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_a_failure_for_the_hold_only() {
        let r = Reachability::new("blob", Duration::from_secs(3600));
        assert!(r.down_since().is_none());
        r.failed(&"refused");
        assert!(r.down_since().is_some());
        r.succeeded();
        assert!(r.down_since().is_none(), "a success ends it");
        // Past the hold, the next fetch tries again.
        let r = Reachability::new("blob", Duration::ZERO);
        r.failed(&"refused");
        assert!(r.down_since().is_none());
    }
}
