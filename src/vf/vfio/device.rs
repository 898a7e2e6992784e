//! [`VfioVf`]: one VF opened through a type1 VFIO container.

use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_device_info, vfio_iommu_type1_dma_map, VFIO_BASE,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_FLAGS_RESET, VFIO_DMA_MAP_FLAG_READ, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{DmaLoggingRange, VfioContainer, VfioDevice, VfioError, VfioOps};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};

use super::check::DeviceRegion;
use super::config::{self, ConfigSpace, DEFAULT_PENDING_TIMEOUT};
use super::dirty::{report_all_writable, report_bitmap};
use super::mapping::{plan_remap, DmaMapper, Mappings, RegionKey};
use super::sysfs::{Bdf, SysfsInfo, DEFAULT_SYSFS_ROOT};
use super::VfioVfError;
use crate::memory::LOG_PAGE_SIZE;
use crate::vf::{
    DeviceStatus, DirtyTracking, MapChange, MappedRegion, QuiesceReport, ResetReport, VfDevice,
    VfDeviceError,
};

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, u32::from(VFIO_TYPE), VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, u32::from(VFIO_TYPE), VFIO_BASE + 11);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, u32::from(VFIO_TYPE), VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_FEATURE, u32::from(VFIO_TYPE), VFIO_BASE + 17);

/// Names of the VFIO PCI regions, by index.
const REGION_NAMES: [&str; VFIO_PCI_NUM_REGIONS as usize] = [
    "BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "config", "VGA",
];

/// The device's flags from `VFIO_DEVICE_GET_INFO` (vfio-ioctls keeps them private).
fn device_info_flags(device: &VfioDevice) -> io::Result<u32> {
    let mut info = vfio_device_info {
        argsz: size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `device` is an open VFIO device fd; `info` is a valid, writable
    // `vfio_device_info` whose `argsz` tells the kernel its size, and it outlives the call.
    let ret = unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.flags)
}

/// Probes a `VFIO_DEVICE_FEATURE` for SET support without doing it.
fn probe_feature_set(device: &VfioDevice, feature: u32) -> io::Result<()> {
    let mut probe = vfio_device_feature {
        argsz: size_of::<vfio_device_feature>() as u32,
        flags: VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | feature,
        data: Default::default(),
    };
    // SAFETY: `device` is an open VFIO device fd; with PROBE the kernel reads only the
    // 8-byte header, which `probe` is (its trailing array is empty), and it outlives the call.
    let ret = unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_FEATURE(), &mut probe) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `VFIO_DEVICE_RESET`, with its error (vfio-ioctls' `reset()` drops it).
fn device_reset(device: &VfioDevice) -> io::Result<()> {
    // SAFETY: `device` is an open VFIO device fd and VFIO_DEVICE_RESET takes no argument.
    let ret = unsafe { ioctl(device, VFIO_DEVICE_RESET()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The VFIO config region of an open device, as a [`ConfigSpace`].
struct VfioConfig<'a> {
    device: &'a VfioDevice,
    offset: u64,
    size: u64,
}

impl VfioConfig<'_> {
    fn check(&self, offset: u64, len: usize) -> io::Result<u64> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset:#x} are past the config region ({:#x} bytes)",
                    self.size
                ),
            ));
        }
        Ok(self.offset + offset)
    }
}

impl ConfigSpace for VfioConfig<'_> {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = self.check(offset, buf.len())?;
        // SAFETY: reads at most `buf.len()` bytes into `buf`, which is valid and writable for
        // that length, from the device fd this borrow keeps open.
        let n = unsafe {
            libc::pread(
                self.device.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                at as libc::off_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read of config space: {n} of {} bytes", buf.len()),
            ));
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = self.check(offset, data.len())?;
        // SAFETY: writes `data.len()` bytes from `data`, valid for reads of that length, to
        // the device fd this borrow keeps open.
        let n = unsafe {
            libc::pwrite(
                self.device.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                at as libc::off_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write of config space: {n} of {} bytes", data.len()),
            ));
        }
        Ok(())
    }
}

