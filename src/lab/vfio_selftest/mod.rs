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
//! Files by role: `plan` says what the test does (steps, guest RAM, probe settings), `steps`
//! runs it, `report` holds the results, `ram` the memfd that stands in for guest RAM,
//! `device_dma` the extra step with the 82576 driver of [`igbvf`], `error` why a step failed.

mod device_dma;
mod error;
pub mod igbvf;
mod plan;
mod ram;
mod report;
mod steps;

pub use error::SelfTestError;
pub use plan::{DmaProbe, STEPS, TEST_RAM_GPA, TEST_RAM_SIZE};
pub use report::{SelfTestReport, Step, StepResult};
pub use steps::{self_test, self_test_with_dma, self_test_with_root};
