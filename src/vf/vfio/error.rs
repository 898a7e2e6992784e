//! Why the VFIO VF could not be opened or driven: one error module for the backend, at the
//! bottom of its module tree (it imports none of its siblings).
//!
//! - [`VfioVfError`]: what the backend's callers see. Every message says what happened and what
//!   to do, once; a lower error is a `#[source]`, never repeated in the message.
//! - [`BdfProblem`] and [`TableError`]: what is wrong with an input (a PCI address, a guest RAM
//!   table), part of the message that refuses it.
//! - [`DmaMapError`]: why one map or unmap of the IOMMU domain failed, the source of
//!   [`VfioVfError::Map`] and [`VfioVfError::Unmap`].
//! - [`chain`]: an error and its causes on one line, for reports that hold text.

use std::io;
use std::path::PathBuf;

use vfio_ioctls::VfioError;

/// "bound to X" or "has no driver", for messages.
fn held_by(driver: &Option<String>) -> String {
    match driver {
        Some(d) => format!("is bound to {d}, not vfio-pci"),
        None => "has no driver".to_string(),
    }
}

pub use crate::errors::chain;

/// What is wrong with a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdfProblem {
    /// Not two or three fields separated by colons.
    #[error("expected DOMAIN:BUS:DEVICE.FUNCTION or BUS:DEVICE.FUNCTION")]
    Shape,
    /// No dot between device and function.
    #[error("the device and function must be separated by a dot")]
    NoDot,
    /// A field is not hexadecimal, or too long.
    #[error("the {field} `{text}` is not 1 to {max_digits} hexadecimal digits")]
    NotHex {
        /// Which field.
        field: &'static str,
        /// What it says.
        text: String,
        /// How many digits it may have.
        max_digits: usize,
    },
    /// A field is past its range.
    #[error("the {field} {value:#x} is out of range (at most {max:#x})")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u32,
        /// The largest it may be.
        max: u32,
    },
}

/// What is wrong with a guest RAM table, found before anything is mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A region has no bytes.
    #[error("the region at GPA {gpa:#x} is empty")]
    Empty {
        /// Its GPA.
        gpa: u64,
    },
    /// A region is not page aligned in GPA or size.
    #[error("the region {gpa:#x}+{size:#x} is not 4 KiB aligned in GPA or size")]
    Unaligned {
        /// Its GPA.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// A region's host address is not page aligned.
    #[error(
        "the region at GPA {gpa:#x} has a host address {host_addr:#x} that is not 4 KiB aligned"
    )]
    HostUnaligned {
        /// Its GPA.
        gpa: u64,
        /// Its host address.
        host_addr: u64,
    },
    /// A region runs past the end of the address space.
    #[error("the region {gpa:#x}+{size:#x} wraps around the address space")]
    Wraps {
        /// Its GPA.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// Two regions overlap in GPA.
    #[error("the regions {a_start:#x}..{a_end:#x} and {b_start:#x}..{b_end:#x} overlap in GPA")]
    Overlap {
        /// Start of the first.
        a_start: u64,
        /// End of the first.
        a_end: u64,
        /// Start of the second.
        b_start: u64,
        /// End of the second.
        b_end: u64,
    },
    /// A region describes memory without owning it.
    #[error("the region at GPA {gpa:#x} owns no memory (a descriptor): refusing to map it")]
    NotBacked {
        /// Its GPA.
        gpa: u64,
    },
}

