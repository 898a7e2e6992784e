//! The guest-memory bitmap backed by QEMU's vhost-user dirty log.
//!
//! vhost-user-backend creates one [`QemuLogBitmap`] per guest RAM region (empty: no log), and on
//! `SET_LOG_BASE` hands each one a [`LogWindow`] over QEMU's shared log. From then on every write
//! through the guest memory (virtqueue updates and the companion's device writes alike) sets
//! `log[page / 8] |= 1 << (page % 8)` with an atomic OR, the format QEMU consumes with `xchg`.
//!
//! Unlike the crate's own `BitmapMmapRegion`, this type can say whether a log is installed
//! ([`QemuLogBitmap::is_logging`]) and hand its window on to a region that a later
//! `SET_MEM_TABLE` creates: the companion needs both to never write guest RAM untracked while a
//! migration runs.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Address, GuestMemoryRegion};

use super::LOG_PAGE_SIZE;

/// A dirty log in this process's own memory, laid out as QEMU lays out its shared one.
/// Used where no QEMU is present: tests and benchmarks.
#[derive(Debug)]
pub struct OwnedLog(Vec<AtomicU8>);

impl OwnedLog {
    /// A zeroed log able to cover `guest_bytes` of guest-physical address space.
    pub fn covering(guest_bytes: u64) -> Self {
        let pages = guest_bytes.div_ceil(LOG_PAGE_SIZE) as usize;
        Self((0..pages.div_ceil(8)).map(|_| AtomicU8::new(0)).collect())
    }

