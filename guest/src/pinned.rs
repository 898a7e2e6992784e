//! Pinned buffers and their guest-physical addresses.
//!
//! The companion reads and writes guest RAM directly at the guest-physical pages of a region,
//! so a buffer must stay at the same physical pages for as long as it is registered: it is
//! mapped anonymous, populated and `mlock`ed, and its page frame numbers are read from
//! `/proc/self/pagemap` (which shows PFNs to root only). In a guest, PFN × 4096 is the GPA.
//!
//! Backing, in order of preference: hugetlb pages (2 MiB, `MAP_HUGETLB`, needs
//! `/proc/sys/vm/nr_hugepages` > 0), then a 2 MiB-aligned mapping with the transparent-hugepage
//! hint (`MADV_HUGEPAGE`), then plain 4 KiB pages. Physically contiguous pages are merged into
//! one [`Segment`]; one registration carries at most [`MAX_SEGMENTS`] segments, and
//! [`PinnedBuffer::new`] fails when the buffer would need more (reserve hugepages then).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vfmig_proto::{Segment, MAX_SEGMENTS};

/// The page size of `/proc/self/pagemap` entries and of guest-physical addresses.
pub const PAGE: usize = 4096;
/// Huge page size (x86-64).
pub const HUGE_PAGE: usize = 2 << 20;
/// Buffers larger than this get a 2 MiB-aligned mapping with the transparent-hugepage hint;
/// smaller ones (at most 64 pages, hence at most 64 segments) use plain pages.
const THP_THRESHOLD: usize = 256 << 10;

/// What backs a [`PinnedBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// hugetlb pages (`MAP_HUGETLB`).
    HugeTlb,
    /// A 2 MiB-aligned mapping with `MADV_HUGEPAGE` (transparent hugepages where the kernel
    /// could get them, 4 KiB pages elsewhere).
    TransparentHuge,
    /// 4 KiB pages.
    Small,
}

impl Backing {
    /// A short name for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Backing::HugeTlb => "hugetlb",
            Backing::TransparentHuge => "thp",
            Backing::Small => "4k",
        }
    }
}

/// A buffer at fixed guest-physical pages: mapped, populated, locked, with its GPAs known.
#[derive(Debug)]
pub struct PinnedBuffer {
    /// Start of the mapping (page aligned).
    ptr: *mut u8,
    /// Requested length.
    len: usize,
    /// Mapped (and locked) length.
    map_len: usize,
    backing: Backing,
    segments: Vec<Segment>,
}

// SAFETY: the buffer owns its mapping exclusively; the raw pointer is only dereferenced
// through `&self`/`&mut self` methods that follow Rust's borrowing rules.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only hands out `&[u8]` (or raw pointers), never mutation via `&self`.
unsafe impl Sync for PinnedBuffer {}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

/// Maps `len` bytes anonymous with extra `flags`; `None` when the kernel refuses.
fn map(len: usize, flags: libc::c_int) -> Option<*mut u8> {
    // SAFETY: an anonymous private mapping at an address the kernel chooses touches no
    // existing memory; the result is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

fn unmap(ptr: *mut u8, len: usize) {
    if len > 0 {
        // SAFETY: callers pass a range they mapped and no longer use.
        unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
    }
}

/// Merges per-page frame numbers into guest-physical segments covering `len` bytes
/// (the last segment is cut at `len`). Pages are [`PAGE`] bytes.
pub fn merge_segments(pfns: &[u64], len: u64) -> Vec<Segment> {
    let page = PAGE as u64;
    let mut out: Vec<Segment> = Vec::new();
    let mut left = len;
    for &pfn in pfns {
        if left == 0 {
            break;
        }
        let take = left.min(page);
        let gpa = pfn * page;
        match out.last_mut() {
            Some(s) if s.gpa + s.len == gpa => s.len += take,
            _ => out.push(Segment { gpa, len: take }),
        }
        left -= take;
    }
    out
}

/// Reads the frame numbers of `pages` pages from `addr` in `/proc/self/pagemap`.
pub fn page_frames(addr: usize, pages: usize) -> io::Result<Vec<u64>> {
    let f = File::open("/proc/self/pagemap")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /proc/self/pagemap: {e}")))?;
    let mut raw = vec![0u8; pages * 8];
    f.read_exact_at(&mut raw, (addr / PAGE) as u64 * 8)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read /proc/self/pagemap: {e}")))?;
    let mut pfns = Vec::with_capacity(pages);
    for (i, e) in raw.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        let e = u64::from_le_bytes(b);
        if e >> 63 == 0 {
            return Err(io::Error::other(format!(
                "page {i} of the pinned buffer (virtual {:#x}) is not present in /proc/self/pagemap",
                addr + i * PAGE
            )));
        }
        let pfn = e & ((1u64 << 55) - 1);
        if pfn == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "/proc/self/pagemap shows page frame number 0: PFNs are hidden without \
                 CAP_SYS_ADMIN; run as root",
            ));
        }
        pfns.push(pfn);
    }
    Ok(pfns)
}

