//! `vfmig bench converge`: a device that writes guest RAM faster than the migration link,
//! migrated with the device throttle off, with `auto`, and with QEMU's own `auto-converge`
//! alone (throttle off), interleaved in one run: whether each completes within the bound, its
//! total time and downtime, and how fast the device could write while precopy ran.
//!
//! [`run_once`] is also the end-to-end convergence test's run (`tests/e2e_converge.rs`).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::demo::{free_port, records_at_destination, start_vm, window, DemoError, DemoOptions};
use super::stats::median;
use crate::companion::converge::DeviceThrottle;
use crate::companion::generator::{compare, GeneratorConfig};
use crate::orchestrator::launch::Role;
use crate::orchestrator::migrate::{migrate, MigrateOptions, Quiet};
use crate::orchestrator::strategy::{StrategyInputs, StrategyKind};
use crate::orchestrator::summary::error_text;

/// How the migration is helped to converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// No help: the device throttle off, QEMU's defaults.
    ThrottleOff,
    /// The companion's device throttle, `auto`.
    ThrottleAuto,
    /// QEMU's `auto-converge` capability (it slows the vCPUs), the device throttle off.
    QemuAutoConverge,
}

impl Variant {
    /// Every variant, in the order a round runs them.
    pub const ALL: [Variant; 3] = [
        Variant::ThrottleOff,
        Variant::ThrottleAuto,
        Variant::QemuAutoConverge,
    ];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Variant::ThrottleOff => "throttle-off",
            Variant::ThrottleAuto => "throttle-auto",
            Variant::QemuAutoConverge => "qemu-auto-converge",
        }
    }

    fn throttle(self) -> DeviceThrottle {
        match self {
            Variant::ThrottleAuto => DeviceThrottle::Auto,
            Variant::ThrottleOff | Variant::QemuAutoConverge => DeviceThrottle::Off,
        }
    }
}

/// One migration of the bench.
#[derive(Debug, Clone, Serialize)]
pub struct ConvergeRun {
    /// How it was helped.
    pub variant: Variant,
    /// Round number.
    pub round: u32,
    /// Whether QEMU completed it within the bound (otherwise it was cancelled).
    pub completed: bool,
    /// QEMU's total time when completed, else how long it ran before the cancel, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms (completed only).
    pub downtime_ms: Option<u64>,
    /// Generator writes per second while the migration ran.
    pub precopy_writes_per_s: f64,
    /// Time the device's writers waited for the throttle in this migration, ms.
    pub throttle_delayed_ms: u64,
    /// Device writes lost at the destination (completed only).
    pub lost_writes: Option<u64>,
    /// Records the generator wrote (completed only).
    pub records_written: Option<u64>,
    /// Not completed: whether the source VM runs again after the cancel.
    pub source_running: Option<bool>,
    /// Not completed: why, as the orchestrator said.
    pub error: Option<String>,
}

