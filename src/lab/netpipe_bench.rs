//! `vfmig bench netpipe`: Debian's NetPIPE (`NPopenmpi`) between two MPI-image VMs, over
//! vfmig's libfabric provider on the soft VFs and over Open MPI's own `tcp;ofi_rxm` on the
//! guests' IP segment, alternating, in one run; no migration. Per provider: the median over
//! the rounds of the latency of the smallest message and of the throughput at the largest.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::mpi::{self, MpiError, MpiRunOptions, NetpipePoint, TCP_PROVIDER, VFMIG_PROVIDER};
use super::stats::median;

/// One provider's figures.
#[derive(Debug, Clone, Serialize)]
pub struct NetpipeRow {
    /// The libfabric provider.
    pub provider: String,
    /// Rounds measured.
    pub rounds: usize,
    /// Median half round trip of the smallest message, µs.
    pub latency_us: f64,
    /// Its size, bytes.
    pub latency_bytes: u64,
    /// Median throughput at the largest message, Mbit/s.
    pub bandwidth_mbps: f64,
    /// Its size, bytes.
    pub bandwidth_bytes: u64,
    /// The last round's points.
    pub points: Vec<NetpipePoint>,
}

/// Why the bench has no figures.
#[derive(Debug, thiserror::Error)]
pub enum NetpipeBenchError {
    /// An MPI run failed.
    #[error("the NetPIPE run on {provider}")]
    Run {
        /// The provider.
        provider: String,
        /// Why.
        #[source]
        source: Box<MpiError>,
    },
    /// NetPIPE printed nothing to measure.
    #[error("NetPIPE on {provider} printed no result (exit {exit:?}):\n{output}")]
    NoPoints {
        /// The provider.
        provider: String,
        /// mpirun's exit status.
        exit: Option<i32>,
        /// What it printed.
        output: String,
    },
}

/// Settings of the bench.
#[derive(Debug, Clone)]
pub struct NetpipeBenchOptions {
    /// Rounds per provider (alternating).
    pub rounds: usize,
    /// NetPIPE's largest message, bytes.
    pub max_bytes: u64,
    /// Guest RAM per VM, MiB.
    pub mem_mib: u64,
    /// Run directory.
    pub run_dir: PathBuf,
    /// The `vfmig` binary.
    pub vfmig_bin: PathBuf,
}

/// Runs the bench; `progress` hears of each run.
pub fn run(
    opts: &NetpipeBenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<Vec<NetpipeRow>, NetpipeBenchError> {
    let providers = [VFMIG_PROVIDER, TCP_PROVIDER];
    let mut points: Vec<Vec<Vec<NetpipePoint>>> = vec![Vec::new(); providers.len()];
    for round in 0..opts.rounds.max(1) {
        for (i, provider) in providers.iter().enumerate() {
            progress(&format!("round {}: NetPIPE over {provider}", round + 1));
            let failed = |source| NetpipeBenchError::Run {
                provider: provider.to_string(),
                source: Box::new(source),
            };
            let r = mpi::run(&MpiRunOptions {
                vms: 2,
                mem_mib: opts.mem_mib,
                run_dir: opts.run_dir.join(format!("{round}-{i}")),
                accel: "tcg".into(),
                image: mpi::mpi_image().map_err(failed)?,
                vfmig_bin: opts.vfmig_bin.clone(),
                hpcc: None,
                netpipe_max_bytes: Some(opts.max_bytes),
                ring: None,
                handoff: true,
                tracking: true,
                provider: provider.to_string(),
                migrate_after: None,
                migrate_from: None,
                precopy_at_least: None,
                timeout: Duration::from_secs(600),
            })
            .map_err(failed)?;
            if r.netpipe.is_empty() {
                let job = r.netpipe_job.unwrap_or_default();
                return Err(NetpipeBenchError::NoPoints {
                    provider: provider.to_string(),
                    exit: job.exit,
                    output: job.output,
                });
            }
            points[i].push(r.netpipe);
        }
    }
    Ok(providers
        .iter()
        .zip(points)
        .map(|(provider, rounds)| row(provider, rounds))
        .collect())
}

fn row(provider: &str, rounds: Vec<Vec<NetpipePoint>>) -> NetpipeRow {
    let first = |r: &Vec<NetpipePoint>| r.first().cloned();
    let last = |r: &Vec<NetpipePoint>| r.last().cloned();
    let small: Vec<NetpipePoint> = rounds.iter().filter_map(first).collect();
    let large: Vec<NetpipePoint> = rounds.iter().filter_map(last).collect();
    NetpipeRow {
        provider: provider.to_string(),
        rounds: rounds.len(),
        latency_us: median(small.iter().map(|p| p.usec).collect()),
        latency_bytes: small.first().map_or(0, |p| p.bytes),
        bandwidth_mbps: median(large.iter().map(|p| p.mbps).collect()),
        bandwidth_bytes: large.first().map_or(0, |p| p.bytes),
        points: rounds.last().cloned().unwrap_or_default(),
    }
}

/// The rows as a markdown table, with each figure's ratio to the first row's.
pub fn markdown(rows: &[NetpipeRow]) -> String {
    let mut s = String::from(
        "| provider | rounds | latency µs (size) | × first | bandwidth Mbit/s (size) | × first |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let base = rows.first();
    for r in rows {
        let ratio = |x: f64, b: Option<f64>| match b {
            Some(b) if b > 0.0 => format!("{:.2}", x / b),
            _ => "–".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {:.1} ({} B) | {} | {:.1} ({} B) | {} |\n",
            r.provider,
            r.rounds,
            r.latency_us,
            r.latency_bytes,
            ratio(r.latency_us, base.map(|b| b.latency_us)),
            r.bandwidth_mbps,
            r.bandwidth_bytes,
            ratio(r.bandwidth_mbps, base.map(|b| b.bandwidth_mbps)),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(bytes: u64, mbps: f64, usec: f64) -> NetpipePoint {
        NetpipePoint { bytes, mbps, usec }
    }

    #[test]
    fn a_row_takes_the_medians_of_the_smallest_and_largest_messages() {
        let rounds = vec![
            vec![p(1, 0.0, 100.0), p(65536, 200.0, 2000.0)],
            vec![p(1, 0.0, 300.0), p(65536, 100.0, 4000.0)],
            vec![p(1, 0.0, 200.0), p(65536, 300.0, 1500.0)],
        ];
        let r = row("vfmig", rounds);
        assert_eq!((r.latency_us, r.latency_bytes), (200.0, 1));
        assert_eq!((r.bandwidth_mbps, r.bandwidth_bytes), (200.0, 65536));
        let md = markdown(&[
            r.clone(),
            NetpipeRow {
                latency_us: 400.0,
                ..r
            },
        ]);
        assert!(md.contains("| 400.0 (1 B) | 2.00 |"), "{md}");
    }
}
