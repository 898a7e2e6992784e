//! The device-write throttle: a token bucket in dirty bytes per second that the DMA engine
//! takes from before each write, so that a device dirtying guest RAM faster than the migration
//! link can send it is slowed down until precopy converges (device auto-converge).
//!
//! A write costs the pages it touches times 4 KiB: what it makes QEMU resend, not its length (a
//! 64-byte record dirties a whole page). The bucket lets a write through at once while it holds
//! tokens (a burst of 50 ms of the rate); otherwise the writer takes the tokens on credit and
//! sleeps until they would have accrued. Later writers queue behind that debt, so the rate
//! holds whatever the number of writers.
//!
//! Cheap when off: [`Throttle::take`] is one relaxed atomic load while no rate is set. A writer
//! sleeps on a condition variable whose lock is released during the sleep and that no other
//! path needs; [`Throttle::lift`] wakes every sleeper at once, so a quiesce is never delayed.
//! The throttle is armed for one migration ([`Throttle::arm`]); a rate set while disarmed is
//! ignored, so a policy that decides just after a quiesce lifted the throttle cannot put it
//! back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::LOG_PAGE_SIZE;

/// The longest burst the bucket holds, as time at the current rate.
const BURST: Duration = Duration::from_millis(50);
/// The smallest burst, so that one write of a few pages always fits.
const MIN_BURST_BYTES: f64 = 16.0 * LOG_PAGE_SIZE as f64;

/// The throttle's counters, for the companion's stats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThrottleCounters {
    /// The rate in force, dirty bytes per second (0: not throttling).
    pub rate: u64,
    /// Writes that had to wait.
    pub delayed_writes: u64,
    /// Bytes of those writes (their length, not their cost in pages).
    pub delayed_bytes: u64,
    /// Time writers spent waiting, ms (summed over writers).
    pub delayed_ms: u64,
}

struct Bucket {
    /// Tokens in dirty bytes; negative while writers wait for them.
    tokens: f64,
    refilled: Instant,
    armed: bool,
}

