//! The soft VF's counters.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

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
    /// QPs the VF holds now: created, and not yet destroyed by the guest (an endpoint that
    /// closes destroys its QPs).
    pub qps: u64,
    /// Malformed frames dropped.
    pub malformed_frames: u64,
    /// QPs failed because their peer's VF state was gone (a new epoch, or `Gone`).
    pub qps_lost: u64,
    /// `Gone` frames refused (another VM named, a stale epoch, an unauthenticated link).
    pub gone_refused: u64,
    /// Moves of peer VMs seen here, the latest last (at most [`MAX_MOVES`]).
    pub peer_moves: Vec<PeerMove>,
}

/// A peer VM that announced its new place, as this VF saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerMove {
    /// The VM that moved.
    pub vm: String,
    /// From the last request this VF applied from the VM's old place to the first from its
    /// new place, ms: the VM's communication blackout as this peer saw it. `None` until the
    /// first request from the new place.
    #[serde(deserialize_with = "crate::companion::control::protocol::required")]
    pub silent_ms: Option<f64>,
}

/// Moves kept in [`SoftVfStats::peer_moves`].
pub const MAX_MOVES: usize = 64;

/// When each peer VM was last heard from (a request applied), and the moves in progress.
#[derive(Debug, Default)]
pub(super) struct Heard {
    /// Per peer VM (names from the cluster file, so bounded by it): its last request, and
    /// whether it has announced a move since.
    last: HashMap<String, (Instant, bool)>,
    /// The moves seen.
    moves: VecDeque<PeerMove>,
}

impl Heard {
    /// A request from `vm` was applied at `now`. The first after a move ends its silence.
    pub(super) fn request(&mut self, vm: &str, now: Instant) {
        let Some((last, moved)) = self.last.get_mut(vm) else {
            self.last.insert(vm.to_string(), (now, false));
            return;
        };
        if std::mem::take(moved) {
            if let Some(m) = self.moves.iter_mut().rev().find(|m| m.vm == vm) {
                m.silent_ms = Some(now.saturating_duration_since(*last).as_secs_f64() * 1e3);
            }
        }
        *last = now;
    }

    /// `vm` announced its new place: its silence runs from its last request here.
    pub(super) fn moved(&mut self, vm: &str) {
        let Some((_, moved)) = self.last.get_mut(vm) else {
            // Never heard from before its move: there is no silence to measure.
            return;
        };
        if *moved {
            // Announced again (a retry) before any request: the same move.
            return;
        }
        *moved = true;
        if self.moves.len() == MAX_MOVES {
            self.moves.pop_front();
        }
        self.moves.push_back(PeerMove {
            vm: vm.to_string(),
            silent_ms: None,
        });
    }

    fn moves(&self) -> Vec<PeerMove> {
        self.moves.iter().cloned().collect()
    }
}

impl SoftVf {
    /// Counters.
    pub fn stats(&self) -> SoftVfStats {
        let mut s = self.inner.stats.lock().clone();
        {
            let st = self.inner.state.lock();
            s.held = st.qps.values().map(|q| q.unacked.len() as u64).sum();
            s.qps = st.qps.len() as u64;
        }
        s.peer_moves = self.inner.heard.lock().moves();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_moves_silence_runs_from_the_last_request_before_to_the_first_after() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut h = Heard::default();
        h.request("b", at(0));
        h.request("b", at(10));
        h.moved("b");
        h.moved("b"); // a retried announce: the same move
        assert_eq!(h.moves()[0].silent_ms, None);
        h.request("c", at(70));
        h.request("b", at(90));
        h.request("b", at(95));
        assert_eq!(
            h.moves(),
            vec![PeerMove {
                vm: "b".into(),
                silent_ms: Some(80.0)
            }]
        );
        // Never heard from before: no move to measure.
        h.moved("d");
        assert_eq!(h.moves().len(), 1);
        for i in 0..2 * MAX_MOVES as u64 {
            h.moved("b");
            h.request("b", at(201 + 2 * i));
        }
        assert_eq!(h.moves().len(), MAX_MOVES);
        // Each silence: 2 ms, from one request of the loop to the next.
        assert_eq!(h.moves()[MAX_MOVES - 1].silent_ms, Some(2.0));
    }
}
