//! The state every role of [`VfioVf`] shares: the open VFIO files, the IOMMU books, the
//! dirty-tracking mode and logging, the quiesce, and the accessors that need nothing else.

use std::sync::Arc;
use std::time::Duration;

use vfio_ioctls::{DmaLoggingRange, VfioContainer, VfioDevice};

use crate::vf::vfio::error::VfioVfError;
use crate::vf::vfio::mapping::{Mappings, RegionKey};
use crate::vf::vfio::sysfs::{Bdf, SysfsInfo};
use crate::vf::{DirtyTracking, MapChange};

/// The open VFIO files.
pub(super) struct Open {
    // Declared before `container`: the device closes first, then its group leaves the
    // container.
    pub(super) device: VfioDevice,
    pub(super) container: Arc<VfioContainer>,
    pub(super) config_offset: u64,
    pub(super) config_size: u64,
}

/// Device DMA logging in progress.
pub(super) struct Logging {
    pub(super) page_size: u64,
    pub(super) ranges: Vec<DmaLoggingRange>,
}

/// A VF bound to vfio-pci, opened through a type1 VFIO container: guest RAM mapped at
/// IOVA = GPA, config space through the VFIO config region, dirty pages from device DMA
/// logging or, without it, every writable mapped page.
pub struct VfioVf {
    pub(super) bdf: Bdf,
    pub(super) sysfs: SysfsInfo,
    pub(super) open: Option<Open>,
    pub(super) mappings: Mappings,
    pub(super) device_flags: u32,
    pub(super) flr: Option<bool>,
    pub(super) tracking: DirtyTracking,
    pub(super) tracking_why: String,
    pub(super) logging: Option<Logging>,
    /// Pages reported by the device when logging was restarted, for the next sync.
    pub(super) carried: Vec<(u64, u64)>,
    pub(super) warned_all_writable: bool,
    /// `Some(bus master before)` while quiesced.
    pub(super) quiesced: Option<bool>,
    pub(super) pending_timeout: Duration,
}

impl VfioVf {
    /// The open files, or [`VfioVfError::Released`].
    pub(super) fn opened(&self) -> Result<&Open, VfioVfError> {
        self.open.as_ref().ok_or_else(|| VfioVfError::Released {
            bdf: self.bdf.to_string(),
        })
    }

    pub(super) fn config_error(&self, what: &'static str, source: std::io::Error) -> VfioVfError {
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
