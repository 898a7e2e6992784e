//! `vfmig`: one binary, one subcommand per job.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use nix::sys::signal::{self, Signal};

use vfmig::companion::control::{ControlClient, Request};
use vfmig::companion::{self, CompanionConfig};
use vfmig::lab::demo::{self, DemoOptions, Strategy};
use vfmig::lab::scenario::{self, ScenarioOptions, Workload};
use vfmig::lab::{self, bench, fabric_bench};
use vfmig::orchestrator;
use vfmig::orchestrator::hotplug::{self, Hotplug};
use vfmig::orchestrator::launch::{
    mac_for, GuestImage, Nic, PassthroughSlot, Role, RunningVm, VmSpec,
};
use vfmig::orchestrator::migrate::{self, with_progress, MigrateOptions};
use vfmig::orchestrator::plan::MigrationPlan;
use vfmig::qmp::QmpClient;
use vfmig::trace::TraceRecorder;
use vfmig::vf::soft::ClusterMap;

/// Live migration of VMs whose MPI jobs use an SR-IOV RDMA VF, with a stock QEMU.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-VM companion: QEMU's vhost-user-net backend, owner of the VF's path into
    /// guest RAM, which logs every page the VF writes into QEMU's dirty log.
    Companion {
        /// The VM's name, for logs and status.
        #[arg(long)]
        name: String,
        /// vhost-user socket to listen on; QEMU's `-chardev socket,path=…` connects to it.
        #[arg(long)]
        socket: PathBuf,
        /// Control socket (JSON lines, mode 0600) for the orchestrator.
        #[arg(long)]
        control: PathBuf,
        /// Start with dirty tracking of device writes OFF. Loses writes during a migration:
        /// only for the negative control that proves the checks can fail.
        #[arg(long)]
        unsafe_no_tracking: bool,
        /// Run the soft VF, listening for peer companions on this address (`host:port`).
        #[arg(long)]
        fabric_listen: Option<String>,
        /// Cluster file: `{"vms": {"NAME": "host:port", ...}}`, the fabric address of every VM.
        #[arg(long)]
        cluster: Option<PathBuf>,
        /// Own this SR-IOV VF, bound to vfio-pci (PCI address `0000:00:02.1` or `00:02.1`):
        /// guest RAM is mapped into its IOMMU domain at IOVA = GPA, it is quiesced at
        /// switchover, and its dirty pages go into QEMU's log. The companion exits with the
        /// reason if the VF cannot be opened (check it first with `vfmig vf check BDF`).
        #[arg(long, value_name = "BDF")]
        vfio: Option<String>,
    },
    /// Start a VM's companion and then QEMU, with all files in one run directory; stop both on
    /// Ctrl-C or when QEMU exits.
    Launch {
        /// The VM's name.
        #[arg(long)]
        name: String,
        /// Run directory (sockets, serial log, logs, pid files).
        #[arg(long)]
        run_dir: PathBuf,
        /// Start as a migration source (boots the guest) or destination (`-incoming defer -S`).
        #[arg(long, value_enum, default_value = "source")]
        role: Role,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        mem_mib: u64,
        /// QEMU accelerator: `tcg`, or `kvm` where KVM can boot the guest.
        #[arg(long, default_value = "tcg")]
        accel: String,
        /// Directory with edited copies of qemu-patches-free-config/*.args (default: built in).
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// Guest kernel (default: the one tools/setup.sh fetched).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Guest initramfs (default: the one tools/setup.sh built).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// QEMU binary.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: String,
        /// Give the VM a pcie-root-port (id `vfmig-vf-port`) for a passthrough VF, for the
        /// `passthrough-hotplug` strategy; alone, the slot is empty (a destination).
        #[arg(long)]
        passthrough_port: bool,
        /// The passthrough VF plugged into that port at start, in `-device` syntax, e.g.
        /// `vfio-pci,host=0000:3b:02.1,id=vfmig-vf,bus=vfmig-vf-port` (implies
        /// --passthrough-port).
        #[arg(long)]
        vf_device: Option<String>,
    },
    /// Migrate a VM: sets capabilities on both sides, `migrate-incoming` then `migrate`, follows
    /// progress, resumes the destination once, and prints a JSON summary.
    Migrate {
        /// QMP socket of the source QEMU.
        #[arg(long, required_unless_present = "plan")]
        src_qmp: Option<PathBuf>,
        /// QMP socket of the destination QEMU (started with `-incoming defer -S`).
        #[arg(long, required_unless_present_any = ["cancel", "plan"])]
        dst_qmp: Option<PathBuf>,
        /// Migration stream URI the destination listens on, e.g. `tcp:127.0.0.1:4444`.
        #[arg(long, required_unless_present_any = ["cancel", "plan"])]
        uri: Option<String>,
        /// Migrate several VMs at once, each to its own destination: a JSON file
        /// `{"migrations":[{"name":…,"src_qmp":…,"dst_qmp":…,"uri":…,"src_control":…,
        /// "dst_control":…}, …]}` (controls optional). The other flags apply to every one.
        #[arg(long, conflicts_with_all = ["src_qmp", "dst_qmp", "uri", "cancel"])]
        plan: Option<PathBuf>,
        /// Multifd channels (sets the `multifd` capability on both sides).
        #[arg(long)]
        multifd: Option<u32>,
        /// Cancel the migration the source is running (`migrate_cancel`) and wait until the
        /// source runs on its own again; needs only --src-qmp. Ctrl-C during a migration does
        /// the same.
        #[arg(long)]
        cancel: bool,
        /// `transparent` (RDMA keeps running through precopy; the VF moves at switchover),
        /// `cooperative` (every rank's runtime suspends for the whole migration: needs
        /// --rank-control for every rank), `passthrough-hotplug` (the VF is a vfio-pci device
        /// of QEMU: ranks suspend, the VF is unplugged, the VM migrates, a VF is plugged in at
        /// the destination, ranks resume: needs --rank-control and --dst-vf-device), or
        /// `unsafe-no-tracking` (negative control: device writes are not logged; needs
        /// --src-control).
        #[arg(long, value_enum, default_value = "transparent")]
        strategy: Strategy,
        /// Control socket of a rank's companion, once per rank of the job (the migrating VM's
        /// source companion among them): `cooperative` and `passthrough-hotplug` tell each
        /// SUSPEND and RESUME.
        #[arg(long)]
        rank_control: Vec<PathBuf>,
        /// `passthrough-hotplug`: the id of the VF device on the source (`-device …,id=ID`).
        #[arg(long, default_value = "vfmig-vf")]
        vf_id: String,
        /// `passthrough-hotplug`: the free VF to plug in at the destination, in `-device`
        /// syntax, e.g. `vfio-pci,host=0000:3b:02.2,id=vfmig-vf,bus=vfmig-vf-port`.
        #[arg(long)]
        dst_vf_device: Option<String>,
        /// `passthrough-hotplug`: the source's VF in `-device` syntax, plugged back in if the
        /// migration fails after the unplug (without it the source keeps running without it).
        #[arg(long)]
        src_vf_device: Option<String>,
        /// `passthrough-hotplug`: seconds the guest may take to release the VF after
        /// `device_del`, and its driver to come up after `device_add`.
        #[arg(long, default_value_t = 30)]
        hotplug_timeout: u64,
        /// Write the migration's timeline to FILE as Chrome trace-event JSON (opens in
        /// Perfetto): phases, QEMU's passes, query-migrate samples, and the source companion's
        /// device-dirty pages and held requests (with --src-control).
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Leave the destination paused after completion (no `cont`), e.g. to compare RAM.
        #[arg(long)]
        keep_paused: bool,
        /// QEMU `max-bandwidth`, bytes per second (QEMU's default: 128 MiB/s).
        #[arg(long)]
        max_bandwidth: Option<u64>,
        /// QEMU `downtime-limit`, ms (QEMU's default: 300).
        #[arg(long)]
        downtime_limit: Option<u64>,
        /// Cancel the migration if it has not finished after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Control socket of the source's companion: with --dst-control, the VF moves to the
        /// destination's companion at switchover, before the destination resumes.
        #[arg(long, requires = "dst_control")]
        src_control: Option<PathBuf>,
        /// Control socket of the destination's companion.
        #[arg(long, requires = "src_control")]
        dst_control: Option<PathBuf>,
    },
    /// Send one request to a companion's control socket and print its reply (JSON): for
    /// wrapper scripts and operators. Exits non-zero if the companion refuses it.
    Ctl {
        /// The companion's control socket.
        #[arg(long)]
        control: PathBuf,
        /// The request: a command name (`status`, `stats`, `quit`, …) or a whole JSON request
        /// such as `{"cmd":"read","gpa":4096,"len":64}`.
        request: String,
    },
    /// Read a migration's timeline (from --trace): print its phase table and write an SVG
    /// with the timeline and the curves of remaining bytes and dirty rate.
    Report {
        /// The trace file (Chrome trace-event JSON).
        file: PathBuf,
        /// Where to write the SVG (default: FILE with the extension .svg).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Benchmarks that compare whole migrations side by side in one run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Real VFs bound to vfio-pci: check one, run the self-test of every step the companion
    /// relies on, or run that self-test on an emulated SR-IOV VF inside a nested guest.
    #[command(subcommand)]
    Vf(VfCommand),
    /// The main job on this machine: two VMs with companions, a device writing guest RAM during
    /// precopy, one migration, and a check that no device write was lost. Its last output line
    /// is a JSON object.
    Demo {
        /// `transparent` (device writes logged into QEMU's dirty log) or `unsafe-no-tracking`
        /// (the negative control: the same load, no logging; must report lost writes). With
        /// --workload also `cooperative` (ranks suspend for the whole migration) and
        /// `passthrough-hotplug` (ranks suspend; an emulated PCIe NIC standing in for a
        /// vfio-pci VF is unplugged before precopy and plugged in at the destination).
        #[arg(long, value_enum, default_value = "transparent")]
        strategy: Strategy,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        mem_mib: u64,
        /// Device writes per second of the traffic generator.
        #[arg(long, default_value_t = 4000)]
        rate: u64,
        /// Bytes per device write (one record per 4 KiB page; 64 to 4096).
        #[arg(long, default_value_t = 256)]
        record_size: u32,
        /// QEMU `max-bandwidth`, bytes/s: lower keeps precopy open longer.
        #[arg(long, default_value_t = 64 << 20)]
        max_bandwidth: u64,
        /// QEMU `downtime-limit`, ms.
        #[arg(long)]
        downtime_limit: Option<u64>,
        /// Leave the destination paused and compare every page of both RAM images by hash.
        #[arg(long)]
        keep_paused: bool,
        /// Where to put the VMs' run directories (default: a fresh temporary directory).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// QEMU accelerator.
        #[arg(long, default_value = "tcg")]
        accel: String,
        /// Seconds the generator runs before the migration starts.
        #[arg(long, default_value_t = 0.5)]
        lead_time: f64,
        /// Run an MPI-style job across VMs on soft VFs instead of the generator, and migrate
        /// VM `a` midway: `lu-lite` (compared with a run without migration), `rdma-bw` (every
        /// byte sent must arrive; --n is the message size) or `rdma-lat`.
        #[arg(long, value_enum)]
        workload: Option<Workload>,
        /// VMs of the job, each on its own test host (network namespace).
        #[arg(long, default_value_t = 3)]
        vms: usize,
        /// lu-lite grid size.
        #[arg(long, default_value_t = 256)]
        n: u32,
        /// lu-lite iterations.
        #[arg(long, default_value_t = 1500)]
        iters: u32,
        /// Migrate once rank `a` has done this many iterations.
        #[arg(long, default_value_t = 300)]
        migrate_at: u32,
        /// Write the migration's timeline to FILE (Chrome trace-event JSON).
        #[arg(long)]
        trace: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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

#[derive(Subcommand)]
enum VfCommand {
    /// Report on a VF: its driver, IOMMU group and members, IDs, VFIO regions, reset and FLR,
    /// and dirty-tracking mode, with every problem and how to fix it. Works (reporting the
    /// problem) even when the VF cannot be opened. Exits non-zero if vfmig cannot use the VF.
    Check {
        /// PCI address of the VF: `0000:00:02.1`, or `00:02.1` for domain 0000.
        bdf: String,
        /// Print the report as one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Where sysfs is mounted (for tests against a fake tree).
        #[arg(long, default_value = "/sys", value_name = "DIR")]
        sysfs_root: PathBuf,
    },
    /// Exercise a VF bound to vfio-pci step by step: open, map_memfd (16 MiB of memfd as guest
    /// RAM at IOVA = GPA 0x100000000), read_config, bus_master, reset, dirty_tracking, unmap
    /// (with a remap on a changed table), release. Prints `step NAME: ok` or the error as each
    /// step finishes, then, as the last line, a JSON object
    /// `{"bdf":…,"steps":{…},"dirty_tracking":…,"ok":…,"details":{…}}`. Exits non-zero if a
    /// step failed. Needs root (or access to /dev/vfio) and a locked-memory limit of 16 MiB.
    SelfTest {
        /// PCI address of the VF: `0000:00:02.1`, or `00:02.1` for domain 0000.
        bdf: String,
        /// Also make the VF DMA: on an Intel 82576 VF, set up a receive ring in the mapped
        /// memfd, send it a frame from this network interface (its PF's), and check that the
        /// device wrote it there and that the dirty sync reports the page (step `device_dma`).
        #[arg(long, value_name = "IFACE")]
        dma_from: Option<String>,
        /// With --dma-from, the negative control: the receive ring names IOVAs outside the
        /// IOMMU mapping, so the device's writes fault and `device_dma` must fail.
        #[arg(long, requires = "dma_from")]
        dma_unmapped: bool,
    },
    /// Prove the VFIO path on this machine without SR-IOV hardware: boot an L1 guest under TCG
    /// with an emulated IOMMU (intel-iommu) and SR-IOV NIC (igb), create two VFs, bind one to
    /// vfio-pci, and run `vfmig vf self-test` on it inside L1. Prints each step as it finishes;
    /// the last line is one JSON object `{"steps":{"boot":…,"create_vfs":…,
    /// "bind_vfio_pci":…,"open":…,…},"dirty_tracking":…,"ok":…}`. Exits non-zero if a step
    /// failed. Needs `tools/setup.sh` (kernel, L1 initramfs) and `tools/build-static.sh`.
    NestedTest {
        /// The statically linked vfmig to run inside L1 (default: the one
        /// tools/build-static.sh builds, or $VFMIG_STATIC_BIN).
        #[arg(long)]
        vfmig: Option<PathBuf>,
        /// L1's RAM in MiB.
        #[arg(long, default_value_t = 512)]
        mem_mib: u64,
        /// Fail if L1 has not finished after this many seconds.
        #[arg(long, default_value_t = 240)]
        timeout: u64,
        /// Where to write the combined initramfs and L1's console log (default: a fresh
        /// temporary directory, kept).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Also print every line of L1's console (on stderr).
        #[arg(long)]
        verbose: bool,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn image(kernel: Option<PathBuf>, initrd: Option<PathBuf>) -> Result<GuestImage> {
    match (kernel, initrd) {
        (Some(kernel), Some(initrd)) => Ok(GuestImage { kernel, initrd }),
        (None, None) => GuestImage::from_setup().map_err(anyhow::Error::msg),
        _ => bail!("give both --kernel and --initrd, or neither"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Companion {
            name,
            socket,
            control,
            unsafe_no_tracking,
            fabric_listen,
            cluster,
            vfio,
        } => {
            init_logging("info");
            let cluster = match cluster {
                Some(path) => ClusterMap::load(&path)?,
                None => ClusterMap::default(),
            };
            companion::run(CompanionConfig {
                name,
                socket,
                control,
                unsafe_no_tracking,
                fabric_listen,
                cluster,
                vfio,
            })?;
        }
        Command::Vf(cmd) => run_vf(cmd)?,
        Command::Launch {
            name,
            run_dir,
            role,
            mem_mib,
            accel,
            config_dir,
            kernel,
            initrd,
            qemu,
            passthrough_port,
            vf_device,
        } => {
            init_logging("info");
            let passthrough = (passthrough_port || vf_device.is_some())
                .then_some(PassthroughSlot { device: vf_device });
            let mut vm = RunningVm::launch(VmSpec {
                mac: mac_for(&name),
                name,
                run_dir,
                mem_mib,
                role,
                accel,
                image: image(kernel, initrd)?,
                vfmig_bin: vfmig_bin()?,
                qemu_bin: qemu,
                config_dir,
                nic: Nic::VhostUser,
                netns: None,
                fabric: None,
                guest_args: String::new(),
                passthrough,
            })?;
            println!("{}", serde_json::to_string(&vm.paths)?);
            let stop = cancel_on_signal()?;
            while vm.qemu_running() && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
            }
            tracing::info!("stopping QEMU and the companion");
            vm.stop();
        }
        Command::Migrate {
            src_qmp,
            plan,
            multifd,
            dst_qmp,
            uri,
            keep_paused,
            max_bandwidth,
            downtime_limit,
            timeout,
            src_control,
            dst_control,
            cancel,
            strategy,
            rank_control,
            vf_id,
            dst_vf_device,
            src_vf_device,
            hotplug_timeout,
            trace,
        } => {
            init_logging("warn");
            let cancel_flag = cancel_on_signal()?;
            if let Some(plan) = plan {
                let plan: MigrationPlan = serde_json::from_str(
                    &std::fs::read_to_string(&plan)
                        .with_context(|| format!("reading the plan {}", plan.display()))?,
                )
                .with_context(|| format!("the plan {} is malformed", plan.display()))?;
                let common = MigrateOptions {
                    uri: String::new(),
                    keep_paused,
                    max_bandwidth,
                    downtime_limit_ms: downtime_limit,
                    multifd,
                    timeout: Duration::from_secs(timeout),
                    cancel: Some(cancel_flag),
                    ..Default::default()
                };
                let start = std::time::Instant::now();
                let outcomes = orchestrator::plan::migrate_all(&plan, &common);
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
                return Ok(());
            }
            let Some(src_qmp) = src_qmp else {
                bail!("give --src-qmp, or --plan");
            };
            let src = QmpClient::connect(&src_qmp, Duration::from_secs(10))
                .context("connecting to the source QEMU")?;
            if cancel {
                src.migrate_cancel()
                    .context("migrate_cancel on the source")?;
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                let status = loop {
                    let s = src.query_status().context("query-status on the source")?;
                    if s.running || std::time::Instant::now() > deadline {
                        break s;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                };
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
                return Ok(());
            }
            let (Some(dst_qmp), Some(uri)) = (dst_qmp, uri) else {
                bail!("give --dst-qmp and --uri, or --cancel");
            };
            let dst = QmpClient::connect(&dst_qmp, Duration::from_secs(10))
                .context("connecting to the destination QEMU")?;
            let opts = MigrateOptions {
                uri,
                keep_paused,
                max_bandwidth,
                downtime_limit_ms: downtime_limit,
                multifd,
                timeout: Duration::from_secs(timeout),
                companions: src_control.clone().zip(dst_control),
                cancel: Some(cancel_flag),
                cooperative: match strategy {
                    Strategy::Cooperative | Strategy::PassthroughHotplug
                        if rank_control.is_empty() =>
                    {
                        bail!("--strategy {strategy:?} needs --rank-control for every rank")
                    }
                    Strategy::Cooperative | Strategy::PassthroughHotplug => Some(rank_control),
                    _ => None,
                },
                hotplug: match (strategy, dst_vf_device) {
                    (Strategy::PassthroughHotplug, None) => bail!(
                        "--strategy passthrough-hotplug needs --dst-vf-device (the free VF to \
                         plug in at the destination)"
                    ),
                    (Strategy::PassthroughHotplug, Some(dst_dev)) => Some(Hotplug {
                        device_id: vf_id,
                        destination_device: hotplug::device_args(&dst_dev)?,
                        source_device: src_vf_device
                            .as_deref()
                            .map(hotplug::device_args)
                            .transpose()?,
                        detach_timeout: Duration::from_secs(hotplug_timeout),
                        attach_timeout: Duration::from_secs(hotplug_timeout),
                    }),
                    _ => None,
                },
                trace: trace.as_ref().map(|_| Arc::new(TraceRecorder::new())),
            };
            if strategy == Strategy::UnsafeNoTracking {
                let Some(ctl) = &src_control else {
                    bail!("--strategy unsafe-no-tracking needs --src-control");
                };
                ControlClient::connect(ctl, Duration::from_secs(5))?
                    .call(&Request::SetTracking { enabled: false })?;
            }
            let result = with_progress(|observer| migrate::migrate(&src, &dst, &opts, observer));
            if let (Some(path), Some(rec)) = (&trace, &opts.trace) {
                rec.set_meta("strategy", format!("{strategy:?}"));
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
        }
        Command::Ctl { control, request } => {
            init_logging("warn");
            let line = if request.trim_start().starts_with('{') {
                request.clone()
            } else {
                serde_json::json!({ "cmd": request.trim() }).to_string()
            };
            let cmd: Request = serde_json::from_str(&line)
                .with_context(|| format!("`{request}` is not a control request"))?;
            let reply = ControlClient::connect(&control, Duration::from_secs(5))?.call(&cmd)?;
            println!("{}", serde_json::to_string(&reply)?);
        }
        Command::Report { file, svg } => {
            init_logging("warn");
            let svg = svg.unwrap_or_else(|| file.with_extension("svg"));
            let report = vfmig::trace::run_report(&file, &svg)?;
            println!("{}", report.markdown());
            eprintln!("report: picture written to {}", svg.display());
        }
        Command::Bench(BenchCommand::Migration {
            pairs,
            mem_mib,
            max_bandwidth,
            run_dir,
            accel,
        }) => {
            init_logging("vfmig=warn");
            let run_dir = run_dir_or_temp(run_dir)?;
            let opts = DemoOptions {
                strategy: Strategy::Transparent,
                mem_mib,
                rate: 0,
                record_size: 256,
                max_bandwidth: Some(max_bandwidth),
                downtime_limit_ms: None,
                keep_paused: true,
                run_dir,
                accel,
                image: image(None, None)?,
                vfmig_bin: vfmig_bin()?,
                lead_time: Duration::ZERO,
                timeout: Duration::from_secs(600),
                trace: None,
            };
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
        }
        Command::Bench(BenchCommand::Strategies {
            vms,
            mem_mib,
            n,
            iters,
            migrate_at,
            max_bandwidth,
            rounds,
            run_dir,
        }) => {
            init_logging("vfmig=warn");
            let run_dir = run_dir_or_temp(run_dir)?;
            let image = image(None, None)?;
            let vfmig_bin = vfmig_bin()?;
            let opts = ScenarioOptions {
                workload: Workload::LuLite,
                vms: vms.max(2),
                strategy: None,
                mem_mib,
                n,
                iters,
                migrate_at,
                max_bandwidth: Some(max_bandwidth),
                run_dir: run_dir.clone(),
                accel: "tcg".into(),
                image: image.clone(),
                vfmig_bin: vfmig_bin.clone(),
                timeout: Duration::from_secs(900),
                fault: None,
                trace: None,
            };
            let plain = DemoOptions {
                strategy: Strategy::Transparent,
                mem_mib,
                rate: 0,
                record_size: 256,
                max_bandwidth: Some(max_bandwidth),
                downtime_limit_ms: None,
                keep_paused: true,
                run_dir,
                accel: "tcg".into(),
                image,
                vfmig_bin,
                lead_time: Duration::ZERO,
                timeout: Duration::from_secs(600),
                trace: None,
            };
            let rows = bench::strategies(&opts, &plain, rounds, |l| eprintln!("bench: {l}"))?;
            println!("{}", bench::strategies_markdown(&rows));
            println!("{}", serde_json::json!({ "rows": rows }));
        }
        Command::Bench(BenchCommand::Plan {
            vms,
            mem_mib,
            max_bandwidth,
            run_dir,
        }) => {
            init_logging("vfmig=warn");
            let opts = DemoOptions {
                strategy: Strategy::Transparent,
                mem_mib,
                rate: 0,
                record_size: 256,
                max_bandwidth: Some(max_bandwidth),
                downtime_limit_ms: None,
                keep_paused: true,
                run_dir: run_dir_or_temp(run_dir)?,
                accel: "tcg".into(),
                image: image(None, None)?,
                vfmig_bin: vfmig_bin()?,
                lead_time: Duration::ZERO,
                timeout: Duration::from_secs(600),
                trace: None,
            };
            let mut rows = Vec::new();
            for n in vms {
                let row = lab::plan_bench::bench_row(&opts, n.max(1))?;
                eprintln!("bench: {row:?}");
                rows.push(row);
            }
            println!("{}", lab::plan_bench::markdown(&rows));
            println!("{}", serde_json::json!({ "rows": rows }));
        }
        Command::Bench(BenchCommand::Fabric { rounds }) => {
            init_logging("vfmig=warn");
            let result = fabric_bench::run(rounds.max(1), |line| eprintln!("bench: {line}"))?;
            println!("{}", fabric_bench::markdown(&result));
            println!("{}", serde_json::to_string(&result)?);
        }
        Command::Demo {
            strategy,
            mem_mib,
            rate,
            record_size,
            max_bandwidth,
            downtime_limit,
            keep_paused,
            run_dir,
            accel,
            lead_time,
            workload,
            vms,
            n,
            iters,
            migrate_at,
            trace,
        } => {
            init_logging("vfmig=info,warn");
            let recorder = trace.as_ref().map(|_| Arc::new(TraceRecorder::new()));
            let write_trace = |meta: &[(&str, serde_json::Value)]| -> Result<()> {
                if let (Some(path), Some(rec)) = (&trace, &recorder) {
                    for (k, v) in meta {
                        rec.set_meta(k, v.clone());
                    }
                    rec.write(path)?;
                    eprintln!("demo: timeline written to {}", path.display());
                }
                Ok(())
            };
            if let Some(workload) = workload {
                let opts = ScenarioOptions {
                    workload,
                    vms: vms.max(2),
                    strategy: Some(strategy),
                    mem_mib: mem_mib.min(512),
                    n,
                    iters,
                    migrate_at,
                    max_bandwidth: Some(max_bandwidth),
                    run_dir: run_dir_or_temp(run_dir)?,
                    accel,
                    image: image(None, None)?,
                    vfmig_bin: vfmig_bin()?,
                    timeout: Duration::from_secs(900),
                    fault: None,
                    trace: recorder.clone(),
                };
                let report = with_progress(|observer| scenario::run_compared(&opts, observer))?;
                write_trace(&[
                    ("strategy", serde_json::json!(strategy)),
                    ("vm", serde_json::json!("a")),
                    ("downtime_ms", serde_json::json!(report.downtime_ms)),
                ])?;
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
                return Ok(());
            }
            if matches!(
                strategy,
                Strategy::Cooperative | Strategy::PassthroughHotplug
            ) {
                bail!(
                    "--strategy {strategy:?} suspends a job's ranks: the generator demo has none. \
                     Add --workload lu-lite"
                );
            }
            let run_dir = run_dir_or_temp(run_dir)?;
            let opts = DemoOptions {
                strategy,
                mem_mib,
                rate,
                record_size,
                max_bandwidth: Some(max_bandwidth),
                downtime_limit_ms: downtime_limit,
                keep_paused,
                run_dir: run_dir.clone(),
                accel,
                image: image(None, None)?,
                vfmig_bin: vfmig_bin()?,
                lead_time: Duration::from_secs_f64(lead_time),
                timeout: Duration::from_secs(600),
                trace: recorder.clone(),
            };
            let report = with_progress(|observer| demo::run(&opts, observer))?;
            write_trace(&[
                ("strategy", serde_json::json!(strategy)),
                ("vm", serde_json::json!("source")),
                ("downtime_ms", serde_json::json!(report.downtime_ms)),
            ])?;
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
        }
    }
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// A flag that Ctrl-C (SIGINT) or SIGTERM sets: it cancels a migration, or stops what
/// `vfmig launch` started.
fn cancel_on_signal() -> Result<Arc<AtomicBool>> {
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal::signal(sig, signal::SigHandler::Handler(on_signal)) }
            .context("cannot install the signal handler")?;
    }
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("vfmig: interrupted");
            f.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    Ok(flag)
}

/// This program, to run companions with.
fn vfmig_bin() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the vfmig binary")
}

/// The run directory given, or a fresh one.
fn run_dir_or_temp(run_dir: Option<PathBuf>) -> Result<PathBuf> {
    match run_dir {
        Some(d) => Ok(d),
        None => tempfile_dir(),
    }
}

/// A fresh directory for run directories, kept after the run for its logs.
fn tempfile_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("vfmig-run-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(base)
}

/// `vfmig vf …`: the handlers of the VF commands.
fn run_vf(cmd: VfCommand) -> Result<()> {
    use std::io::Write;
    use vfmig::vf::vfio;
    init_logging("warn");
    let ok = match cmd {
        VfCommand::Check {
            bdf,
            json,
            sysfs_root,
        } => {
            let report = vfio::check_with_root(&sysfs_root, &bdf);
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
            report.ok
        }
        VfCommand::NestedTest {
            vfmig,
            mem_mib,
            timeout,
            work_dir,
            verbose,
        } => {
            use vfmig::lab::nested::{self, NestedOptions};
            let mut opts = NestedOptions::from_setup(run_dir_or_temp(work_dir)?);
            if let Some(v) = vfmig {
                opts.vfmig = v;
            }
            opts.mem_mib = mem_mib;
            opts.timeout = Duration::from_secs(timeout);
            opts.verbose = verbose;
            eprintln!(
                "vf nested-test: booting L1 (kernel {}), console in {}",
                opts.kernel.display(),
                opts.work_dir.join("l1-console.log").display()
            );
            let report = nested::run(&opts, &mut |name, result| {
                println!("step {name}: {result}");
                let _ = std::io::stdout().flush();
            })?;
            println!("{}", serde_json::to_string(&report.to_json())?);
            report.ok
        }
        VfCommand::SelfTest {
            bdf,
            dma_from,
            dma_unmapped,
        } => {
            let dma = dma_from
                .as_deref()
                .map(|from| vfmig::lab::vfio_selftest::DmaProbe {
                    from,
                    unmapped: dma_unmapped,
                });
            let report = vfmig::lab::vfio_selftest::self_test_with_dma(&bdf, dma, &mut |step| {
                println!("{step}");
                let _ = std::io::stdout().flush();
            });
            println!("{}", serde_json::to_string(&report)?);
            report.ok()
        }
    };
    std::io::stdout().flush()?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