/// Runs the generator on a fresh source (at `opts.rate` records a second) and migrates it
/// under `variant`, giving up after `opts.timeout`. Completed: the destination's records are
/// compared with the generator's ledger. Given up: the source's state is read after the
/// cancel.
pub fn run_once(
    opts: &DemoOptions,
    variant: Variant,
    round: u32,
) -> Result<ConvergeRun, DemoError> {
    let strategy = StrategyKind::Transparent.with(StrategyInputs::default())?;
    let opts = DemoOptions {
        run_dir: opts.run_dir.join(format!("{}-{round}", variant.name())),
        ..opts.clone()
    };
    let mut src = start_vm(&opts, "source", Role::Source)?;
    let dst = start_vm(&opts, "destination", Role::Destination)?;
    src.wait_guest_up(Duration::from_secs(120))?;
    let mut ctl = src.control()?;
    let window = window(opts.record_size);
    ctl.generator_start(GeneratorConfig {
        window,
        rate: opts.rate,
    })?;
    std::thread::sleep(opts.lead_time);
    let before = ctl.stats()?;
    let (src_qmp, dst_qmp) = (src.qmp()?, dst.qmp()?);
    let started = Instant::now();
    let result = migrate(
        &src_qmp,
        &dst_qmp,
        &MigrateOptions {
            uri: format!("tcp:127.0.0.1:{}", free_port()),
            max_bandwidth: opts.max_bandwidth,
            downtime_limit_ms: opts.downtime_limit_ms,
            timeout: opts.timeout,
            companions: Some((
                src.paths.control_socket.clone(),
                dst.paths.control_socket.clone(),
            )),
            strategy,
            device_throttle: variant.throttle(),
            auto_converge: variant == Variant::QemuAutoConverge,
            ..Default::default()
        },
        &mut Quiet,
    );
    let ran = started.elapsed();
    let after = ctl.stats()?;
    let writes = |s: &crate::companion::control::StatsReply| {
        s.generator.as_ref().map_or(0, |g| g.writes) as f64
    };
    let mut run = ConvergeRun {
        variant,
        round,
        completed: result.is_ok(),
        total_ms: ran.as_millis() as u64,
        downtime_ms: None,
        precopy_writes_per_s: 0.0,
        throttle_delayed_ms: after.throttle.delayed_ms - before.throttle.delayed_ms,
        lost_writes: None,
        records_written: None,
        source_running: None,
        error: None,
    };
    let wrote = writes(&after) - writes(&before);
    ctl.generator_stop()?;
    match result {
        Ok(summary) => {
            run.total_ms = summary.total_ms;
            run.downtime_ms = Some(summary.downtime_ms);
            // The source's device is quiesced from the switchover on: its writes are precopy's.
            run.precopy_writes_per_s = wrote / (summary.total_ms.max(1) as f64 / 1e3);
            let versions = ctl.ledger()?.versions;
            let verdict = compare(&versions, &records_at_destination(dst, &window)?);
            run.lost_writes = Some(verdict.lost_writes);
            run.records_written = Some(verdict.records_written);
        }
        Err(e) => {
            run.precopy_writes_per_s = wrote / ran.as_secs_f64();
            run.error = Some(error_text(&e));
            run.source_running = Some(src_qmp.query_status().is_ok_and(|s| s.running));
        }
    }
    Ok(run)
}

/// The bench's and the test's settings on top of `base` (guest, image, binaries, bandwidth):
/// the generator at `rate` records a second, one per page of the 16 MiB window, 256 bytes
/// each, for 1 s before the migration; the destination runs after it (its records are read
/// through its companion); give up after `bound_secs`.
pub fn options(
    base: DemoOptions,
    rate: u64,
    downtime_limit_ms: u64,
    bound_secs: u64,
) -> DemoOptions {
    DemoOptions {
        rate,
        record_size: 256,
        keep_paused: false,
        lead_time: Duration::from_secs(1),
        downtime_limit_ms: Some(downtime_limit_ms),
        timeout: Duration::from_secs(bound_secs),
        ..base
    }
}

/// Medians of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct ConvergeRow {
    /// The variant.
    pub variant: Variant,
    /// Migrations run.
    pub runs: usize,
    /// Of which completed within the bound.
    pub completed: usize,
    /// Median total time of the completed ones, ms.
    pub total_ms: Option<f64>,
    /// Median downtime of the completed ones, ms.
    pub downtime_ms: Option<f64>,
    /// Median generator writes per second during the migration.
    pub precopy_writes_per_s: f64,
    /// Median time writers waited for the throttle, ms.
    pub throttle_delayed_ms: f64,
    /// Device writes lost, summed over the completed ones (none completed: `None`).
    pub lost_writes: Option<u64>,
}

/// The bench's result.
#[derive(Debug, Clone, Serialize)]
pub struct ConvergeBench {
    /// Generator records a second asked for.
    pub rate: u64,
    /// QEMU `max-bandwidth`, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// The bound, s.
    pub timeout_s: u64,
    /// Every migration, in the order run.
    pub runs: Vec<ConvergeRun>,
    /// One row per variant.
    pub rows: Vec<ConvergeRow>,
}

