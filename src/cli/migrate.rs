//! `vfmig migrate`: one migration (or a plan of several, or a cancel), its summary printed as
//! JSON.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use vfmig::companion::converge::DeviceThrottle;
use vfmig::orchestrator::migrate::{self, with_progress, MigrateOptions};
use vfmig::orchestrator::plan::{self, MigrationPlan};
use vfmig::orchestrator::strategy::{StrategyInputs, StrategyKind, VfDevices};
use vfmig::qmp::QmpClient;
use vfmig::trace::TraceRecorder;

use super::{cancel_on_signal, init_logging};

/// The arguments of `vfmig migrate`.
#[derive(clap::Args)]
pub struct Args {
    /// QMP socket of the source QEMU.
    #[arg(long, required_unless_present = "plan")]
    pub src_qmp: Option<PathBuf>,
    /// QMP socket of the destination QEMU (started with `-incoming defer -S`).
    #[arg(long, required_unless_present_any = ["cancel", "plan"])]
    pub dst_qmp: Option<PathBuf>,
    /// Migration stream URI the destination listens on, e.g. `tcp:127.0.0.1:4444`.
    #[arg(long, required_unless_present_any = ["cancel", "plan"])]
    pub uri: Option<String>,
    /// Migrate several VMs at once, each to its own destination: a JSON file
    /// `{"migrations":[{"name":…,"src_qmp":…,"dst_qmp":…,"uri":…,"src_control":…,
    /// "dst_control":…}, …]}` (controls optional). The other flags apply to every one.
    #[arg(long, conflicts_with_all = ["src_qmp", "dst_qmp", "uri", "cancel"])]
    pub plan: Option<PathBuf>,
    /// Multifd channels (sets the `multifd` capability on both sides).
    #[arg(long)]
    pub multifd: Option<u32>,
    /// Cancel the migration the source is running (`migrate_cancel`) and wait until the
    /// source runs on its own again; needs only --src-qmp. Ctrl-C during a migration does
    /// the same.
    #[arg(long)]
    pub cancel: bool,
    /// `transparent` (RDMA keeps running through precopy; the VF moves at switchover),
    /// `cooperative` (every rank's runtime suspends for the whole migration: needs
    /// --rank-control for every rank), `passthrough-hotplug` (the VF is a vfio-pci device
    /// of QEMU: ranks suspend, the VF is unplugged, the VM migrates, a VF is plugged in at
    /// the destination, ranks resume: needs --rank-control and --dst-vf-device), or
    /// `unsafe-no-tracking` (negative control: device writes are not logged; needs
    /// --src-control).
    #[arg(long, value_enum, default_value = "transparent")]
    pub strategy: StrategyKind,
    /// Control socket of a rank's companion, once per rank of the job (the migrating VM's
    /// source companion among them): `cooperative` and `passthrough-hotplug` tell each
    /// SUSPEND and RESUME.
    #[arg(long)]
    pub rank_control: Vec<PathBuf>,
    /// `passthrough-hotplug`: the id of the VF device on the source (`-device …,id=ID`).
    #[arg(long, default_value = "vfmig-vf")]
    pub vf_id: String,
    /// `passthrough-hotplug`: the free VF to plug in at the destination, in `-device`
    /// syntax, e.g. `vfio-pci,host=0000:3b:02.2,id=vfmig-vf,bus=vfmig-vf-port`.
    #[arg(long)]
    pub dst_vf_device: Option<String>,
    /// `passthrough-hotplug`: the source's VF in `-device` syntax, plugged back in if the
    /// migration fails after the unplug (without it the source keeps running without it).
    #[arg(long)]
    pub src_vf_device: Option<String>,
    /// `passthrough-hotplug`: seconds the guest may take to release the VF after
    /// `device_del`, and its driver to come up after `device_add`.
    #[arg(long, default_value_t = 30)]
    pub hotplug_timeout: u64,
    /// Write the migration's timeline to FILE as Chrome trace-event JSON (opens in
    /// Perfetto): phases, QEMU's passes, query-migrate samples, and the source companion's
    /// device-dirty pages and held requests (with --src-control).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Leave the destination paused after completion (no `cont`), e.g. to compare RAM.
    #[arg(long)]
    pub keep_paused: bool,
    /// QEMU `max-bandwidth`, bytes per second (QEMU's default: 128 MiB/s).
    #[arg(long)]
    pub max_bandwidth: Option<u64>,
    /// QEMU `downtime-limit`, ms (QEMU's default: 300).
    #[arg(long)]
    pub downtime_limit: Option<u64>,
    /// Cancel the migration if it has not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Control socket of the source's companion: with --dst-control, the VF moves to the
    /// destination's companion at switchover, before the destination resumes.
    #[arg(long, requires = "dst_control")]
    pub src_control: Option<PathBuf>,
    /// Control socket of the destination's companion.
    #[arg(long, requires = "src_control")]
    pub dst_control: Option<PathBuf>,
    /// Device auto-converge, told to the source companion with the migration's bandwidth
    /// (--max-bandwidth, or QEMU's default 128 MiB/s; needs --src-control): `auto` slows the
    /// VF's writes into guest RAM step by step while it dirties more than half that bandwidth
    /// and QEMU's passes do not shrink; `off` never slows it; a rate (`50MB/s`, `64MiB/s`,
    /// bytes/s of dirtied pages) holds it there for the whole precopy. Lifted at switchover.
    #[arg(long, default_value = "auto", value_name = "off|auto|RATE")]
    pub device_throttle: DeviceThrottle,
    /// Also set QEMU's own `auto-converge` capability, which slows the vCPUs (not the device)
    /// when precopy does not converge.
    #[arg(long)]
    pub auto_converge: bool,
}

