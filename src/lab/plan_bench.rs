//! `vfmig bench plan`: 1, 2, 4… VMs migrated at once (`vfmig migrate --plan`) against what
//! their bytes and the bandwidth allow.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::demo::{free_port, start_vm_with, DemoError, DemoOptions};
use crate::orchestrator::launch::{Nic, Role};
use crate::orchestrator::migrate::{MigrateOptions, MigrationSummary};
use crate::orchestrator::plan::{migrate_all, MigrationPlan, PlannedMigration};

/// One row of `vfmig bench plan`.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    /// VMs migrated at once.
    pub vms: usize,
    /// Wall time until the last one completed, ms.
    pub wall_ms: u64,
    /// The longest of QEMU's total times, ms.
    pub max_total_ms: u64,
    /// Bytes sent by all of them.
    pub bytes_sent: u64,
    /// What the bandwidth allows: each stream is capped at `max-bandwidth`, so the largest
    /// transfer ÷ that cap, ms.
    pub bound_ms: f64,
    /// Wall time over that bound.
    pub ratio: f64,
    /// Migrations that failed.
    pub failed: usize,
}

/// Starts `n` source/destination pairs with companions, migrates them at once, and reports.
pub fn bench_row(opts: &DemoOptions, n: usize) -> Result<PlanRow, DemoError> {
    let mut pairs = Vec::new();
    for i in 0..n {
        let mut o = opts.clone();
        o.run_dir = opts.run_dir.join(format!("{n}-vms/vm{i}"));
        let src = start_vm_with(&o, "source", Role::Source, Nic::VhostUser)?;
        let dst = start_vm_with(&o, "destination", Role::Destination, Nic::VhostUser)?;
        pairs.push((src, dst));
    }
    for (src, _) in pairs.iter_mut() {
        src.wait_guest_up(Duration::from_secs(180))?;
    }
    let plan = MigrationPlan {
        migrations: pairs
            .iter()
            .enumerate()
            .map(|(i, (s, d))| PlannedMigration {
                name: format!("vm{i}"),
                src_qmp: s.paths.qmp_socket.clone(),
                dst_qmp: d.paths.qmp_socket.clone(),
                uri: format!("tcp:127.0.0.1:{}", free_port()),
                src_control: Some(s.paths.control_socket.clone()),
                dst_control: Some(d.paths.control_socket.clone()),
            })
            .collect(),
    };
    let common = MigrateOptions {
        uri: String::new(),
        keep_paused: true,
        max_bandwidth: opts.max_bandwidth,
        downtime_limit_ms: opts.downtime_limit_ms,
        timeout: opts.timeout,
        ..Default::default()
    };
    let start = Instant::now();
    let outcomes = migrate_all(&plan, &common);
    let wall_ms = start.elapsed().as_millis() as u64;
    let done: Vec<&MigrationSummary> = outcomes.iter().filter_map(|o| o.summary.as_ref()).collect();
    let largest = done.iter().map(|s| s.transferred_bytes).max().unwrap_or(0);
    let bound_ms = opts
        .max_bandwidth
        .map_or(0.0, |bw| largest as f64 / bw as f64 * 1e3);
    Ok(PlanRow {
        vms: n,
        wall_ms,
        max_total_ms: done.iter().map(|s| s.total_ms).max().unwrap_or(0),
        bytes_sent: done.iter().map(|s| s.transferred_bytes).sum(),
        bound_ms,
        ratio: if bound_ms > 0.0 {
            wall_ms as f64 / bound_ms
        } else {
            0.0
        },
        failed: outcomes.len() - done.len(),
    })
}

/// The plan bench as a markdown table.
pub fn markdown(rows: &[PlanRow]) -> String {
    let mut s = String::from(
        "| VMs at once | wall ms | longest QEMU total ms | MiB sent | bound ms (largest ÷ max-bandwidth) | wall ÷ bound | failed |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.0} | {:.2} | {} |\n",
            r.vms,
            r.wall_ms,
            r.max_total_ms,
            r.bytes_sent as f64 / (1 << 20) as f64,
            r.bound_ms,
            r.ratio,
            r.failed
        );
    }
    s
}
