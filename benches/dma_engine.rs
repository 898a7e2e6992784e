//! What a device write costs for being logged into QEMU's dirty log, and what harvesting the
//! companion's own device-dirty bitmap costs for a large guest.
//!
//! While a migration runs, every write the VF makes into guest RAM goes through
//! [`DmaEngine::write`]: range check against the memory table, the gate (mutex, in-flight count,
//! "is the log installed for this range"), the copy through the logged guest memory (which sets
//! the page's bit in QEMU's vhost-user dirty log with an atomic OR), and the companion's own
//! device-dirty bitmap. These benches put a number on that overhead against a plain `memcpy`,
//! so that one can say whether logging device writes is what limits the device's throughput.
//!
//! Groups:
//! - `logged_write/{64B,4KiB}`: `DmaEngine::write` on the real migration path: a log
//!   ([`OwnedLog`], laid out like QEMU's) installed on every region and `set_log_requested(true)`.
//! - `unlogged_memcpy/{64B,4KiB}`: the baseline: `copy_from_slice` of the same size into a plain
//!   `Vec<u8>` of the same size as guest RAM, at the same offsets.
//! - `fenced_memcpy/{64B,4KiB}`: the same copy, but into guest RAM mapped as the engine maps
//!   it, then one `SeqCst` `fetch_or` into a log laid out like QEMU's, at the page's bit: the floor of any write that is logged after it lands.
//!   On x86 every atomic read-modify-write is a full barrier, so the OR waits until the copy's
//!   stores have reached the cache; with writes spread over 64 MiB those are cache (and TLB)
//!   misses, which the plain copy leaves in the store buffer and overlaps with the next ones.
//!   The gap between `unlogged_memcpy` and `fenced_memcpy` is that wait, not the engine.
//! - `untracked_write/{64B,4KiB}`: `DmaEngine::write` with `set_tracking(false)` (the
//!   `unsafe-no-tracking` negative control): the engine's range check, gate and device-dirty
//!   bitmap, but a raw copy that skips QEMU's log. The gap to `logged_write` is the log itself;
//!   the gap to `unlogged_memcpy` is the rest of the engine.
//! - `harvest_device_dirty/64GiB/{empty,sparse,dense_1pct}`: [`DeviceDirtyBitmap::harvest`] over
//!   the bitmap of a 64 GiB guest (16 Mi pages, 2 MiB of words) with nothing marked (the cost of
//!   scanning every word), 1,000 pages marked spread across the guest, and 1% of the pages
//!   marked. The marking happens in `iter_batched`'s setup and is not timed.
//!
//! Writes go to page-aligned GPAs that cycle through all 16 Ki pages of a 64 MiB guest, so the
//! numbers are not those of one hot page (nor of one hot log byte). Guest RAM and the baseline
//! buffer are touched before measuring so that no page fault is timed.
//!
//! Run with `cargo bench --bench dma_engine`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use vhost_user_backend::bitmap::BitmapReplace;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};

use vfmig::memory::guest_ram::GuestRam;
use vfmig::memory::DmaEngine;
use vfmig::memory::{DeviceDirtyBitmap, LogWindow, OwnedLog, LOG_PAGE_SIZE};

/// Size of the benchmark guest's RAM (one region at GPA 0).
const GUEST_BYTES: u64 = 64 << 20;
/// Pages of the benchmark guest.
const GUEST_PAGES: u64 = GUEST_BYTES / LOG_PAGE_SIZE;
/// Write sizes: a small completion/descriptor-sized write and a full page.
const SIZES: [(&str, usize); 2] = [("64B", 64), ("4KiB", 4096)];

/// Guest RAM of `GUEST_BYTES`, every page touched, with QEMU's log (an owned one) installed.
fn logged_ram() -> (GuestRam, Arc<OwnedLog>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_BYTES as usize)])
        .expect("map benchmark guest RAM");
    let ram: GuestRam = GuestMemoryAtomic::new(mem);
    // Fault every page in before the log is installed: no page fault is timed, and the log
    // starts empty.
    let page = vec![0x5Au8; LOG_PAGE_SIZE as usize];
    for p in 0..GUEST_PAGES {
        ram.memory()
            .write_slice(&page, GuestAddress(p * LOG_PAGE_SIZE))
            .expect("touch guest RAM");
    }
    let log = Arc::new(OwnedLog::covering(GUEST_BYTES));
    for r in ram.memory().iter() {
        r.bitmap()
            .replace(LogWindow::over_owned(Arc::clone(&log), r).expect("log covers region"));
    }
    (ram, log)
}

