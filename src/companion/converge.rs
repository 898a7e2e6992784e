//! Device auto-converge: the policy that sets the DMA engine's [`Throttle`] so that a device
//! writing guest RAM faster than the migration link sends it cannot keep precopy from
//! finishing, whatever drives the migration (vfmig, libvirt, plain QMP).
//!
//! The companion sees only vhost-user, and that is enough:
//! - **a migration runs** while QEMU has logging on (`VHOST_F_LOG_ALL`), and it is over at the
//!   switchover quiesce (`GET_VRING_BASE`) or when logging goes off (completed, failed or
//!   cancelled): the throttle is armed for the one and lifted at the others;
//! - **QEMU's sync passes**: QEMU harvests the shared log by atomic exchange, clearing the bits
//!   it took. The policy keeps one canary bit set (guest page 0 of the first region, resent
//!   once per pass: 4 KiB) and counts a pass each time it finds the bit cleared;
//! - **the device's dirty rate**: from the DMA engine's counters, each write counted as the
//!   larger of its bytes and one page (an upper bound on the pages it dirties).
//!
//! Policies ([`DeviceThrottle`]): `off`; a fixed rate (dirty bytes per second, in force for the
//! whole precopy); or `auto`, the default, modelled on QEMU's `auto-converge` (which throttles
//! vCPUs, not devices):
//! - it waits [`GRACE`] after logging begins or [`GRACE_PASSES`] passes, whichever comes first
//!   (the first pass sends all of RAM whatever the device does);
//! - then every [`STEP`] or pass it measures the device's dirty rate; above [`SHARE`] of the
//!   migration bandwidth (QEMU's `throttle-trigger-threshold` default, 50 %), and unless passes
//!   are shrinking (the last pass at most 0.8 of the one before, and the current one not longer
//!   yet), it cuts the device's rate: to 80 % of what the device wrote unthrottled, then 10
//!   points more each step (QEMU's `cpu-throttle-initial` 20 and `cpu-throttle-increment` 10),
//!   at most [`MAX_PCT`] %.
//!
//! The share is what makes precopy converge: with the device dirtying `r` bytes a second and
//! QEMU sending `B`, each pass leaves `r / B` of the last one to resend; at 50 % the dirty set
//! halves every pass until it fits in the downtime. The bandwidth is a companion option
//! (default QEMU's default `max-bandwidth`, 128 MiB/s) that `vfmig migrate` sets to its own
//! `--max-bandwidth` over the control socket. A device writing below the share is never
//! throttled: what keeps such a migration from converging is not the device.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{DmaEngine, DmaStats, LOG_PAGE_SIZE};

/// QEMU's default `max-bandwidth`, the bandwidth assumed until told otherwise.
pub const DEFAULT_BANDWIDTH: u64 = 128 << 20;
/// How long logging runs before `auto` judges the device.
pub const GRACE: Duration = Duration::from_secs(3);
/// Or how many passes.
pub const GRACE_PASSES: u64 = 2;
/// How often `auto` may step when no pass comes.
pub const STEP: Duration = Duration::from_secs(1);
/// Share of the migration bandwidth the device may dirty.
pub const SHARE: f64 = 0.5;
/// The first cut, percent of the device's unthrottled rate.
pub const INITIAL_PCT: u32 = 20;
/// Each further cut.
pub const INCREMENT_PCT: u32 = 10;
/// The deepest cut.
pub const MAX_PCT: u32 = 99;
/// How often the policy looks.
pub const TICK: Duration = Duration::from_millis(100);

/// The device-throttle policy: `off`, `auto`, or a fixed rate of dirty bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceThrottle {
    /// Never throttle.
    Off,
    /// Throttle when precopy does not converge (see the module's documentation).
    #[default]
    Auto,
    /// Limit device writes to this many dirty bytes per second while a migration runs.
    Fixed(u64),
}

/// A policy that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "device throttle {0:?} is not `off`, `auto` or a rate such as `50MB/s`, `64MiB/s` or \
     `4000000` (bytes per second, above 0)"
)]
pub struct ThrottleParseError(String);

