//! `vfmig demo`: the main job on this machine, or, with `--workload`, an MPI-style job across
//! VMs with one of them migrated midway. The last line is JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

use vfmig::companion::converge::DeviceThrottle;
use vfmig::lab::demo::{self, DemoOptions};
use vfmig::lab::mpi::{self, HpccInput, MpiRunOptions};
use vfmig::lab::scenario::{self, ScenarioOptions, Workload};
use vfmig::orchestrator::migrate::with_progress;
use vfmig::orchestrator::StrategyKind;
use vfmig::trace::TraceRecorder;

use super::{image, init_logging, run_dir_or_temp, vfmig_bin};

/// The arguments of `vfmig demo`.
#[derive(clap::Args)]
pub struct Args {
    /// `transparent` (device writes logged into QEMU's dirty log) or `unsafe-no-tracking`
    /// (the negative control: the same load, no logging; must report lost writes). With
    /// --workload also `cooperative` (ranks suspend for the whole migration) and
    /// `passthrough-hotplug` (ranks suspend; an emulated PCIe NIC standing in for a
    /// vfio-pci VF is unplugged before precopy and plugged in at the destination).
    #[arg(long, value_enum, default_value = "transparent")]
    pub strategy: StrategyKind,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem_mib: u64,
    /// Device writes per second of the traffic generator.
    #[arg(long, default_value_t = 4000)]
    pub rate: u64,
    /// Bytes per device write (one record per 4 KiB page; 64 to 4096).
    #[arg(long, default_value_t = 256)]
    pub record_size: u32,
    /// QEMU `max-bandwidth`, bytes/s: lower keeps precopy open longer.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_bandwidth: u64,
    /// QEMU `downtime-limit`, ms.
    #[arg(long)]
    pub downtime_limit: Option<u64>,
    /// Leave the destination paused and compare every page of both RAM images by hash.
    #[arg(long)]
    pub keep_paused: bool,
    /// Where to put the VMs' run directories (default: a fresh temporary directory).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    pub accel: String,
    /// Seconds the generator runs before the migration starts.
    #[arg(long, default_value_t = 0.5)]
    pub lead_time: f64,
    /// Run an MPI-style job across VMs on soft VFs instead of the generator, and migrate
    /// VM `a` midway: `lu-lite` (compared with a run without migration), `rdma-bw` (every
    /// byte sent must arrive; --n is the message size), `rdma-lat`, or `msg-ring` (messages
    /// of 1 B to several 64 KiB segments around a ring on the libfabric provider's message
    /// channel, checked and compared with a run without migration; --n is the base size).
    /// `hpcc`: Debian's unmodified HPCC across --vms VMs of the MPI guest image, on vfmig's
    /// libfabric provider, the last VM migrated 20 s in (plain QMP; the companions hand its VF
    /// over), beside the same run without migration: the last line has HPCC's verdict and
    /// figures for both, and the migration's total time, downtime, the VF's blackout (source
    /// quiesce to the destination's announce) and the silence the peers' soft VFs saw. `--strategy unsafe-no-tracking` starts the migrated VM's companion
    /// without dirty tracking (the negative control).
    #[arg(long, value_enum)]
    pub workload: Option<DemoWorkload>,
    /// With --workload: what drives the migration. `vfmig` (vfmig's orchestrator, every
    /// strategy) or `qmp` (a plain QMP client, as libvirt or Nova: `migrate-incoming`,
    /// `migrate`, `cont` and no vfmig command; the companions hand the VF over themselves;
    /// `transparent` or `unsafe-no-tracking`, whose source companion then starts with
    /// `--unsafe-no-tracking`).
    #[arg(long, value_enum, default_value = "vfmig")]
    pub driver: scenario::Driver,
    /// VMs of the job, each on its own test host (network namespace).
    #[arg(long, default_value_t = 3)]
    pub vms: usize,
    /// lu-lite grid size; the message size of rdma-bw, rdma-lat and msg-ring.
    #[arg(long, default_value_t = 256)]
    pub n: u32,
    /// Iterations of the job.
    #[arg(long, default_value_t = 1500)]
    pub iters: u32,
    /// Migrate once rank `a` has done this many iterations.
    #[arg(long, default_value_t = 300)]
    pub migrate_at: u32,
    /// Write the migration's timeline to FILE (Chrome trace-event JSON).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Device auto-converge of the generator's migration: `off`, `auto` or a rate of dirtied
    /// bytes per second, as `vfmig migrate --device-throttle`.
    #[arg(long, default_value = "auto", value_name = "off|auto|RATE")]
    pub device_throttle: DeviceThrottle,
}