/// An engine over a fresh logged guest, migrating (`log_requested`), with `tracking` as given.
fn engine(tracking: bool) -> (DmaEngine, Arc<OwnedLog>) {
    let (ram, log) = logged_ram();
    let e = DmaEngine::new(ram);
    e.adopt_memory();
    e.set_log_requested(true);
    e.set_tracking(tracking);
    (e, log)
}

/// Page-aligned GPAs cycling through every page of the guest.
fn gpas() -> impl FnMut() -> u64 {
    let mut page = 0u64;
    move || {
        let gpa = page * LOG_PAGE_SIZE;
        page = (page + 1) % GUEST_PAGES;
        gpa
    }
}

fn bench_engine_write(c: &mut Criterion, group_name: &str, tracking: bool) {
    let (e, log) = engine(tracking);
    // Check once that the bench measures the intended path.
    e.write(0x3000, &[1; 64]).expect("benchmark write refused");
    assert_eq!(log.is_set(0x3000), tracking, "QEMU log bit for a write");
    assert!(e.device_dirty_bitmap().is_marked(0x3000));
    assert_eq!(e.stats().untracked_writes, u64::from(!tracking));

    let mut group = c.benchmark_group(group_name);
    for (name, len) in SIZES {
        let data = vec![0xA5u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| {
            let mut next = gpas();
            b.iter(|| {
                e.write(next(), black_box(&data))
                    .expect("benchmark write refused")
            })
        });
    }
    group.finish();
}

fn logged_write(c: &mut Criterion) {
    bench_engine_write(c, "logged_write", true);
}

fn untracked_write(c: &mut Criterion) {
    bench_engine_write(c, "untracked_write", false);
}

fn unlogged_memcpy(c: &mut Criterion) {
    // Non-zero fill, so that every page is really allocated and faulted in.
    let mut dst = vec![0x5Au8; GUEST_BYTES as usize];
    let mut group = c.benchmark_group("unlogged_memcpy");
    for (name, len) in SIZES {
        let src = vec![0xA5u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| {
            let mut next = gpas();
            b.iter(|| {
                let off = next() as usize;
                dst[off..off + len].copy_from_slice(black_box(&src));
                black_box(&mut dst);
            })
        });
    }
    group.finish();
}

fn fenced_memcpy(c: &mut Criterion) {
    // Into guest RAM mapped as the engine maps it, so that only the engine differs.
    let (ram, _) = logged_ram();
    let mem = ram.memory();
    let base = mem
        .get_host_address(GuestAddress(0))
        .expect("guest RAM mapped");
    let log = OwnedLog::covering(GUEST_BYTES);
    let mut group = c.benchmark_group("fenced_memcpy");
    for (name, len) in SIZES {
        let src = vec![0xA5u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| {
            let mut next = gpas();
            b.iter(|| {
                let off = next();
                // SAFETY: `off + len` stays inside the one region of `GUEST_BYTES` at GPA 0,
                // mapped at `base` for as long as `mem` lives; `src` is a distinct buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        black_box(&src).as_ptr(),
                        base.add(off as usize),
                        len,
                    )
                };
                log.mark_page(off);
            })
        });
    }
    group.finish();
}

fn harvest_device_dirty(c: &mut Criterion) {
    const GUEST_64G: u64 = 64 << 30;
    let bitmap = DeviceDirtyBitmap::new(GUEST_64G);
    let pages = GUEST_64G / LOG_PAGE_SIZE;
    assert_eq!(bitmap.capacity_pages(), pages);

    // (id, pages to mark before each harvest)
    let sparse: Vec<u64> = (0..1000u64).map(|i| i * (pages / 1000)).collect();
    let dense: Vec<u64> = (0..pages).step_by(100).collect();
    let cases: [(&str, Vec<u64>); 3] = [
        ("empty", Vec::new()),
        ("sparse", sparse),
        ("dense_1pct", dense),
    ];

    let mut group = c.benchmark_group("harvest_device_dirty");
    for (name, marked) in &cases {
        // Check once that a harvest takes exactly the marked pages.
        for &p in marked {
            bitmap.mark(p * LOG_PAGE_SIZE, 1);
        }
        assert_eq!(bitmap.harvest(|_| {}), marked.len() as u64);
        assert_eq!(bitmap.count(), 0);

        group.bench_function(BenchmarkId::new("64GiB", name), |b| {
            b.iter_batched(
                || {
                    for &p in marked {
                        bitmap.mark(p * LOG_PAGE_SIZE, 1);
                    }
                },
                // The setup marks a bitmap shared by all iterations, so each harvest must
                // follow its own setup: one input per batch.
                |()| {
                    let mut sum = 0u64;
                    let taken = bitmap.harvest(|p| sum = sum.wrapping_add(p));
                    black_box((taken, sum))
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = logged_write, unlogged_memcpy, fenced_memcpy, untracked_write, harvest_device_dirty
}
criterion_main!(benches);
