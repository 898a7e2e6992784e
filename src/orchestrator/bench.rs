//! `vfmig bench migration`: the same guest migrated with and without the companion, side by
//! side in one run, alternating so that drift of the machine hits both alike. The generator is
//! off: this measures what the companion itself costs a migration (vhost-user set-up, log
//! syncs of its dirty log, the quiesce inside the downtime).

use std::time::Duration;

use serde::Serialize;

use super::demo::{free_port, start_vm_with, DemoError, DemoOptions};
use super::launch::{Nic, Role};
use super::migrate::{migrate, MigrateOptions, Quiet};

/// One row of `vfmig bench strategies`.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyRow {
    /// `transparent`, `cooperative`, `passthrough-hotplug`, `unsafe-no-tracking`, or
    /// `plain-qemu` (the same guest with no companion and no RDMA).
    pub strategy: String,
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
    /// Bytes sent.
    pub transferred_bytes: u64,
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

/// Median of `xs` (mean of the middle two for an even count); 0 when empty.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
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
    tracing::info!(variant, run, total_ms = s.total_ms, "bench migration done");
    Ok(BenchRun {
        variant,
        run,
        total_ms: s.total_ms,
        downtime_ms: s.downtime_ms,
        transferred_bytes: s.transferred_bytes,
    })
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
/// reference), then with VM `a` migrated under each strategy, then the plain-QEMU baseline.
pub fn strategies(
    opts: &super::scenario::ScenarioOptions,
    plain: &DemoOptions,
    mut progress: impl FnMut(&str),
) -> Result<Vec<StrategyRow>, super::scenario::ScenarioError> {
    use super::demo::Strategy;
    use super::scenario::run;
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
    let mut rows = Vec::new();
    for strategy in [
        Strategy::Transparent,
        Strategy::Cooperative,
        Strategy::PassthroughHotplug,
        Strategy::UnsafeNoTracking,
    ] {
        let mut o = opts.clone();
        o.strategy = Some(strategy);
        o.run_dir = opts.run_dir.join(format!("{strategy:?}").to_lowercase());
        let r = run(&o, &mut Quiet)?;
        let m = r.migration.clone().unwrap_or_default();
        let differing = r
            .checksums
            .iter()
            .filter(|(k, v)| reference.checksums.get(*k) != Some(*v))
            .count() as u64;
        let row = StrategyRow {
            strategy: serde_json::to_value(strategy)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
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
        progress(&format!("{}: {row:?}", row.strategy));
        rows.push(row);
    }
    // The same guest with no companion and no RDMA, migrated the same way.
    let mut p = plain.clone();
    p.run_dir = opts.run_dir.join("plain-qemu");
    let b = one(&p, Nic::Plain, 0).map_err(super::scenario::ScenarioError::from)?;
    rows.push(StrategyRow {
        strategy: "plain-qemu".into(),
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

/// The strategies as a markdown table.
pub fn strategies_markdown(rows: &[StrategyRow]) -> String {
    let opt = |v: Option<f64>, prec: usize| v.map_or("–".to_string(), |x| format!("{x:.prec$}"));
    let mut s = String::from(
        "| strategy | total ms | downtime ms | blackout ms | lu-lite slowdown | MiB sent | MiB resent (device) | lost writes | VF detach ms | VF attach ms |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} |\n",
            r.strategy,
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
    s
}

/// The bench as a markdown table.
pub fn markdown(b: &MigrationBench) -> String {
    let mut s = String::from(
        "| variant | runs | median total ms | median downtime ms | median MiB sent |\n|---|---|---|---|---|\n",
    );
    for m in [&b.with_companion, &b.without_companion] {
        s += &format!(
            "| {} | {} | {:.0} | {:.0} | {:.1} |\n",
            m.variant,
            m.runs,
            m.total_ms,
            m.downtime_ms,
            m.transferred_bytes / (1 << 20) as f64
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

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
