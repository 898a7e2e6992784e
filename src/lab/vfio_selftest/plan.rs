//! What the self-test does: its steps, the guest RAM it maps, and the settings of the extra
//! `device_dma` step.

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
pub(super) const MOVED_GPA: u64 = 0x2_0000_0000;

/// The `device_dma` step's settings.
#[derive(Debug, Clone, Copy)]
pub struct DmaProbe<'a> {
    /// The interface that sends the VF its frame (the PF's).
    pub from: &'a str,
    /// Negative control: the receive ring names IOVAs outside the IOMMU mapping, so the
    /// device's writes fault and the step must fail with "no frame arrived".
    pub unmapped: bool,
}
