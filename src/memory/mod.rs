//! The logged path into guest RAM, for everyone who writes it: guest RAM as mapped from
//! `SET_MEM_TABLE` ([`guest_ram`]), QEMU's dirty log as that memory's bitmap
//! ([`QemuLogBitmap`]), the companion's own device-dirty bitmap, and the [`DmaEngine`], the
//! one gate through which a device writes guest RAM, with its rate limit ([`Throttle`], device
//! auto-converge).
//!
//! Dirty tracking of device writes.
//!
//! Two bitmaps, one bit per 4 KiB page of guest-physical address:
//! - [`QemuLogBitmap`]: the bitmap type of the guest memory the companion maps. Once QEMU has
//!   sent `SET_LOG_BASE`, every write through that memory sets the page's bit in QEMU's own
//!   vhost-user dirty log, and QEMU resends the page in precopy.
//! - [`DeviceDirtyBitmap`]: the companion's own record of the pages its device wrote during one
//!   migration epoch, for statistics and profiling.

mod device_bitmap;
mod dma;
mod gate;
pub mod guest_ram;
mod qemu_log;
mod throttle;

pub use device_bitmap::DeviceDirtyBitmap;
pub use dma::{DmaEngine, DmaError, DmaStats, GateState};
pub use qemu_log::{LogWindow, OwnedLog, QemuLogBitmap};
pub use throttle::{dirty_cost, Throttle, ThrottleCounters};

/// Size of the page the vhost-user log tracks, in bytes (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 4096;
