//! The main job on one machine: a source and a destination VM with their companions, the
//! traffic generator writing guest RAM as a remote RDMA peer would, one migration, and the
//! check that no device write was lost.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::verify::{self, RamComparison, VerifyError};
use crate::companion::control::ControlError;
use crate::companion::converge::DeviceThrottle;
use crate::companion::generator::{compare, GeneratorConfig, SlotContent, Verdict, Window};
use crate::orchestrator::launch::{mac_for, GuestImage, LaunchError, Nic, Role, RunningVm, VmSpec};
use crate::orchestrator::migrate::{
    migrate, MigrateError, MigrateOptions, MigrationSummary, Observer,
};
use crate::orchestrator::strategy::{StrategyError, StrategyInputs, StrategyKind};

/// Guest-physical address of the window the guest kernel never touches (`memmap=16M$…`).
pub const WINDOW_GPA: u64 = 0x1800_0000;
/// Size of that window.
pub const WINDOW_BYTES: u64 = 16 << 20;

/// Settings of a demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Tracking strategy: `transparent` or `unsafe-no-tracking` (the others suspend a job's
    /// ranks, and the generator demo has none).
    pub strategy: StrategyKind,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// Generator writes per second (0: no generator).
    pub rate: u64,
    /// Bytes per generator write.
    pub record_size: u32,
    /// QEMU `max-bandwidth` in bytes/s.
    pub max_bandwidth: Option<u64>,
    /// QEMU `downtime-limit` in ms.
    pub downtime_limit_ms: Option<u64>,
    /// Leave the destination paused and compare both RAM images with `pmemsave`.
    pub keep_paused: bool,
    /// Where the run directories go.
    pub run_dir: PathBuf,
    /// QEMU accelerator.
    pub accel: String,
    /// Guest kernel and initramfs.
    pub image: GuestImage,
    /// The `vfmig` binary for the companions.
    pub vfmig_bin: PathBuf,
    /// How long the generator runs before the migration starts.
    pub lead_time: Duration,
    /// Migration timeout.
    pub timeout: Duration,
    /// Where the migration's timeline goes.
    pub trace: Option<std::sync::Arc<crate::trace::TraceRecorder>>,
    /// Device auto-converge policy of the migration.
    pub device_throttle: DeviceThrottle,
    /// QEMU's own `auto-converge` capability.
    pub auto_converge: bool,
}

impl DemoOptions {
    /// The demo's settings as `vfmig demo` has them by default, with its run directory, guest
    /// image and companion binary: `transparent`, a 512 MiB guest, 4000 device writes a second
    /// of 256 bytes for 0.5 s before the migration, precopy capped at 64 MiB/s, a 600 s
    /// timeout.
    pub fn new(run_dir: PathBuf, image: GuestImage, vfmig_bin: PathBuf) -> Self {
        Self {
            strategy: StrategyKind::Transparent,
            mem_mib: 512,
            rate: 4000,
            record_size: 256,
            max_bandwidth: Some(64 << 20),
            downtime_limit_ms: None,
            keep_paused: false,
            run_dir,
            accel: "tcg".into(),
            image,
            vfmig_bin,
            lead_time: Duration::from_millis(500),
            timeout: Duration::from_secs(600),
            trace: None,
            device_throttle: DeviceThrottle::Auto,
            auto_converge: false,
        }
    }

    /// The same, for measuring migrations alone: no device writes, no lead time, and the
    /// destination left paused.
    pub fn idle(self) -> Self {
        Self {
            rate: 0,
            keep_paused: true,
            lead_time: Duration::ZERO,
            ..self
        }
    }
}