/// A token bucket in dirty bytes per second; see the module's documentation.
pub struct Throttle {
    /// Dirty bytes per second; 0: off. Changed only under `bucket`'s lock.
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
    wake: Condvar,
    delayed_writes: AtomicU64,
    delayed_bytes: AtomicU64,
    delayed_ns: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes of the pages `[gpa, gpa + len)` touches: what the write costs in dirty bytes.
pub fn dirty_cost(gpa: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
    (last - gpa / LOG_PAGE_SIZE + 1) * LOG_PAGE_SIZE
}

impl Throttle {
    /// A throttle that is off and disarmed.
    pub fn new() -> Self {
        Self {
            rate: AtomicU64::new(0),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                refilled: Instant::now(),
                armed: false,
            }),
            wake: Condvar::new(),
            delayed_writes: AtomicU64::new(0),
            delayed_bytes: AtomicU64::new(0),
            delayed_ns: AtomicU64::new(0),
        }
    }

    fn bucket(&self) -> MutexGuard<'_, Bucket> {
        // The bucket holds plain numbers; a panic elsewhere cannot leave them inconsistent.
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the cost of a write of `len` bytes at `gpa`, waiting if the rate says so. Returns
    /// at once when no rate is set, and as soon as [`Self::lift`] is called.
    #[inline]
    pub fn take(&self, gpa: u64, len: u64) {
        if self.rate.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.take_slow(dirty_cost(gpa, len), len);
    }

    #[cold]
    fn take_slow(&self, cost: u64, len: u64) {
        let mut b = self.bucket();
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        refill(&mut b, rate);
        b.tokens -= cost as f64;
        if b.tokens >= 0.0 {
            return;
        }
        let started = Instant::now();
        loop {
            let rate = self.rate.load(Ordering::Relaxed);
            if rate == 0 {
                break;
            }
            let wait = Duration::from_secs_f64(-b.tokens / rate as f64);
            // The lock is released while waiting: other writers take their share meanwhile,
            // and `lift` or a new rate wakes everyone.
            b = self
                .wake
                .wait_timeout(b, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            let rate = self.rate.load(Ordering::Relaxed);
            if rate == 0 {
                break;
            }
            refill(&mut b, rate);
            if b.tokens >= 0.0 {
                break;
            }
        }
        let waited = started.elapsed();
        self.delayed_writes.fetch_add(1, Ordering::Relaxed);
        self.delayed_bytes.fetch_add(len, Ordering::Relaxed);
        self.delayed_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Arms the throttle for a migration: rates may be set until [`Self::lift`].
    pub fn arm(&self) {
        let mut b = self.bucket();
        b.armed = true;
    }

    /// Whether the throttle is armed.
    pub fn armed(&self) -> bool {
        self.bucket().armed
    }

    /// Limits device writes to `rate` dirty bytes per second (0: no limit). Ignored, and
    /// `false` returned, while disarmed.
    pub fn set_rate(&self, rate: u64) -> bool {
        let mut b = self.bucket();
        if !b.armed {
            return false;
        }
        let old = self.rate.swap(rate, Ordering::Relaxed);
        if old == 0 && rate > 0 {
            // A fresh start: a full burst, no debt.
            b.tokens = burst(rate);
            b.refilled = Instant::now();
        }
        if old != rate {
            self.wake.notify_all();
        }
        true
    }

    /// Lifts the throttle and disarms it: every waiting writer goes on at once, and no rate
    /// applies until [`Self::arm`]. Called at the switchover quiesce and when logging ends.
    pub fn lift(&self) {
        let mut b = self.bucket();
        b.armed = false;
        b.tokens = 0.0;
        if self.rate.swap(0, Ordering::Relaxed) != 0 {
            self.wake.notify_all();
        }
    }

    /// The rate in force (0: none).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// The counters so far.
    pub fn counters(&self) -> ThrottleCounters {
        ThrottleCounters {
            rate: self.rate(),
            delayed_writes: self.delayed_writes.load(Ordering::Relaxed),
            delayed_bytes: self.delayed_bytes.load(Ordering::Relaxed),
            delayed_ms: self.delayed_ns.load(Ordering::Relaxed) / 1_000_000,
        }
    }
}

fn burst(rate: u64) -> f64 {
    (rate as f64 * BURST.as_secs_f64()).max(MIN_BURST_BYTES)
}

fn refill(b: &mut Bucket, rate: u64) {
    let now = Instant::now();
    let gained = now.duration_since(b.refilled).as_secs_f64() * rate as f64;
    b.tokens = (b.tokens + gained).min(burst(rate));
    b.refilled = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const PAGE: u64 = LOG_PAGE_SIZE;

    #[test]
    fn a_write_costs_the_pages_it_touches() {
        assert_eq!(dirty_cost(0, 0), 0);
        assert_eq!(dirty_cost(0, 64), PAGE);
        assert_eq!(dirty_cost(PAGE - 1, 2), 2 * PAGE);
        assert_eq!(dirty_cost(PAGE, PAGE), PAGE);
        assert_eq!(
            dirty_cost(u64::MAX - 10, 100),
            PAGE,
            "no overflow at the top"
        );
    }

    #[test]
    fn off_and_disarmed_it_never_waits() {
        let t = Throttle::new();
        assert!(!t.set_rate(PAGE), "a rate needs an armed throttle");
        let started = Instant::now();
        for i in 0..1000 {
            t.take(i * PAGE, 64);
        }
        assert!(started.elapsed() < Duration::from_millis(50));
        assert_eq!(t.counters(), ThrottleCounters::default());
    }

    #[test]
    fn writers_are_held_to_the_rate() {
        let t = Arc::new(Throttle::new());
        t.arm();
        // 100 pages a second; the burst is 16 pages. 2 writers × 20 pages: 40 pages, of
        // which 24 beyond the burst take 0.24 s.
        assert!(t.set_rate(100 * PAGE));
        let started = Instant::now();
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for i in 0..20 {
                        t.take((w * 100 + i) * PAGE, 64);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(220) && took < Duration::from_millis(600),
            "{took:?}"
        );
        let c = t.counters();
        assert_eq!(c.rate, 100 * PAGE);
        assert!(c.delayed_writes >= 20, "{c:?}");
        assert_eq!(c.delayed_bytes, c.delayed_writes * 64);
    }

    #[test]
    fn lift_wakes_a_waiting_writer_at_once_and_disarms() {
        let t = Arc::new(Throttle::new());
        t.arm();
        // One page every 10 s: the second write beyond the burst would wait ~10 s.
        assert!(t.set_rate(PAGE / 10));
        for i in 0..16 {
            t.take(i * PAGE, 1);
        }
        let t2 = Arc::clone(&t);
        let writer = std::thread::spawn(move || {
            let started = Instant::now();
            t2.take(100 * PAGE, 1);
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!writer.is_finished(), "the writer must be waiting");
        let lifted = Instant::now();
        t.lift();
        let waited = writer.join().unwrap();
        assert!(lifted.elapsed() < Duration::from_millis(100));
        assert!(waited < Duration::from_secs(1), "{waited:?}");
        assert_eq!(t.rate(), 0);
        assert!(!t.set_rate(PAGE), "disarmed until the next migration");
        assert!(!t.armed());
    }

    #[test]
    fn a_higher_rate_shortens_a_wait_in_progress() {
        let t = Arc::new(Throttle::new());
        t.arm();
        assert!(t.set_rate(PAGE / 10));
        for i in 0..17 {
            t.take(i * PAGE, 1);
        }
        let t2 = Arc::clone(&t);
        let writer = std::thread::spawn(move || t2.take(200 * PAGE, 1));
        std::thread::sleep(Duration::from_millis(50));
        assert!(t.set_rate(1000 * PAGE));
        let started = Instant::now();
        writer.join().unwrap();
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}
