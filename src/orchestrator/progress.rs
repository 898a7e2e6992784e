//! Watching a migration: the [`Timeline`] of its phases, the [`Observer`] seam, and a progress
//! bar on the terminal.

use crate::qmp::MigrationInfo;

use std::sync::Arc;
use std::time::Instant;

use super::summary::{Phase, PhaseSpan};
use crate::trace::TraceRecorder;

/// Someone who wants to watch a migration (a progress bar, a trace).
pub trait Observer {
    /// A phase begins.
    fn phase(&mut self, _phase: Phase) {}
    /// A `query-migrate` sample of the source.
    fn sample(&mut self, _info: &MigrationInfo) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// Runs `f` with a progress bar on stderr when it is a terminal, and with no observer when it
/// is not (no progress noise in logs and pipes).
pub fn with_progress<T>(f: impl FnOnce(&mut dyn Observer) -> T) -> T {
    match TerminalProgress::on_stderr() {
        Some(mut bar) => f(&mut bar),
        None => f(&mut Quiet),
    }
}

/// A progress bar on the terminal: phase, percent of RAM sent, rate and ETA.
pub struct TerminalProgress {
    bar: indicatif::ProgressBar,
}

impl TerminalProgress {
    /// A bar on stderr, or `None` when stderr is not a terminal (no progress noise then).
    pub fn on_stderr() -> Option<Self> {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>20} [{bar:30}] {percent:>3}% {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Some(Self { bar })
    }
}

impl Observer for TerminalProgress {
    fn phase(&mut self, phase: Phase) {
        self.bar.set_message(format!("{phase:?}"));
        if phase == Phase::Done {
            self.bar.finish();
        }
    }

    fn sample(&mut self, info: &MigrationInfo) {
        if let Some(ram) = &info.ram {
            let total = ram.total.unwrap_or(0);
            let remaining = ram.remaining.unwrap_or(total);
            self.bar.set_length(total);
            self.bar.set_position(total.saturating_sub(remaining));
        }
    }
}

/// The phases as they happen: spans for the summary, phase events on the trace, and the
/// observer told.
pub(super) struct Timeline {
    pub(super) start: Instant,
    pub(super) spans: Vec<PhaseSpan>,
    pub(super) trace: Option<Arc<TraceRecorder>>,
}

impl Timeline {
    /// A timeline starting now: trace timestamps count from the start of the migration.
    pub(super) fn new(trace: Option<Arc<TraceRecorder>>) -> Self {
        Self {
            start: Instant::now(),
            spans: vec![],
            trace,
        }
    }

    /// µs since the start, on the trace's clock.
    pub(super) fn us(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e6
    }

    /// `phase` begins (nothing happens if it is the current one).
    pub(super) fn enter(&mut self, phase: Phase, observer: &mut dyn Observer) {
        let now = self.start.elapsed().as_secs_f64() * 1e3;
        if let Some(last) = self.spans.last_mut() {
            last.end_ms = now;
        }
        if self.spans.last().map(|s| s.phase) != Some(phase) {
            self.spans.push(PhaseSpan {
                phase,
                start_ms: now,
                end_ms: now,
            });
            tracing::info!(?phase, at_ms = now as u64, "migration phase");
            if let Some(tr) = &self.trace {
                let name = serde_json::to_value(phase)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                tr.enter_phase_at(&name, self.us());
                if phase == Phase::Done {
                    tr.close_phase_at(self.us());
                }
            }
            observer.phase(phase);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Seen(Vec<Phase>);
    impl Observer for Seen {
        fn phase(&mut self, phase: Phase) {
            self.0.push(phase);
        }
    }

    #[test]
    fn a_phase_entered_twice_is_one_span_and_one_event() {
        let mut t = Timeline::new(None);
        let mut seen = Seen::default();
        t.enter(Phase::Precopy, &mut seen);
        t.enter(Phase::Switchover, &mut seen);
        t.enter(Phase::Switchover, &mut seen);
        t.enter(Phase::Done, &mut seen);
        assert_eq!(seen.0, [Phase::Precopy, Phase::Switchover, Phase::Done]);
        let phases: Vec<Phase> = t.spans.iter().map(|s| s.phase).collect();
        assert_eq!(phases, seen.0);
        assert!(t.spans.windows(2).all(|w| w[0].end_ms <= w[1].start_ms));
    }
}
