//! What a migration did, and when: its [`Phase`]s on a timeline, and the [`MigrationSummary`]
//! it returns.

use serde::Serialize;

use super::hotplug::HotplugTimes;

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

impl MigrationSummary {
    /// QEMU's figures of a finished migration, from the source's `query-migrate`; what vfmig
    /// adds is left empty.
    pub fn from_qemu(info: &crate::qmp::MigrationInfo) -> Self {
        let ram = info.ram.clone().unwrap_or_default();
        Self {
            status: info.status.clone().unwrap_or_default(),
            total_ms: info.total_time.unwrap_or(0),
            downtime_ms: info.downtime.unwrap_or(0),
            setup_ms: info.setup_time.unwrap_or(0),
            transferred_bytes: ram.transferred.unwrap_or(0),
            ram_total_bytes: ram.total.unwrap_or(0),
            dirty_sync_count: ram.dirty_sync_count.unwrap_or(0),
            ..Default::default()
        }
    }
}

/// The VF's move at switchover.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Takeover {
    /// The handoff inside the downtime: from the source's export, right after its quiesce,
    /// to the state's arrival at the destination's companion, ms.
    pub ms: f64,
    /// The takeover once the destination runs: its claim to the source, the import and the
    /// announce to the peers, ms (0 if it was not seen).
    pub takeover_ms: f64,
    /// Bytes of the state on the fabric.
    pub bytes: u64,
    /// QPs moved.
    pub qps: usize,
    /// Requests in flight that the destination will replay.
    pub pending_requests: usize,
    /// Frames that waited for the guest and moved.
    pub waiting_frames: usize,
    /// Peers told of the VM's new place.
    pub announced_to: Vec<String>,
    /// The VF's blackout: from the source's quiesce (nothing is applied or sent there after
    /// it) to the end of the destination's announce (peers replay to the new place from
    /// then), ms (0 if not seen). Whatever the workload, no request crosses the VF between.
    pub blackout_ms: f64,
    /// When the source's export began (unix µs), for `blackout_ms`.
    #[serde(skip)]
    pub exported_at_unix_us: Option<f64>,
}

pub use crate::errors::chain as error_text;

#[cfg(test)]
mod tests {
    use super::*;

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
