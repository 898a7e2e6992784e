//! Why a self-test step failed. A step's result is text (`error: …`), built from one of these
//! with its causes ([`crate::vf::vfio::error::chain`]).

use std::io;

use super::igbvf::IgbvfError;
use crate::vf::vfio::{RegionKey, VfioVfError};
use crate::vf::VfDeviceError;

/// Why a self-test step failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    /// The VFIO backend failed.
    #[error(transparent)]
    Vfio(#[from] VfioVfError),
    /// The device seam failed.
    #[error(transparent)]
    Device(#[from] VfDeviceError),
    /// The 82576 VF did not receive the probe frame.
    #[error(transparent)]
    Nic(#[from] IgbvfError),
    /// The stand-in guest RAM could not be made.
    #[error("cannot make the self-test's guest RAM: {what} failed")]
    Memfd {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A step that needs the device ran without it.
    #[error("the device is not open")]
    NotOpen,
    /// A step that needs the guest RAM ran without it.
    #[error("the self-test RAM is missing")]
    NoRam,
    /// The books disagree with the mapping just made.
    #[error("after mapping, the books say {books:?}, expected {want:?}")]
    MappedBooks {
        /// What the books hold.
        books: Vec<RegionKey>,
        /// What was mapped.
        want: Vec<(u64, u64)>,
    },
    /// Config space reads all zeros or all ones.
    #[error("config space reads {what} ID {id:#06x}: the device does not answer")]
    DeadId {
        /// Vendor or device.
        what: &'static str,
        /// What it read.
        id: u16,
    },
    /// Config space and sysfs name different devices.
    #[error("config space says {vendor:04x}:{device:04x}, sysfs says {sysfs}")]
    IdsDiffer {
        /// Vendor ID from config space.
        vendor: u16,
        /// Device ID from config space.
        device: u16,
        /// `vendor:device` from sysfs.
        sysfs: String,
    },
    /// Bus master did not read back as written.
    #[error("wrote bus master {wrote}, read back {read}")]
    BusMaster {
        /// What was written: on or off.
        wrote: &'static str,
        /// What was read: on or off.
        read: &'static str,
    },
    /// The dirty sync reported a range outside the mapping.
    #[error("sync reported {gpa:#x}+{len:#x}, outside the mapping {start:#x}..{end:#x}")]
    OutsideMapping {
        /// The range's GPA.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Start of the mapping.
        start: u64,
        /// End of the mapping.
        end: u64,
    },
    /// All-writable-pages reported other than every page of the mapping.
    #[error(
        "all-writable-pages must report exactly the {want} pages of the mapping; it reported \
         {distinct} distinct pages (counted {pages})"
    )]
    AllWritableCount {
        /// Pages in the mapping.
        want: u64,
        /// Distinct pages reported.
        distinct: u64,
        /// Pages counted by the sync.
        pages: u64,
    },
    /// A VFIO VF claimed the soft VF's tracking mode.
    #[error("a VFIO VF reported the soft VF's tracking mode")]
    SoftTracking,
    /// Unmapping everything left something in the books.
    #[error("after unmapping everything the books still hold {books:?} (unmapped {unmapped:?})")]
    UnmapBooks {
        /// What the books hold.
        books: Vec<RegionKey>,
        /// What the unmap said it unmapped.
        unmapped: Vec<(u64, u64)>,
    },
    /// A remap on a changed table did not unmap, map and keep what it must.
    #[error(
        "remap on a changed table: unmapped {unmapped:?} mapped {mapped:?} kept {kept:?}; \
         expected the stale {b:?} unmapped, {b_moved:?} mapped and {a:?} kept"
    )]
    Remap {
        /// What it unmapped.
        unmapped: Vec<(u64, u64)>,
        /// What it mapped.
        mapped: Vec<(u64, u64)>,
        /// What it kept.
        kept: Vec<(u64, u64)>,
        /// The region that stays.
        a: (u64, u64),
        /// The region that moves.
        b: (u64, u64),
        /// Where it moves.
        b_moved: (u64, u64),
    },
    /// After a remap the books are wrong.
    #[error("after the remap the books hold {books:?}, expected {want:?}")]
    RemapBooks {
        /// What the books hold.
        books: Vec<(u64, u64)>,
        /// What they must hold.
        want: Vec<(u64, u64)>,
    },
    /// The final unmap left something in the books.
    #[error("the books still hold {books:?}")]
    StillMapped {
        /// What the books hold.
        books: Vec<RegionKey>,
    },
    /// Release is not idempotent.
    #[error("a second release failed")]
    SecondRelease(#[source] VfDeviceError),
    /// The device is open or mapped after release.
    #[error("after release the device is still open or mapped")]
    NotReleased,
    /// `device_dma` runs on an 82576 VF only.
    #[error(
        "vfmig can make only an Intel 82576 VF (8086:10ca) receive a frame; this VF is \
         {vendor:04x}:{device:04x}: run the self-test without --dma-from"
    )]
    Not82576 {
        /// Its vendor ID.
        vendor: u16,
        /// Its device ID.
        device: u16,
    },
    /// The sending interface's MAC address could not be read.
    #[error("cannot read {path} (is `{iface}` a network interface?)")]
    InterfaceMac {
        /// The sysfs file.
        path: String,
        /// The interface.
        iface: String,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// The sending interface's address is not a MAC address.
    #[error("{path} holds `{text}`, not a MAC address")]
    NotAMac {
        /// The sysfs file.
        path: String,
        /// What it holds.
        text: String,
    },
    /// The device wrote something other than the frame sent.
    #[error(
        "the device wrote {len} bytes at GPA {gpa:#x}, but not the frame sent (marker \
         `{marker}` missing)"
    )]
    MarkerMissing {
        /// Bytes written.
        len: u16,
        /// Where.
        gpa: u64,
        /// The marker the frame carried.
        marker: String,
    },
    /// The dirty sync missed the page the device wrote.
    #[error("the device wrote GPA {gpa:#x}, but the dirty sync did not report page {page:#x}")]
    PageNotReported {
        /// Where the device wrote.
        gpa: u64,
        /// Its page.
        page: u64,
    },
}