impl FromStr for DeviceThrottle {
    type Err = ThrottleParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ThrottleParseError(s.into());
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "off" => return Ok(Self::Off),
            "auto" => return Ok(Self::Auto),
            _ => {}
        }
        let t = t.strip_suffix("/s").unwrap_or(t);
        let digits = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let scale = match unit.trim() {
            "" | "B" => 1.0,
            "K" | "KB" | "k" | "kB" => 1e3,
            "M" | "MB" => 1e6,
            "G" | "GB" => 1e9,
            "Ki" | "KiB" => 1024.0,
            "Mi" | "MiB" => 1024.0 * 1024.0,
            "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let rate = (number * scale).round();
        if !(rate >= 1.0 && rate < u64::MAX as f64) {
            return Err(bad());
        }
        Ok(Self::Fixed(rate as u64))
    }
}

impl fmt::Display for DeviceThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Auto => f.write_str("auto"),
            Self::Fixed(rate) => write!(f, "{rate}"),
        }
    }
}

impl Serialize for DeviceThrottle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceThrottle {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The throttle's state, for the companion's stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThrottleStats {
    /// The policy.
    pub policy: DeviceThrottle,
    /// The migration bandwidth the policy assumes, bytes/s.
    pub bandwidth: u64,
    /// The rate in force, dirty bytes per second (0: not throttling).
    pub rate: u64,
    /// `auto`: how deep the cut is, percent of the device's unthrottled rate.
    pub step_pct: u32,
    /// QEMU's log-sync passes seen in this migration.
    pub passes: u64,
    /// The device's dirty rate last measured, bytes/s.
    pub device_dirty_rate: u64,
    /// Writes that waited for the throttle (since the companion started).
    pub delayed_writes: u64,
    /// Bytes of those writes.
    pub delayed_bytes: u64,
    /// Time they waited, ms.
    pub delayed_ms: u64,
}

/// The dirty bytes the device's writes stand for: each write at least one page.
fn dirty_bytes(s: &DmaStats) -> u64 {
    s.bytes.max(s.writes.saturating_mul(LOG_PAGE_SIZE))
}

/// One migration as the policy follows it.
#[derive(Debug)]
struct Watch {
    epoch: u64,
    since: Instant,
    passes: u64,
    last_pass: Option<Instant>,
    /// Durations of the pass before the last and of the last.
    pass_lens: (Option<Duration>, Option<Duration>),
    decided: Instant,
    dirty_at_decision: u64,
    /// The device's rate when the cuts began.
    base: Option<f64>,
    step_pct: u32,
    measured: f64,
}

impl Watch {
    fn new(epoch: u64, now: Instant, dirty: u64) -> Self {
        Self {
            epoch,
            since: now,
            passes: 0,
            last_pass: None,
            pass_lens: (None, None),
            decided: now,
            dirty_at_decision: dirty,
            base: None,
            step_pct: 0,
            measured: 0.0,
        }
    }

    fn pass(&mut self, now: Instant) {
        self.passes += 1;
        if let Some(at) = self.last_pass {
            self.pass_lens = (self.pass_lens.1, Some(now - at));
        }
        self.last_pass = Some(now);
    }

    /// Passes are shrinking: the last one was clearly shorter than the one before, and the
    /// current one is not longer yet.
    fn shrinking(&self, now: Instant) -> bool {
        match (self.pass_lens, self.last_pass) {
            ((Some(before), Some(last)), Some(at)) => {
                last.as_secs_f64() <= 0.8 * before.as_secs_f64() && now - at <= last
            }
            _ => false,
        }
    }

