//! What a migration did, and when: its [`Phase`]s on a timeline, and the [`MigrationSummary`]
//! it returns.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::hotplug::HotplugTimes;
use super::progress::Observer;
use crate::trace::TraceRecorder;

/// The phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Capabilities and `migrate-incoming` on the destination.
    PrepareDestination,
    /// `cooperative`, `passthrough-hotplug`: every rank's runtime suspends communication and
    /// reports ready.
    Suspend,
    /// `passthrough-hotplug`: the VF is unplugged from the source.
    Detach,
    /// RAM is copied while the source runs.
    Precopy,
    /// The source is stopped; last dirty pages and device state move.
    Switchover,
    /// The destination takes over and is resumed.
    DestinationUp,
    /// `passthrough-hotplug`: a VF is plugged into the destination and its driver comes up.
    Attach,
    /// `cooperative`, `passthrough-hotplug`: every rank's runtime communicates again.
    Resume,
    /// Finished.
    Done,
}

/// One phase's place on the timeline, in ms from the start of the migration.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSpan {
    /// The phase.
    pub phase: Phase,
    /// Start, ms.
    pub start_ms: f64,
    /// End, ms.
    pub end_ms: f64,
}

/// What a migration did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationSummary {
    /// QEMU's final status on the source (`completed`).
    pub status: String,
    /// QEMU's total migration time, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms.
    pub downtime_ms: u64,
    /// QEMU's setup time, ms.
    pub setup_ms: u64,
    /// RAM bytes sent.
    pub transferred_bytes: u64,
    /// Guest RAM size as QEMU counts it.
    pub ram_total_bytes: u64,
    /// Dirty-bitmap syncs QEMU made (each one also syncs the vhost-user log).
    pub dirty_sync_count: u64,
    /// Whether the destination was resumed.
    pub destination_resumed: bool,
    /// The VF's move to the destination's companion, when there was a VF to move.
    pub vf_takeover: Option<Takeover>,
    /// `passthrough-hotplug`: how long the unplug and the plug took.
    pub hotplug: Option<HotplugTimes>,
    /// The phases.
    pub timeline: Vec<PhaseSpan>,
    /// Wall-clock time of the whole state machine, ms.
    pub wall_ms: u64,
}

/// The VF's move at switchover.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Takeover {
    /// Time from the start of the export to the end of the import and announce, ms.
    pub ms: f64,
    /// QPs moved.
    pub qps: usize,
    /// Requests in flight that the destination will replay.
    pub pending_requests: usize,
    /// Frames that waited for the guest and moved.
    pub waiting_frames: usize,
    /// Peers told of the VM's new place.
    pub announced_to: Vec<String>,
}

/// An error and its causes on one line, `what: why: …`, for reports that keep a failed
/// migration as text.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
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

    #[test]
    fn an_error_is_written_with_its_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_text(&e), "outer: inner");
    }

    #[test]
    fn phases_are_named_in_kebab_case() {
        let v = serde_json::to_value(Phase::PrepareDestination).unwrap();
        assert_eq!(v, "prepare-destination");
    }
}
