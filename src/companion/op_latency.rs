//! What the companion adds to each operation's latency, measured inside it:
//! - **TX**: from the moment the vring worker takes a POST_SEND frame off the guest's TX
//!   queue to the moment the soft VF has handed its request to the fabric link (or queued it
//!   for a peer not reachable yet);
//! - **RX**: from the moment a peer's request has been read off the fabric (decoded and
//!   authenticated) to the moment the frame with its receive completion is in the guest's RX
//!   used ring.
//!
//! Each keeps its last [`KEPT`] samples; `stats` reports their count, median, p99 and maximum.

use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Samples kept per direction (the most recent).
pub const KEPT: usize = 1 << 16;

/// The latest samples of one direction, in nanoseconds.
#[derive(Debug, Default)]
struct Samples {
    ns: Vec<u32>,
    next: usize,
    count: u64,
}

impl Samples {
    fn add(&mut self, d: Duration) {
        let v = d.as_nanos().min(u128::from(u32::MAX)) as u32;
        if self.ns.len() < KEPT {
            self.ns.push(v);
        } else {
            self.ns[self.next] = v;
            self.next = (self.next + 1) % KEPT;
        }
        self.count += 1;
    }

    fn summary(&self) -> LatencySummary {
        let mut v = self.ns.clone();
        if v.is_empty() {
            return LatencySummary::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i]) / 1e3
        };
        LatencySummary {
            ops: self.count,
            median_us: at(0.5),
            p99_us: at(0.99),
            max_us: f64::from(v[v.len() - 1]) / 1e3,
        }
    }
}

/// One direction's figures, over the samples kept.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Operations measured since the start (the figures cover the last [`KEPT`]).
    pub ops: u64,
    /// Median, µs.
    pub median_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

/// Both directions (see the module's doc).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpLatencyReport {
    /// TX queue to the fabric.
    pub tx: LatencySummary,
    /// The fabric to the RX used ring.
    pub rx: LatencySummary,
}

/// The companion's per-operation latency.
#[derive(Debug, Default)]
pub struct OpLatency {
    tx: Mutex<Samples>,
    rx: Mutex<Samples>,
}

impl OpLatency {
    /// A POST_SEND took `d` from the TX queue to the fabric.
    pub fn tx(&self, d: Duration) {
        self.tx.lock().add(d);
    }

    /// A receive completion took `d` from the fabric to the RX used ring.
    pub fn rx(&self, d: Duration) {
        self.rx.lock().add(d);
    }

    /// The figures now.
    pub fn report(&self) -> OpLatencyReport {
        OpLatencyReport {
            tx: self.tx.lock().summary(),
            rx: self.rx.lock().summary(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p99_are_those_of_the_samples_kept() {
        let l = OpLatency::default();
        assert_eq!(l.report(), OpLatencyReport::default());
        for us in 1..=100u64 {
            l.tx(Duration::from_micros(us));
        }
        let r = l.report();
        assert_eq!(r.tx.ops, 100);
        assert_eq!(r.tx.median_us, 50.0);
        assert_eq!(r.tx.p99_us, 99.0);
        assert_eq!(r.tx.max_us, 100.0);
        assert_eq!(r.rx.ops, 0);
        // Beyond KEPT, the oldest go: a run of slow operations ages out.
        for _ in 0..KEPT {
            l.rx(Duration::from_millis(1));
        }
        for _ in 0..KEPT {
            l.rx(Duration::from_micros(2));
        }
        let r = l.report();
        assert_eq!(r.rx.ops, 2 * KEPT as u64);
        assert_eq!((r.rx.median_us, r.rx.max_us), (2.0, 2.0));
    }
}
