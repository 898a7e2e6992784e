//! The VFIO VF: a real SR-IOV VF bound to vfio-pci, owned through `vfio-ioctls`.
//!
//! - [`VfioVf::open`] checks sysfs first ([`sysfs`]: the device exists, vfio-pci holds it, it
//!   has a viable IOMMU group), then opens the type1 container and the device.
//! - Guest RAM is mapped into the device's IOMMU domain at IOVA = GPA, and remapped when the
//!   memory table changes ([`mapping`]).
//! - Config space goes through the VFIO config region ([`config`]): IDs, bus master, and the
//!   quiesce (clear bus master, wait for Transactions Pending to clear).
//! - Dirty pages come from device DMA logging where the device's VFIO driver has it; otherwise
//!   every writable mapped page counts as dirty at every sync ([`dirty`]).
//! - [`check`] reports on a device without needing it to work. The self-test that exercises
//!   every step on a real VF is lab equipment: `crate::lab::vfio_selftest`.

pub mod check;
pub mod config;
pub(crate) mod device;
pub mod dirty;
pub mod mapping;
mod seam;
pub mod sysfs;

use std::path::PathBuf;

pub use check::{check, check_with_root, CheckReport, DeviceRegion};
pub use device::VfioVf;
pub use mapping::RegionKey;
pub use sysfs::{Bdf, GroupMember, SysfsInfo, DEFAULT_SYSFS_ROOT};

/// "bound to X" or "has no driver", for messages.
fn held_by(driver: &Option<String>) -> String {
    match driver {
        Some(d) => format!("is bound to {d}, not vfio-pci"),
        None => "has no driver".to_string(),
    }
}

/// Why the VFIO VF could not be opened or driven. Every message says what happened and what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VfioVfError {
    /// The PCI address does not parse.
    #[error(
        "`{input}` is not a PCI address ({reason}); write it as DOMAIN:BUS:DEVICE.FUNCTION in \
         hexadecimal, e.g. 0000:00:02.1 (`lspci -D` lists them)"
    )]
    BadBdf {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No such device in sysfs.
    #[error(
        "no PCI device {bdf}: {path} does not exist. Check the address with `lspci -D`; for a \
         VF, check that its PF has VFs (`cat /sys/bus/pci/devices/PF/sriov_numvfs`; create them \
         with `echo N > /sys/bus/pci/devices/PF/sriov_numvfs`) and that the PF's driver is loaded",
        path = path.display()
    )]
    DeviceMissing {
        /// The address.
        bdf: String,
        /// The sysfs directory that is missing.
        path: PathBuf,
    },
    /// The device is not bound to vfio-pci.
    #[error("{bdf} {held}; bind it to vfio-pci (as root):\n{commands}", held = held_by(driver))]
    NotBoundToVfio {
        /// The address.
        bdf: String,
        /// The driver holding it, if any.
        driver: Option<String>,
        /// The commands that rebind it, one per line.
        commands: String,
    },
    /// The device has no IOMMU group.
    #[error(
        "{bdf} has no iommu_group in sysfs: the IOMMU is off. Enable VT-d (Intel) or AMD-Vi \
         (AMD) in the firmware and boot with intel_iommu=on or amd_iommu=on on the kernel \
         command line (/sys/kernel/iommu_groups must not be empty); in a VM, give it a virtual \
         IOMMU (QEMU: -device intel-iommu)"
    )]
    NoIommuGroup {
        /// The address.
        bdf: String,
    },
    /// Another device of the group is bound to a host driver.
    #[error(
        "IOMMU group {group} of {bdf} is not viable: its member {member} is bound to {driver}. \
         VFIO needs every device of the group bound to vfio-pci or to no driver (bridges \
         excepted): unbind it with `echo {member} > /sys/bus/pci/devices/{member}/driver/unbind`, \
         or bind it to vfio-pci too"
    )]
    GroupNotViable {
        /// The address.
        bdf: String,
        /// The group.
        group: u32,
        /// The member that blocks it.
        member: String,
        /// Its driver.
        driver: String,
    },
    /// `/dev/vfio/vfio` could not be opened.
    #[error("cannot open the VFIO container /dev/vfio/vfio: {source}; {hint}")]
    NoContainer {
        /// The open error.
        #[source]
        source: std::io::Error,
        /// What to do.
        hint: String,
    },
    /// The container refused to work.
    #[error("the VFIO container is unusable: {reason}; {hint}")]
    Container {
        /// What vfio-ioctls said.
        reason: String,
        /// What to do.
        hint: String,
    },
    /// The device could not be opened through its group.
    #[error("cannot open {bdf} through VFIO: {reason}; {hint}")]
    OpenDevice {
        /// The address.
        bdf: String,
        /// What vfio-ioctls or the kernel said.
        reason: String,
        /// What to do.
        hint: String,
    },
    /// A config-space access failed.
    #[error(
        "{bdf}: {what} through the VFIO config region failed: {source}; the device may have \
         been removed or be in reset: check `lspci -s {bdf} -vv`"
    )]
    Config {
        /// The address.
        bdf: String,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A guest RAM table was refused before anything was mapped.
    #[error("guest RAM table refused, nothing changed: {reason}")]
    BadTable {
        /// What is wrong.
        reason: String,
    },
    /// A region could not be mapped into the IOMMU domain.
    #[error(
        "mapping guest RAM {gpa:#x}+{size:#x} at IOVA = GPA into the VF's IOMMU domain failed: \
         {reason}. ENOMEM: the locked-memory limit is too low to pin guest RAM (raise it: \
         `ulimit -l unlimited`, or LimitMEMLOCK=infinity); EEXIST: that IOVA range is \
         already mapped; EFAULT: the host address is not mapped in this process"
    )]
    Map {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
        /// The error.
        reason: String,
    },
    /// A region could not be unmapped.
    #[error(
        "unmapping guest RAM {gpa:#x}+{size:#x} from the VF's IOMMU domain failed: {reason}; \
         it stays mapped until the device is released"
    )]
    Unmap {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
        /// The error.
        reason: String,
    },
    /// Transactions were still pending after the quiesce's timeout.
    #[error(
        "{bdf}: transactions still pending {waited_ms} ms after bus master was cleared: DMA may \
         still land in guest RAM after the dirty pages were synced. Reset the device (FLR) \
         before it is used again"
    )]
    TransactionsPending {
        /// The address.
        bdf: String,
        /// How long the quiesce waited.
        waited_ms: u64,
    },
    /// VFIO_DEVICE_RESET failed.
    #[error(
        "{bdf}: VFIO_DEVICE_RESET failed: {source}; the kernel could not reset the function \
         (EAGAIN/EBUSY: another function of the slot or bus is in use; retry, or reset the PF)"
    )]
    Reset {
        /// The address.
        bdf: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Device DMA logging failed.
    #[error("{bdf}: device DMA logging: {action} failed: {reason}")]
    DmaLogging {
        /// The address.
        bdf: String,
        /// What was being done.
        action: String,
        /// The error.
        reason: String,
    },
    /// The device was released.
    #[error("{bdf} was released (its VFIO files are closed); open it again to use it")]
    Released {
        /// The address.
        bdf: String,
    },
    /// The self-test's stand-in guest RAM could not be made.
    #[error("cannot make the self-test's guest RAM: {what} failed: {source}")]
    Memfd {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