impl PinnedBuffer {
    /// Allocates `len` zeroed bytes at fixed guest-physical pages (see the module docs for the
    /// backing). Fails if the pages cannot be locked, their PFNs cannot be read (not root), or
    /// the buffer spans more than [`MAX_SEGMENTS`] physically contiguous ranges.
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a pinned buffer cannot be empty",
            ));
        }
        let (ptr, map_len, backing) = Self::map_backing(len)?;
        let mut buf = PinnedBuffer {
            ptr,
            len,
            map_len,
            backing,
            segments: Vec::new(),
        };
        // SAFETY: [ptr, ptr + map_len) is our mapping.
        if unsafe { libc::mlock(ptr as *const libc::c_void, map_len) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "mlock of {map_len} bytes failed: {e} (run as root or raise RLIMIT_MEMLOCK)"
                ),
            ));
        }
        // Touch every page with a write so each one is present and private (no zero page).
        for off in (0..map_len).step_by(PAGE) {
            // SAFETY: off < map_len, inside the mapping.
            unsafe { std::ptr::write_volatile(ptr.add(off), 0) };
        }
        let pfns = page_frames(ptr as usize, map_len / PAGE)?;
        buf.segments = merge_segments(&pfns, len as u64);
        if buf.segments.len() > MAX_SEGMENTS {
            return Err(io::Error::other(format!(
                "a pinned buffer of {len} bytes ({} pages) spans {} physically discontiguous \
                 ranges, more than the {MAX_SEGMENTS} one registration carries: reserve hugepages \
                 (echo N > /proc/sys/vm/nr_hugepages, or vfmig.hugepages=N on the guest kernel \
                 command line) or use smaller buffers",
                backing.name(),
                buf.segments.len()
            )));
        }
        Ok(buf)
    }

    fn map_backing(len: usize) -> io::Result<(*mut u8, usize, Backing)> {
        let huge_len = round_up(len, HUGE_PAGE);
        if let Some(p) = map(huge_len, libc::MAP_HUGETLB | libc::MAP_POPULATE) {
            return Ok((p, huge_len, Backing::HugeTlb));
        }
        if len > THP_THRESHOLD {
            // Over-map by one huge page and trim to a 2 MiB-aligned range.
            if let Some(p) = map(huge_len + HUGE_PAGE, libc::MAP_NORESERVE) {
                let start = round_up(p as usize, HUGE_PAGE);
                let head = start - p as usize;
                unmap(p, head);
                let tail = HUGE_PAGE - head;
                unmap((start + huge_len) as *mut u8, tail);
                let aligned = start as *mut u8;
                // SAFETY: [aligned, aligned + huge_len) is what is left of our mapping.
                let ok = unsafe {
                    libc::madvise(aligned as *mut libc::c_void, huge_len, libc::MADV_HUGEPAGE)
                } == 0;
                if ok {
                    return Ok((aligned, huge_len, Backing::TransparentHuge));
                }
                unmap(aligned, huge_len);
            }
        }
        let small_len = round_up(len, PAGE);
        match map(small_len, libc::MAP_POPULATE) {
            Some(p) => Ok((p, small_len, Backing::Small)),
            None => {
                let e = io::Error::last_os_error();
                Err(io::Error::new(
                    e.kind(),
                    format!("mmap of {small_len} bytes failed: {e}"),
                ))
            }
        }
    }

    /// The buffer's first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its length in bytes (as requested).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (empty buffers are refused); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What backs it.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The contents. The companion may write them at any time on behalf of a peer; read them
    /// after the completion that says the data arrived.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zero-filled) bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The contents, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only Rust reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The guest-physical ranges backing the buffer, in order; their lengths add up to
    /// [`len`](Self::len).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        unmap(self.ptr, self.map_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_contiguous_pages_and_cuts_at_len() {
        let s = merge_segments(&[10, 11, 12, 20, 19, 21], 5 * 4096 + 100);
        assert_eq!(
            s,
            vec![
                Segment {
                    gpa: 10 * 4096,
                    len: 3 * 4096
                },
                Segment {
                    gpa: 20 * 4096,
                    len: 4096
                },
                Segment {
                    gpa: 19 * 4096,
                    len: 4096
                },
                Segment {
                    gpa: 21 * 4096,
                    len: 100
                },
            ]
        );
        assert!(merge_segments(&[1, 2], 0).is_empty());
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn check(len: usize) -> PinnedBuffer {
        let mut b = PinnedBuffer::new(len).expect("pinned buffer");
        assert_eq!(b.len(), len);
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
        let segs = b.segments().to_vec();
        assert!(!segs.is_empty() && segs.len() <= MAX_SEGMENTS);
        assert_eq!(segs.iter().map(|s| s.len).sum::<u64>(), len as u64);
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(s.gpa % PAGE as u64, 0, "segment {i} not page aligned");
            if i + 1 < segs.len() {
                assert_eq!(s.len % PAGE as u64, 0);
                // merged: the next segment never starts where this one ends
                assert_ne!(s.gpa + s.len, segs[i + 1].gpa);
            }
        }
        // It agrees with a fresh read of the pagemap (pages did not move).
        let pfns = page_frames(b.as_ptr() as usize, len.div_ceil(PAGE)).unwrap();
        assert_eq!(merge_segments(&pfns, len as u64), segs);
        b.as_mut_slice()[len - 1] = 7;
        assert_eq!(b.as_slice()[len - 1], 7);
        assert!(b.as_slice()[..len - 1].iter().all(|&x| x == 0));
        b
    }

    #[test]
    fn pinned_buffers_cover_their_length_with_page_aligned_segments() {
        if !is_root() {
            eprintln!("skipped: needs root for /proc/self/pagemap PFNs");
            return;
        }
        for len in [1, 4096, 3 * 4096 + 5, 64 << 10] {
            let b = check(len);
            assert!(b.segments().len() <= len.div_ceil(PAGE));
        }
        // Large: hugetlb or THP where the host has them; a 2 MiB huge page is one segment.
        let b = check(4 << 20);
        eprintln!(
            "4 MiB buffer: {} backing, {} segments",
            b.backing().name(),
            b.segments().len()
        );
        if b.backing() == Backing::HugeTlb {
            assert!(b.segments().len() <= 2);
        }
    }

    #[test]
    fn empty_buffer_is_refused() {
        assert_eq!(
            PinnedBuffer::new(0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
