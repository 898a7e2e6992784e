//! What a scenario run reports: the ranks' results and the migration's outcome, as the
//! demo's last JSON line.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{median, RankResult, ScenarioOptions, Workload};
use crate::lab::faults::{FaultRecord, Restarted};
use crate::orchestrator::migrate::MigrationSummary;
use crate::orchestrator::strategy::StrategyKind;

/// The scenario's result; the last line of the demo is this, as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// The job.
    pub workload: Workload,
    /// How `a` migrated (`null`: it did not).
    pub strategy: Option<StrategyKind>,
    /// VMs.
    pub vms: usize,
    /// Every rank's checksum equals the reference run's.
    pub checksum_match: bool,
    /// Checksums by rank.
    pub checksums: BTreeMap<String, Option<String>>,
    /// The reference run's checksums.
    pub reference: BTreeMap<String, Option<String>>,
    /// Operations that failed or never completed, as the ranks saw them.
    pub lost_ops: u64,
    /// Operations that completed twice, as the ranks saw them.
    pub duplicate_ops: u64,
    /// Longest gap in completed RDMA operations seen by a peer of `a`, ms.
    pub blackout_ms: f64,
    /// QEMU's total migration time, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms.
    pub downtime_ms: u64,
    /// Distinct pages `a`'s VF wrote during the migration (its companion's epoch bitmap): each
    /// was logged into QEMU's dirty log and sent again at least once because of the device.
    pub device_dirty_pages: Option<u64>,
    /// rdma-bw: bytes `a` sent.
    pub bytes_sent: Option<u64>,
    /// rdma-bw: bytes `b` received.
    pub bytes_received: Option<u64>,
    /// Median iteration time before, during and after the migration, ms (rank 0).
    pub iteration_ms: IterationMedians,
    /// The migration, when there was one and it completed.
    pub migration: Option<MigrationSummary>,
    /// Why the migration did not complete (an injected fault).
    pub migration_error: Option<String>,
    /// `passthrough-hotplug` after a failed migration: whether the source has its VF back,
    /// with its guest driver up.
    pub source_vf_restored: Option<bool>,
    /// Per rank.
    pub ranks: BTreeMap<String, RankResult>,
    /// The fault injected into the migration, if any, and when it fired.
    pub fault: Option<FaultRecord>,
    /// A job that stopped making progress after an injected fault: which ranks gave no
    /// result (only when the injection asks for stalls to be reported, not failed).
    pub stalled: Option<String>,
    /// What each companion added to each operation's latency (TX queue to fabric, fabric to
    /// RX used ring), read when the job ended: by VM (`a`, `b`, …; `a-dest` for `a`'s
    /// destination).
    pub op_latency: BTreeMap<String, crate::companion::op_latency::OpLatencyReport>,
}

/// Median iteration times around the migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IterationMedians {
    /// Before it.
    pub before: f64,
    /// While it ran.
    pub during: f64,
    /// After it.
    pub after: f64,
}

/// What migrating `a` left for the report.
#[derive(Default)]
pub(in crate::lab) struct MigrationOutcome {
    pub(in crate::lab) migration: Option<MigrationSummary>,
    pub(in crate::lab::scenario) migration_error: Option<String>,
    pub(in crate::lab::scenario) source_vf_restored: Option<bool>,
    pub(in crate::lab) device_dirty_pages: Option<u64>,
    /// Rank `a`'s iterations when the migration started and when it ended.
    pub(in crate::lab) iters_at: (usize, usize),
    /// The fault injected.
    pub(in crate::lab::scenario) fault: Option<FaultRecord>,
    /// A peer companion the fault started again: it runs until the job ends.
    pub(in crate::lab::scenario) _restarted: Option<Restarted>,
}

/// Step 5: the report from the ranks' results and the migration's outcome (`checksum_match`
/// is filled in by [`run_compared`](super::run_compared)).
pub(in crate::lab) fn report(
    opts: &ScenarioOptions,
    vm_names: &[String],
    ranks: Vec<RankResult>,
    outcome: MigrationOutcome,
) -> ScenarioReport {
    let by_name: BTreeMap<String, RankResult> = vm_names
        .iter()
        .cloned()
        .zip(ranks.iter().cloned())
        .collect();
    let checksums = by_name
        .iter()
        .map(|(n, r)| (n.clone(), r.checksum.clone()))
        .collect();
    // Lost: failed completions, a rank that ended without its result, and (rdma-bw) bytes
    // sent that never arrived, in messages.
    let mut lost_ops: u64 = ranks
        .iter()
        .map(|r| r.failed_completions + u64::from(!r.done))
        .sum();
    let bytes_sent = ranks[0].bytes;
    let bytes_received = ranks.get(1).and_then(|r| r.bytes);
    if opts.workload == Workload::RdmaBw {
        let (s, r) = (bytes_sent.unwrap_or(0), bytes_received.unwrap_or(0));
        lost_ops += s.saturating_sub(r).div_ceil(u64::from(opts.n.max(1)));
    }
    let duplicate_ops = ranks.iter().map(|r| r.duplicates).sum();
    let blackout_ms = ranks[1..]
        .iter()
        .filter_map(|r| r.blackout_ms)
        .fold(0.0, f64::max);
    let it = &ranks[0].iteration_ms;
    let (b, d) = (
        outcome.iters_at.0.min(it.len()),
        outcome.iters_at.1.min(it.len()),
    );
    let summary = outcome.migration.clone().unwrap_or_default();
    ScenarioReport {
        workload: opts.workload,
        strategy: opts.strategy,
        vms: opts.vms,
        checksum_match: false,
        checksums,
        reference: BTreeMap::new(),
        lost_ops,
        duplicate_ops,
        device_dirty_pages: outcome.device_dirty_pages,
        bytes_sent,
        bytes_received,
        blackout_ms,
        total_ms: summary.total_ms,
        downtime_ms: summary.downtime_ms,
        iteration_ms: IterationMedians {
            before: median(&it[..b]),
            during: median(&it[b..d.max(b)]),
            after: median(&it[d.max(b)..]),
        },
        migration: outcome.migration,
        migration_error: outcome.migration_error,
        source_vf_restored: outcome.source_vf_restored,
        ranks: by_name,
        fault: outcome.fault,
        stalled: None,
        op_latency: BTreeMap::new(),
    }
}