/// Maps through the type1 container.
struct ContainerMapper<'a>(&'a VfioContainer);

impl DmaMapper for ContainerMapper<'_> {
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        writable: bool,
    ) -> Result<(), String> {
        let len = usize::try_from(size).map_err(|_| format!("size {size:#x} too large"))?;
        if writable {
            // SAFETY: the caller upholds `DmaMapper::map`'s contract, which is the one
            // `vfio_dma_map` states.
            return unsafe { VfioOps::vfio_dma_map(self.0, iova, len, host_addr as *mut u8) }
                .map_err(|e| e.to_string());
        }
        // vfio-ioctls always maps read-write, which pinning a read-only mapping refuses:
        // map read-only regions ourselves.
        let map = vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ,
            vaddr: host_addr,
            iova,
            size,
        };
        // SAFETY: the container fd is open; `map` is a valid `vfio_iommu_type1_dma_map` that
        // the kernel only reads; the host range satisfies the caller's contract.
        let ret = unsafe { ioctl_with_ref(self.0, VFIO_IOMMU_MAP_DMA(), &map) };
        if ret < 0 {
            return Err(format!(
                "VFIO_IOMMU_MAP_DMA (read-only): {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), String> {
        let len = usize::try_from(size).map_err(|_| format!("size {size:#x} too large"))?;
        self.0.vfio_dma_unmap(iova, len).map_err(|e| e.to_string())
    }
}

/// Device DMA logging in progress.
struct Logging {
    page_size: u64,
    ranges: Vec<DmaLoggingRange>,
}

/// The open VFIO files.
struct Open {
    // Declared before `container`: the device closes first, then its group leaves the
    // container.
    device: VfioDevice,
    container: Arc<VfioContainer>,
    config_offset: u64,
    config_size: u64,
}

/// A VF bound to vfio-pci, opened through a type1 VFIO container: guest RAM mapped at
/// IOVA = GPA, config space through the VFIO config region, dirty pages from device DMA
/// logging or, without it, every writable mapped page.
pub struct VfioVf {
    bdf: Bdf,
    sysfs: SysfsInfo,
    open: Option<Open>,
    mappings: Mappings,
    device_flags: u32,
    flr: Option<bool>,
    tracking: DirtyTracking,
    tracking_why: String,
    logging: Option<Logging>,
    /// Pages reported by the device when logging was restarted, for the next sync.
    carried: Vec<(u64, u64)>,
    warned_all_writable: bool,
    /// `Some(bus master before)` while quiesced.
    quiesced: Option<bool>,
    pending_timeout: Duration,
}

fn open_device_error(bdf: &Bdf, e: VfioError) -> VfioVfError {
    let bdf_s = bdf.to_string();
    let (reason, hint) = match &e {
        VfioError::OpenGroup(io, group) => {
            let hint = match io.raw_os_error() {
                Some(libc::ENOENT) => format!(
                    "/dev/vfio/{group} does not exist: is {bdf_s} bound to vfio-pci \
                     (`ls -l /sys/bus/pci/devices/{bdf_s}/driver`)?"
                ),
                Some(libc::EACCES) | Some(libc::EPERM) => format!(
                    "run as root, or give this user /dev/vfio/{group} \
                     (`chown USER /dev/vfio/{group}`)"
                ),
                Some(libc::EBUSY) => format!(
                    "group {group} is already open in another process (a QEMU with \
                     -device vfio-pci, or another vfmig): stop it first (`fuser -v /dev/vfio/{group}`)"
                ),
                _ => format!("check /dev/vfio/{group}"),
            };
            (e.to_string(), hint)
        }
        VfioError::GroupViable => (
            e.to_string(),
            format!(
                "every device in the IOMMU group of {bdf_s} must be bound to vfio-pci or to no \
                 driver: see /sys/bus/pci/devices/{bdf_s}/iommu_group/devices"
            ),
        ),
        VfioError::InvalidPath => (
            e.to_string(),
            format!("cannot read /sys/bus/pci/devices/{bdf_s}/iommu_group: is the IOMMU on?"),
        ),
        VfioError::GroupSetContainer | VfioError::ContainerSetIOMMU(_) => (
            e.to_string(),
            "the group could not join the type1 container: it may already be in another \
             container; load vfio_iommu_type1"
                .to_string(),
        ),
        VfioError::GroupGetDeviceFD(_) => (
            e.to_string(),
            "the kernel refused the device fd: EBUSY means another process holds the device"
                .to_string(),
        ),
        _ => (
            e.to_string(),
            "check `dmesg` for vfio-pci messages about the device".to_string(),
        ),
    };
    VfioVfError::OpenDevice {
        bdf: bdf_s,
        reason,
        hint,
    }
}

fn container_error(e: VfioError) -> VfioVfError {
    match e {
        VfioError::OpenContainer(source) => {
            let hint = match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    "load the VFIO modules: `modprobe vfio vfio_iommu_type1 vfio-pci`".to_string()
                }
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    "run as root, or give this user access to /dev/vfio/vfio".to_string()
                }
                _ => "check that the vfio and vfio_iommu_type1 modules are loaded".to_string(),
            };
            VfioVfError::NoContainer { source, hint }
        }
        other => VfioVfError::Container {
            reason: other.to_string(),
            hint: "the kernel must offer the type1v2 IOMMU: `modprobe vfio_iommu_type1`"
                .to_string(),
        },
    }
}