/// The demo's result; the last line of `vfmig demo` is this, as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// The strategy.
    pub strategy: StrategyKind,
    /// Device writes the destination does not hold (older version, missing or corrupt).
    pub lost_writes: u64,
    /// Device writes made by the source's VF (the generator).
    pub device_writes: u64,
    /// Distinct pages the device wrote during this migration (its epoch, up to the quiesce).
    pub device_dirty_pages: u64,
    /// QEMU's total migration time, ms.
    pub total_ms: u64,
    /// QEMU's downtime, ms.
    pub downtime_ms: u64,
    /// RAM bytes QEMU sent.
    pub transferred_bytes: u64,
    /// Guest RAM, MiB.
    pub guest_ram_mib: u64,
    /// Records the ledger says were written.
    pub records_written: u64,
    /// Records found intact at the destination.
    pub records_intact: u64,
    /// Where the destination's records were read: `companion` or `pmemsave`.
    pub verified_through: &'static str,
    /// With `keep_paused`: every page of both RAM images compared by hash.
    pub ram_comparison: Option<RamComparison>,
    /// Whether the VF was quiesced at switchover on the source.
    pub quiesced_at_switchover: bool,
    /// The migration's own summary.
    pub migration: MigrationSummary,
}

/// Errors of a demo run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A VM failed to start or stop.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The migration failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// A companion refused or failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A RAM check failed to run.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The strategy needs what the demo does not have (ranks to suspend).
    #[error(transparent)]
    Strategy(#[from] StrategyError),
}

/// The generator's window: one record per page of the reserved window.
pub fn window(record_size: u32) -> Window {
    Window {
        gpa: WINDOW_GPA,
        slots: (WINDOW_BYTES / 4096) as u32,
        stride: 4096,
        record_size,
    }
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(4444)
}

/// Starts a VM of the demo, with a companion.
pub fn start_vm(opts: &DemoOptions, name: &str, role: Role) -> Result<RunningVm, LaunchError> {
    start_vm_with(opts, name, role, Nic::VhostUser)
}

/// Starts a VM of the demo with the given NIC (`Plain`: no companion).
pub fn start_vm_with(
    opts: &DemoOptions,
    name: &str,
    role: Role,
    nic: Nic,
) -> Result<RunningVm, LaunchError> {
    let mut spec = vm_spec(opts, name, role);
    spec.nic = nic;
    RunningVm::launch(spec)
}

/// The spec of a VM of the demo: a companion, no soft VF, no job.
pub fn vm_spec(opts: &DemoOptions, name: &str, role: Role) -> VmSpec {
    VmSpec {
        name: name.into(),
        run_dir: opts.run_dir.join(name),
        mem_mib: opts.mem_mib,
        role,
        accel: opts.accel.clone(),
        image: opts.image.clone(),
        vfmig_bin: opts.vfmig_bin.clone(),
        qemu_bin: "qemu-system-x86_64".into(),
        config_dir: None,
        mac: mac_for("vfmig-demo"),
        nic: Nic::VhostUser,
        netns: None,
        fabric: None,
        guest_args: String::new(),
        passthrough: None,
        ip_nic: None,
    }
}

/// The generator's records as a running destination holds them: read through its companion,
/// which maps guest RAM once the guest's device starts there.
pub fn records_at_destination(
    mut dst: RunningVm,
    window: &Window,
) -> Result<Vec<SlotContent>, DemoError> {
    dst.wait_guest_up(Duration::from_secs(60))?;
    Ok(dst.control()?.scan(*window)?.slots)
}

/// The destination's records against the source's ledger; lost writes are logged.
pub fn verdict(ledger: &[u64], found: &[SlotContent]) -> Verdict {
    let verdict = compare(ledger, found);
    if verdict.lost_writes > 0 {
        tracing::warn!(
            lost = verdict.lost_writes,
            examples = ?verdict.lost_examples,
            "device writes lost: the destination holds older records than the source wrote"
        );
    }
    verdict
}