    /// Number of pages whose bit is set.
    pub fn count_set(&self) -> u64 {
        self.0
            .iter()
            .map(|b| u64::from(b.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    /// Sets the bit of the page holding `gpa` as a device write's log does (`SeqCst` OR), or
    /// nothing past the log's end. For benchmarks: the cost of one logged page.
    pub fn mark_page(&self, gpa: u64) {
        let page = (gpa / LOG_PAGE_SIZE) as usize;
        if let Some(b) = self.0.get(page / 8) {
            b.fetch_or(1 << (page % 8), Ordering::SeqCst);
        }
    }

    /// Clears the bit of the page holding `gpa`, as QEMU's harvest does; whether it was set.
    pub fn take(&self, gpa: u64) -> bool {
        let page = (gpa / LOG_PAGE_SIZE) as usize;
        self.0.get(page / 8).is_some_and(|b| {
            b.fetch_and(!(1 << (page % 8)), Ordering::SeqCst) & (1 << (page % 8)) != 0
        })
    }

    /// Whether the bit of the page holding `gpa` is set.
    pub fn is_set(&self, gpa: u64) -> bool {
        let page = (gpa / LOG_PAGE_SIZE) as usize;
        self.0
            .get(page / 8)
            .is_some_and(|b| b.load(Ordering::SeqCst) & (1 << (page % 8)) != 0)
    }
}

/// Where a log's bytes live.
#[derive(Debug, Clone)]
enum LogBytes {
    /// QEMU's log, mapped from the fd of `SET_LOG_BASE`.
    Qemu(Arc<MmapLogReg>),
    /// A log of this process (tests, benchmarks).
    Owned(Arc<OwnedLog>),
}

impl LogBytes {
    fn byte(&self, index: usize) -> &AtomicU8 {
        match self {
            LogBytes::Qemu(m) => &m[index],
            LogBytes::Owned(o) => &o.0[index],
        }
    }

    /// Checks that the log covers the region's pages.
    fn check_covers<R: GuestMemoryRegion>(&self, region: &R) -> io::Result<()> {
        match self {
            // The crate's constructor checks coverage against the mapping's length, which it
            // keeps private; reuse its verdict.
            LogBytes::Qemu(m) => AtomicBitmapMmap::new(region, Arc::clone(m)).map(drop),
            LogBytes::Owned(o) => {
                let (first, pages) = region_pages(region)?;
                if first + pages > o.0.len() * 8 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the dirty log covers {} pages; region at {:#x} ends at page {}",
                            o.0.len() * 8,
                            region.start_addr().raw_value(),
                            first + pages
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The part of a dirty log that covers one guest RAM region.
#[derive(Debug, Clone)]
pub struct LogWindow {
    log: LogBytes,
    /// Absolute page number (GPA / 4 KiB) of the region's first byte.
    first_page: usize,
    /// Number of pages in the region.
    pages: usize,
}

impl LogWindow {
    fn over<R: GuestMemoryRegion>(log: LogBytes, region: &R) -> io::Result<Self> {
        let (first_page, pages) = region_pages(region)?;
        log.check_covers(region)?;
        Ok(Self {
            log,
            first_page,
            pages,
        })
    }

    /// A window over an [`OwnedLog`]; fails if the log does not cover the region.
    pub fn over_owned<R: GuestMemoryRegion>(log: Arc<OwnedLog>, region: &R) -> io::Result<Self> {
        Self::over(LogBytes::Owned(log), region)
    }

    /// The same log, placed over another region; fails if the log does not cover it.
    pub fn for_region<R: GuestMemoryRegion>(&self, region: &R) -> io::Result<Self> {
        Self::over(self.log.clone(), region)
    }

    /// Sets the bits of the pages `[offset, offset + len)` of the region (offsets in bytes,
    /// relative to the region's start). Bytes past the region are ignored.
    ///
    /// The page range is computed once and each log byte it touches gets one `fetch_or` of
    /// all its bits, not one per page. The OR is `SeqCst`, as QEMU's `xchg` that harvests the
    /// log is: a bit set after the data was written is seen by the harvest that clears it,
    /// and that harvest is followed by QEMU's read of the page.
    pub(crate) fn mark(&self, offset: usize, len: usize) {
        if len == 0 || self.pages == 0 {
            return;
        }
        let first = offset / LOG_PAGE_SIZE as usize;
        if first >= self.pages {
            return;
        }
        let last = (offset.saturating_add(len - 1) / LOG_PAGE_SIZE as usize).min(self.pages - 1);
        let (first, last) = (self.first_page + first, self.first_page + last);
        for byte in first / 8..=last / 8 {
            let lo = if byte == first / 8 { first % 8 } else { 0 };
            let hi = if byte == last / 8 { last % 8 } else { 7 };
            // Bits lo..=hi of the byte; hi - lo <= 7, so the shift never overflows a u16.
            let bits = (((1u16 << (hi - lo + 1)) - 1) << lo) as u8;
            self.log.byte(byte).fetch_or(bits, Ordering::SeqCst);
        }
    }

    fn is_marked(&self, offset: usize) -> bool {
        let page = offset / LOG_PAGE_SIZE as usize;
        if page >= self.pages {
            return false;
        }
        let abs = self.first_page + page;
        self.log.byte(abs / 8).load(Ordering::SeqCst) & (1 << (abs % 8)) != 0
    }
}

/// First absolute page and page count of a region; the region must be 4 KiB aligned.
fn region_pages<R: GuestMemoryRegion>(region: &R) -> io::Result<(usize, usize)> {
    let start = region.start_addr().raw_value();
    if start % LOG_PAGE_SIZE != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("guest RAM region at {start:#x} is not 4 KiB aligned"),
        ));
    }
    Ok((
        (start / LOG_PAGE_SIZE) as usize,
        region.len().div_ceil(LOG_PAGE_SIZE) as usize,
    ))
}

impl MemRegionBitmap for LogWindow {
    fn new<R: GuestMemoryRegion>(region: &R, log: Arc<MmapLogReg>) -> io::Result<Self> {
        Self::over(LogBytes::Qemu(log), region)
    }
}

/// Bitmap of one guest RAM region: QEMU's dirty log once `SET_LOG_BASE` arrived, nothing before.
#[derive(Debug, Clone, Default)]
pub struct QemuLogBitmap {
    window: Arc<RwLock<Option<LogWindow>>>,
    /// Offset of this slice from the region's start, in bytes.
    base: usize,
}

impl QemuLogBitmap {
    /// Whether QEMU's log is installed for this region.
    pub fn is_logging(&self) -> bool {
        self.window.read().map(|w| w.is_some()).unwrap_or(false)
    }

    /// The log window installed for this region, if any.
    pub fn window(&self) -> Option<LogWindow> {
        self.window.read().ok().and_then(|w| w.clone())
    }

    /// Calls `f` with the log window installed for this region (or `None`), holding it in
    /// place for the call: a write made inside `f` and marked with that window is logged in
    /// the log that was installed when it landed, even if `SET_LOG_BASE` swaps it meanwhile
    /// (the swap waits). Windows are only ever replaced, never removed, so a region that had
    /// a log when `f` started still has one after.
    pub(crate) fn with_window<R>(&self, f: impl FnOnce(Option<&LogWindow>) -> R) -> R {
        // A poisoned lock means a writer panicked while swapping windows; use whatever
        // window is there, as `mark_dirty` does.
        let guard = self.window.read().unwrap_or_else(|e| e.into_inner());
        f(guard.as_ref())
    }
}

impl Bitmap for QemuLogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // A poisoned lock means a writer panicked while swapping windows; keep marking with
        // whatever window is there rather than dropping the bit.
        let guard = self.window.read().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = guard.as_ref() {
            w.mark(self.base.saturating_add(offset), len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let guard = self.window.read().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .is_some_and(|w| w.is_marked(self.base.saturating_add(offset)))
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        Self {
            window: Arc::clone(&self.window),
            base: self.base.saturating_add(offset),
        }
    }
}

impl BitmapSlice for QemuLogBitmap {}

impl WithBitmapSlice<'_> for QemuLogBitmap {
    type S = Self;
}

impl NewBitmap for QemuLogBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for QemuLogBitmap {
    type InnerBitmap = LogWindow;

    fn replace(&self, window: LogWindow) {
        let mut guard = self.window.write().unwrap_or_else(|e| e.into_inner());
        *guard = Some(window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    #[test]
    fn writes_set_bits_in_the_log_at_gpa_page_numbers() {
        let mem = GuestMemoryMmap::<QemuLogBitmap>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        let log = Arc::new(OwnedLog::covering(0x40_0000));
        for r in mem.iter() {
            assert!(!r.bitmap().is_logging());
            r.bitmap()
                .replace(LogWindow::over_owned(Arc::clone(&log), r).unwrap());
            assert!(r.bitmap().is_logging());
        }
        // A write that straddles pages 0x201 and 0x202 of the second region.
        mem.write_slice(&[7u8; 16], GuestAddress(0x20_1ff8))
            .unwrap();
        assert!(log.is_set(0x20_1000));
        assert!(log.is_set(0x20_2000));
        assert_eq!(log.count_set(), 2);
    }

    #[test]
    fn a_log_too_small_for_the_region_is_refused() {
        let mem =
            GuestMemoryMmap::<QemuLogBitmap>::from_ranges(&[(GuestAddress(0x100_0000), 0x1000)])
                .unwrap();
        let log = Arc::new(OwnedLog::covering(0x10_0000));
        let r = mem.iter().next().unwrap();
        assert!(LogWindow::over_owned(log, r).is_err());
    }

    #[test]
    fn a_window_moves_to_a_new_region_only_within_the_log() {
        let mem = GuestMemoryMmap::<QemuLogBitmap>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x10_0000), 0x1000),
            (GuestAddress(0x100_0000), 0x1000),
        ])
        .unwrap();
        let log = Arc::new(OwnedLog::covering(0x20_0000));
        let regions: Vec<_> = mem.iter().collect();
        let w = LogWindow::over_owned(log, regions[0]).unwrap();
        assert!(w.for_region(regions[1]).is_ok());
        assert!(w.for_region(regions[2]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn mark_sets_exactly_the_pages_of_the_range(offset in 0usize..(80 * 4096), len in 0usize..(90 * 4096)) {
            // A region of 64 pages starting at page 3: its pages are not byte-aligned in the log.
            let mem = GuestMemoryMmap::<QemuLogBitmap>::from_ranges(&[(GuestAddress(0x3000), 64 * 4096)])
                .unwrap();
            let log = Arc::new(OwnedLog::covering(0x10_0000));
            let w = LogWindow::over_owned(Arc::clone(&log), mem.iter().next().unwrap()).unwrap();
            w.mark(offset, len);
            let set: Vec<usize> = (0..256).filter(|p| log.is_set(*p as u64 * 4096)).collect();
            let want: Vec<usize> = if len == 0 {
                vec![]
            } else {
                (offset / 4096..=(offset + len - 1) / 4096).filter(|&p| p < 64).map(|p| p + 3).collect()
            };
            proptest::prop_assert_eq!(set, want);
        }
    }

    #[test]
    fn without_a_log_writes_mark_nothing() {
        let mem =
            GuestMemoryMmap::<QemuLogBitmap>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        mem.write_slice(&[1u8; 8], GuestAddress(0x1000)).unwrap();
        assert!(!mem.iter().next().unwrap().bitmap().dirty_at(0x1000));
    }
}
