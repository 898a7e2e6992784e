//! Guest RAM in the VF's IOMMU domain at IOVA = GPA, through the type1 container: the
//! [`DmaMapper`] of a real device, and the remap on a new memory table (which restarts device
//! DMA logging over the new ranges).

use std::io;
use std::mem::size_of;

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioOps};
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::state::{Open, VfioVf};
use crate::vf::vfio::error::{DmaMapError, VfioVfError};
use crate::vf::vfio::mapping::{plan_remap, DmaMapper, RegionKey};
use crate::vf::{MapChange, MappedRegion};

vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, u32::from(VFIO_TYPE), VFIO_BASE + 13);

/// Maps through the type1 container.
pub(super) struct ContainerMapper<'a>(&'a VfioContainer);

impl ContainerMapper<'_> {
    pub(super) fn of(open: &Open) -> ContainerMapper<'_> {
        ContainerMapper(&open.container)
    }
}

fn len_of(size: u64) -> Result<usize, DmaMapError> {
    usize::try_from(size).map_err(|_| DmaMapError::TooLarge { size })
}

impl DmaMapper for ContainerMapper<'_> {
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        writable: bool,
    ) -> Result<(), DmaMapError> {
        let len = len_of(size)?;
        if writable {
            // SAFETY: the caller upholds `DmaMapper::map`'s contract, which is the one
            // `vfio_dma_map` states.
            return Ok(unsafe { VfioOps::vfio_dma_map(self.0, iova, len, host_addr as *mut u8) }?);
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
            return Err(DmaMapError::Ioctl {
                ioctl: "VFIO_IOMMU_MAP_DMA (read-only)",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaMapError> {
        Ok(self.0.vfio_dma_unmap(iova, len_of(size)?)?)
    }
}

impl VfioVf {
    /// Maps `regions` at IOVA = GPA (see [`crate::vf::VfDevice::map_guest_ram`]).
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
        // The field, not `opened()`: `mappings` is borrowed mutably beside it.
        let open = self.open.as_ref().ok_or_else(|| VfioVfError::Released {
            bdf: self.bdf.to_string(),
        })?;
        let result = self.mappings.apply(&ContainerMapper::of(open), regions);
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
}