/// Runs the demo end to end.
pub fn run(opts: &DemoOptions, observer: &mut dyn Observer) -> Result<DemoReport, DemoError> {
    // The strategy first: one the demo cannot run fails before any VM starts.
    let strategy = opts.strategy.with(StrategyInputs::default())?;
    let mut src = start_vm(opts, "source", Role::Source)?;
    let dst = start_vm(opts, "destination", Role::Destination)?;
    let booted = src.wait_guest_up(Duration::from_secs(120))?;
    tracing::info!(secs = booted.as_secs_f64(), "source guest started its NIC");

    let mut src_ctl = src.control()?;
    let window = window(opts.record_size);
    if opts.rate > 0 {
        src_ctl.generator_start(GeneratorConfig {
            window,
            rate: opts.rate,
        })?;
        std::thread::sleep(opts.lead_time);
    }

    let src_qmp = src.qmp()?;
    let dst_qmp = dst.qmp()?;
    let summary = migrate(
        &src_qmp,
        &dst_qmp,
        &MigrateOptions {
            uri: format!("tcp:127.0.0.1:{}", free_port()),
            keep_paused: opts.keep_paused,
            max_bandwidth: opts.max_bandwidth,
            downtime_limit_ms: opts.downtime_limit_ms,
            timeout: opts.timeout,
            companions: Some((
                src.paths.control_socket.clone(),
                dst.paths.control_socket.clone(),
            )),
            strategy,
            trace: opts.trace.clone(),
            device_throttle: opts.device_throttle,
            auto_converge: opts.auto_converge,
            ..Default::default()
        },
        observer,
    )?;

    // The source is stopped and its VF quiesced: the ledger is final.
    let stats = src_ctl.stats()?;
    let versions: Vec<u64> = if opts.rate > 0 {
        src_ctl.generator_stop()?;
        src_ctl.ledger()?.versions
    } else {
        vec![0; window.slots as usize]
    };
    let device_writes = stats.dma.writes;
    let device_dirty_pages = stats.device_dirty_pages;
    let quiesced = stats.quiesced;

    let (found, through, ram_comparison) = if opts.keep_paused {
        // Both sides paused: dump all of RAM on both and compare, and read the records from
        // the destination's dump.
        let dir = opts.run_dir.join("ram-dumps");
        std::fs::create_dir_all(&dir).map_err(|source| VerifyError::Read {
            path: dir.clone(),
            source,
        })?;
        let size = opts.mem_mib << 20;
        let (a, b) = (dir.join("source.ram"), dir.join("destination.ram"));
        verify::dump(&src_qmp, "source", 0, size, &a)?;
        verify::dump(&dst_qmp, "destination", 0, size, &b)?;
        let cmp = verify::compare_dumps(&a, &b)?;
        let found = verify::records_in_dump(&b, 0, &window)?;
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        (found, "pmemsave", Some(cmp))
    } else {
        (records_at_destination(dst, &window)?, "companion", None)
    };
    let verdict = verdict(&versions, &found);
    Ok(DemoReport {
        strategy: opts.strategy,
        lost_writes: verdict.lost_writes,
        device_writes,
        device_dirty_pages,
        total_ms: summary.total_ms,
        downtime_ms: summary.downtime_ms,
        transferred_bytes: summary.transferred_bytes,
        guest_ram_mib: opts.mem_mib,
        records_written: verdict.records_written,
        records_intact: verdict.intact,
        verified_through: through,
        ram_comparison,
        quiesced_at_switchover: quiesced,
        migration: summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_demo_and_the_idle_one() {
        let image = GuestImage {
            kernel: "k".into(),
            initrd: "i".into(),
        };
        let o = DemoOptions::new("/run".into(), image, "vfmig".into());
        assert_eq!(o.strategy, StrategyKind::Transparent);
        assert_eq!((o.mem_mib, o.rate, o.record_size), (512, 4000, 256));
        assert_eq!(o.max_bandwidth, Some(64 << 20));
        assert!(!o.keep_paused);
        assert_eq!(o.lead_time, Duration::from_millis(500));
        let idle = o.idle();
        assert_eq!((idle.rate, idle.keep_paused), (0, true));
        assert_eq!(idle.lead_time, Duration::ZERO);
        assert_eq!(idle.mem_mib, 512);
    }

    #[test]
    fn the_report_names_its_strategy_in_kebab_case() {
        let v = serde_json::to_value(StrategyKind::UnsafeNoTracking).unwrap();
        assert_eq!(v, "unsafe-no-tracking");
    }
}
