//! `vfmig bench drivers`: one lu-lite job with VM `a` migrated by each migration driver,
//! interleaved in one run, the same VMs' size and bandwidth each time: vfmig's orchestrator
//! (`vfmig migrate`), a plain QMP client (`migrate-incoming`, `migrate`, `cont`), and libvirt
//! (`virsh migrate --live --p2p`, `a` a libvirt domain). Every one moves the VF by the
//! companions' handoff. For each: QEMU's total time and downtime (libvirt's own figures for
//! libvirt: its job's elapsed time includes starting the destination), the peers' blackout, the
//! handoff inside the downtime (the source's export to the state's arrival) and the takeover
//! once the destination runs (claim, import, announce); lost and duplicated operations, and the
//! checksums against a run without migration.

use serde::Serialize;

use super::libvirt_job::{self, LibvirtJobError};
use super::scenario::{self, Driver, ScenarioOptions, ScenarioReport};
use super::stats::median;
use crate::orchestrator::migrate::Quiet;
use crate::orchestrator::StrategyKind;

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct DriverRun {
    /// `vfmig`, `qmp` or `libvirt`.
    pub driver: &'static str,
    /// Every rank's checksum equals the run without migration's.
    pub checksum_match: bool,
    /// Operations lost, as the ranks saw them.
    pub lost_ops: u64,
    /// Operations completed twice.
    pub duplicate_ops: u64,
    /// Total migration time, ms.
    pub total_ms: f64,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Longest gap in completions seen by a peer of `a`, ms.
    pub blackout_ms: f64,
    /// The handoff inside the downtime, ms.
    pub handoff_ms: f64,
    /// The takeover once the destination runs, ms.
    pub takeover_ms: f64,
}

/// A driver's medians over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct DriverRow {
    /// The driver.
    pub driver: &'static str,
    /// Rounds.
    pub runs: usize,
    /// Rounds whose checksums matched with nothing lost or duplicated.
    pub clean_runs: usize,
    /// Median total time, ms.
    pub total_ms: f64,
    /// Median downtime, ms.
    pub downtime_ms: f64,
    /// Median blackout, ms.
    pub blackout_ms: f64,
    /// Median handoff, ms.
    pub handoff_ms: f64,
    /// Median takeover, ms.
    pub takeover_ms: f64,
    /// Every run.
    pub each: Vec<DriverRun>,
}

/// Why the bench stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriversBenchError {
    /// A vfmig or plain-QMP run.
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    /// A libvirt run.
    #[error(transparent)]
    Libvirt(#[from] LibvirtJobError),
}

fn measured(driver: &'static str, r: &ScenarioReport, reference: &ScenarioReport) -> DriverRun {
    let m = r.migration.clone().unwrap_or_default();
    let t = m.vf_takeover.unwrap_or_default();
    DriverRun {
        driver,
        checksum_match: r.checksums == reference.checksums,
        lost_ops: r.lost_ops,
        duplicate_ops: r.duplicate_ops,
        total_ms: m.total_ms as f64,
        downtime_ms: m.downtime_ms as f64,
        blackout_ms: r.blackout_ms,
        handoff_ms: t.ms,
        takeover_ms: t.takeover_ms,
    }
}

/// Runs the job without migration, then `rounds` rounds of the three drivers under
/// `transparent`, at `opts.max_bandwidth` (libvirt: the same in MiB/s).
pub fn run(
    opts: &ScenarioOptions,
    rounds: usize,
    mut progress: impl FnMut(&str),
) -> Result<Vec<DriverRow>, DriversBenchError> {
    let mut reference_opts = opts.clone();
    reference_opts.strategy = None;
    reference_opts.run_dir = opts.run_dir.join("reference");
    let reference = scenario::run(&reference_opts, &mut Quiet)?;
    progress(&format!(
        "reference run: checksums {:?}",
        reference.checksums
    ));
    let bandwidth_mib_s = opts.max_bandwidth.unwrap_or(128 << 20) >> 20;
    let drivers: [&'static str; 3] = ["vfmig", "qmp", "libvirt"];
    let mut each: Vec<Vec<DriverRun>> = vec![Vec::new(); drivers.len()];
    for round in 0..rounds.max(1) {
        for (i, driver) in drivers.iter().enumerate() {
            let mut o = opts.clone();
            o.strategy = Some(StrategyKind::Transparent);
            o.run_dir = opts.run_dir.join(format!("{driver}-{round}"));
            let r = match *driver {
                "vfmig" => scenario::run(&o, &mut Quiet)?,
                "qmp" => {
                    o.driver = Driver::Qmp;
                    scenario::run(&o, &mut Quiet)?
                }
                _ => libvirt_job::run(&o, bandwidth_mib_s)?,
            };
            let run = measured(driver, &r, &reference);
            progress(&format!("round {}: {run:?}", round + 1));
            each[i].push(run);
        }
    }
    Ok(drivers
        .iter()
        .zip(each)
        .map(|(driver, runs)| {
            let m = |f: fn(&DriverRun) -> f64| median(runs.iter().map(f).collect());
            DriverRow {
                driver,
                runs: runs.len(),
                clean_runs: runs
                    .iter()
                    .filter(|r| r.checksum_match && r.lost_ops == 0 && r.duplicate_ops == 0)
                    .count(),
                total_ms: m(|r| r.total_ms),
                downtime_ms: m(|r| r.downtime_ms),
                blackout_ms: m(|r| r.blackout_ms),
                handoff_ms: m(|r| r.handoff_ms),
                takeover_ms: m(|r| r.takeover_ms),
                each: runs,
            }
        })
        .collect())
}

/// The rows as a markdown table, with each driver's blackout against `vfmig`'s.
pub fn markdown(rows: &[DriverRow]) -> String {
    let base = rows
        .iter()
        .find(|r| r.driver == "vfmig")
        .map(|r| r.blackout_ms);
    let mut out = String::from(
        "| driver | clean runs | total ms | downtime ms | blackout ms | blackout / vfmig | \
         handoff ms | takeover ms |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = match base {
            Some(b) if b > 0.0 => format!("{:.2}", r.blackout_ms / b),
            _ => "–".into(),
        };
        out.push_str(&format!(
            "| {} | {}/{} | {:.0} | {:.0} | {:.1} | {ratio} | {:.2} | {:.2} |\n",
            r.driver,
            r.clean_runs,
            r.runs,
            r.total_ms,
            r.downtime_ms,
            r.blackout_ms,
            r.handoff_ms,
            r.takeover_ms
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(driver: &'static str, blackout_ms: f64) -> DriverRow {
        DriverRow {
            driver,
            runs: 3,
            clean_runs: 3,
            total_ms: 700.0,
            downtime_ms: 40.0,
            blackout_ms,
            handoff_ms: 1.0,
            takeover_ms: 2.5,
            each: vec![],
        }
    }

    #[test]
    fn the_table_gives_each_drivers_blackout_against_vfmigs() {
        let md = markdown(&[row("vfmig", 100.0), row("libvirt", 150.0)]);
        assert!(
            md.contains("| vfmig | 3/3 | 700 | 40 | 100.0 | 1.00 | 1.00 | 2.50 |"),
            "{md}"
        );
        assert!(
            md.contains("| libvirt | 3/3 | 700 | 40 | 150.0 | 1.50 |"),
            "{md}"
        );
        let md = markdown(&[row("qmp", 10.0)]);
        assert!(md.contains("| qmp | 3/3 | 700 | 40 | 10.0 | – |"), "{md}");
    }
}