/// The jobs of `--workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoWorkload {
    /// See `vfmig::lab::scenario::Workload`.
    LuLite,
    /// See `vfmig::lab::scenario::Workload`.
    RdmaBw,
    /// See `vfmig::lab::scenario::Workload`.
    RdmaLat,
    /// See `vfmig::lab::scenario::Workload`.
    MsgRing,
    /// Debian's unmodified HPCC on the vfmig provider (the MPI guest image).
    Hpcc,
}

/// Runs the demo, or the scenario with `--workload`, and prints its report.
pub fn run(args: Args) -> Result<()> {
    init_logging("vfmig=info,warn");
    let recorder = args.trace.as_ref().map(|_| Arc::new(TraceRecorder::new()));
    let workload = match args.workload {
        None => return run_generator(args, recorder),
        Some(DemoWorkload::Hpcc) => return run_hpcc(args),
        Some(DemoWorkload::LuLite) => Workload::LuLite,
        Some(DemoWorkload::RdmaBw) => Workload::RdmaBw,
        Some(DemoWorkload::RdmaLat) => Workload::RdmaLat,
        Some(DemoWorkload::MsgRing) => Workload::MsgRing,
    };
    run_scenario(workload, args, recorder)
}

/// `--workload hpcc`: HPCC without migration, then with the last VM migrated 20 s in.
fn run_hpcc(args: Args) -> Result<()> {
    if !matches!(
        args.strategy,
        StrategyKind::Transparent | StrategyKind::UnsafeNoTracking
    ) {
        bail!(
            "--workload hpcc migrates as libvirt or Nova would (plain QMP, the companions hand \
             the VF over): --strategy transparent, or unsafe-no-tracking for the negative \
             control; {:?} is not offered for it",
            args.strategy
        );
    }
    let vms = args.vms.max(2);
    let run_dir = run_dir_or_temp(args.run_dir)?;
    let base = MpiRunOptions {
        vms,
        mem_mib: 512,
        run_dir: run_dir.join("reference"),
        accel: args.accel,
        image: mpi::mpi_image()?,
        vfmig_bin: vfmig_bin()?,
        hpcc: Some(HpccInput::small(vms as u32)),
        netpipe_max_bytes: None,
        ring: None,
        handoff: true,
        tracking: args.strategy == StrategyKind::Transparent,
        provider: mpi::VFMIG_PROVIDER.into(),
        migrate_after: None,
        migrate_from: None,
        precopy_at_least: None,
        timeout: Duration::from_secs(1800),
    };
    eprintln!("demo: HPCC on {vms} VMs on the vfmig provider, without migration…");
    let reference = mpi::run(&base)?;
    eprintln!("demo: HPCC again, mpi{} migrated 20 s in…", vms - 1);
    let migrated = mpi::run(&MpiRunOptions {
        run_dir: run_dir.join("migrated"),
        migrate_after: Some(Duration::from_secs(20)),
        ..base
    })?;
    let verdict = |r: &mpi::MpiReport| {
        serde_json::json!({
            "success": r.hpcc.as_ref().is_some_and(|h| h.passed()),
            "summary": r.hpcc,
            "error": r.hpcc_error,
            "secs": r.hpcc_job.as_ref().and_then(|j| j.secs),
            "exit": r.hpcc_job.as_ref().and_then(|j| j.exit),
        })
    };
    let m = migrated.migration.as_ref();
    eprintln!(
        "demo: HPCC passed: {} with the migration, {} without; migration {} ms, downtime {} ms, \
         VF blackout {} ms, silence seen by the peers {} ms; run directories kept in {}",
        verdict(&migrated)["success"],
        verdict(&reference)["success"],
        m.map_or(0, |m| m.total_ms),
        m.map_or(0, |m| m.downtime_ms),
        m.and_then(|m| m.vf_takeover.as_ref())
            .map_or("unknown".into(), |t| format!("{:.1}", t.blackout_ms)),
        migrated
            .peer_silence_ms
            .map_or("unknown".into(), |b| format!("{b:.1}")),
        run_dir.display()
    );
    println!(
        "{}",
        serde_json::json!({
            "workload": "hpcc",
            "provider": mpi::VFMIG_PROVIDER,
            "vms": vms,
            "hpcc": verdict(&migrated),
            "reference": verdict(&reference),
            "total_ms": m.map(|m| m.total_ms),
            "downtime_ms": m.map(|m| m.downtime_ms),
            "blackout_ms": m.and_then(|m| m.vf_takeover.as_ref()).map(|t| t.blackout_ms),
            "peer_silence_ms": migrated.peer_silence_ms,
            "strategy": args.strategy,
            "vf_takeover": m.and_then(|m| m.vf_takeover.clone()),
        })
    );
    Ok(())
}

