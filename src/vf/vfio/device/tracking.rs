//! Which pages the VF wrote: device DMA logging over the writable mapped regions where the
//! device's VFIO driver offers it, otherwise every writable mapped page at every sync.

use std::io;
use std::mem::size_of;

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, VFIO_BASE, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET, VFIO_TYPE,
};
use vfio_ioctls::{DmaLoggingRange, VfioDevice, VfioError};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::state::{Logging, VfioVf};
use crate::memory::LOG_PAGE_SIZE;
use crate::vf::vfio::dirty::{report_all_writable, report_bitmap};
use crate::vf::vfio::error::{chain, VfioVfError};
use crate::vf::DirtyTracking;

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_FEATURE, u32::from(VFIO_TYPE), VFIO_BASE + 17);

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

/// The tracking mode an open device supports, and why.
pub(super) fn probe(device: &VfioDevice) -> (DirtyTracking, String) {
    match probe_feature_set(device, VFIO_DEVICE_FEATURE_DMA_LOGGING_START) {
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
    }
}

impl VfioVf {
    pub(super) fn logging_error(&self, action: &'static str, source: VfioError) -> VfioVfError {
        VfioVfError::DmaLogging {
            bdf: self.bdf.to_string(),
            action,
            source,
        }
    }

    /// Takes what the device logged so far into `carried`, then stops logging.
    pub(super) fn stop_logging_carrying(&mut self) {
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
                        bdf = %self.bdf, error = %chain(&e),
                        "device DMA logging report failed before a restart: the whole range \
                         counts as dirty"
                    );
                    carried.push((r.iova, r.length));
                }
            }
        }
        if let Err(e) = open.device.stop_dma_logging() {
            tracing::warn!(bdf = %self.bdf, error = %chain(&e), "stopping device DMA logging failed");
        }
    }

    /// Starts device DMA logging over the writable mapped regions. If the device refuses,
    /// falls back to reporting every writable page.
    pub(super) fn start_logging(&mut self) {
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
                let err = chain(&self.logging_error("start", e));
                tracing::warn!(error = %err, "falling back to all-writable-pages");
                self.tracking = DirtyTracking::AllWritablePages;
                self.tracking_why = format!("device DMA logging could not start: {err}");
            }
        }
    }

    /// Reports the pages dirtied since the last sync (see [`crate::vf::VfDevice::sync_dirty`]).
    pub(super) fn sync(&mut self, report: &mut dyn FnMut(u64, u64)) -> Result<u64, VfioVfError> {
        self.opened()?;
        let mut pages = 0u64;
        for (gpa, len) in std::mem::take(&mut self.carried) {
            report(gpa, len);
            pages += len.div_ceil(LOG_PAGE_SIZE);
        }
        match self.tracking {
            DirtyTracking::DeviceDmaLogging => pages += self.sync_logged(report)?,
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

    /// Reports what device DMA logging saw. A range whose bitmap is lost is reported in
    /// full, and logging restarts.
    fn sync_logged(&mut self, report: &mut dyn FnMut(u64, u64)) -> Result<u64, VfioVfError> {
        let Some(logging) = self.logging.as_ref() else {
            return Ok(0); // nothing writable mapped
        };
        let open = self.opened()?;
        let mut pages = 0u64;
        let mut failed = None;
        for r in &logging.ranges {
            match open.device.report_dma_logging(*r, logging.page_size) {
                Ok(bm) => pages += report_bitmap(r.iova, r.length, logging.page_size, &bm, report),
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
                error = %chain(&err),
                "the ranges that failed were reported dirty in full; restarting logging"
            );
            self.stop_logging_carrying();
            self.start_logging();
        }
        Ok(pages)
    }
}