    /// `auto`: the new rate, if this is the moment to cut.
    fn decide(&mut self, now: Instant, passed: bool, dirty: u64, bandwidth: u64) -> Option<u64> {
        let window = now.saturating_duration_since(self.decided);
        if window < STEP && !(passed && window >= TICK) {
            return None;
        }
        self.measured =
            dirty.saturating_sub(self.dirty_at_decision) as f64 / window.as_secs_f64().max(1e-3);
        self.decided = now;
        self.dirty_at_decision = dirty;
        if now - self.since < GRACE && self.passes < GRACE_PASSES {
            return None;
        }
        if self.measured <= SHARE * bandwidth as f64 || self.shrinking(now) {
            return None;
        }
        let base = *self.base.get_or_insert(self.measured);
        self.step_pct = match self.step_pct {
            0 => INITIAL_PCT,
            p => (p + INCREMENT_PCT).min(MAX_PCT),
        };
        let rate = base * f64::from(100 - self.step_pct) / 100.0;
        Some((rate as u64).max(LOG_PAGE_SIZE))
    }
}

#[derive(Debug)]
struct State {
    policy: DeviceThrottle,
    bandwidth: u64,
    watch: Option<Watch>,
    /// Whether the canary bit is set in the current log.
    canary: bool,
}

/// The policy, driving the DMA engine's throttle; see the module's documentation.
pub struct Converge {
    dma: Arc<DmaEngine>,
    state: Mutex<State>,
}

impl Converge {
    /// A policy over `dma`'s throttle.
    pub fn new(dma: Arc<DmaEngine>, policy: DeviceThrottle, bandwidth: u64) -> Self {
        Self {
            dma,
            state: Mutex::new(State {
                policy,
                bandwidth: bandwidth.max(1),
                watch: None,
                canary: false,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the policy and the migration bandwidth (bytes/s) it assumes; a change of policy
    /// in a migration starts over from the device's unthrottled rate.
    pub fn set(&self, policy: DeviceThrottle, bandwidth: u64) {
        let mut st = self.state();
        if st.policy != policy {
            if let Some(w) = st.watch.as_mut() {
                w.base = None;
                w.step_pct = 0;
            }
            self.dma.throttle().set_rate(0);
        }
        st.policy = policy;
        st.bandwidth = bandwidth.max(1);
        tracing::info!(%policy, bandwidth, "device throttle policy set");
    }

    /// The throttle's state.
    pub fn stats(&self) -> ThrottleStats {
        let st = self.state();
        let c = self.dma.throttle().counters();
        ThrottleStats {
            policy: st.policy,
            bandwidth: st.bandwidth,
            rate: c.rate,
            step_pct: st.watch.as_ref().map_or(0, |w| w.step_pct),
            passes: st.watch.as_ref().map_or(0, |w| w.passes),
            device_dirty_rate: st.watch.as_ref().map_or(0, |w| w.measured as u64),
            delayed_writes: c.delayed_writes,
            delayed_bytes: c.delayed_bytes,
            delayed_ms: c.delayed_ms,
        }
    }

    /// Finds whether QEMU harvested the log since the last look: the canary bit, set in the
    /// first region's log, is clear again. Sets it (again).
    fn pass_seen(&self, canary: &mut bool) -> bool {
        let mem = self.dma.ram().memory();
        let Some(region) = mem.iter().next() else {
            return false;
        };
        let log = region.bitmap();
        if !log.is_logging() || region.len() == 0 {
            *canary = false;
            return false;
        }
        let harvested = *canary && !log.dirty_at(0);
        if !*canary || harvested {
            log.mark_dirty(0, 1);
            *canary = true;
        }
        harvested
    }

    /// One look: arms the throttle when a migration begins, lifts it when it ends, and sets
    /// the rate the policy asks for.
    pub fn tick(&self, now: Instant) {
        let mut st = self.state();
        let throttle = self.dma.throttle();
        let gate = self.dma.gate_state();
        if !gate.log_requested || gate.quiesced {
            if let Some(w) = st.watch.take() {
                throttle.lift();
                tracing::info!(
                    passes = w.passes,
                    step_pct = w.step_pct,
                    "device throttle lifted: the migration reached switchover or ended"
                );
            }
            st.canary = false;
            return;
        }
        let dirty = dirty_bytes(&self.dma.stats());
        if st.watch.as_ref().is_none_or(|w| w.epoch != gate.epoch) {
            st.watch = Some(Watch::new(gate.epoch, now, dirty));
            st.canary = false;
            throttle.arm();
        }
        let mut canary = st.canary;
        let passed = self.pass_seen(&mut canary);
        st.canary = canary;
        let (policy, bandwidth) = (st.policy, st.bandwidth);
        let Some(w) = st.watch.as_mut() else {
            return;
        };
        if passed {
            w.pass(now);
        }
        let wanted = match policy {
            DeviceThrottle::Off => Some(0),
            DeviceThrottle::Fixed(rate) => Some(rate),
            DeviceThrottle::Auto => w.decide(now, passed, dirty, bandwidth),
        };
        if let Some(rate) = wanted.filter(|r| *r != throttle.rate()) {
            if throttle.set_rate(rate) {
                tracing::info!(
                    %policy,
                    rate,
                    step_pct = w.step_pct,
                    device_dirty_rate = w.measured as u64,
                    passes = w.passes,
                    "device writes throttled so that precopy converges"
                );
            }
        }
    }

    /// Looks every [`TICK`] on a thread of its own, for the life of the process.
    pub fn start(self: Arc<Self>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("vfmig-converge".into())
            .spawn(move || loop {
                self.tick(Instant::now());
                std::thread::sleep(TICK);
            })
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{LogWindow, OwnedLog};
    use vhost_user_backend::bitmap::BitmapReplace;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    const MB: u64 = 1_000_000;

    #[test]
    fn policies_parse_from_what_an_operator_types() {
        let p = |s: &str| s.parse::<DeviceThrottle>();
        assert_eq!(p("off"), Ok(DeviceThrottle::Off));
        assert_eq!(p("AUTO"), Ok(DeviceThrottle::Auto));
        assert_eq!(p("50MB/s"), Ok(DeviceThrottle::Fixed(50 * MB)));
        assert_eq!(p("64MiB/s"), Ok(DeviceThrottle::Fixed(64 << 20)));
        assert_eq!(p("1.5G"), Ok(DeviceThrottle::Fixed(1_500_000_000)));
        assert_eq!(p("4000000"), Ok(DeviceThrottle::Fixed(4 * MB)));
        for bad in ["", "0", "fast", "5 parsecs", "-3MB/s", "1e400"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        for v in [
            DeviceThrottle::Off,
            DeviceThrottle::Auto,
            DeviceThrottle::Fixed(7),
        ] {
            let wire = serde_json::to_string(&v).unwrap();
            assert_eq!(serde_json::from_str::<DeviceThrottle>(&wire).unwrap(), v);
        }
    }

    /// `decide` every second of a migration whose device writes `rate` bytes/s when not
    /// throttled, with passes of `pass` seconds: the rates it sets.
    fn cuts(rate: f64, bandwidth: u64, pass: Option<u64>, secs: u64) -> Vec<u64> {
        let t0 = Instant::now();
        let mut w = Watch::new(1, t0, 0);
        let (mut dirty, mut limit, mut out) = (0f64, f64::INFINITY, vec![]);
        for s in 1..=secs {
            let now = t0 + Duration::from_secs(s);
            dirty += rate.min(limit);
            let passed = pass.is_some_and(|p| s % p == 0);
            if passed {
                w.pass(now);
            }
            if let Some(r) = w.decide(now, passed, dirty as u64, bandwidth) {
                limit = r as f64;
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn auto_cuts_by_20_then_10_points_until_under_the_share() {
        // 16 MB/s against an 8 MB/s link: cut from 3 s on until at most 4 MB/s.
        let r = cuts(16e6, 8 * MB, None, 20);
        let expect: Vec<u64> = [80, 70, 60, 50, 40, 30, 20]
            .iter()
            .map(|p| 16 * MB * p / 100)
            .collect();
        assert_eq!(r, expect);
    }

    #[test]
    fn auto_leaves_a_device_under_the_share_alone() {
        assert!(cuts(3e6, 8 * MB, None, 20).is_empty());
        assert!(cuts(16e6, 128 << 20, Some(2), 20).is_empty());
    }

    #[test]
    fn auto_holds_while_passes_shrink() {
        let t0 = Instant::now();
        let mut w = Watch::new(1, t0, 0);
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        // Passes of 4 s then 2 s: shrinking; the device is above the share.
        w.pass(s(0.5));
        w.pass(s(4.5));
        w.pass(s(6.5));
        assert!(w.shrinking(s(7.0)));
        assert_eq!(w.decide(s(7.0), false, 70 * MB, 8 * MB), None);
        // The current pass outlasts the last one: not shrinking any more.
        assert!(!w.shrinking(s(9.0)));
        assert_eq!(w.decide(s(9.0), false, 90 * MB, 8 * MB), Some(8 * MB));
    }

    /// A 4 MiB guest with an owned log installed, and its policy.
    fn companion_side(policy: DeviceThrottle) -> (Arc<DmaEngine>, Arc<OwnedLog>, Converge) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dma = Arc::new(DmaEngine::new(GuestMemoryAtomic::new(mem)));
        dma.adopt_memory();
        let log = Arc::new(OwnedLog::covering(4 << 20));
        for r in dma.ram().memory().iter() {
            r.bitmap()
                .replace(LogWindow::over_owned(Arc::clone(&log), r).unwrap());
        }
        let c = Converge::new(dma.clone(), policy, 8 * MB);
        (dma, log, c)
    }

    #[test]
    fn a_fixed_rate_holds_from_logging_on_until_the_quiesce() {
        let (dma, log, c) = companion_side(DeviceThrottle::Fixed(2 * MB));
        let t0 = Instant::now();
        c.tick(t0);
        assert_eq!(dma.throttle().rate(), 0, "no migration, no throttle");
        dma.set_log_requested(true);
        c.tick(t0);
        assert_eq!(dma.throttle().rate(), 2 * MB);
        assert!(log.is_set(0), "the canary is set");
        dma.quiesce();
        assert_eq!(dma.throttle().rate(), 0, "lifted by the quiesce itself");
        c.tick(t0 + TICK);
        assert_eq!(dma.throttle().rate(), 0, "and not put back");
        assert_eq!(c.stats().rate, 0);
    }

    #[test]
    fn a_quiesce_wakes_a_throttled_writer_at_once() {
        let (dma, _log, c) = companion_side(DeviceThrottle::Fixed(LOG_PAGE_SIZE / 10));
        dma.set_log_requested(true);
        c.tick(Instant::now());
        // The burst (16 pages) goes through; the next page would wait 10 s.
        for i in 0..16 {
            dma.write(i * LOG_PAGE_SIZE, &[1]).unwrap();
        }
        let writer = {
            let dma = dma.clone();
            std::thread::spawn(move || {
                let r = dma.write(100 * LOG_PAGE_SIZE, &[2]);
                (r, Instant::now())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!writer.is_finished(), "the writer waits for the throttle");
        let started = Instant::now();
        let waited = dma.quiesce();
        assert!(waited < Duration::from_millis(50), "{waited:?}");
        let (result, done) = writer.join().unwrap();
        assert!(done - started < Duration::from_millis(200));
        // Woken just before the gate closed, the write lands (and the quiesce waited for
        // it); just after, it is refused and nothing lands.
        let landed = dma.read(100 * LOG_PAGE_SIZE, 1).unwrap();
        match result {
            Ok(()) => assert_eq!(landed, vec![2]),
            Err(e) => {
                assert_eq!(e, crate::memory::DmaError::Quiesced);
                assert_eq!(landed, vec![0]);
            }
        }
    }

    #[test]
    fn passes_are_counted_from_the_canary_qemu_clears() {
        let (dma, log, c) = companion_side(DeviceThrottle::Off);
        dma.set_log_requested(true);
        let t0 = Instant::now();
        c.tick(t0);
        assert_eq!(c.stats().passes, 0);
        assert!(log.is_set(0));
        for n in 1..=3 {
            assert!(log.take(0), "what QEMU's harvest does");
            c.tick(t0 + TICK * n);
            assert_eq!(c.stats().passes, u64::from(n));
            assert!(log.is_set(0), "the canary is set again");
        }
        c.tick(t0 + TICK * 9);
        assert_eq!(c.stats().passes, 3, "no harvest, no pass");
        dma.set_log_requested(false);
        c.tick(t0 + TICK * 10);
        assert_eq!(c.stats().passes, 0, "the migration is over");
    }

    #[test]
    fn auto_throttles_a_fast_device_and_logging_off_lifts_it() {
        let (dma, _log, c) = companion_side(DeviceThrottle::Auto);
        dma.set_log_requested(true);
        let t0 = Instant::now();
        c.tick(t0);
        // 4000 page writes a second (16.4 MB/s) against 8 MB/s: cut once the grace is over.
        for s in 1..=3u64 {
            for i in 0..4000 {
                dma.write((i % 1000) * LOG_PAGE_SIZE, &[1; 64]).unwrap();
            }
            c.tick(t0 + Duration::from_secs(s));
        }
        let st = c.stats();
        assert_eq!(st.step_pct, 20, "{st:?}");
        assert_eq!(st.device_dirty_rate, 4000 * LOG_PAGE_SIZE, "{st:?}");
        assert_eq!(st.rate, 4000 * LOG_PAGE_SIZE * 8 / 10, "{st:?}");
        dma.set_log_requested(false);
        c.tick(t0 + Duration::from_secs(4));
        assert_eq!(c.stats().rate, 0);
        assert!(!dma.throttle().armed());
    }
}
