//! Dirty tracking of device writes.
//!
//! Two bitmaps, one bit per 4 KiB page of guest-physical address:
//! - [`QemuLogBitmap`]: the bitmap type of the guest memory the companion maps. Once QEMU has
//!   sent `SET_LOG_BASE`, every write through that memory sets the page's bit in QEMU's own
//!   vhost-user dirty log, and QEMU resends the page in precopy.
//! - [`DeviceDirtyBitmap`]: the companion's own record of the pages its device wrote during one
//!   migration epoch, for statistics and profiling.

mod device_bitmap;
mod qemu_log;

pub use device_bitmap::DeviceDirtyBitmap;
pub use qemu_log::{LogWindow, OwnedLog, QemuLogBitmap};

/// Size of the page the vhost-user log tracks, in bytes (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 4096;
