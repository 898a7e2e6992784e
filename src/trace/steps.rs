//! The steps a companion takes around a switchover (the quiesce, links closed, the export,
//! the import and announce, "the VM runs here", the first replay, the first completion for the
//! guest, …), kept in a small log that the orchestrator reads over the control socket
//! (`steps`) and draws on the companion's track of the migration's trace.
//!
//! Times are wall-clock µs since the UNIX epoch, so that steps of several processes on one
//! machine line up; across hosts they are as good as the hosts' clock sync.
//!
//! The log is process-wide (one companion per process), bounded to [`MAX_STEPS`] (the oldest
//! go first). A "first" step ([`first`]) is kept once per switchover: [`rearm`] (at the quiesce
//! and at the import) lets each be taken again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Steps the log keeps.
pub const MAX_STEPS: usize = 512;

/// One step: a span (`dur_us` > 0) or an instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// What happened (`quiesce`, `vf-export`, `announce`, `vm-runs-here`, …).
    pub name: String,
    /// When it began, µs since the UNIX epoch.
    pub at_unix_us: f64,
    /// How long it took, µs (0: an instant).
    pub dur_us: f64,
    /// What it concerned (a peer, a count), free text.
    pub detail: String,
}

struct Log {
    steps: VecDeque<Step>,
    /// The `first` steps taken since the last rearm: details by name.
    firsts: BTreeMap<&'static str, BTreeSet<String>>,
}

/// A bounded log of steps; the companion's is [`STEPS`], reached through the free functions.
pub struct StepLog(Mutex<Log>);

/// The process's log.
pub static STEPS: StepLog = StepLog::new();

/// µs since the UNIX epoch of `at`, a moment of this process.
pub fn unix_us(at: Instant) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6);
    now - at.elapsed().as_secs_f64() * 1e6
}

impl StepLog {
    /// An empty log.
    pub const fn new() -> Self {
        StepLog(Mutex::new(Log {
            steps: VecDeque::new(),
            firsts: BTreeMap::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, step: Step) {
        tracing::debug!(?step, "switchover step");
        let mut l = self.lock();
        if l.steps.len() >= MAX_STEPS {
            l.steps.pop_front();
        }
        l.steps.push_back(step);
    }

    /// A step that began at `started` and ends now.
    pub fn span(&self, name: &str, started: Instant, detail: impl Into<String>) {
        self.push(Step {
            name: name.into(),
            at_unix_us: unix_us(started),
            dur_us: started.elapsed().as_secs_f64() * 1e6,
            detail: detail.into(),
        });
    }

    /// A step that happens now.
    pub fn instant(&self, name: &str, detail: impl Into<String>) {
        self.push(Step {
            name: name.into(),
            at_unix_us: unix_us(Instant::now()),
            dur_us: 0.0,
            detail: detail.into(),
        });
    }

    /// An instant kept once per switchover for each `(name, detail)`. Called on per-frame
    /// paths: once taken, a step costs a lookup under the lock and allocates nothing.
    pub fn first(&self, name: &'static str, detail: &str) {
        {
            let mut l = self.lock();
            if l.firsts.get(name).is_some_and(|d| d.contains(detail)) {
                return;
            }
            l.firsts.entry(name).or_default().insert(detail.to_string());
        }
        self.instant(name, detail);
    }

    /// A new switchover begins: every first step may be taken again.
    pub fn rearm(&self) {
        self.lock().firsts.clear();
    }

    /// The steps kept, oldest first.
    pub fn snapshot(&self) -> Vec<Step> {
        self.lock().steps.iter().cloned().collect()
    }
}

impl Default for StepLog {
    fn default() -> Self {
        Self::new()
    }
}

/// A step of this companion that began at `started` and ends now.
pub fn span(name: &str, started: Instant, detail: impl Into<String>) {
    STEPS.span(name, started, detail);
}

/// A step of this companion that happens now.
pub fn instant(name: &str, detail: impl Into<String>) {
    STEPS.instant(name, detail);
}

/// An instant of this companion kept once per switchover for each `(name, detail)`: the first
/// replay from a peer, the first completion for the guest. Cheap when it was taken already.
pub fn first(name: &'static str, detail: &str) {
    STEPS.first(name, detail);
}

/// A new switchover begins here: every [`first`] step may be taken again.
pub fn rearm() {
    STEPS.rearm();
}

/// This companion's steps, oldest first.
pub fn snapshot() -> Vec<Step> {
    STEPS.snapshot()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_step_is_kept_once_per_switchover_and_spans_have_their_length() {
        let log = StepLog::new();
        let count = || log.snapshot().iter().filter(|s| s.name == "first").count();
        log.first("first", "b");
        log.first("first", "b");
        log.first("first", "c");
        assert_eq!(count(), 2, "once per detail");
        log.rearm();
        log.first("first", "b");
        assert_eq!(count(), 3, "again after rearm");

        let started = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        log.span("span", started, "x");
        let s = log
            .snapshot()
            .into_iter()
            .rfind(|s| s.name == "span")
            .unwrap();
        assert!(s.dur_us >= 2000.0, "{s:?}");
        let now = unix_us(Instant::now());
        assert!(s.at_unix_us <= now && now - s.at_unix_us < 60e6, "{s:?}");
    }

    #[test]
    fn the_log_is_bounded() {
        let log = StepLog::new();
        for i in 0..MAX_STEPS + 10 {
            log.instant("bound", i.to_string());
        }
        let steps = log.snapshot();
        assert_eq!(steps.len(), MAX_STEPS);
        assert_eq!(steps[0].detail, "10", "the oldest went first");
    }
}
