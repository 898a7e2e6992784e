//! The soft VF's counters.

use serde::{Deserialize, Serialize};

use super::SoftVf;

/// Counters of the soft VF.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SoftVfStats {
    /// Requests sent (first transmissions).
    pub requests_sent: u64,
    /// Requests sent again (after a broken link or an RNR).
    pub requests_replayed: u64,
    /// Requests applied here (writes and sends from peers).
    pub requests_applied: u64,
    /// Duplicate requests acknowledged without applying.
    pub duplicates: u64,
    /// Requests held now for unreachable peers.
    pub held: u64,
    /// Malformed frames dropped.
    pub malformed_frames: u64,
    /// QPs failed because their peer's VF state was gone (a new epoch, or `Gone`).
    pub qps_lost: u64,
    /// `Gone` frames refused (another VM named, a stale epoch, an unauthenticated link).
    pub gone_refused: u64,
}

impl SoftVf {
    /// Counters.
    pub fn stats(&self) -> SoftVfStats {
        let mut s = self.inner.stats.lock().clone();
        s.held = self
            .inner
            .state
            .lock()
            .qps
            .values()
            .map(|q| q.unacked.len() as u64)
            .sum();
        s
    }
}
