//! The companion's own record of the pages its device wrote during one migration epoch.
//!
//! One bit per 4 KiB page of guest-physical address, in 64-bit atomic words, so that device
//! writes from any thread can mark it without a lock, and a harvest can take a whole word at a
//! time with `swap(0)` and walk only the set bits.

use std::sync::atomic::{AtomicU64, Ordering};

use super::LOG_PAGE_SIZE;

/// Pages written by the device, by GPA page number.
#[derive(Debug)]
pub struct DeviceDirtyBitmap {
    words: Vec<AtomicU64>,
}

impl DeviceDirtyBitmap {
    /// An empty bitmap for `guest_bytes` of guest-physical address space (from GPA 0).
    pub fn new(guest_bytes: u64) -> Self {
        let pages = guest_bytes.div_ceil(LOG_PAGE_SIZE);
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Number of pages the bitmap can record.
    pub fn capacity_pages(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// Marks the pages touched by `[gpa, gpa + len)`. Pages past the bitmap's end are ignored
    /// (the DMA engine has already refused writes outside guest RAM).
    ///
    /// One `fetch_or` per word the range touches, and none for a word that already holds all
    /// its bits (the common case: a page written again in the same epoch). The check is a
    /// plain load: this bitmap is the companion's record for statistics, not QEMU's log, and
    /// a harvest that clears the word between the load and the skipped OR took the page
    /// already, in the same epoch.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || self.words.is_empty() {
            return;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = (gpa.saturating_add(len - 1) / LOG_PAGE_SIZE).min(self.capacity_pages() - 1);
        if first > last {
            return;
        }
        for word in first / 64..=last / 64 {
            let lo = if word == first / 64 { first % 64 } else { 0 };
            let hi = if word == last / 64 { last % 64 } else { 63 };
            let bits = (u64::MAX >> (63 - (hi - lo))) << lo;
            let w = &self.words[word as usize];
            if w.load(Ordering::Relaxed) & bits != bits {
                w.fetch_or(bits, Ordering::Relaxed);
            }
        }
    }

    /// Whether the page holding `gpa` is marked.
    pub fn is_marked(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE_SIZE;
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Takes every marked page, clearing the bitmap, and calls `f` with each page number in
    /// ascending order. Returns how many pages were taken. Words are taken with `swap`, so a
    /// page marked during the harvest is either taken now or kept for the next one, never lost.
    pub fn harvest(&self, mut f: impl FnMut(u64)) -> u64 {
        let mut taken = 0;
        for (i, word) in self.words.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            taken += each_page(i, word.swap(0, Ordering::AcqRel), &mut f);
        }
        taken
    }

    /// Calls `f` with each page marked now that `seen` does not hold yet, in ascending order,
    /// and adds it to `seen`; returns how many. Unlike [`DeviceDirtyBitmap::harvest`] it
    /// clears nothing, so the epoch's count stays whole for statistics. `seen` is the caller's
    /// shadow copy of the words (empty to start).
    pub fn report_new(&self, seen: &mut Vec<u64>, mut f: impl FnMut(u64)) -> u64 {
        seen.resize(self.words.len(), 0);
        let mut reported = 0;
        for (i, (word, old)) in self.words.iter().zip(seen.iter_mut()).enumerate() {
            let now = word.load(Ordering::Acquire);
            reported += each_page(i, now & !*old, &mut f);
            *old |= now;
        }
        reported
    }
}

/// Calls `f` with the page number of each bit set in `bits`, word `index` of a bitmap, in
/// ascending order; returns how many.
fn each_page(index: usize, mut bits: u64, f: &mut impl FnMut(u64)) -> u64 {
    let mut n = 0;
    while bits != 0 {
        f(index as u64 * 64 + u64::from(bits.trailing_zeros()));
        bits &= bits - 1;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marks_every_page_a_write_touches() {
        let b = DeviceDirtyBitmap::new(1 << 20);
        b.mark(0x0fff, 2); // pages 0 and 1
        b.mark(0x5000, 0x1000); // page 5 only
        assert_eq!(b.count(), 3);
        assert!(b.is_marked(0x1000) && b.is_marked(0x5fff) && !b.is_marked(0x6000));
    }

    #[test]
    fn marks_past_the_end_are_ignored() {
        let b = DeviceDirtyBitmap::new(64 * 4096);
        b.mark(63 * 4096, 8192);
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn harvest_takes_pages_in_order_and_clears() {
        let b = DeviceDirtyBitmap::new(1 << 30);
        for p in [3u64, 64, 65, 200_000] {
            b.mark(p * 4096, 1);
        }
        let mut seen = vec![];
        assert_eq!(b.harvest(|p| seen.push(p)), 4);
        assert_eq!(seen, vec![3, 64, 65, 200_000]);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn report_new_reports_each_page_once_and_clears_nothing() {
        let b = DeviceDirtyBitmap::new(1 << 24);
        let mut seen = Vec::new();
        b.mark(0x1000, 1);
        b.mark(0x41000, 0x2000);
        let mut got = vec![];
        assert_eq!(b.report_new(&mut seen, |p| got.push(p)), 3);
        assert_eq!(got, vec![1, 0x41, 0x42]);
        b.mark(0x1000, 1);
        b.mark(0x9000, 1);
        got.clear();
        assert_eq!(b.report_new(&mut seen, |p| got.push(p)), 1);
        assert_eq!(got, vec![9]);
        assert_eq!(b.count(), 4, "the epoch's count is untouched");
    }

    proptest! {
        #[test]
        fn mark_sets_exactly_the_pages_of_the_range(gpa in 0u64..(300 * 4096), len in 0u64..(200 * 4096)) {
            let b = DeviceDirtyBitmap::new(256 * 4096);
            b.mark(gpa, len);
            let mut got = vec![];
            b.harvest(|p| got.push(p));
            let want: Vec<u64> = if len == 0 {
                vec![]
            } else {
                (gpa / 4096..=(gpa + len - 1) / 4096).filter(|&p| p < 256).collect()
            };
            prop_assert_eq!(got, want);
        }

        #[test]
        fn harvest_returns_exactly_the_marked_pages(pages in proptest::collection::btree_set(0u64..100_000, 0..200)) {
            let b = DeviceDirtyBitmap::new(100_000 * 4096);
            for p in &pages {
                b.mark(p * 4096 + 17, 1);
            }
            let mut got = vec![];
            b.harvest(|p| got.push(p));
            prop_assert_eq!(got, pages.into_iter().collect::<Vec<_>>());
        }
    }
}
