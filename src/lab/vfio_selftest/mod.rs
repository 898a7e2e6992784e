//! `vfmig vf self-test`: every step the companion relies on, run against a real VF, each
//! reported as it finishes.
//!
//! Steps, in order: `open`, `map_memfd` (16 MiB of memfd mapped at IOVA = GPA
//! 0x1_0000_0000 as guest RAM), `read_config`, `bus_master`, `reset`, `dirty_tracking`,
//! `unmap` (including a remap on a changed table), `release`. After a failed step the rest
//! are skipped.
//!
//! With a network interface to send from (`--dma-from`, the PF's interface), an extra step
//! `device_dma` after `dirty_tracking` makes an 82576 VF receive a frame sent from it: the
//! device writes it into the mapped memfd through the IOMMU, and the page must be reported by
//! the dirty sync.

//!
//! Files by role: `steps` runs the steps, `report` holds their results, `ram` the memfd that
//! stands in for guest RAM, `device_dma` the extra step with the 82576 driver of [`igbvf`],
//! `error` why a step failed.

mod device_dma;
mod error;
pub mod igbvf;
mod ram;
mod report;
mod steps;

use std::path::Path;

pub use error::SelfTestError;
pub use report::{SelfTestReport, Step, StepResult};

use crate::vf::vfio::DEFAULT_SYSFS_ROOT;

/// The steps, in order.
pub const STEPS: [&str; 8] = [
    "open",
    "map_memfd",
    "read_config",
    "bus_master",
    "reset",
    "dirty_tracking",
    "unmap",
    "release",
];

/// Size of the self-test's guest RAM.
pub const TEST_RAM_SIZE: u64 = 16 << 20;
/// Where the self-test's guest RAM sits in guest-physical space (and IOVA).
pub const TEST_RAM_GPA: u64 = 0x1_0000_0000;
/// Where the remap check moves the second half of the guest RAM.
const MOVED_GPA: u64 = 0x2_0000_0000;

/// Runs the self-test on the VF at `bdf` with sysfs at `/sys`, calling `progress` as each
/// step finishes.
pub fn self_test(bdf: &str, progress: &mut dyn FnMut(&Step)) -> SelfTestReport {
    self_test_with_root(Path::new(DEFAULT_SYSFS_ROOT), bdf, progress)
}

/// As [`self_test`], with sysfs at `sysfs_root`.
pub fn self_test_with_root(
    sysfs_root: &Path,
    bdf: &str,
    progress: &mut dyn FnMut(&Step),
) -> SelfTestReport {
    steps::run(sysfs_root, bdf, None, progress)
}

/// The `device_dma` step's settings.
#[derive(Debug, Clone, Copy)]
pub struct DmaProbe<'a> {
    /// The interface that sends the VF its frame (the PF's).
    pub from: &'a str,
    /// Negative control: the receive ring names IOVAs outside the IOMMU mapping, so the
    /// device's writes fault and the step must fail with "no frame arrived".
    pub unmapped: bool,
}

/// As [`self_test`], with the `device_dma` step when `dma` is given.
pub fn self_test_with_dma(
    bdf: &str,
    dma: Option<DmaProbe<'_>>,
    progress: &mut dyn FnMut(&Step),
) -> SelfTestReport {
    steps::run(Path::new(DEFAULT_SYSFS_ROOT), bdf, dma, progress)
}
