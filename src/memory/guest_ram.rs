//! Guest RAM as the companion maps it: the regions QEMU hands over in `SET_MEM_TABLE`, each
//! with a [`QemuLogBitmap`] so that writes through it land in QEMU's dirty log.

use vm_memory::{
    Address, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::memory::QemuLogBitmap;

/// The guest memory every writer of guest RAM in the companion goes through.
pub type GuestRamMmap = GuestMemoryMmap<QemuLogBitmap>;

/// The shared, swappable view of guest RAM (swapped on each `SET_MEM_TABLE`).
pub type GuestRam = GuestMemoryAtomic<GuestRamMmap>;

/// An empty guest RAM, before QEMU has sent a memory table.
pub fn empty() -> GuestRam {
    GuestMemoryAtomic::new(GuestMemoryMmap::new())
}

/// One region of guest RAM, as reported to users.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionInfo {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Whether QEMU's dirty log is installed for the region.
    pub logged: bool,
}

/// The regions of `mem`, in GPA order.
pub fn regions(mem: &GuestRamMmap) -> Vec<RegionInfo> {
    mem.iter()
        .map(|r| RegionInfo {
            gpa: r.start_addr().raw_value(),
            size: r.len(),
            logged: r.bitmap().is_logging(),
        })
        .collect()
}

/// One past the highest guest-physical address of `mem` (0 when empty).
pub fn end_gpa(mem: &GuestRamMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
}

/// A short human description of the regions, for error messages.
pub fn describe(mem: &GuestRamMmap) -> String {
    let rs = regions(mem);
    if rs.is_empty() {
        return "no guest RAM mapped".into();
    }
    rs.iter()
        .map(|r| format!("{:#x}..{:#x}", r.gpa, r.gpa + r.size))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `[gpa, gpa + len)` lies entirely in guest RAM (possibly across adjacent regions).
pub fn contains(mem: &GuestRamMmap, gpa: u64, len: u64) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    gpa.checked_add(len as u64).is_some()
        && GuestMemoryBackend::check_range(mem, GuestAddress(gpa), len)
}
