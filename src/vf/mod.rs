//! The VF backends behind one seam.
//!
//! A VF reaches guest RAM only through [`crate::memory::DmaEngine`] (the soft VF) or through
//! its IOMMU mappings (a VFIO VF).
//!
//! The seam is three small traits, after cloud-hypervisor's `vm-migration` (`Pausable`,
//! `Snapshottable`, `Migratable`, with default methods) and firecracker's split of a device
//! into device, persist and metrics:
//! - [`Vf`]: the verbs, what the guest link calls;
//! - [`VfDevice`]: the device side (map guest RAM, quiesce and resume, reset, dirty pages,
//!   release);
//! - [`VfPersist`]: what moves with the VM at switchover besides guest RAM; by default
//!   nothing, said as an error.
//!
//! [`VfBackend`] holds one backend through the three: the soft VF ([`soft::SoftVf::backend`])
//! or a real VF bound to vfio-pci ([`vfio::VfioVf::into_backend`], whose verbs run in the
//! HCA's own queues and so are refused here with [`VerbsError::ServedByDevice`]).

pub mod soft;
pub mod verbs;
pub mod vfio;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::guest_ram::GuestRamMmap;

use soft::{SoftVf, StateError, VfState};
use verbs::{Access, Completion, GpaRange, RecvWr, SendWr, VerbsError};

/// The verbs of a VF: what the guest link asks of it, whether the soft VF (a software RDMA
/// engine over TCP) or a real VF owned through VFIO. Failed transfers are completions with a
/// status; errors here are about bad handles, or verbs the backend does not serve.
pub trait Vf: Send + Sync {
    /// Registers guest memory: `segments` (guest-physical) appear at `addr` onwards.
    fn register_mr(
        &self,
        addr: u64,
        segments: Vec<GpaRange>,
        access: Access,
    ) -> Result<u32, VerbsError>;
    /// Drops a region.
    fn deregister_mr(&self, key: u32) -> Result<(), VerbsError>;
    /// A new reliable-connected QP, not yet connected.
    fn create_qp(&self) -> Result<u32, VerbsError>;
    /// A new QP numbered `qp`, refused if 0 or in use.
    fn create_qp_at(&self, qp: u32) -> Result<u32, VerbsError>;
    /// Destroys a QP: its posted requests are dropped without completions.
    fn destroy_qp(&self, qp: u32) -> Result<(), VerbsError>;
    /// Connects a QP to a peer VM's QP.
    fn connect_qp(&self, qp: u32, peer_vm: &str, peer_qp: u32) -> Result<(), VerbsError>;
    /// Posts a send work request (WRITE, WRITE_WITH_IMM, SEND).
    fn post_send(&self, qp: u32, wr: SendWr) -> Result<(), VerbsError>;
    /// Posts a receive work request.
    fn post_recv(&self, qp: u32, wr: RecvWr) -> Result<(), VerbsError>;
    /// Takes up to `max` completions.
    fn poll_cq(&self, max: usize) -> Result<Vec<Completion>, VerbsError>;
    /// Waits up to `timeout` for at least one completion, then takes up to `max`.
    fn wait_cq(&self, max: usize, timeout: Duration) -> Result<Vec<Completion>, VerbsError>;
    /// When the request behind receive completion `(qp, wr_id)` came off the fabric, if the
    /// VF knows (the companion's latency figures).
    fn arrival(&self, qp: u32, wr_id: u64) -> Option<std::time::Instant> {
        let _ = (qp, wr_id);
        None
    }
}

/// What of a VF moves with the VM at switchover besides guest RAM, as cloud-hypervisor's
/// `Snapshottable` and `Migratable`. The defaults say that the backend keeps no such state
/// in the companion.
pub trait VfPersist: Send + Sync {
    /// Short name of the device, for messages.
    fn device_name(&self) -> String;
    /// Takes the VF's state for the destination; the device must be quiesced.
    fn export_state(&self) -> Result<VfState, StateError> {
        Err(StateError::NoState {
            device: self.device_name(),
        })
    }
    /// Takes over a migrated VM's VF state.
    fn import_state(&self, state: VfState) -> Result<(), StateError> {
        let _ = state;
        Err(StateError::NoState {
            device: self.device_name(),
        })
    }
    /// Tells the VF's peers that the VM now lives here; returns the peers reached.
    fn announce(&self) -> Vec<String> {
        Vec::new()
    }
    /// Drops the VF's state: the VM's VF lives in another companion now. Nothing to do for a
    /// VF that keeps no state in the companion.
    fn discard_state(&self) {}
}

