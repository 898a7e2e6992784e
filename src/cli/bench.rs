//! `vfmig bench …`: whole migrations compared side by side in one run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

use vfmig::lab::demo::DemoOptions;
use vfmig::lab::faults::{self, FaultPhase, MatrixOptions};
use vfmig::lab::scenario::{Fault, ScenarioOptions, Workload};
use vfmig::lab::soak::{self, SoakOptions};
use vfmig::lab::{
    bench, converge_bench, drivers_bench, fabric_bench, netpipe_bench, ops_bench, plan_bench,
};
use vfmig::orchestrator::migrate::{with_progress, Observer};

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
    /// Device auto-converge: the generator writing guest RAM faster than a low
    /// `max-bandwidth` lets precopy send it, migrated with the device throttle `off`, with
    /// `auto`, and with QEMU's own `auto-converge` capability alone (throttle off), one of
    /// each per round; each is cancelled if it has not completed within the bound. Prints a
    /// markdown table (completed, total time, downtime, device writes/s during precopy), then
    /// one JSON line with every run and the rows.
    Converge {
        /// Rounds (each runs the three variants once).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Guest RAM in MiB (at least 512: the generator's window is reserved at 384 MiB).
        #[arg(long, default_value_t = 512)]
        mem_mib: u64,
        /// Generator records per second, one per 4 KiB page (each dirties a page).
        #[arg(long, default_value_t = 4000)]
        rate: u64,
        /// QEMU `max-bandwidth`, bytes/s (low, so that the generator outruns it).
        #[arg(long, default_value_t = 8_000_000)]
        max_bandwidth: u64,
        /// QEMU `downtime-limit`, ms.
        #[arg(long, default_value_t = 300)]
        downtime_limit: u64,
        /// Cancel a migration that has not completed after this many seconds.
        #[arg(long, default_value_t = 45)]
        bound_secs: u64,
        /// Where to put the run directories (default: a fresh temporary directory).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Soft-VF RDMA WRITE bandwidth (64 B to 1 MiB) and 64 B latency between two soft VFs
    /// over loopback TCP, beside memcpy, a plain loopback TCP socket pair, and the same pair in
    /// the soft VF's shape (every message acked, acks and messages handed between threads)
    /// measured in the same run; prints a markdown table, then one JSON line.
    Fabric {
        /// Rounds per figure; the median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Message sizes to measure, bytes, comma-separated (default: 64 B to 1 MiB by 4).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u64>,
        /// Measure only the authenticated soft VF, nothing beside it, so that a profiler
        /// (`perf record`) sees it alone; the other figures are reported as 0.
        #[arg(long)]
        soft_vf_only: bool,
    },
    /// The fault matrix: lu-lite on VMs with VM `a` migrated, one fault injected per run at
    /// a phase of the migration (precopy start, mid-precopy, switchover, takeover, after
    /// `cont`): the destination's QEMU or companion killed, peer `b`'s companion restarted,
    /// the fabric link cut, a cancel. Each cell must end with the checksum of a run without
    /// faults, or with an error that names what failed; prints a markdown table, then one
    /// JSON line. Exits non-zero when a cell breaks that rule (lost or stalled silently) or
    /// proves nothing (its phase never came).
    Faults {
        /// Phases to inject at (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        phases: Vec<FaultPhase>,
        /// Fault kinds (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        faults: Vec<FaultKind>,
        /// How long a cut link stays down, ms.
        #[arg(long, default_value_t = 3000)]
        link_down_ms: u64,
        /// A job that prints nothing for this long after its fault is stalled, s (longer than
        /// the fabric's retry limit, so that a peer that gives up can say so).
        #[arg(long, default_value_t = 150)]
        stall_secs: u64,
        #[command(flatten)]
        job: JobArgs,
    },
    /// One lu-lite job with VM `a` migrated by each driver, interleaved, `--rounds` times:
    /// vfmig's orchestrator, a plain QMP client (no vfmig command) and libvirt (`virsh
    /// migrate --live --p2p`, `a` a libvirt domain); the companions hand the VF over in all
    /// three. lu-lite runs at least 2000 iterations so that the job outlives libvirt's
    /// migration. Prints a markdown table (medians of total time, downtime, blackout, the
    /// handoff inside the downtime and the takeover after it; blackout against vfmig's), then
    /// one JSON line `{"rows":[…]}`.
    Drivers {
        /// Rounds of the three drivers.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[command(flatten)]
        job: JobArgs,
    },
    /// What the companion adds to each operation's latency, measured inside it: TX, from a
    /// POST_SEND taken off the guest's TX queue to its request on the fabric; RX, from a
    /// peer's request read off the fabric to its receive completion in the guest's RX used
    /// ring. Two VMs, no migration: rdma-lat (64 B ping-pong), then msg-ring (the libfabric
    /// provider's message channel). Prints a markdown table (median and p99 per companion),
    /// then one JSON line `{"rows":[…]}`. Each workload runs `--iters` iterations, at least
    /// 2000.
    Ops {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Debian's NetPIPE (`NPopenmpi`) between two MPI-image VMs over vfmig's libfabric
    /// provider on the soft VFs and over Open MPI's own `tcp;ofi_rxm` on the guests' IP
    /// segment, alternating, no migration: the median latency of the smallest message and
    /// throughput at the largest, with their ratios to vfmig's. Prints a markdown table, then
    /// one JSON line `{"rows":[…]}`.
    Netpipe {
        /// Rounds per provider.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// NetPIPE's largest message, bytes.
        #[arg(long, default_value_t = 1 << 20)]
        max_bytes: u64,
        /// Guest RAM per VM in MiB.
        #[arg(long, default_value_t = 512)]
        mem_mib: u64,
        /// Where to put the run directories (default: a fresh temporary directory).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// VM `a` migrated back and forth between two test hosts N times under lu-lite, each time
    /// into a fresh QEMU and companion (the old source quit); then the job's checksum against
    /// a run without migration. Prints one JSON line (migrations done, lost and duplicated
    /// ops, checksum match, medians); exits non-zero unless every migration completed under
    /// load with the same checksum and nothing lost or duplicated.
    Soak {
        /// Migrations of `a`.
        #[arg(long, default_value_t = 10)]
        migrations: u32,
        /// lu-lite iterations per migration (the job runs `migrate-at` + this × migrations).
        #[arg(long, default_value_t = 400)]
        iters_per_migration: u32,
        /// How long `a` runs in each new place before it moves again, ms.
        #[arg(long, default_value_t = 1000)]
        dwell_ms: u64,
        #[command(flatten)]
        job: JobArgs,
    },
}

/// A fault kind, as `--faults` takes it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FaultKind {
    /// The destination's QEMU is killed.
    KillDestinationQemu,
    /// The destination's companion is killed.
    KillDestinationCompanion,
    /// Peer `b`'s companion is killed and started again with the same command line.
    RestartPeerCompanion,
    /// The veths of `a`'s source and destination hosts go down for `--link-down-ms`.
    CutLink,
    /// The operator cancels.
    Cancel,
}

impl From<FaultKind> for Fault {
    fn from(k: FaultKind) -> Self {
        match k {
            FaultKind::KillDestinationQemu => Fault::KillDestinationQemu,
            FaultKind::KillDestinationCompanion => Fault::KillDestinationCompanion,
            FaultKind::RestartPeerCompanion => Fault::RestartPeerCompanion,
            FaultKind::CutLink => Fault::CutLink,
            FaultKind::Cancel => Fault::Cancel,
        }
    }
}

/// The lu-lite job of `bench faults`, `bench soak` and `bench drivers`.
#[derive(clap::Args)]
pub struct JobArgs {
    /// VMs of the job, at least 2 (`a` is the one migrated; in `bench faults`, `b` is the peer
    /// whose companion is restarted).
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// Guest RAM per VM in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// lu-lite grid size.
    #[arg(long, default_value_t = 256)]
    n: u32,
    /// lu-lite iterations of each run of `bench faults`, and of `bench drivers` (at least
    /// 2000 there); `bench soak` sizes its job from `--migrations` and
    /// `--iters-per-migration` instead.
    #[arg(long, default_value_t = 600)]
    iters: u32,
    /// Migrate once rank `a` has done this many iterations.
    #[arg(long, default_value_t = 150)]
    migrate_at: u32,
    /// QEMU `max-bandwidth`, bytes/s (default: 32 MiB/s for `bench faults`, so that
    /// precopy stays open long enough to be hit mid-way; 128 MiB/s for `bench soak`
    /// and `bench drivers`).
    #[arg(long)]
    max_bandwidth: Option<u64>,
    /// Give up on one run after this long, s.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Where to put the run directories (default: a fresh temporary directory).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

impl JobArgs {
    fn options(self, iters: u32, max_bandwidth: u64) -> Result<ScenarioOptions> {
        if self.vms < 2 {
            bail!("--vms must be at least 2: peer `b` is part of the drill");
        }
        Ok(ScenarioOptions {
            driver: Default::default(),
            workload: Workload::LuLite,
            vms: self.vms,
            strategy: None,
            mem_mib: self.mem_mib,
            n: self.n,
            iters,
            migrate_at: self.migrate_at,
            max_bandwidth: Some(self.max_bandwidth.unwrap_or(max_bandwidth)),
            run_dir: run_dir_or_temp(self.run_dir)?,
            accel: "tcg".into(),
            image: image(None, None)?,
            vfmig_bin: vfmig_bin()?,
            timeout: Duration::from_secs(self.timeout_secs),
            fault: None,
            trace: None,
        })
    }
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
                driver: Default::default(),
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
        BenchCommand::Faults {
            phases,
            faults,
            link_down_ms,
            stall_secs,
            job,
        } => fault_matrix(MatrixOptions {
            phases: if phases.is_empty() {
                FaultPhase::ALL.to_vec()
            } else {
                phases
            },
            faults: if faults.is_empty() {
                Fault::ALL.to_vec()
            } else {
                faults.into_iter().map(Fault::from).collect()
            },
            link_down: Duration::from_millis(link_down_ms),
            stall: Duration::from_secs(stall_secs),
            base: {
                let iters = job.iters;
                job.options(iters, 32 << 20)?
            },
        }),
        BenchCommand::Drivers { rounds, job } => {
            let iters = job.iters.max(2000);
            let opts = job.options(iters, 128 << 20)?;
            let rows = drivers_bench::run(&opts, rounds, |l| eprintln!("bench: {l}"))?;
            println!("{}", drivers_bench::markdown(&rows));
            println!("{}", serde_json::json!({ "rows": rows }));
            Ok(())
        }
        BenchCommand::Netpipe {
            rounds,
            max_bytes,
            mem_mib,
            run_dir,
        } => {
            let opts = netpipe_bench::NetpipeBenchOptions {
                rounds,
                max_bytes,
                mem_mib,
                run_dir: run_dir_or_temp(run_dir)?,
                vfmig_bin: vfmig_bin()?,
            };
            let rows = netpipe_bench::run(&opts, |l| eprintln!("bench: {l}"))?;
            println!("{}", netpipe_bench::markdown(&rows));
            println!("{}", serde_json::json!({ "rows": rows }));
            Ok(())
        }
        BenchCommand::Ops { job } => {
            let iters = job.iters.max(2000);
            let opts = job.options(iters, 128 << 20)?;
            let rows = ops_bench::run(&opts, iters, |l| eprintln!("bench: {l}"))?;
            println!("{}", ops_bench::markdown(&rows));
            println!("{}", serde_json::json!({ "rows": rows }));
            Ok(())
        }
        BenchCommand::Soak {
            migrations,
            iters_per_migration,
            dwell_ms,
            job,
        } => {
            let iters = job.migrate_at + iters_per_migration * migrations.max(1);
            soak_run(SoakOptions {
                base: job.options(iters, 128 << 20)?,
                migrations,
                dwell: Duration::from_millis(dwell_ms),
                stall: Duration::from_secs(150),
            })
        }
        BenchCommand::Converge {
            rounds,
            mem_mib,
            rate,
            max_bandwidth,
            downtime_limit,
            bound_secs,
            run_dir,
        } => {
            let mut opts = idle_demo(mem_mib, max_bandwidth, run_dir, "tcg".into())?;
            opts = converge_bench::options(opts, rate, downtime_limit, bound_secs);
            let result = converge_bench::bench(&opts, rounds, |r| {
                eprintln!(
                    "bench: round {} {}: completed {}, {} ms, {:.0} writes/s",
                    r.round,
                    r.variant.name(),
                    r.completed,
                    r.total_ms,
                    r.precopy_writes_per_s
                )
            })?;
            println!("{}", converge_bench::markdown(&result));
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        BenchCommand::Fabric {
            rounds,
            sizes,
            soft_vf_only,
        } => {
            let mut opts = fabric_bench::FabricOptions {
                rounds,
                soft_vf_only,
                ..Default::default()
            };
            if !sizes.is_empty() {
                opts.sizes = sizes;
            }
            let result = fabric_bench::run(&opts, |line| eprintln!("bench: {line}"))?;
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

/// `bench faults`: the matrix, its table and JSON; fails when a cell breaks the rule.
fn fault_matrix(opts: MatrixOptions) -> Result<()> {
    eprintln!(
        "bench: run directories under {}",
        opts.base.run_dir.display()
    );
    let m = faults::run_matrix(&opts, |i, total, c| {
        eprintln!(
            "bench: {i}/{total} {} at {}: {} ({:.0} s)",
            c.fault.map_or("none", Fault::name),
            c.phase.map_or("none", FaultPhase::name),
            c.outcome.label(),
            c.wall_s
        )
    })?;
    println!("{}", faults::markdown(&m));
    println!("{}", serde_json::to_string(&m)?);
    if m.failures > 0 {
        bail!(
            "{} of {} cells lost or stalled silently, or never saw their fault: see the table",
            m.failures,
            m.cells.len()
        );
    }
    Ok(())
}

/// `bench soak`: the migrations with a progress line each on a terminal, then the JSON line;
/// fails unless the soak passed.
fn soak_run(opts: SoakOptions) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    eprintln!(
        "bench: run directories under {}",
        opts.base.run_dir.display()
    );
    let total = opts.migrations;
    let report = with_progress(|observer: &mut dyn Observer| {
        soak::run(&opts, observer, |m| {
            if tty {
                eprintln!(
                    "soak: {}/{total} host {} -> {}: total {} ms, downtime {} ms, blackout {:.0} ms",
                    m.number, m.from_host, m.to_host, m.total_ms, m.downtime_ms, m.blackout_ms
                );
            }
        })
    })?;
    println!("{}", serde_json::to_string(&report)?);
    if !soak::passed(&report) {
        bail!(
            "the soak failed: {} of {} migrations done ({} under load), checksum {}, {} lost, {} duplicated{}",
            report.migrations_done,
            report.migrations_requested,
            report.migrations_under_load,
            if report.checksum_match { "matches" } else { "DIFFERS" },
            report.lost_ops,
            report.duplicate_ops,
            report.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    Ok(())
}
