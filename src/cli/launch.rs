//! `vfmig launch`: a VM's companion, then QEMU, in one run directory.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;

use vfmig::orchestrator::launch::{mac_for, Nic, PassthroughSlot, Role, RunningVm, VmSpec};

use super::{cancel_on_signal, image, init_logging, vfmig_bin};

/// The arguments of `vfmig launch`.
#[derive(clap::Args)]
pub struct Args {
    /// The VM's name.
    #[arg(long)]
    pub name: String,
    /// Run directory (sockets, serial log, logs, pid files).
    #[arg(long)]
    pub run_dir: PathBuf,
    /// Start as a migration source (boots the guest) or destination (`-incoming defer -S`).
    #[arg(long, value_enum, default_value = "source")]
    pub role: Role,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem_mib: u64,
    /// QEMU accelerator: `tcg`, or `kvm` where KVM can boot the guest.
    #[arg(long, default_value = "tcg")]
    pub accel: String,
    /// Directory with edited copies of qemu-patches-free-config/*.args (default: built in).
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Guest kernel (default: the one tools/setup.sh fetched).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: the one tools/setup.sh built).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Give the VM a pcie-root-port (id `vfmig-vf-port`) for a passthrough VF, for the
    /// `passthrough-hotplug` strategy; alone, the slot is empty (a destination).
    #[arg(long)]
    pub passthrough_port: bool,
    /// The passthrough VF plugged into that port at start, in `-device` syntax, e.g.
    /// `vfio-pci,host=0000:3b:02.1,id=vfmig-vf,bus=vfmig-vf-port` (implies
    /// --passthrough-port).
    #[arg(long)]
    pub vf_device: Option<String>,
}

/// Starts both, prints the run's paths (JSON), and stops both on Ctrl-C or when QEMU exits.
pub fn run(args: Args) -> Result<()> {
    let Args {
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
    } = args;
    init_logging("info");
    let passthrough =
        (passthrough_port || vf_device.is_some()).then_some(PassthroughSlot { device: vf_device });
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
        ip_nic: None,
    })?;
    println!("{}", serde_json::to_string(&vm.paths)?);
    let stop = cancel_on_signal()?;
    while vm.qemu_running() && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    tracing::info!("stopping QEMU and the companion");
    vm.stop();
    Ok(())
}
