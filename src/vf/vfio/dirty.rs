//! Turning what a VFIO device can say about its writes into `(gpa, len)` ranges.
//!
//! - With device DMA logging, the kernel hands back one bit per page of each logged IOVA range:
//!   [`report_bitmap`] turns runs of set bits into ranges.
//! - Without it, [`report_all_writable`] reports every writable mapped page, every time.

use super::mapping::RegionKey;
use crate::memory::LOG_PAGE_SIZE;

/// Reports every writable region of `mapped` in full; returns the number of 4 KiB pages.
pub fn report_all_writable(mapped: &[RegionKey], report: &mut dyn FnMut(u64, u64)) -> u64 {
    let mut pages = 0;
    for r in mapped.iter().filter(|r| r.writable && r.size > 0) {
        report(r.gpa, r.size);
        pages += r.size.div_ceil(LOG_PAGE_SIZE);
    }
    pages
}

/// Reports the runs of set bits of a DMA-logging bitmap over `[iova, iova + length)`, page
/// `i` at `iova + i * page_size`, clipped to the range; returns the number of 4 KiB pages.
pub fn report_bitmap(
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &[u64],
    report: &mut dyn FnMut(u64, u64),
) -> u64 {
    if page_size == 0 || length == 0 {
        return 0;
    }
    let end = iova.saturating_add(length);
    let pages = length.div_ceil(page_size);
    let mut total = 0;
    let mut run: Option<u64> = None; // first page of the current run
    let mut flush = |first: u64, last_excl: u64, total: &mut u64| {
        let start = iova.saturating_add(first.saturating_mul(page_size));
        let stop = iova
            .saturating_add(last_excl.saturating_mul(page_size))
            .min(end);
        if stop > start {
            report(start, stop - start);
            let first_page = start / LOG_PAGE_SIZE;
            let last_page = (stop - 1) / LOG_PAGE_SIZE;
            *total += last_page - first_page + 1;
        }
    };
    for i in 0..pages {
        let set = bitmap
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0);
        match (set, run) {
            (true, None) => run = Some(i),
            (false, Some(first)) => {
                flush(first, i, &mut total);
                run = None;
            }
            _ => {}
        }
    }
    if let Some(first) = run {
        flush(first, pages, &mut total);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_writable_pages_reports_every_writable_page_and_no_other() {
        let regions = [
            RegionKey {
                gpa: 0x1_0000_0000,
                size: 16 << 20,
                host_addr: 0x7f00_0000_0000,
                writable: true,
            },
            RegionKey {
                gpa: 0,
                size: 0x10_0000,
                host_addr: 0x7f10_0000_0000,
                writable: false,
            },
        ];
        let mut seen = vec![];
        let pages = report_all_writable(&regions, &mut |g, l| seen.push((g, l)));
        assert_eq!(pages, 4096);
        assert_eq!(seen, vec![(0x1_0000_0000, 16 << 20)]);
        // Again at the next sync: the same, every time.
        assert_eq!(report_all_writable(&regions, &mut |_, _| {}), 4096);
    }

    #[test]
    fn bitmap_runs_become_ranges() {
        // Pages 0, 1, 2, 5, 63, 64 and the last of 130 pages.
        let mut bm = vec![0u64; 3];
        for p in [0u64, 1, 2, 5, 63, 64, 129] {
            bm[(p / 64) as usize] |= 1 << (p % 64);
        }
        let mut seen = vec![];
        let pages = report_bitmap(0x10_0000, 130 * 4096, 4096, &bm, &mut |g, l| {
            seen.push((g, l))
        });
        assert_eq!(pages, 7);
        assert_eq!(
            seen,
            vec![
                (0x10_0000, 3 * 4096),
                (0x10_0000 + 5 * 4096, 4096),
                (0x10_0000 + 63 * 4096, 2 * 4096),
                (0x10_0000 + 129 * 4096, 4096),
            ]
        );
    }

    #[test]
    fn larger_device_pages_are_clipped_to_the_range_and_counted_in_4k_pages() {
        // 2 MiB device pages over a 3 MiB range: the second page is clipped at the end.
        let bm = vec![0b11u64];
        let mut seen = vec![];
        let pages = report_bitmap(0, 3 << 20, 2 << 20, &bm, &mut |g, l| seen.push((g, l)));
        assert_eq!(seen, vec![(0, 3 << 20)]);
        assert_eq!(pages, 768);
        assert_eq!(report_bitmap(0, 4096, 0, &bm, &mut |_, _| {}), 0);
        assert_eq!(report_bitmap(0, 8192, 4096, &[], &mut |_, _| {}), 0);
    }
}
