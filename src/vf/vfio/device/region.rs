//! The device's VFIO regions: byte access through the device fd ([`VfioConfig`], for config
//! space and BARs), the config-space accessors built on it (IDs, Command, bus master), and the
//! table of the regions the device has ([`DeviceRegion`]).

use std::io;
use std::os::fd::AsRawFd;

use serde::Serialize;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::VfioDevice;

use super::state::{Open, VfioVf};
use crate::vf::vfio::config::{self, ConfigSpace};
use crate::vf::vfio::error::VfioVfError;

/// Names of the VFIO PCI regions, by index.
const REGION_NAMES: [&str; VFIO_PCI_NUM_REGIONS as usize] = [
    "BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "config", "VGA",
];

/// One VFIO region of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRegion {
    /// VFIO region index (0-5 BARs, 6 ROM, 7 config, 8 VGA).
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Readable through the device fd.
    pub readable: bool,
    /// Writable through the device fd.
    pub writable: bool,
    /// Can be mmapped.
    pub mmap: bool,
}

/// One VFIO region of an open device (its config region, or a BAR), as a [`ConfigSpace`].
pub(super) struct VfioConfig<'a> {
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

impl VfioVf {
    /// The config region of `open`.
    pub(super) fn config_of(open: &Open) -> VfioConfig<'_> {
        VfioConfig {
            device: &open.device,
            offset: open.config_offset,
            size: open.config_size,
        }
    }

    /// The config region, or [`VfioVfError::Released`].
    pub(super) fn config(&self) -> Result<VfioConfig<'_>, VfioVfError> {
        Ok(Self::config_of(self.opened()?))
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

    /// Byte access to the device's VFIO region `index` (BAR0 is 0), through the device fd.
    pub fn region(&self, index: u32) -> Result<impl ConfigSpace + '_, VfioVfError> {
        let open = self.opened()?;
        Ok(VfioConfig {
            device: &open.device,
            offset: open.device.get_region_offset(index),
            size: open.device.get_region_size(index),
        })
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
}