/// Writes the timeline, with `meta`, when `--trace` asked for one.
fn write_trace(
    trace: &Option<PathBuf>,
    recorder: &Option<Arc<TraceRecorder>>,
    meta: &[(&str, serde_json::Value)],
) -> Result<()> {
    if let (Some(path), Some(rec)) = (trace, recorder) {
        for (k, v) in meta {
            rec.set_meta(k, v.clone());
        }
        rec.write(path)?;
        eprintln!("demo: timeline written to {}", path.display());
    }
    Ok(())
}

/// `--workload`: the job on `--vms` VMs, VM `a` migrated midway, compared with a run without
/// migration.
fn run_scenario(
    workload: Workload,
    args: Args,
    recorder: Option<Arc<TraceRecorder>>,
) -> Result<()> {
    let strategy = args.strategy;
    let opts = ScenarioOptions {
        driver: args.driver,
        workload,
        vms: args.vms.max(2),
        strategy: Some(strategy),
        mem_mib: args.mem_mib.min(512),
        n: args.n,
        iters: args.iters,
        migrate_at: args.migrate_at,
        max_bandwidth: Some(args.max_bandwidth),
        run_dir: run_dir_or_temp(args.run_dir)?,
        accel: args.accel,
        image: image(None, None)?,
        vfmig_bin: vfmig_bin()?,
        timeout: Duration::from_secs(900),
        fault: None,
        trace: recorder.clone(),
    };
    let report = with_progress(|observer| scenario::run_compared(&opts, observer))?;
    write_trace(
        &args.trace,
        &recorder,
        &[
            ("strategy", serde_json::json!(strategy)),
            ("vm", serde_json::json!("a")),
            ("downtime_ms", serde_json::json!(report.downtime_ms)),
        ],
    )?;
    eprintln!(
        "demo: {:?} on {} VMs, `a` migrated ({:?}): checksums match: {}; lost ops {}, \
         duplicate ops {}; blackout {:.1} ms; migration {} ms, downtime {} ms",
        report.workload,
        report.vms,
        strategy,
        report.checksum_match,
        report.lost_ops,
        report.duplicate_ops,
        report.blackout_ms,
        report.total_ms,
        report.downtime_ms
    );
    if let Some(h) = report.migration.as_ref().and_then(|m| m.hotplug.as_ref()) {
        eprintln!(
            "demo: the VF was unplugged in {:.1} ms and plugged in at the destination \
             ({}) in {:.1} ms",
            h.detach_ms,
            h.destination_address.as_deref().unwrap_or("?"),
            h.attach_ms
        );
    }
    eprintln!("demo: run directories kept in {}", opts.run_dir.display());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// No workload: the traffic generator writes guest RAM through one migration, and the
/// destination is checked for every write.
fn run_generator(args: Args, recorder: Option<Arc<TraceRecorder>>) -> Result<()> {
    let strategy = args.strategy;
    if matches!(
        strategy,
        StrategyKind::Cooperative | StrategyKind::PassthroughHotplug
    ) {
        bail!(
            "--strategy {strategy:?} suspends a job's ranks: the generator demo has none. \
             Add --workload lu-lite"
        );
    }
    let run_dir = run_dir_or_temp(args.run_dir)?;
    let opts = DemoOptions {
        strategy,
        mem_mib: args.mem_mib,
        rate: args.rate,
        record_size: args.record_size,
        max_bandwidth: Some(args.max_bandwidth),
        downtime_limit_ms: args.downtime_limit,
        keep_paused: args.keep_paused,
        accel: args.accel,
        lead_time: Duration::from_secs_f64(args.lead_time),
        trace: recorder.clone(),
        device_throttle: args.device_throttle,
        ..DemoOptions::new(run_dir.clone(), image(None, None)?, vfmig_bin()?)
    };
    let report = with_progress(|observer| demo::run(&opts, observer))?;
    write_trace(
        &args.trace,
        &recorder,
        &[
            ("strategy", serde_json::json!(strategy)),
            ("vm", serde_json::json!("source")),
            ("downtime_ms", serde_json::json!(report.downtime_ms)),
        ],
    )?;
    eprintln!(
        "demo: strategy {:?}: {} device writes on {} distinct pages during the migration; \
         {} lost at the destination (checked through the {}); migration {} ms, downtime {} ms",
        report.strategy,
        report.device_writes,
        report.device_dirty_pages,
        report.lost_writes,
        report.verified_through,
        report.total_ms,
        report.downtime_ms
    );
    eprintln!("demo: run directories kept in {}", run_dir.display());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
