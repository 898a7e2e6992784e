//! What a VM is launched from: its spec (name, RAM, role, NIC, image, host, soft VF,
//! passthrough slot) and the layout of its run directory.

use std::path::{Path, PathBuf};

use super::LaunchError;

/// Which side of a migration a VM is started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Boots and runs the guest.
    Source,
    /// Waits for an incoming migration (`-incoming defer -S`).
    Destination,
}

/// The VM's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nic {
    /// virtio-net whose backend is the vfmig companion (vhost-user).
    VhostUser,
    /// The same NIC with no backend and no companion: the baseline.
    Plain,
}

/// Where the guest's kernel and initramfs are.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The image `tools/setup.sh` builds: under `$VFMIG_CACHE`, or `.cache/` of the source tree.
    pub fn from_setup() -> Result<Self, LaunchError> {
        Self::from_setup_with("initramfs.cpio.gz")
    }

    /// The kernel of [`GuestImage::from_setup`] with another initramfs of the same cache
    /// (`mpi-initramfs.cpio.gz`: the MPI guest).
    pub fn from_setup_with(initrd: &str) -> Result<Self, LaunchError> {
        let cache = std::env::var_os("VFMIG_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache"));
        let image = Self {
            kernel: cache.join("kernel/vmlinuz"),
            initrd: cache.join(initrd),
        };
        for f in [&image.kernel, &image.initrd] {
            if !f.exists() {
                return Err(LaunchError::NoGuestImage { file: f.clone() });
            }
        }
        Ok(image)
    }
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The VM's name.
    pub name: String,
    /// Its run directory (created).
    pub run_dir: PathBuf,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Source or destination.
    pub role: Role,
    /// QEMU accelerator (`tcg` or `kvm`).
    pub accel: String,
    /// The guest (source only needs it to boot; the destination gets the same options).
    pub image: GuestImage,
    /// The `vfmig` binary to run the companion with.
    pub vfmig_bin: PathBuf,
    /// QEMU binary.
    pub qemu_bin: String,
    /// Override of the compiled-in option files.
    pub config_dir: Option<PathBuf>,
    /// The NIC's MAC address.
    pub mac: String,
    /// The NIC, and with it whether a companion runs.
    pub nic: Nic,
    /// Network namespace to run the companion and QEMU in (a "host"); none: this one.
    pub netns: Option<String>,
    /// The companion's soft VF: its fabric address and the cluster file; none: no VF.
    pub fabric: Option<FabricSpec>,
    /// Extra guest kernel arguments (`vfmig.run=… vfmig.args=…` for the guest's agent).
    pub guest_args: String,
    /// A pcie-root-port for a passthrough VF (`passthrough-hotplug`), with or without a device
    /// in it; none: no port.
    pub passthrough: Option<PassthroughSlot>,
    /// A second NIC on an IP segment shared by the VMs of a run (the MPI runtime's path);
    /// none: only the vhost-user NIC.
    pub ip_nic: Option<IpNic>,
}

/// A second virtio-net NIC on a QEMU multicast socket segment (`ip-nic.args`), apart from
/// the companion's NIC. Every QEMU of a run joins the same group, a destination too, with the
/// VM's MAC: the segment has no switch to learn where a MAC is, so the guest's address
/// follows the VM through a migration with nothing to update.
#[derive(Debug, Clone)]
pub struct IpNic {
    /// The NIC's MAC address (the same at the source and the destination).
    pub mac: String,
    /// The segment: a multicast group and port, `230.x.y.z:port`.
    pub group: std::net::SocketAddrV4,
    /// The host address QEMU sends and joins the group from (the host's address on its
    /// bridge, or 127.0.0.1 when the VMs share this host's loopback).
    pub local: std::net::Ipv4Addr,
}

/// The PCIe slot of a passthrough VF.
#[derive(Debug, Clone)]
pub struct PassthroughSlot {
    /// The `-device` value of the VF plugged in at start (`vfio-pci,host=…,id=…,bus=PORT` in
    /// production; an emulated PCIe NIC in the tests), or `None` for an empty slot (a
    /// destination: its VF is plugged in after the migration).
    pub device: Option<String>,
}

/// The id of the pcie-root-port of the passthrough VF (`passthrough-port.args`).
pub const PASSTHROUGH_PORT: &str = "vfmig-vf-port";
/// The id of the passthrough VF device.
pub const PASSTHROUGH_DEVICE: &str = "vfmig-vf";

/// The `-device` value of the emulated PCIe NIC that stands in for a passthrough VF where there
/// is none (the tests): a virtio-net-pci on the VF's port, without a backend.
pub fn stand_in_vf_device(mac: &str) -> String {
    format!("virtio-net-pci,id={PASSTHROUGH_DEVICE},bus={PASSTHROUGH_PORT},mac={mac},romfile=")
}

/// The soft VF of a VM's companion.
#[derive(Debug, Clone)]
pub struct FabricSpec {
    /// Address the soft VF listens on (`host:port`).
    pub listen: String,
    /// The cluster file.
    pub cluster: PathBuf,
    /// The VM's private fabric key (mode 0600, from `vfmig keys generate`); the same file for a
    /// VM's source and destination. None: the fabric runs without authentication
    /// (`--insecure-fabric`, benchmarks only).
    pub key: Option<PathBuf>,
    /// The companion starts with `--unsafe-no-tracking`: the negative control of a migration
    /// that no vfmig command drives (it loses the device's writes).
    pub untracked: bool,
    /// A destination's companion does not take the VF over from the source's (no
    /// `--incoming`): the negative control of a migration in which the VF's state stays
    /// behind.
    pub no_handoff: bool,
}

/// The files of one VM's run directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunPaths {
    /// The directory.
    pub dir: PathBuf,
    /// vhost-user socket (the companion listens, QEMU connects).
    pub vhost_socket: PathBuf,
    /// The companion's control socket.
    pub control_socket: PathBuf,
    /// QEMU's QMP socket.
    pub qmp_socket: PathBuf,
    /// The guest console.
    pub serial_log: PathBuf,
    /// The companion's log.
    pub companion_log: PathBuf,
    /// QEMU's stderr.
    pub qemu_log: PathBuf,
    /// QEMU's pid.
    pub qemu_pid: PathBuf,
    /// The companion's pid.
    pub companion_pid: PathBuf,
}

impl RunPaths {
    /// The standard layout under `dir`.
    pub fn under(dir: &Path) -> Self {
        Self {
            dir: dir.into(),
            vhost_socket: dir.join("vhost-user.sock"),
            control_socket: dir.join("control.sock"),
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            companion_log: dir.join("companion.log"),
            qemu_log: dir.join("qemu.log"),
            qemu_pid: dir.join("qemu.pid"),
            companion_pid: dir.join("companion.pid"),
        }
    }
}

/// A locally administered MAC address derived from a VM name.
pub fn mac_for(name: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(name.as_bytes()).to_le_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}
