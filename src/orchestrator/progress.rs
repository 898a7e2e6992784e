//! Watching a migration: the [`Observer`] seam, and a progress bar on the terminal.

use crate::qmp::MigrationInfo;

use super::summary::Phase;

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