/// Why one map or unmap of the device's IOMMU domain failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaMapError {
    /// The length does not fit this machine's `usize`.
    #[error("the size {size:#x} is too large for this machine")]
    TooLarge {
        /// The length asked for.
        size: u64,
    },
    /// vfio-ioctls refused it.
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// An ioctl of our own failed.
    #[error("{ioctl} failed")]
    Ioctl {
        /// Which ioctl.
        ioctl: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// Why the VFIO VF could not be opened or driven. Every message says what happened and what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VfioVfError {
    /// The PCI address does not parse.
    #[error(
        "`{input}` is not a PCI address ({problem}); write it as DOMAIN:BUS:DEVICE.FUNCTION in \
         hexadecimal, e.g. 0000:00:02.1 (`lspci -D` lists them)"
    )]
    BadBdf {
        /// What was given.
        input: String,
        /// What is wrong with it.
        problem: BdfProblem,
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
    #[error("cannot open the VFIO container /dev/vfio/vfio; {hint}")]
    NoContainer {
        /// The open error.
        #[source]
        source: io::Error,
        /// What to do.
        hint: String,
    },
    /// The container refused to work.
    #[error("the VFIO container is unusable; {hint}")]
    Container {
        /// What vfio-ioctls said.
        #[source]
        source: VfioError,
        /// What to do.
        hint: String,
    },
    /// The device could not be opened through its group.
    #[error("cannot open {bdf} through VFIO; {hint}")]
    OpenDevice {
        /// The address.
        bdf: String,
        /// What vfio-ioctls or the kernel said.
        #[source]
        source: VfioError,
        /// What to do.
        hint: String,
    },
    /// The device opened, but would not say what it is.
    #[error(
        "cannot open {bdf} through VFIO: VFIO_DEVICE_GET_INFO failed; check `dmesg` for \
         vfio-pci messages about the device"
    )]
    DeviceInfo {
        /// The address.
        bdf: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The device's config region cannot be both read and written.
    #[error(
        "cannot open {bdf} through VFIO: its config region is not readable and writable \
         (flags {flags:#x}); is this a PCI device bound to vfio-pci?"
    )]
    ConfigRegion {
        /// The address.
        bdf: String,
        /// The region's flags.
        flags: u32,
    },
    /// A config-space access failed.
    #[error(
        "{bdf}: {what} through the VFIO config region failed; the device may have been removed \
         or be in reset: check `lspci -s {bdf} -vv`"
    )]
    Config {
        /// The address.
        bdf: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A guest RAM table was refused before anything was mapped.
    #[error("guest RAM table refused, nothing changed: {reason}")]
    BadTable {
        /// What is wrong.
        reason: TableError,
    },
    /// A region could not be mapped into the IOMMU domain.
    #[error(
        "mapping guest RAM {gpa:#x}+{size:#x} at IOVA = GPA into the VF's IOMMU domain failed. \
         ENOMEM: the locked-memory limit is too low to pin guest RAM (raise it: \
         `ulimit -l unlimited`, or LimitMEMLOCK=infinity); EEXIST: that IOVA range is \
         already mapped; EFAULT: the host address is not mapped in this process"
    )]
    Map {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
        /// The error.
        #[source]
        source: DmaMapError,
    },
    /// A region could not be unmapped.
    #[error(
        "unmapping guest RAM {gpa:#x}+{size:#x} from the VF's IOMMU domain failed; it stays \
         mapped until the device is released"
    )]
    Unmap {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
        /// The error.
        #[source]
        source: DmaMapError,
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
        "{bdf}: VFIO_DEVICE_RESET failed: the kernel could not reset the function \
         (EAGAIN/EBUSY: another function of the slot or bus is in use; retry, or reset the PF)"
    )]
    Reset {
        /// The address.
        bdf: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Device DMA logging failed.
    #[error("{bdf}: device DMA logging: {action} failed")]
    DmaLogging {
        /// The address.
        bdf: String,
        /// What was being done: start, report or stop.
        action: &'static str,
        /// What vfio-ioctls said.
        #[source]
        source: VfioError,
    },
    /// The device was released.
    #[error("{bdf} was released (its VFIO files are closed); open it again to use it")]
    Released {
        /// The address.
        bdf: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_shows_each_cause_once() {
        let e = VfioVfError::Reset {
            bdf: "0000:00:02.1".into(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        };
        let text = chain(&e);
        assert!(
            text.starts_with("0000:00:02.1: VFIO_DEVICE_RESET failed"),
            "{text}"
        );
        assert_eq!(text.matches("busy").count(), 1, "{text}");
        // vfio-ioctls prints its source in its own message: it is not repeated.
        let e = VfioVfError::Map {
            gpa: 0x1000,
            size: 0x1000,
            source: DmaMapError::Vfio(VfioError::IommuDmaMap(vmm_sys_util::errno::Error::new(
                libc::ENOMEM,
            ))),
        };
        let text = chain(&e);
        assert!(text.contains("failed to add guest memory map"), "{text}");
        assert_eq!(text.matches("Cannot allocate memory").count(), 1, "{text}");
    }

    #[test]
    fn a_message_does_not_print_its_source() {
        let e = VfioVfError::NoContainer {
            source: io::Error::from_raw_os_error(libc::ENOENT),
            hint: "load the VFIO modules".into(),
        };
        assert!(!e.to_string().contains("No such file"), "{e}");
        assert!(
            chain(&e).ends_with("load the VFIO modules: No such file or directory (os error 2)")
        );
    }
}
