//! [`VfioVf`]: one VF opened through a type1 VFIO container, split by role:
//! - `state`: what every role shares (the open files, the books, the tracking mode);
//! - `open`: opening the container and the device, what the device offers;
//! - `region`: byte access to a VFIO region through the device fd (config space, BARs), the
//!   config-space accessors, and the table of the device's regions;
//! - `iommu`: guest RAM mapped at IOVA = GPA through the container;
//! - `tracking`: dirty pages, from device DMA logging or every writable mapped page;
//! - `lifecycle`: quiesce, resume, reset, release.
//!
//! This file declares them and puts the VF behind the [`VfDevice`] seam. Each role imports
//! only `state` and the roles below it (`lifecycle` uses `iommu`'s mapper, `open` uses
//! `tracking`'s probe); none imports this file.

mod iommu;
mod lifecycle;
mod open;
mod region;
mod state;
mod tracking;

pub use region::DeviceRegion;
pub use state::VfioVf;

use super::error::chain;
use crate::vf::{
    DeviceStatus, DirtyTracking, MapChange, MappedRegion, QuiesceReport, ResetReport, VfDevice,
    VfDeviceError,
};

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
