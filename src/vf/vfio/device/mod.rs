//! [`VfioVf`]: one VF opened through a type1 VFIO container, split by role:
//! - `open`: opening the container and the device, what the device offers;
//! - `region`: byte access to a VFIO region through the device fd (config space, BARs) and
//!   the table of the device's regions;
//! - `iommu`: guest RAM mapped at IOVA = GPA through the container;
//! - `tracking`: dirty pages, from device DMA logging or every writable mapped page;
//! - `lifecycle`: quiesce, resume, reset, release.
//!
//! This file holds the state they share, the accessors, and the [`VfDevice`] seam.

mod iommu;
mod lifecycle;
mod open;
mod region;
mod tracking;

use std::sync::Arc;
use std::time::Duration;

use vfio_ioctls::{VfioContainer, VfioDevice};

use super::config;
use super::error::{chain, VfioVfError};
use super::mapping::{Mappings, RegionKey};
use super::sysfs::{Bdf, SysfsInfo};
use crate::vf::{
    DeviceStatus, DirtyTracking, MapChange, MappedRegion, QuiesceReport, ResetReport, VfDevice,
    VfDeviceError,
};

pub use region::DeviceRegion;
use tracking::Logging;

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

impl VfioVf {
    /// The open files, or [`VfioVfError::Released`].
    fn opened(&self) -> Result<&Open, VfioVfError> {
        self.open.as_ref().ok_or_else(|| VfioVfError::Released {
            bdf: self.bdf.to_string(),
        })
    }

    fn config_error(&self, what: &'static str, source: std::io::Error) -> VfioVfError {
        VfioVfError::Config {
            bdf: self.bdf.to_string(),
            what,
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

    /// Whether the device advertises FLR; `None` without a PCI Express capability.
    pub fn flr_advertised(&self) -> Option<bool> {
        self.flr
    }

    /// Why the dirty-tracking mode is what it is.
    pub fn dirty_tracking_reason(&self) -> &str {
        &self.tracking_why
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
            tracing::warn!(error = %chain(&e), "releasing the VFIO VF on drop");
        }
    }
}
