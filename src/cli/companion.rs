//! `vfmig companion`: the per-VM companion process.

use std::path::PathBuf;

use anyhow::Result;

use vfmig::companion::converge::{self, DeviceThrottle};
use vfmig::companion::{self, CompanionConfig};
use vfmig::vf::soft::ClusterMap;

use super::init_logging;

/// The arguments of `vfmig companion`.
#[derive(clap::Args)]
pub struct Args {
    /// The VM's name, for logs and status.
    #[arg(long)]
    pub name: String,
    /// vhost-user socket to listen on; QEMU's `-chardev socket,path=…` connects to it.
    #[arg(long)]
    pub socket: PathBuf,
    /// Control socket (JSON lines, mode 0600) for the orchestrator.
    #[arg(long)]
    pub control: PathBuf,
    /// Start with dirty tracking of device writes OFF. Loses writes during a migration:
    /// only for the negative control that proves the checks can fail.
    #[arg(long)]
    pub unsafe_no_tracking: bool,
    /// Run the soft VF, listening for peer companions on this address (`host:port`).
    #[arg(long)]
    pub fabric_listen: Option<String>,
    /// Cluster file: `{"vms": {"NAME": "host:port", ...}}`, the fabric address of every VM,
    /// with the public keys and the job key file `vfmig keys generate` adds.
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// This VM's private fabric key (mode 0600), written by `vfmig keys generate`; it moves
    /// with the VM (give it to the destination's companion too).
    #[arg(long, value_name = "FILE")]
    pub fabric_key: Option<PathBuf>,
    /// Run the fabric WITHOUT authentication: anyone who reaches the port can write the
    /// guest's RAM. For benchmarks only; logged as a warning.
    #[arg(long)]
    pub insecure_fabric: bool,
    /// Own this SR-IOV VF, bound to vfio-pci (PCI address `0000:00:02.1` or `00:02.1`):
    /// guest RAM is mapped into its IOMMU domain at IOVA = GPA, it is quiesced at
    /// switchover, and its dirty pages go into QEMU's log. The companion exits with the
    /// reason if the VF cannot be opened (check it first with `vfmig vf check BDF`).
    #[arg(long, value_name = "BDF")]
    pub vfio: Option<String>,
    /// Device auto-converge: slow the VF's writes into guest RAM while a migration runs, so
    /// that a device dirtying pages faster than the link sends them cannot keep precopy from
    /// finishing. `auto`: once logging has run 3 s (or 2 of QEMU's passes) and the device
    /// dirties more than half the migration bandwidth, cut its rate by 20 %, then 10 points
    /// more every second, until it is under half or QEMU's passes shrink. `off`: never. A
    /// rate (`50MB/s`, `64MiB/s`, bytes/s): that limit for the whole precopy. Rates count
    /// dirty bytes (a write costs the 4 KiB pages it touches). Lifted at switchover and when
    /// the migration ends; `vfmig migrate --device-throttle` overrides it per migration.
    #[arg(long, default_value = "auto", value_name = "off|auto|RATE")]
    pub device_throttle: DeviceThrottle,
    /// The migration bandwidth `auto` assumes, bytes/s, until `vfmig migrate` tells the
    /// companion its own `--max-bandwidth` (default: QEMU's default max-bandwidth, 128 MiB/s).
    #[arg(long, default_value_t = converge::DEFAULT_BANDWIDTH, value_name = "BYTES_PER_S")]
    pub migration_bandwidth: u64,
    /// The VM migrates in (QEMU runs with `-incoming`): the companion looks for the
    /// companion that runs the VM's VF (at the VM's address in the cluster file, then at the
    /// cluster's other addresses) and gets the VF's state from it at the switchover, over the
    /// authenticated fabric, whatever drives the migration (vfmig, libvirt, plain QMP). The VF
    /// is served once the VM runs here and the state is taken over; the VM's start waits up
    /// to 10 s for a state still on its way. Needs the VM's fabric key, as the source has.
    #[arg(long)]
    pub incoming: bool,
}

/// Runs the companion until it is told to quit.
pub fn run(args: Args) -> Result<()> {
    let Args {
        name,
        socket,
        control,
        unsafe_no_tracking,
        fabric_listen,
        cluster,
        fabric_key,
        insecure_fabric,
        vfio,
        device_throttle,
        migration_bandwidth,
        incoming,
    } = args;
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
        fabric_key,
        insecure_fabric,
        vfio,
        device_throttle,
        migration_bandwidth,
        incoming,
    })?;
    Ok(())
}