/// Which backend a [`VfBackend`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// The soft VF.
    Soft,
    /// A real VF bound to vfio-pci.
    Vfio,
}

/// One VF backend through the three traits of the seam: built by
/// [`soft::SoftVf::backend`] or [`vfio::VfioVf::into_backend`].
pub struct VfBackend {
    /// Which backend it is.
    pub kind: BackendKind,
    /// Its verbs.
    pub verbs: Arc<dyn Vf>,
    /// Its device side.
    pub device: Box<dyn VfDevice>,
    /// What of it moves at switchover.
    pub persist: Arc<dyn VfPersist>,
    /// The soft VF, for its fabric counters; `None` for other backends.
    pub fabric: Option<SoftVf>,
}

impl std::fmt::Debug for VfBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfBackend")
            .field("kind", &self.kind)
            .field("device", &self.device.name())
            .finish()
    }
}

/// Whatever keeps a [`MappedRegion`]'s host memory mapped while a device maps it.
pub type KeepAlive = Arc<dyn Any + Send + Sync>;

/// One region of guest RAM as a device maps it into its IOMMU domain: at IOVA = GPA, backed
/// by `size` bytes of this process's memory at `host_addr`.
///
/// A region holds a reference to the owner of its host memory, so the memory stays mapped for
/// as long as a device keeps the region mapped. Build regions with
/// [`MappedRegion::from_guest_ram`], or with the `unsafe` [`MappedRegion::new`].
#[derive(Clone)]
pub struct MappedRegion {
    /// Guest-physical address of the first byte (the IOVA the device uses).
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host userspace address of the first byte.
    pub host_addr: u64,
    /// Whether the device may write the region (and so dirty it).
    pub writable: bool,
    keep_alive: Option<KeepAlive>,
}

impl std::fmt::Debug for MappedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRegion")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("size", &format_args!("{:#x}", self.size))
            .field("host_addr", &format_args!("{:#x}", self.host_addr))
            .field("writable", &self.writable)
            .finish()
    }
}

impl MappedRegion {
    /// A region of guest RAM at `gpa`, backed by `size` bytes at `host_addr`.
    ///
    /// # Safety
    ///
    /// `[host_addr, host_addr + size)` must be a mapping of guest RAM, readable (and writable
    /// if `writable`), that stays mapped while `keep_alive` is alive, and that no Rust
    /// reference covers: a device may read and write it at any time by DMA. Only raw-pointer,
    /// volatile or atomic accesses (as vm-memory makes) may touch it.
    pub unsafe fn new(
        gpa: u64,
        size: u64,
        host_addr: u64,
        writable: bool,
        keep_alive: KeepAlive,
    ) -> Self {
        Self {
            gpa,
            size,
            host_addr,
            writable,
            keep_alive: Some(keep_alive),
        }
    }

    /// Every region of `mem` (a memory table from `SET_MEM_TABLE`), each keeping `mem` alive.
    pub fn from_guest_ram(mem: &Arc<GuestRamMmap>) -> Vec<Self> {
        let keep: KeepAlive = mem.clone();
        mem.iter()
            .map(|r| Self {
                gpa: r.start_addr().raw_value(),
                size: r.len(),
                host_addr: r.as_ptr() as u64,
                writable: r.prot() & libc::PROT_WRITE != 0,
                keep_alive: Some(keep.clone()),
            })
            .collect()
    }

    /// A region that describes memory without owning any: for planning and tests only. A
    /// device refuses to map it.
    pub fn descriptor(gpa: u64, size: u64, host_addr: u64, writable: bool) -> Self {
        Self {
            gpa,
            size,
            host_addr,
            writable,
            keep_alive: None,
        }
    }

    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.size)
    }

    /// Whether the region owns a reference to its host memory (only those may be mapped).
    pub fn is_backed(&self) -> bool {
        self.keep_alive.is_some()
    }

    /// The owner of the host memory, if any.
    pub(crate) fn keep_alive(&self) -> Option<&KeepAlive> {
        self.keep_alive.as_ref()
    }
}

/// How a VF's device-side writes reach QEMU's dirty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyTracking {
    /// The device logs its own DMA writes (VFIO `DMA_LOGGING_*`); only those pages are
    /// reported.
    DeviceDmaLogging,
    /// The device cannot say what it wrote: every writable mapped page is reported dirty at
    /// every sync, so the whole mapped RAM is resent.
    AllWritablePages,
    /// The soft VF: every write goes through the companion's [`crate::memory::DmaEngine`], which logs it as
    /// it writes; sync reports what it wrote since the last sync.
    DmaEngine,
}

