//! `vfmig bench migration`: the same guest migrated with and without the companion, side by
//! side in one run, alternating so that drift of the machine hits both alike. The generator is
//! off: this measures what the companion itself costs a migration (vhost-user set-up, log
//! syncs of its dirty log, the quiesce inside the downtime). Each run also records QEMU's
//! setup time and dirty-bitmap syncs, and the CPU time the two companions used during the
//! migration, so that a gap can be placed: set-up, precopy passes, downtime, or CPU taken
//! from QEMU on a small machine.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::demo::{free_port, start_vm_with, DemoError, DemoOptions};
use super::stats::median;
use crate::orchestrator::launch::{Nic, Role};
use crate::orchestrator::migrate::{migrate, MigrateOptions, Quiet};

/// One row of `vfmig bench strategies`.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyRow {
    /// `transparent`, `cooperative`, `passthrough-hotplug`, `unsafe-no-tracking`, or
    /// `plain-qemu` (the same guest with no companion and no RDMA).
    pub strategy: String,
    /// Migrations behind the row; its figures are their medians.
    pub runs: usize,
    /// QEMU's total migration time, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms.
    pub downtime_ms: u64,
    /// Longest gap in completed RDMA operations seen by a peer of the migrating VM, ms.
    pub blackout_ms: Option<f64>,
    /// Median iteration time of the migrating rank while it migrated, over its median in
    /// the same bench's run without migration.
    pub slowdown: Option<f64>,
    /// RAM bytes QEMU sent.
    pub bytes_sent: u64,
    /// Bytes QEMU sent again because the device wrote them: distinct pages the VF wrote
    /// during the migration × 4 KiB (each was sent at least once more because of it).
    pub bytes_resent: Option<u64>,
    /// Writes lost, as the job sees them: failed operations, plus one per rank whose result
    /// differs from the run without migration.
    pub lost_writes: u64,
    /// `passthrough-hotplug`: `device_del` until the guest released the VF, ms.
    pub detach_ms: Option<f64>,
    /// `passthrough-hotplug`: `device_add` until the guest's driver enabled the VF, ms.
    pub attach_ms: Option<f64>,
}

/// One migration of the bench.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRun {
    /// `with-companion` or `without-companion`.
    pub variant: &'static str,
    /// Run number (pairs share it).
    pub run: u32,
    /// QEMU's total time, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms.
    pub downtime_ms: u64,
    /// QEMU's setup time (before the first pass), ms.
    pub setup_ms: u64,
    /// QEMU's dirty-bitmap syncs (one per precopy pass, plus the last).
    pub dirty_syncs: u64,
    /// Bytes sent.
    pub transferred_bytes: u64,
    /// CPU time (user + system) the source's and destination's companions used during the
    /// migration, ms; `None` without a companion or where `/proc` could not tell.
    pub companion_cpu_ms: Option<f64>,
}

/// Medians of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct Medians {
    /// The variant.
    pub variant: &'static str,
    /// Runs.
    pub runs: usize,
    /// Median total time, ms.
    pub total_ms: f64,
    /// Median downtime, ms.
    pub downtime_ms: f64,
    /// Median setup time, ms.
    pub setup_ms: f64,
    /// Median dirty-bitmap syncs.
    pub dirty_syncs: f64,
    /// Median CPU time of the companions during the migration, ms (0 without them).
    pub companion_cpu_ms: f64,
    /// Median bytes sent.
    pub transferred_bytes: f64,
}

/// The bench's result.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationBench {
    /// Every migration, in the order run.
    pub runs: Vec<BenchRun>,
    /// Medians with the companion.
    pub with_companion: Medians,
    /// Medians without it.
    pub without_companion: Medians,
    /// Median total time with ÷ median total time without.
    pub total_time_ratio: f64,
    /// Median of the per-pair ratios (with ÷ without of the same run number).
    pub paired_ratio_median: f64,
}