/// `rounds` rounds, each migrating once under every variant; `progress` sees each run.
pub fn bench(
    opts: &DemoOptions,
    rounds: u32,
    mut progress: impl FnMut(&ConvergeRun),
) -> Result<ConvergeBench, DemoError> {
    let mut runs = Vec::new();
    for round in 1..=rounds.max(1) {
        for variant in Variant::ALL {
            let run = run_once(opts, variant, round)?;
            progress(&run);
            runs.push(run);
        }
    }
    Ok(ConvergeBench {
        rate: opts.rate,
        max_bandwidth: opts.max_bandwidth,
        timeout_s: opts.timeout.as_secs(),
        rows: Variant::ALL.iter().map(|v| row(&runs, *v)).collect(),
        runs,
    })
}

fn row(runs: &[ConvergeRun], variant: Variant) -> ConvergeRow {
    let mine: Vec<&ConvergeRun> = runs.iter().filter(|r| r.variant == variant).collect();
    let done: Vec<&&ConvergeRun> = mine.iter().filter(|r| r.completed).collect();
    let of_done = |f: &dyn Fn(&ConvergeRun) -> f64| {
        (!done.is_empty()).then(|| median(done.iter().map(|r| f(r)).collect()))
    };
    ConvergeRow {
        variant,
        runs: mine.len(),
        completed: done.len(),
        total_ms: of_done(&|r| r.total_ms as f64),
        downtime_ms: of_done(&|r| r.downtime_ms.unwrap_or(0) as f64),
        precopy_writes_per_s: median(mine.iter().map(|r| r.precopy_writes_per_s).collect()),
        throttle_delayed_ms: median(mine.iter().map(|r| r.throttle_delayed_ms as f64).collect()),
        lost_writes: (!done.is_empty()).then(|| done.iter().filter_map(|r| r.lost_writes).sum()),
    }
}

/// The rows as a markdown table.
pub fn markdown(b: &ConvergeBench) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let mut out = format!(
        "generator {} records/s, max-bandwidth {}, bound {} s\n\n\
         | variant | completed | total ms | downtime ms | device writes/s in precopy | throttle wait ms | lost writes |\n\
         |---|---|---|---|---|---|---|\n",
        b.rate,
        b.max_bandwidth
            .map_or("QEMU's default".into(), |bw| format!("{bw} B/s")),
        b.timeout_s
    );
    for r in &b.rows {
        out.push_str(&format!(
            "| {} | {}/{} | {} | {} | {:.0} | {:.0} | {} |\n",
            r.variant.name(),
            r.completed,
            r.runs,
            opt(r.total_ms),
            opt(r.downtime_ms),
            r.precopy_writes_per_s,
            r.throttle_delayed_ms,
            r.lost_writes.map_or("-".into(), |n| n.to_string())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(variant: Variant, completed: bool, total_ms: u64, wps: f64) -> ConvergeRun {
        ConvergeRun {
            variant,
            round: 1,
            completed,
            total_ms,
            downtime_ms: completed.then_some(20),
            precopy_writes_per_s: wps,
            throttle_delayed_ms: 0,
            lost_writes: completed.then_some(0),
            records_written: completed.then_some(10),
            source_running: (!completed).then_some(true),
            error: None,
        }
    }

    #[test]
    fn rows_take_medians_of_completed_runs_only_for_times() {
        let runs = vec![
            run(Variant::ThrottleOff, false, 30_000, 4000.0),
            run(Variant::ThrottleAuto, true, 12_000, 1500.0),
            run(Variant::ThrottleAuto, true, 14_000, 1700.0),
            run(Variant::ThrottleAuto, false, 30_000, 900.0),
        ];
        let off = row(&runs, Variant::ThrottleOff);
        assert_eq!((off.runs, off.completed, off.total_ms), (1, 0, None));
        let auto = row(&runs, Variant::ThrottleAuto);
        assert_eq!((auto.runs, auto.completed), (3, 2));
        assert_eq!(auto.total_ms, Some(13_000.0));
        assert_eq!(auto.precopy_writes_per_s, 1500.0);
        let b = ConvergeBench {
            rate: 4000,
            max_bandwidth: Some(8_000_000),
            timeout_s: 30,
            rows: vec![off, auto],
            runs,
        };
        let md = markdown(&b);
        assert!(
            md.contains("| throttle-off | 0/1 | - | - | 4000 | 0 | - |"),
            "{md}"
        );
        assert!(
            md.contains("| throttle-auto | 2/3 | 13000 | 20 | 1500 | 0 | 0 |"),
            "{md}"
        );
    }
}