impl std::fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DirtyTracking::DeviceDmaLogging => "device-dma-logging",
            DirtyTracking::AllWritablePages => "all-writable-pages",
            DirtyTracking::DmaEngine => "dma-engine",
        })
    }
}

/// What one call of [`VfDevice::map_guest_ram`] changed in the device's IOMMU mappings.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapChange {
    /// `(gpa, size)` of regions mapped by this call.
    pub mapped: Vec<(u64, u64)>,
    /// `(gpa, size)` of regions unmapped by this call (gone from the table, or changed).
    pub unmapped: Vec<(u64, u64)>,
    /// `(gpa, size)` of regions left mapped as they were.
    pub kept: Vec<(u64, u64)>,
}

/// What [`VfDevice::quiesce`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuiesceReport {
    /// How long the quiesce took, in microseconds.
    pub waited_us: u64,
    /// Whether the device was bus master (DMA on) before the quiesce.
    pub was_bus_master: bool,
    /// What was done, in words.
    pub detail: String,
}

impl QuiesceReport {
    /// How long the quiesce took.
    pub fn waited(&self) -> Duration {
        Duration::from_micros(self.waited_us)
    }
}

/// What [`VfDevice::reset`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResetReport {
    /// Whether a reset was performed.
    pub performed: bool,
    /// Whether the device advertises Function Level Reset (PCIe Device Capabilities bit 28);
    /// `None` when not applicable or unknown.
    pub flr_advertised: Option<bool>,
    /// What was done, in words.
    pub detail: String,
}

/// A VF's device side, for the control socket's `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceStatus {
    /// Short name (the VM for the soft VF, the PCI address for a VFIO VF).
    pub name: String,
    /// One line about the device.
    pub description: String,
    /// How its writes are tracked.
    pub dirty_tracking: Option<DirtyTracking>,
    /// Regions mapped into its IOMMU domain.
    pub mapped_regions: usize,
    /// Bytes mapped.
    pub mapped_bytes: u64,
    /// Whether the device is quiesced.
    pub quiesced: bool,
    /// Whether the device was released.
    pub released: bool,
}

/// Why a VF's device side failed an operation. The soft VF's device side cannot fail (its
/// device is the DMA engine), so only a VFIO VF's errors appear here.
#[derive(Debug, thiserror::Error)]
pub enum VfDeviceError {
    /// The VFIO VF failed.
    #[error(transparent)]
    Vfio(#[from] vfio::VfioVfError),
}

/// The device side of a VF (cloud-hypervisor's `Pausable` and dirty-log sync): what the
/// companion asks of any VF, soft or real, beside the verbs of [`Vf`].
pub trait VfDevice: Send {
    /// Short name: the VM for the soft VF, the PCI address for a VFIO VF.
    fn name(&self) -> String;
    /// One line about the device, for logs and status.
    fn describe(&self) -> String;
    /// Makes the device's IOMMU mappings equal to `regions`, each at IOVA = GPA: regions that
    /// went away or changed are unmapped, new ones are mapped, unchanged ones are left alone.
    /// An empty table unmaps everything.
    fn map_guest_ram(&mut self, regions: &[MappedRegion]) -> Result<MapChange, VfDeviceError>;
    /// Stops the device's DMA and waits for its pending transactions. Idempotent.
    fn quiesce(&mut self) -> Result<QuiesceReport, VfDeviceError>;
    /// Lets the device DMA again as before [`VfDevice::quiesce`].
    fn resume(&mut self) -> Result<(), VfDeviceError>;
    /// Resets the device, and says what was done.
    fn reset(&mut self) -> Result<ResetReport, VfDeviceError>;
    /// How the device's writes are tracked.
    fn dirty_tracking(&self) -> DirtyTracking;
    /// Calls `report(gpa, len)` for the pages the device dirtied since the last sync; returns
    /// how many 4 KiB pages were reported.
    fn sync_dirty(&mut self, report: &mut dyn FnMut(u64, u64)) -> Result<u64, VfDeviceError>;
    /// Stops logging, stops DMA, unmaps guest RAM and closes the device. Idempotent.
    fn release(&mut self) -> Result<(), VfDeviceError>;
    /// The device's state, for `status`.
    fn status(&self) -> DeviceStatus;
}