fn one(opts: &DemoOptions, nic: Nic, run: u32) -> Result<BenchRun, DemoError> {
    let variant = match nic {
        Nic::VhostUser => "with-companion",
        Nic::Plain => "without-companion",
    };
    let mut o = opts.clone();
    o.run_dir = opts.run_dir.join(format!("{variant}-{run}"));
    let mut src = start_vm_with(&o, "source", Role::Source, nic)?;
    let dst = start_vm_with(&o, "destination", Role::Destination, nic)?;
    src.wait_guest_up(Duration::from_secs(120))?;
    let pid_files = ["source", "destination"].map(|vm| o.run_dir.join(vm).join("companion.pid"));
    let companions_cpu = || -> Option<f64> {
        match nic {
            Nic::VhostUser => pid_files.iter().map(|f| cpu_ms(f)).sum(),
            Nic::Plain => None,
        }
    };
    let cpu_before = companions_cpu();
    let s = migrate(
        &src.qmp()?,
        &dst.qmp()?,
        &MigrateOptions {
            uri: format!("tcp:127.0.0.1:{}", free_port()),
            keep_paused: true,
            max_bandwidth: opts.max_bandwidth,
            downtime_limit_ms: opts.downtime_limit_ms,
            timeout: opts.timeout,
            ..Default::default()
        },
        &mut Quiet,
    )?;
    let companion_cpu_ms = companions_cpu().zip(cpu_before).map(|(a, b)| a - b);
    tracing::info!(variant, run, total_ms = s.total_ms, "bench migration done");
    Ok(BenchRun {
        variant,
        run,
        total_ms: s.total_ms,
        downtime_ms: s.downtime_ms,
        setup_ms: s.setup_ms,
        dirty_syncs: s.dirty_sync_count,
        transferred_bytes: s.transferred_bytes,
        companion_cpu_ms,
    })
}

/// CPU time (user + system) so far of the process whose pid `pid_file` holds, ms.
fn cpu_ms(pid_file: &Path) -> Option<f64> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3; utime and
    // stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 * 1e3 / hz as f64)
}

fn medians(runs: &[BenchRun], variant: &'static str) -> Medians {
    let of = |f: fn(&BenchRun) -> f64| {
        median(
            runs.iter()
                .filter(|r| r.variant == variant)
                .map(f)
                .collect(),
        )
    };
    Medians {
        variant,
        runs: runs.iter().filter(|r| r.variant == variant).count(),
        total_ms: of(|r| r.total_ms as f64),
        downtime_ms: of(|r| r.downtime_ms as f64),
        setup_ms: of(|r| r.setup_ms as f64),
        dirty_syncs: of(|r| r.dirty_syncs as f64),
        companion_cpu_ms: of(|r| r.companion_cpu_ms.unwrap_or(0.0)),
        transferred_bytes: of(|r| r.transferred_bytes as f64),
    }
}

/// Runs `pairs` pairs of migrations, alternating which variant goes first.
pub fn migration(
    opts: &DemoOptions,
    pairs: u32,
    mut on_run: impl FnMut(&BenchRun),
) -> Result<MigrationBench, DemoError> {
    let mut runs = Vec::new();
    for run in 0..pairs {
        let order = if run % 2 == 0 {
            [Nic::VhostUser, Nic::Plain]
        } else {
            [Nic::Plain, Nic::VhostUser]
        };
        for nic in order {
            let r = one(opts, nic, run)?;
            on_run(&r);
            runs.push(r);
        }
    }
    let with = medians(&runs, "with-companion");
    let without = medians(&runs, "without-companion");
    let paired = (0..pairs)
        .filter_map(|run| {
            let t = |v: &str| {
                runs.iter()
                    .find(|r| r.run == run && r.variant == v)
                    .map(|r| r.total_ms as f64)
            };
            Some(t("with-companion")? / t("without-companion")?.max(1.0))
        })
        .collect();
    Ok(MigrationBench {
        total_time_ratio: with.total_ms / without.total_ms.max(1.0),
        paired_ratio_median: median(paired),
        with_companion: with,
        without_companion: without,
        runs,
    })
}