/// Migrates, cancels, or runs a plan, as the arguments say.
pub fn run(args: Args) -> Result<()> {
    init_logging("warn");
    let cancel_flag = cancel_on_signal()?;
    if let Some(plan) = &args.plan {
        return run_plan(plan, &args, cancel_flag);
    }
    let Some(src_qmp) = &args.src_qmp else {
        bail!("give --src-qmp, or --plan");
    };
    let src = QmpClient::connect(src_qmp, Duration::from_secs(10))
        .context("connecting to the source QEMU")?;
    if args.cancel {
        return cancel(&src);
    }
    migrate_one(&src, args, cancel_flag)
}

/// The settings every migration of this command shares: QEMU's, the timeout, the cancel flag.
fn common_options(args: &Args, cancel: Arc<AtomicBool>) -> MigrateOptions {
    MigrateOptions {
        uri: String::new(),
        keep_paused: args.keep_paused,
        max_bandwidth: args.max_bandwidth,
        downtime_limit_ms: args.downtime_limit,
        multifd: args.multifd,
        timeout: Duration::from_secs(args.timeout),
        cancel: Some(cancel),
        device_throttle: args.device_throttle,
        auto_converge: args.auto_converge,
        ..Default::default()
    }
}

/// `--plan`: every migration of the file at once; JSON with each one's outcome.
fn run_plan(path: &PathBuf, args: &Args, cancel: Arc<AtomicBool>) -> Result<()> {
    let plan: MigrationPlan = serde_json::from_str(
        &std::fs::read_to_string(path)
            .with_context(|| format!("reading the plan {}", path.display()))?,
    )
    .with_context(|| format!("the plan {} is malformed", path.display()))?;
    let start = Instant::now();
    let outcomes = plan::migrate_all(&plan, &common_options(args, cancel));
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    println!(
        "{}",
        serde_json::json!({
            "vms": outcomes,
            "wall_ms": start.elapsed().as_millis() as u64,
            "failed": failed,
        })
    );
    if failed > 0 {
        bail!("{failed} of the planned migrations failed; their sources keep running");
    }
    Ok(())
}

/// `--cancel`: `migrate_cancel`, then wait until the source runs on its own again.
fn cancel(src: &QmpClient) -> Result<()> {
    src.migrate_cancel()
        .context("migrate_cancel on the source")?;
    migrate::wait_source_settled(src);
    let status = src.query_status().context("query-status on the source")?;
    let info = src.query_migrate().context("query-migrate on the source")?;
    println!(
        "{}",
        serde_json::json!({
            "cancelled": true,
            "migration_status": info.status,
            "source_status": status.status,
            "source_running": status.running,
        })
    );
    if !status.running {
        bail!("the source is {} after the cancel: check it", status.status);
    }
    Ok(())
}

/// One migration from `src` to `--dst-qmp` under `--strategy`; its summary as JSON.
fn migrate_one(src: &QmpClient, args: Args, cancel: Arc<AtomicBool>) -> Result<()> {
    let common = common_options(&args, cancel);
    let Args {
        dst_qmp,
        uri,
        src_control,
        dst_control,
        strategy: kind,
        rank_control,
        vf_id,
        dst_vf_device,
        src_vf_device,
        hotplug_timeout,
        trace,
        ..
    } = args;
    let (Some(dst_qmp), Some(uri)) = (dst_qmp, uri) else {
        bail!("give --dst-qmp and --uri, or --cancel");
    };
    let dst = QmpClient::connect(&dst_qmp, Duration::from_secs(10))
        .context("connecting to the destination QEMU")?;
    let strategy = kind.with(StrategyInputs {
        ranks: rank_control,
        vf: VfDevices {
            device_id: vf_id,
            destination: dst_vf_device,
            source: src_vf_device,
            timeout: Duration::from_secs(hotplug_timeout),
        },
    })?;
    let opts = MigrateOptions {
        uri,
        companions: src_control.zip(dst_control),
        strategy,
        trace: trace.as_ref().map(|_| Arc::new(TraceRecorder::new())),
        ..common
    };
    let result = with_progress(|observer| migrate::migrate(src, &dst, &opts, observer));
    if let (Some(path), Some(rec)) = (&trace, &opts.trace) {
        rec.set_meta("strategy", format!("{kind:?}"));
        if let Ok(s) = &result {
            rec.set_meta("downtime_ms", s.downtime_ms);
            rec.set_meta("total_ms", s.total_ms);
        }
        rec.write(path)?;
        eprintln!(
            "vfmig: timeline written to {} (open it in Perfetto, or `vfmig report {}`)",
            path.display(),
            path.display()
        );
    }
    let summary = result?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
