//! The VF's lifecycle at a migration: quiesce (bus master off, pending transactions drained),
//! resume, reset (`VFIO_DEVICE_RESET`), release (logging stopped, DMA off, guest RAM unmapped,
//! files closed).

use std::io;

use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_DEVICE_FLAGS_RESET, VFIO_TYPE};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::ioctl::ioctl;

use super::iommu::ContainerMapper;
use super::state::VfioVf;
use crate::vf::vfio::config;
use crate::vf::vfio::error::VfioVfError;
use crate::vf::{QuiesceReport, ResetReport};

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, u32::from(VFIO_TYPE), VFIO_BASE + 11);

/// `VFIO_DEVICE_RESET`, with its error (vfio-ioctls' `reset()` drops it).
fn device_reset(device: &VfioDevice) -> io::Result<()> {
    // SAFETY: `device` is an open VFIO device fd and VFIO_DEVICE_RESET takes no argument.
    let ret = unsafe { ioctl(device, VFIO_DEVICE_RESET()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl VfioVf {
    /// Whether the device offers `VFIO_DEVICE_RESET` (`VFIO_DEVICE_FLAGS_RESET`).
    pub fn reset_supported(&self) -> bool {
        self.device_flags & VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// Clears bus master and waits for pending transactions (see
    /// [`crate::vf::VfDevice::quiesce`]).
    pub(super) fn quiesce_device(&mut self) -> Result<QuiesceReport, VfioVfError> {
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

    /// Restores bus master as it was before the quiesce.
    pub(super) fn resume_device(&mut self) -> Result<(), VfioVfError> {
        if let Some(was) = self.quiesced {
            self.set_bus_master(was)?;
            self.quiesced = None;
            tracing::info!(bdf = %self.bdf, bus_master = was, "VF resumed");
        }
        Ok(())
    }

    /// Resets the function through VFIO, if the device offers it.
    pub(super) fn reset_device(&mut self) -> Result<ResetReport, VfioVfError> {
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

    /// Stops logging, clears bus master, unmaps guest RAM and closes the files; tries every
    /// step and returns the first error. Idempotent.
    pub(super) fn release_device(&mut self) -> Result<(), VfioVfError> {
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
        if let Err(e) = self.mappings.unmap_all(&ContainerMapper::of(&open)) {
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