/// `vfmig bench strategies`: in one run, lu-lite on `opts.vms` VMs without migration (the
/// reference), then `rounds` rounds in which VM `a` is migrated once under each strategy (the
/// strategies interleaved, so that drift of the machine spreads over all of them), then the
/// plain-QEMU baseline. Each row holds the medians of its strategy's runs.
pub fn strategies(
    opts: &super::scenario::ScenarioOptions,
    plain: &DemoOptions,
    rounds: usize,
    mut progress: impl FnMut(&str),
) -> Result<Vec<StrategyRow>, super::scenario::ScenarioError> {
    use super::scenario::run;
    use crate::orchestrator::StrategyKind as Strategy;
    let mut reference_opts = opts.clone();
    reference_opts.strategy = None;
    reference_opts.trace = None;
    reference_opts.run_dir = opts.run_dir.join("reference");
    let reference = run(&reference_opts, &mut Quiet)?;
    let base_iter = median(
        reference
            .ranks
            .get("a")
            .map(|r| r.iteration_ms.clone())
            .unwrap_or_default(),
    );
    progress(&format!(
        "reference run: median iteration {base_iter:.2} ms, checksums {:?}",
        reference.checksums
    ));
    let strategies = [
        Strategy::Transparent,
        Strategy::Cooperative,
        Strategy::PassthroughHotplug,
        Strategy::UnsafeNoTracking,
    ];
    let mut runs: Vec<Vec<StrategyRow>> = vec![Vec::new(); strategies.len()];
    for round in 0..rounds.max(1) {
        for (i, strategy) in strategies.iter().enumerate() {
            let name = serde_json::to_value(strategy)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let mut o = opts.clone();
            o.strategy = Some(*strategy);
            o.run_dir = opts.run_dir.join(format!("{name}-{round}"));
            let r = run(&o, &mut Quiet)?;
            let m = r.migration.clone().unwrap_or_default();
            let differing = r
                .checksums
                .iter()
                .filter(|(k, v)| reference.checksums.get(*k) != Some(*v))
                .count() as u64;
            let row = StrategyRow {
                strategy: name,
                runs: 1,
                total_ms: m.total_ms,
                downtime_ms: m.downtime_ms,
                blackout_ms: Some(r.blackout_ms),
                slowdown: (base_iter > 0.0).then(|| r.iteration_ms.during / base_iter),
                bytes_sent: m.transferred_bytes,
                bytes_resent: r.device_dirty_pages.map(|p| p * 4096),
                lost_writes: r.lost_ops + differing,
                detach_ms: m.hotplug.as_ref().map(|h| h.detach_ms),
                attach_ms: m.hotplug.as_ref().map(|h| h.attach_ms),
            };
            progress(&format!("round {}: {}: {row:?}", round + 1, row.strategy));
            runs[i].push(row);
        }
    }
    let mut rows: Vec<StrategyRow> = runs.iter().map(|r| median_row(r)).collect();
    // The same guest with no companion and no RDMA, migrated the same way.
    let mut p = plain.clone();
    p.run_dir = opts.run_dir.join("plain-qemu");
    let b = one(&p, Nic::Plain, 0).map_err(super::scenario::ScenarioError::from)?;
    rows.push(StrategyRow {
        strategy: "plain-qemu".into(),
        runs: 1,
        total_ms: b.total_ms,
        downtime_ms: b.downtime_ms,
        blackout_ms: None,
        slowdown: None,
        bytes_sent: b.transferred_bytes,
        bytes_resent: None,
        lost_writes: 0,
        detach_ms: None,
        attach_ms: None,
    });
    Ok(rows)
}

/// One row from several runs of a strategy: the median of each figure, and the sum of the
/// lost writes (one lost write in any run counts).
fn median_row(runs: &[StrategyRow]) -> StrategyRow {
    let med = |f: &dyn Fn(&StrategyRow) -> f64| median(runs.iter().map(f).collect());
    let med_opt = |f: &dyn Fn(&StrategyRow) -> Option<f64>| {
        let xs: Vec<f64> = runs.iter().filter_map(f).collect();
        (!xs.is_empty()).then(|| median(xs))
    };
    StrategyRow {
        strategy: runs.first().map(|r| r.strategy.clone()).unwrap_or_default(),
        runs: runs.len(),
        total_ms: med(&|r| r.total_ms as f64).round() as u64,
        downtime_ms: med(&|r| r.downtime_ms as f64).round() as u64,
        blackout_ms: med_opt(&|r| r.blackout_ms),
        slowdown: med_opt(&|r| r.slowdown),
        bytes_sent: med(&|r| r.bytes_sent as f64).round() as u64,
        bytes_resent: med_opt(&|r| r.bytes_resent.map(|b| b as f64)).map(|b| b.round() as u64),
        lost_writes: runs.iter().map(|r| r.lost_writes).sum(),
        detach_ms: med_opt(&|r| r.detach_ms),
        attach_ms: med_opt(&|r| r.attach_ms),
    }
}

