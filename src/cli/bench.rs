//! `vfmig bench …`: whole migrations compared side by side in one run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use vfmig::lab::demo::DemoOptions;
use vfmig::lab::scenario::{ScenarioOptions, Workload};
use vfmig::lab::{bench, fabric_bench, plan_bench};

use super::{image, init_logging, run_dir_or_temp, vfmig_bin};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// The same guest (generator off) migrated with and without the companion, alternating;
    /// prints a markdown table, then one JSON line with every run, the medians and the ratio.
    Migration {
        /// Pairs of migrations (one with, one without the companion each).
        #[arg(long, default_value_t = 5)]
        pairs: u32,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        mem_mib: u64,
        /// QEMU `max-bandwidth`, bytes/s (QEMU's default is 128 MiB/s).
        #[arg(long, default_value_t = 128 << 20)]
        max_bandwidth: u64,
        /// Where to put the run directories (default: a fresh temporary directory).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// QEMU accelerator.
        #[arg(long, default_value = "tcg")]
        accel: String,
    },
    /// In one run: lu-lite on VMs without migration, then with VM `a` migrated under each
    /// strategy (transparent, cooperative, passthrough-hotplug with an emulated PCIe NIC
    /// standing in for the VF, unsafe-no-tracking), then the same guest with no
    /// companion and no RDMA migrated alone; prints a markdown table, then one JSON line
    /// `{"rows":[…]}`.
    Strategies {
        /// VMs of the job.
        #[arg(long, default_value_t = 3)]
        vms: usize,
        /// Guest RAM per VM in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        /// lu-lite grid size.
        #[arg(long, default_value_t = 256)]
        n: u32,
        /// lu-lite iterations.
        #[arg(long, default_value_t = 1000)]
        iters: u32,
        /// Migrate once rank `a` has done this many iterations.
        #[arg(long, default_value_t = 200)]
        migrate_at: u32,
        /// QEMU `max-bandwidth`, bytes/s.
        #[arg(long, default_value_t = 128 << 20)]
        max_bandwidth: u64,
        /// Rounds: each migrates `a` once under every strategy, interleaved; rows are medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Where to put the run directories (default: a fresh temporary directory).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Several VMs (with companions) migrated at once, for each count given: wall time
    /// against what the bytes and `max-bandwidth` allow; markdown table, then JSON.
    Plan {
        /// VM counts to measure.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2, 4])]
        vms: Vec<usize>,
        /// Guest RAM per VM in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        /// QEMU `max-bandwidth` of each migration, bytes/s.
        #[arg(long, default_value_t = 64 << 20)]
        max_bandwidth: u64,
        /// Where to put the run directories (default: a fresh temporary directory).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Soft-VF RDMA WRITE bandwidth (64 B to 1 MiB) and 64 B latency between two soft VFs
    /// over loopback TCP, beside memcpy and a plain loopback TCP socket pair measured in the
    /// same run; prints a markdown table, then one JSON line.
    Fabric {
        /// Rounds per figure; the median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

/// Runs the bench and prints its markdown table, then its JSON line.
pub fn run(cmd: BenchCommand) -> Result<()> {
    init_logging("vfmig=warn");
    match cmd {
        BenchCommand::Migration {
            pairs,
            mem_mib,
            max_bandwidth,
            run_dir,
            accel,
        } => migration(pairs, idle_demo(mem_mib, max_bandwidth, run_dir, accel)?),
        BenchCommand::Strategies {
            vms,
            mem_mib,
            n,
            iters,
            migrate_at,
            max_bandwidth,
            rounds,
            run_dir,
        } => {
            let plain = idle_demo(mem_mib, max_bandwidth, run_dir, "tcg".into())?;
            let opts = ScenarioOptions {
                workload: Workload::LuLite,
                vms: vms.max(2),
                strategy: None,
                mem_mib,
                n,
                iters,
                migrate_at,
                max_bandwidth: Some(max_bandwidth),
                run_dir: plain.run_dir.clone(),
                accel: "tcg".into(),
                image: plain.image.clone(),
                vfmig_bin: plain.vfmig_bin.clone(),
                timeout: Duration::from_secs(900),
                fault: None,
                trace: None,
            };
            let rows = bench::strategies(&opts, &plain, rounds, |l| eprintln!("bench: {l}"))?;
            println!("{}", bench::strategies_markdown(&rows));
            println!("{}", serde_json::json!({ "rows": rows }));
            Ok(())
        }
        BenchCommand::Plan {
            vms,
            mem_mib,
            max_bandwidth,
            run_dir,
        } => plan(
            &vms,
            idle_demo(mem_mib, max_bandwidth, run_dir, "tcg".into())?,
        ),
        BenchCommand::Fabric { rounds } => {
            let result = fabric_bench::run(rounds.max(1), |line| eprintln!("bench: {line}"))?;
            println!("{}", fabric_bench::markdown(&result));
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
    }
}

/// The demo's VMs with nothing running on them (no generator, no lead time), the destination
/// left paused: what the benches migrate.
fn idle_demo(
    mem_mib: u64,
    max_bandwidth: u64,
    run_dir: Option<PathBuf>,
    accel: String,
) -> Result<DemoOptions> {
    let mut opts =
        DemoOptions::new(run_dir_or_temp(run_dir)?, image(None, None)?, vfmig_bin()?).idle();
    opts.mem_mib = mem_mib;
    opts.max_bandwidth = Some(max_bandwidth);
    opts.accel = accel;
    Ok(opts)
}

/// `bench migration`: pairs of migrations with and without the companion.
fn migration(pairs: u32, opts: DemoOptions) -> Result<()> {
    let total = pairs * 2;
    let mut done = 0;
    let result = bench::migration(&opts, pairs, |r| {
        done += 1;
        eprintln!(
            "bench: {done}/{total} {} run {}: total {} ms, downtime {} ms",
            r.variant, r.run, r.total_ms, r.downtime_ms
        );
    })?;
    println!("{}", bench::markdown(&result));
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// `bench plan`: `n` VMs migrated at once, for each `n` of `vms`.
fn plan(vms: &[usize], opts: DemoOptions) -> Result<()> {
    let mut rows = Vec::new();
    for &n in vms {
        let row = plan_bench::bench_row(&opts, n.max(1))?;
        eprintln!("bench: {row:?}");
        rows.push(row);
    }
    println!("{}", plan_bench::markdown(&rows));
    println!("{}", serde_json::json!({ "rows": rows }));
    Ok(())
}
