//! The VF side of the companion: how the device reaches guest RAM.
//!
//! [`DmaEngine`] is the one path by which the companion's device writes guest RAM. It checks
//! every range against the memory table, writes through the logged guest memory so that QEMU
//! resends the page, records the page in the companion's own per-migration bitmap, holds writes
//! while a migration runs without a log, and stops them at switchover.

mod dma;

pub use dma::{DmaEngine, DmaError, DmaStats, GateState};