/// The ratio of two strategies' median blackouts (`num` over `den`), when both have one.
pub fn blackout_ratio(rows: &[StrategyRow], num: &str, den: &str) -> Option<f64> {
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.strategy == name)
            .and_then(|r| r.blackout_ms)
    };
    match (get(num), get(den)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The strategies as a markdown table.
pub fn strategies_markdown(rows: &[StrategyRow]) -> String {
    let opt = |v: Option<f64>, prec: usize| v.map_or("–".to_string(), |x| format!("{x:.prec$}"));
    let mut s = String::from(
        "| strategy | runs | total ms | downtime ms | blackout ms | lu-lite slowdown | MiB sent | MiB resent (device) | lost writes | VF detach ms | VF attach ms |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} |\n",
            r.strategy,
            r.runs,
            r.total_ms,
            r.downtime_ms,
            opt(r.blackout_ms, 1),
            opt(r.slowdown, 2),
            r.bytes_sent as f64 / (1 << 20) as f64,
            opt(r.bytes_resent.map(|b| b as f64 / (1 << 20) as f64), 1),
            r.lost_writes,
            opt(r.detach_ms, 1),
            opt(r.attach_ms, 1)
        );
    }
    s += "\nFigures are medians over the runs; lost writes are summed.\n";
    for (num, den) in [
        ("passthrough-hotplug", "transparent"),
        ("cooperative", "transparent"),
    ] {
        if let Some(x) = blackout_ratio(rows, num, den) {
            s += &format!("blackout {num} / {den}: {x:.1}x\n");
        }
    }
    s
}

/// The bench as a markdown table.
pub fn markdown(b: &MigrationBench) -> String {
    let mut s = String::from(
        "| variant | runs | median total ms | median setup ms | median downtime ms | median dirty syncs | median MiB sent | median companion CPU ms |\n|---|---|---|---|---|---|---|---|\n",
    );
    for m in [&b.with_companion, &b.without_companion] {
        s += &format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |\n",
            m.variant,
            m.runs,
            m.total_ms,
            m.setup_ms,
            m.downtime_ms,
            m.dirty_syncs,
            m.transferred_bytes / (1 << 20) as f64,
            m.companion_cpu_ms
        );
    }
    s += &format!(
        "\ntotal-time ratio with/without companion: {:.3} (median of paired ratios: {:.3})\n",
        b.total_time_ratio, b.paired_ratio_median
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(strategy: &str, blackout: f64, lost: u64) -> StrategyRow {
        StrategyRow {
            strategy: strategy.into(),
            runs: 1,
            total_ms: 100,
            downtime_ms: 5,
            blackout_ms: Some(blackout),
            slowdown: None,
            bytes_sent: 0,
            bytes_resent: None,
            lost_writes: lost,
            detach_ms: None,
            attach_ms: None,
        }
    }

    #[test]
    fn strategy_rows_take_medians_and_sum_lost_writes() {
        let m = median_row(&[
            row("transparent", 80.0, 0),
            row("transparent", 60.0, 1),
            row("transparent", 300.0, 2),
        ]);
        assert_eq!(m.runs, 3);
        assert_eq!(m.blackout_ms, Some(80.0));
        assert_eq!(m.lost_writes, 3);
        assert_eq!(m.detach_ms, None);
        let rows = [m, row("passthrough-hotplug", 800.0, 0)];
        assert_eq!(
            blackout_ratio(&rows, "passthrough-hotplug", "transparent"),
            Some(10.0)
        );
        assert!(strategies_markdown(&rows)
            .contains("blackout passthrough-hotplug / transparent: 10.0x"));
        assert_eq!(blackout_ratio(&rows, "cooperative", "transparent"), None);
    }
}