impl VfioVf {
    /// Opens the VF at `bdf` (`0000:00:02.1`, or `00:02.1` for domain 0), checking sysfs at
    /// `/sys` first.
    pub fn open(bdf: &str) -> Result<Self, VfioVfError> {
        Self::open_with_root(Path::new(DEFAULT_SYSFS_ROOT), bdf)
    }

    /// As [`VfioVf::open`], with sysfs at `sysfs_root`.
    pub fn open_with_root(sysfs_root: &Path, bdf: &str) -> Result<Self, VfioVfError> {
        let bdf: Bdf = bdf.parse()?;
        let sysfs = SysfsInfo::read(sysfs_root, bdf)?;
        if let Some(problem) = sysfs.problems().into_iter().next() {
            return Err(problem);
        }
        Self::open_checked(sysfs)
    }

    /// Opens a device whose sysfs checks passed.
    pub(crate) fn open_checked(sysfs: SysfsInfo) -> Result<Self, VfioVfError> {
        let bdf = sysfs.bdf;
        let container = Arc::new(VfioContainer::new(None).map_err(container_error)?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device =
            VfioDevice::new(&sysfs.path, ops, false).map_err(|e| open_device_error(&bdf, e))?;
        let device_flags = device_info_flags(&device).map_err(|e| VfioVfError::OpenDevice {
            bdf: bdf.to_string(),
            reason: format!("VFIO_DEVICE_GET_INFO failed: {e}"),
            hint: "check `dmesg` for vfio-pci messages about the device".into(),
        })?;
        let config_flags = device.get_region_flags(VFIO_PCI_CONFIG_REGION_INDEX);
        let want = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        if config_flags & want != want {
            return Err(VfioVfError::OpenDevice {
                bdf: bdf.to_string(),
                reason: format!(
                    "its config region is not readable and writable (flags {config_flags:#x})"
                ),
                hint: "is this a PCI device bound to vfio-pci?".into(),
            });
        }
        let open = Open {
            config_offset: device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX),
            config_size: device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX),
            device,
            container,
        };
        let (tracking, tracking_why) =
            match probe_feature_set(&open.device, VFIO_DEVICE_FEATURE_DMA_LOGGING_START) {
                Ok(()) => (
                    DirtyTracking::DeviceDmaLogging,
                    "the device's VFIO driver supports DMA logging".to_string(),
                ),
                Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => (
                    DirtyTracking::AllWritablePages,
                    "the device's VFIO driver has no DMA logging (probe of \
                     VFIO_DEVICE_FEATURE_DMA_LOGGING_START: ENOTTY)"
                        .to_string(),
                ),
                Err(e) => (
                    DirtyTracking::AllWritablePages,
                    format!("the probe of VFIO_DEVICE_FEATURE_DMA_LOGGING_START failed: {e}"),
                ),
            };
        let mut vf = Self {
            bdf,
            sysfs,
            open: Some(open),
            mappings: Mappings::new(),
            device_flags,
            flr: None,
            tracking,
            tracking_why,
            logging: None,
            carried: Vec::new(),
            warned_all_writable: false,
            quiesced: None,
            pending_timeout: DEFAULT_PENDING_TIMEOUT,
        };
        let flr = config::flr_advertised(&vf.config()?)
            .map_err(|e| vf.config_error("reading the PCI Express capability", e))?;
        vf.flr = flr;
        tracing::info!(
            bdf = %vf.bdf,
            dirty_tracking = %vf.tracking,
            reset = vf.reset_supported(),
            flr = ?vf.flr,
            "VFIO VF opened"
        );
        Ok(vf)
    }

    fn opened(&self) -> Result<&Open, VfioVfError> {
        self.open.as_ref().ok_or_else(|| VfioVfError::Released {
            bdf: self.bdf.to_string(),
        })
    }

    fn config_of(open: &Open) -> VfioConfig<'_> {
        VfioConfig {
            device: &open.device,
            offset: open.config_offset,
            size: open.config_size,
        }
    }

    fn config(&self) -> Result<VfioConfig<'_>, VfioVfError> {
        Ok(Self::config_of(self.opened()?))
    }

    /// Byte access to the device's VFIO region `index` (BAR0 is 0), through the device fd.
    pub fn region(&self, index: u32) -> Result<impl ConfigSpace + '_, VfioVfError> {
        let open = self.opened()?;
        Ok(VfioConfig {
            device: &open.device,
            offset: open.device.get_region_offset(index),
            size: open.device.get_region_size(index),
        })
    }

    fn config_error(&self, what: &str, source: io::Error) -> VfioVfError {
        VfioVfError::Config {
            bdf: self.bdf.to_string(),
            what: what.to_string(),
            source,
        }
    }

    /// The PCI address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// What sysfs said at open.
    pub fn sysfs(&self) -> &SysfsInfo {
        &self.sysfs
    }

    /// Vendor and device IDs, read from config space.
    pub fn ids(&self) -> Result<(u16, u16), VfioVfError> {
        config::ids(&self.config()?).map_err(|e| self.config_error("reading the IDs", e))
    }

    /// The Command register.
    pub fn command(&self) -> Result<u16, VfioVfError> {
        config::read_u16(&self.config()?, config::PCI_COMMAND)
            .map_err(|e| self.config_error("reading the Command register", e))
    }

    /// Whether Bus Master Enable is set.
    pub fn bus_master(&self) -> Result<bool, VfioVfError> {
        Ok(self.command()? & config::PCI_COMMAND_MASTER != 0)
    }

    /// Sets or clears Bus Master Enable.
    pub fn set_bus_master(&mut self, on: bool) -> Result<(), VfioVfError> {
        config::set_bus_master(&self.config()?, on)
            .map_err(|e| self.config_error("writing the Command register", e))
    }

    /// Whether the device offers `VFIO_DEVICE_RESET` (`VFIO_DEVICE_FLAGS_RESET`).
    pub fn reset_supported(&self) -> bool {
        self.device_flags & VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// Whether the device advertises FLR; `None` without a PCI Express capability.
    pub fn flr_advertised(&self) -> Option<bool> {
        self.flr
    }

    /// Why the dirty-tracking mode is what it is.
    pub fn dirty_tracking_reason(&self) -> &str {
        &self.tracking_why
    }

    /// The device's VFIO regions that exist (non-zero flags).
    pub fn regions(&self) -> Vec<DeviceRegion> {
        let Some(open) = self.open.as_ref() else {
            return Vec::new();
        };
        (0..VFIO_PCI_NUM_REGIONS)
            .filter_map(|index| {
                let flags = open.device.get_region_flags(index);
                (flags != 0).then(|| DeviceRegion {
                    index,
                    name: REGION_NAMES[index as usize].to_string(),
                    size: open.device.get_region_size(index),
                    readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
                    writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
                    mmap: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
                })
            })
            .collect()
    }

    /// What is mapped into the IOMMU domain, in GPA order.
    pub fn mapped(&self) -> Vec<RegionKey> {
        self.mappings.regions()
    }

    /// What the last map or unmap changed.
    pub fn last_map_change(&self) -> &MapChange {
        self.mappings.last_change()
    }

    /// How long a quiesce waits for pending transactions.
    pub fn set_pending_timeout(&mut self, timeout: Duration) {
        self.pending_timeout = timeout;
    }

    /// Whether the device was released.
    pub fn is_released(&self) -> bool {
        self.open.is_none()
    }

    fn logging_error(&self, action: &str, e: VfioError) -> VfioVfError {
        VfioVfError::DmaLogging {
            bdf: self.bdf.to_string(),
            action: action.to_string(),
            reason: e.to_string(),
        }
    }

    /// Takes what the device logged so far into `carried`, then stops logging.
    fn stop_logging_carrying(&mut self) {
        let Some(logging) = self.logging.take() else {
            return;
        };
        let Some(open) = self.open.as_ref() else {
            return;
        };
        for r in &logging.ranges {
            let carried = &mut self.carried;
            match open.device.report_dma_logging(*r, logging.page_size) {
                Ok(bm) => {
                    report_bitmap(r.iova, r.length, logging.page_size, &bm, &mut |g, l| {
                        carried.push((g, l))
                    });
                }
                Err(e) => {
                    tracing::warn!(
                        bdf = %self.bdf, error = %e,
                        "device DMA logging report failed before a restart: the whole range \
                         counts as dirty"
                    );
                    carried.push((r.iova, r.length));
                }
            }
        }
        if let Err(e) = open.device.stop_dma_logging() {
            tracing::warn!(bdf = %self.bdf, error = %e, "stopping device DMA logging failed");
        }
    }

    /// Starts device DMA logging over the writable mapped regions. If the device refuses,
    /// falls back to reporting every writable page.
    fn start_logging(&mut self) {
        if self.tracking != DirtyTracking::DeviceDmaLogging || self.logging.is_some() {
            return;
        }
        let ranges: Vec<DmaLoggingRange> = self
            .mappings
            .regions()
            .iter()
            .filter(|r| r.writable)
            .map(|r| DmaLoggingRange {
                iova: r.gpa,
                length: r.size,
            })
            .collect();
        if ranges.is_empty() {
            return;
        }
        let Some(open) = self.open.as_ref() else {
            return;
        };
        match open.device.start_dma_logging(LOG_PAGE_SIZE, &ranges) {
            Ok(page_size) => {
                tracing::info!(
                    bdf = %self.bdf, ranges = ranges.len(), page_size,
                    "device DMA logging started"
                );
                self.logging = Some(Logging { page_size, ranges });
            }
            Err(e) => {
                let err = self.logging_error("start", e);
                tracing::warn!(error = %err, "falling back to all-writable-pages");
                self.tracking = DirtyTracking::AllWritablePages;
                self.tracking_why = format!("device DMA logging could not start: {err}");
            }
        }
    }

    fn mapper(open: &Open) -> ContainerMapper<'_> {
        ContainerMapper(&open.container)
    }

    /// Maps `regions` at IOVA = GPA (see [`VfDevice::map_guest_ram`]).
    pub fn map(&mut self, regions: &[MappedRegion]) -> Result<MapChange, VfioVfError> {
        self.opened()?;
        let wanted: Vec<RegionKey> = regions.iter().map(RegionKey::of).collect();
        let plan = plan_remap(&self.mappings.regions(), &wanted);
        let changes = !plan.map.is_empty() || !plan.unmap.is_empty();
        if changes {
            // Logged ranges are fixed at start: restart logging over the new table, keeping
            // what the device logged so far for the next sync.
            self.stop_logging_carrying();
        }
        let open = self.open.as_ref().ok_or_else(|| VfioVfError::Released {
            bdf: self.bdf.to_string(),
        })?;
        let result = self.mappings.apply(&Self::mapper(open), regions);
        if changes {
            self.start_logging();
        }
        let change = result?;
        if changes {
            tracing::info!(
                bdf = %self.bdf,
                mapped = ?change.mapped.iter().map(|(g, s)| format!("{g:#x}+{s:#x}")).collect::<Vec<_>>(),
                unmapped = ?change.unmapped.iter().map(|(g, s)| format!("{g:#x}+{s:#x}")).collect::<Vec<_>>(),
                kept = change.kept.len(),
                "guest RAM mapped into the VF's IOMMU domain at IOVA = GPA"
            );
        }
        Ok(change)
    }

    fn quiesce_device(&mut self) -> Result<QuiesceReport, VfioVfError> {
        if let Some(was) = self.quiesced {
            return Ok(QuiesceReport {
                waited_us: 0,
                was_bus_master: was,
                detail: "already quiesced".into(),
            });
        }
        let out = config::quiesce(&self.config()?, self.pending_timeout)
            .map_err(|e| self.config_error("quiescing (bus master off, pending poll)", e))?;
        self.quiesced = Some(out.was_bus_master);
        let report = QuiesceReport {
            waited_us: out.elapsed.as_micros() as u64,
            was_bus_master: out.was_bus_master,
            detail: out.describe(),
        };
        tracing::info!(bdf = %self.bdf, waited_us = report.waited_us, "{}", report.detail);
        if !out.idle() {
            return Err(VfioVfError::TransactionsPending {
                bdf: self.bdf.to_string(),
                waited_ms: out.elapsed.as_millis() as u64,
            });
        }
        Ok(report)
    }

    fn resume_device(&mut self) -> Result<(), VfioVfError> {
        if let Some(was) = self.quiesced {
            self.set_bus_master(was)?;
            self.quiesced = None;
            tracing::info!(bdf = %self.bdf, bus_master = was, "VF resumed");
        }
        Ok(())
    }

    fn reset_device(&mut self) -> Result<ResetReport, VfioVfError> {
        let open = self.opened()?;
        let flr = match self.flr {
            Some(true) => "FLR advertised",
            Some(false) => "FLR not advertised",
            None => "no PCI Express capability",
        };
        if !self.reset_supported() {
            return Ok(ResetReport {
                performed: false,
                flr_advertised: self.flr,
                detail: format!(
                    "not reset: the device offers no VFIO reset (VFIO_DEVICE_FLAGS_RESET clear; \
                     {flr})"
                ),
            });
        }
        device_reset(&open.device).map_err(|source| VfioVfError::Reset {
            bdf: self.bdf.to_string(),
            source,
        })?;
        let bm = match self.bus_master() {
            Ok(true) => "bus master on",
            Ok(false) => "bus master off",
            Err(_) => "config space unreadable",
        };
        let detail = format!(
            "VFIO_DEVICE_RESET done ({flr}; the kernel picks FLR or another method and \
             restores config space); after it: {bm}"
        );
        tracing::info!(bdf = %self.bdf, "{detail}");
        Ok(ResetReport {
            performed: true,
            flr_advertised: self.flr,
            detail,
        })
    }

    fn sync(&mut self, report: &mut dyn FnMut(u64, u64)) -> Result<u64, VfioVfError> {
        self.opened()?;
        let mut pages = 0u64;
        for (gpa, len) in std::mem::take(&mut self.carried) {
            report(gpa, len);
            pages += len.div_ceil(LOG_PAGE_SIZE);
        }
        match self.tracking {
            DirtyTracking::DeviceDmaLogging => {
                let Some(logging) = self.logging.as_ref() else {
                    return Ok(pages); // nothing writable mapped
                };
                let open = self.opened()?;
                let mut failed = None;
                for r in &logging.ranges {
                    match open.device.report_dma_logging(*r, logging.page_size) {
                        Ok(bm) => {
                            pages += report_bitmap(r.iova, r.length, logging.page_size, &bm, report)
                        }
                        Err(e) => {
                            // The bitmap is lost: count the whole range, and restart logging.
                            report(r.iova, r.length);
                            pages += r.length.div_ceil(LOG_PAGE_SIZE);
                            failed.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = failed {
                    let err = self.logging_error("report", e);
                    tracing::warn!(
                        error = %err,
                        "the ranges that failed were reported dirty in full; restarting logging"
                    );
                    self.stop_logging_carrying();
                    self.start_logging();
                }
            }
            DirtyTracking::AllWritablePages | DirtyTracking::DmaEngine => {
                if !self.warned_all_writable {
                    self.warned_all_writable = true;
                    tracing::warn!(
                        bdf = %self.bdf,
                        why = %self.tracking_why,
                        mapped_bytes = self.mappings.bytes(),
                        "the VF cannot report which pages it wrote, so every writable mapped page \
                         is reported dirty at every sync: QEMU resends the whole mapped guest RAM \
                         in every precopy pass, so precopy may not converge under a downtime \
                         limit"
                    );
                }
                pages += report_all_writable(&self.mappings.regions(), report);
            }
        }
        Ok(pages)
    }

    fn release_device(&mut self) -> Result<(), VfioVfError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let mut first_err: Option<VfioVfError> = None;
        if self.logging.take().is_some() {
            if let Err(e) = open.device.stop_dma_logging() {
                first_err.get_or_insert(self.logging_error("stop", e));
            }
        }
        self.carried.clear();
        if let Err(e) = config::set_bus_master(&Self::config_of(&open), false) {
            first_err.get_or_insert(self.config_error("clearing bus master", e));
        }
        self.quiesced = None;
        if let Err(e) = self.mappings.unmap_all(&Self::mapper(&open)) {
            first_err.get_or_insert(e);
        }
        // Closing the container unmaps whatever is left.
        self.mappings.forget();
        drop(open);
        tracing::info!(bdf = %self.bdf, "VFIO VF released");
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl VfDevice for VfioVf {
    fn name(&self) -> String {
        self.bdf.to_string()
    }

    fn describe(&self) -> String {
        let ids = match (self.sysfs.vendor, self.sysfs.device) {
            (Some(v), Some(d)) => format!("{v:04x}:{d:04x}"),
            _ => "unknown IDs".into(),
        };
        format!(
            "VFIO VF {} ({ids}), IOMMU group {}, dirty tracking {}, reset {}{}",
            self.bdf,
            self.sysfs
                .iommu_group
                .map_or_else(|| "?".into(), |g| g.to_string()),
            self.tracking,
            if self.reset_supported() {
                "supported"
            } else {
                "unsupported"
            },
            if self.is_released() { ", released" } else { "" }
        )
    }

    fn map_guest_ram(&mut self, regions: &[MappedRegion]) -> Result<MapChange, VfDeviceError> {
        Ok(self.map(regions)?)
    }

    fn quiesce(&mut self) -> Result<QuiesceReport, VfDeviceError> {
        Ok(self.quiesce_device()?)
    }

    fn resume(&mut self) -> Result<(), VfDeviceError> {
        Ok(self.resume_device()?)
    }

    fn reset(&mut self) -> Result<ResetReport, VfDeviceError> {
        Ok(self.reset_device()?)
    }

    fn dirty_tracking(&self) -> DirtyTracking {
        self.tracking
    }

    fn sync_dirty(&mut self, report: &mut dyn FnMut(u64, u64)) -> Result<u64, VfDeviceError> {
        Ok(self.sync(report)?)
    }

    fn release(&mut self) -> Result<(), VfDeviceError> {
        Ok(self.release_device()?)
    }

    fn status(&self) -> DeviceStatus {
        DeviceStatus {
            name: self.name(),
            description: self.describe(),
            dirty_tracking: Some(self.tracking),
            mapped_regions: self.mappings.regions().len(),
            mapped_bytes: self.mappings.bytes(),
            quiesced: self.quiesced.is_some(),
            released: self.is_released(),
        }
    }
}

impl Drop for VfioVf {
    fn drop(&mut self) {
        if let Err(e) = self.release_device() {
            tracing::warn!(error = %e, "releasing the VFIO VF on drop");
        }
    }
}
