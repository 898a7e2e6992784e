//! Guest RAM as the companion maps it: the regions QEMU hands over in `SET_MEM_TABLE`, each
//! with a [`QemuLogBitmap`] so that writes through it land in QEMU's dirty log.

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
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

/// Where a device write lands, found once by [`locate`].
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// Inside one region, at `offset` from its start.
    Region {
        /// The region.
        region: &'a GuestRegionMmap<QemuLogBitmap>,
        /// Offset of the first byte in the region.
        offset: u64,
    },
    /// Across adjacent regions.
    Spanning,
}

/// Where `[gpa, gpa + len)` lies in guest RAM, or `None` if it is not entirely inside it.
/// One region lookup for a range inside one region, the common case; the full check otherwise.
pub fn locate(mem: &GuestRamMmap, gpa: u64, len: u64) -> Option<Target<'_>> {
    let end = gpa.checked_add(len)?;
    if let Some(region) = mem.find_region(GuestAddress(gpa)) {
        let offset = gpa - region.start_addr().raw_value();
        if end - region.start_addr().raw_value() <= region.len() {
            return Some(Target::Region { region, offset });
        }
    }
    contains(mem, gpa, len).then_some(Target::Spanning)
}

/// Why [`write_logged`] wrote nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggedWriteError {
    /// The log was required and is not installed at `gpa`.
    NoLog {
        /// The first address without a log.
        gpa: u64,
    },
    /// Guest memory refused the access.
    Memory {
        /// Address of the access.
        gpa: u64,
        /// vm-memory's account of it.
        reason: String,
    },
}

/// Writes `data` at `gpa` (located by [`locate`]) and marks its pages in QEMU's log wherever
/// the log is installed. With `need_log`, refuses (writing nothing) if any part of the range
/// has no log.
///
/// Inside one region and longer than a machine word: one `memcpy` into the mapping and one
/// `fetch_or` per log byte, under one read of the region's log window. Shorter writes keep
/// vm-memory's volatile, aligned per-word copy (a device's 2-, 4- or 8-byte update must not
/// tear), and writes across regions go through vm-memory too.
pub fn write_logged(
    mem: &GuestRamMmap,
    target: Target<'_>,
    gpa: u64,
    data: &[u8],
    need_log: bool,
) -> Result<(), LoggedWriteError> {
    let Target::Region { region, offset } = target else {
        return write_generic(mem, gpa, data, need_log);
    };
    if data.len() <= std::mem::size_of::<usize>() {
        return write_generic(mem, gpa, data, need_log);
    }
    region.bitmap().with_window(|window| {
        if need_log && window.is_none() {
            return Err(LoggedWriteError::NoLog { gpa });
        }
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|e| LoggedWriteError::Memory {
                gpa,
                reason: e.to_string(),
            })?;
        // SAFETY: `locate` found `[offset, offset + data.len())` inside `region`, whose
        // mapping `mem` (borrowed for this call) keeps alive; `host` is the mapping's address
        // of `offset`, so the whole destination is mapped and writable. The source is a Rust
        // slice, which never overlaps guest RAM's mapping. Guest RAM is shared with the guest,
        // which may access the same bytes meanwhile: that is the same plain `memcpy`
        // vm-memory itself makes for any copy longer than a word.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) };
        if let Some(w) = window {
            w.mark(offset as usize, data.len());
        }
        Ok(())
    })
}

/// The general path: the log check region by region, then vm-memory's `write_slice`, which
/// marks the log through each region's bitmap.
fn write_generic(
    mem: &GuestRamMmap,
    gpa: u64,
    data: &[u8],
    need_log: bool,
) -> Result<(), LoggedWriteError> {
    if need_log {
        if let Some(bad) = first_unlogged(mem, gpa, data.len() as u64) {
            return Err(LoggedWriteError::NoLog { gpa: bad });
        }
    }
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|e| LoggedWriteError::Memory {
            gpa,
            reason: e.to_string(),
        })
}

/// The first address in `[gpa, gpa + len)` whose region has no log, if any.
fn first_unlogged(mem: &GuestRamMmap, gpa: u64, len: u64) -> Option<u64> {
    let end = gpa + len;
    let mut at = gpa;
    while at < end {
        let region = mem.find_region(GuestAddress(at))?;
        if !region.bitmap().is_logging() {
            return Some(at);
        }
        at = region.start_addr().raw_value() + region.len();
    }
    None
}
