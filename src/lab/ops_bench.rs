//! `vfmig bench ops`: what the companion adds to each operation's latency, measured inside
//! it (see `companion::op_latency`): TX, from the POST_SEND frame taken off the guest's TX
//! queue to its request handed to the fabric link; RX, from a peer's request read off the
//! fabric to the frame with its receive completion in the guest's RX used ring. Two VMs, no
//! migration, in one run: `rdma-lat` (64 B WRITE_WITH_IMM ping-pong, one operation in flight)
//! and `msg-ring` (the provider's message channel: SENDs of up to 64 KiB, several in flight).

use serde::Serialize;

use super::scenario::{self, ScenarioError, ScenarioOptions, Workload};
use crate::companion::op_latency::LatencySummary;
use crate::orchestrator::migrate::Quiet;

/// Why the bench has no figures.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A run could not be made.
    #[error("the {workload:?} run")]
    Run {
        /// Which.
        workload: Workload,
        /// Why.
        #[source]
        source: ScenarioError,
    },
    /// A rank of a run failed: its figures would not be those of a working job.
    #[error("{workload:?}: rank {rank} failed: {errors}; see the serial logs of the run")]
    RankFailed {
        /// Which run.
        workload: Workload,
        /// Which rank.
        rank: String,
        /// What it printed.
        errors: String,
    },
}

/// One companion's figures under one workload.
#[derive(Debug, Clone, Serialize)]
pub struct OpsRow {
    /// The workload.
    pub workload: Workload,
    /// The VM whose companion measured.
    pub vm: String,
    /// TX queue to the fabric.
    pub tx: LatencySummary,
    /// The fabric to the RX used ring.
    pub rx: LatencySummary,
}

/// Runs `rdma-lat` then `msg-ring` on two VMs of `base` (its workload, size and strategy are
/// set here), `iters` iterations each; `progress` hears of each run.
pub fn run(
    base: &ScenarioOptions,
    iters: u32,
    mut progress: impl FnMut(&str),
) -> Result<Vec<OpsRow>, OpsError> {
    let mut rows = Vec::new();
    for (workload, n) in [(Workload::RdmaLat, 64), (Workload::MsgRing, 16_384)] {
        let mut opts = base.clone();
        opts.workload = workload;
        opts.vms = 2;
        opts.strategy = None;
        opts.n = n;
        opts.iters = iters;
        opts.run_dir = base.run_dir.join(format!("{workload:?}").to_lowercase());
        progress(&format!("{workload:?}: {iters} iterations on 2 VMs"));
        let r = scenario::run(&opts, &mut Quiet)
            .map_err(|source| OpsError::Run { workload, source })?;
        if let Some((name, rank)) = r.ranks.iter().find(|(_, r)| !r.errors.is_empty()) {
            return Err(OpsError::RankFailed {
                workload,
                rank: name.clone(),
                errors: rank.errors.join("; "),
            });
        }
        rows.extend(r.op_latency.into_iter().map(|(vm, l)| OpsRow {
            workload,
            vm,
            tx: l.tx,
            rx: l.rx,
        }));
    }
    Ok(rows)
}

/// The rows as a markdown table.
pub fn markdown(rows: &[OpsRow]) -> String {
    let mut s = String::from(
        "| workload | VM | TX ops | TX median µs | TX p99 µs | RX ops | RX median µs | RX p99 µs |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {:?} | {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} |\n",
            r.workload,
            r.vm,
            r.tx.ops,
            r.tx.median_us,
            r.tx.p99_us,
            r.rx.ops,
            r.rx.median_us,
            r.rx.p99_us
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_companion_and_workload() {
        let l = |m| LatencySummary {
            ops: 10,
            median_us: m,
            p99_us: 2.0 * m,
            max_us: 3.0 * m,
        };
        let rows = vec![OpsRow {
            workload: Workload::RdmaLat,
            vm: "a".into(),
            tx: l(1.5),
            rx: l(4.0),
        }];
        let md = markdown(&rows);
        assert!(
            md.contains("| RdmaLat | a | 10 | 1.5 | 3.0 | 10 | 4.0 | 8.0 |"),
            "{md}"
        );
    }
}
