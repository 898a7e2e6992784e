//! The DMA engine: device writes into guest RAM, logged and gated.
//!
//! The gate has three inputs:
//! - `log_requested`: QEMU acked `VHOST_F_LOG_ALL`, i.e. a migration is running;
//! - the log itself: whether every region a write touches has QEMU's log installed;
//! - `quiesced`: the device was stopped at switchover (`GET_VRING_BASE`).
//!
//! A write passes only when not quiesced and, if a migration runs, when the log covers it.
//! Otherwise it is refused with a reason and nothing is written; the caller (the VF) retries.
//! [`DmaEngine::quiesce`] closes the gate and waits for writes in progress to finish, so that
//! when it returns every write that will ever land before the switchover has landed and been
//! logged. That is what lets QEMU's final log sync, which follows the reply to
//! `GET_VRING_BASE`, catch the last device writes.
//!
//! The gate takes no lock on a write's path (see [`super::gate`] for the protocol), and a write
//! inside one region is one translation, one copy and one `fetch_or` per log byte
//! ([`guest_ram::write_logged`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
};

use crate::memory::gate::Gate;
use crate::memory::guest_ram::{self, GuestRam, GuestRamMmap, LoggedWriteError};
use crate::memory::{DeviceDirtyBitmap, Throttle};

/// Why a device write or read was refused. Nothing was written in any case.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DmaError {
    /// The range is not entirely inside guest RAM.
    #[error(
        "GPA range {gpa:#x}+{len:#x} is outside guest RAM ({regions}); refused, nothing was written"
    )]
    OutOfRange {
        /// First guest-physical address of the request.
        gpa: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The guest RAM regions, for the message.
        regions: String,
    },
    /// QEMU has not sent a memory table: the guest driver has not started the device yet.
    #[error("no guest RAM mapped yet: the guest's virtio-net driver has not started the device")]
    NoMemory,
    /// The device is stopped for switchover; writes resume when QEMU restarts it.
    #[error("device quiesced at switchover; writes resume if the source VM runs again")]
    Quiesced,
    /// A migration runs and QEMU's dirty log does not cover the range yet.
    #[error(
        "write to GPA {gpa:#x} held: a migration is running and QEMU's dirty log is not mapped \
         for that range yet (waiting for SET_LOG_BASE); writing now would lose the page"
    )]
    HeldNoLog {
        /// The address that has no log.
        gpa: u64,
    },
    /// Guest memory refused the access (should not happen after the range check).
    #[error("guest memory access at {gpa:#x} failed: {reason}")]
    Memory {
        /// Address of the access.
        gpa: u64,
        /// vm-memory's account of it.
        reason: String,
    },
}

/// Counters of the DMA engine.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DmaStats {
    /// Device writes that landed in guest RAM.
    pub writes: u64,
    /// Bytes of those writes.
    pub bytes: u64,
    /// Writes refused because the range was outside guest RAM.
    pub refused_out_of_range: u64,
    /// Writes held because a migration ran without a log.
    pub held_no_log: u64,
    /// Writes refused because the device was quiesced.
    pub refused_quiesced: u64,
    /// Writes made with dirty tracking switched off (`unsafe-no-tracking`).
    pub untracked_writes: u64,
}

/// State of the gate, as reported by `status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GateState {
    /// QEMU asked for dirty logging (a migration is running).
    pub log_requested: bool,
    /// The device is quiesced.
    pub quiesced: bool,
    /// Writes in progress.
    pub in_flight: u32,
    /// Migration epoch: increments each time QEMU turns logging on.
    pub epoch: u64,
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    bytes: AtomicU64,
    refused_out_of_range: AtomicU64,
    held_no_log: AtomicU64,
    refused_quiesced: AtomicU64,
    untracked_writes: AtomicU64,
}

/// The device's one path into guest RAM.
pub struct DmaEngine {
    ram: GuestRam,
    gate: Gate,
    /// QEMU asked for dirty logging (a migration is running).
    log_requested: AtomicBool,
    /// Migration epoch; changed with `log_requested` under `adopted`'s lock.
    epoch: AtomicU64,
    /// Pages written in the current epoch; replaced at each new epoch or memory table.
    device_dirty: RwLock<Arc<DeviceDirtyBitmap>>,
    /// False only under `unsafe-no-tracking`: writes bypass QEMU's log.
    tracking: AtomicBool,
    warned_no_log: AtomicBool,
    counters: Counters,
    /// The memory table last adopted, to carry QEMU's log over to new regions.
    adopted: Mutex<Option<Arc<GuestRamMmap>>>,
    /// Device auto-converge: the rate limit every write takes from (off unless a migration
    /// does not converge).
    throttle: Throttle,
}

impl DmaEngine {
    /// An engine writing through `ram`, the same `GuestMemoryAtomic` the vhost-user daemon
    /// updates (any other copy would write without the log).
    pub fn new(ram: GuestRam) -> Self {
        let end = guest_ram::end_gpa(&ram.memory());
        Self {
            ram,
            gate: Gate::default(),
            log_requested: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            device_dirty: RwLock::new(Arc::new(DeviceDirtyBitmap::new(end))),
            tracking: AtomicBool::new(true),
            warned_no_log: AtomicBool::new(false),
            counters: Counters::default(),
            adopted: Mutex::new(None),
            throttle: Throttle::new(),
        }
    }

    /// Writes `data` at `gpa` as the device. On success the bytes are in guest RAM and, while a
    /// migration runs, every page they touch is marked in QEMU's dirty log.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        let len = data.len() as u64;
        // Before the gate: a throttled writer is not in flight, so it never delays a quiesce.
        self.throttle.take(gpa, len);
        let mem = self.ram.memory();
        if mem.num_regions() == 0 {
            return Err(DmaError::NoMemory);
        }
        let Some(target) = guest_ram::locate(&mem, gpa, len) else {
            self.counters
                .refused_out_of_range
                .fetch_add(1, Ordering::Relaxed);
            return Err(DmaError::OutOfRange {
                gpa,
                len,
                regions: guest_ram::describe(&mem),
            });
        };
        let tracking = self.tracking.load(Ordering::SeqCst);
        // Held until the write has landed and been logged: a quiesce waits for it.
        let Some(_pass) = self.gate.enter() else {
            self.counters
                .refused_quiesced
                .fetch_add(1, Ordering::Relaxed);
            return Err(DmaError::Quiesced);
        };
        let result = if tracking {
            let need_log = self.log_requested.load(Ordering::SeqCst);
            guest_ram::write_logged(&mem, target, gpa, data, need_log).map_err(|e| match e {
                LoggedWriteError::NoLog { gpa: bad } => {
                    self.counters.held_no_log.fetch_add(1, Ordering::Relaxed);
                    if !self.warned_no_log.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            gpa = format_args!("{bad:#x}"),
                            "holding device writes: a migration is running and QEMU's dirty log \
                             is not mapped yet; they resume once SET_LOG_BASE arrives"
                        );
                    }
                    DmaError::HeldNoLog { gpa: bad }
                }
                LoggedWriteError::Memory { gpa, reason } => DmaError::Memory { gpa, reason },
            })
        } else {
            write_untracked(&mem, gpa, data)
        };
        if result.is_ok() {
            self.device_dirty
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .mark(gpa, len);
            self.counters.writes.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(len, Ordering::Relaxed);
            if !tracking {
                self.counters
                    .untracked_writes
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Marks `[gpa, gpa + len)` dirty as a device write the engine did not make itself: a
    /// VFIO VF's DMA, reported by its `sync_dirty`. Pages go into QEMU's log where it is
    /// installed (unless tracking is off, the `unsafe-no-tracking` control) and into the
    /// epoch's device-dirty bitmap. Parts outside guest RAM are ignored. Returns how many
    /// bytes inside guest RAM could not be logged because QEMU's log is not installed there.
    pub fn mark_dirty(&self, gpa: u64, len: u64) -> u64 {
        use vm_memory::bitmap::Bitmap;
        if len == 0 {
            return 0;
        }
        let mem = self.ram.memory();
        let tracking = self.tracking();
        let end = gpa.saturating_add(len);
        let mut unlogged = 0u64;
        for region in mem.iter() {
            let start = region.start_addr().raw_value();
            let stop = start.saturating_add(region.len());
            let (from, to) = (gpa.max(start), end.min(stop));
            if from >= to {
                continue;
            }
            self.device_dirty_bitmap().mark(from, to - from);
            if !tracking {
                continue;
            }
            if region.bitmap().is_logging() {
                region
                    .bitmap()
                    .mark_dirty((from - start) as usize, (to - from) as usize);
            } else {
                unlogged += to - from;
            }
        }
        unlogged
    }

    /// Whether the device may write its rings now (receive frames): not quiesced, and, while
    /// a migration runs with tracking on, QEMU's log covers all of guest RAM.
    pub fn ring_writes_allowed(&self) -> bool {
        if self.gate.quiesced() {
            return false;
        }
        if !self.log_requested.load(Ordering::SeqCst) || !self.tracking() {
            return true;
        }
        self.ram.memory().iter().all(|r| r.bitmap().is_logging())
    }

    /// Reads `len` bytes of guest RAM at `gpa` (for verification; reads dirty nothing).
    pub fn read(&self, gpa: u64, len: u64) -> Result<Vec<u8>, DmaError> {
        self.readable(gpa, len)?;
        let mut buf = vec![0u8; len as usize];
        self.read_into(gpa, &mut buf)?;
        Ok(buf)
    }

    /// Reads `buf.len()` bytes of guest RAM at `gpa` into `buf`, as [`Self::read`] does, into
    /// a buffer the caller reuses.
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mem = self.readable(gpa, buf.len() as u64)?;
        mem.read_slice(buf, GuestAddress(gpa))
            .map_err(|e| DmaError::Memory {
                gpa,
                reason: e.to_string(),
            })
    }

    /// Guest RAM, if `len` bytes at `gpa` lie in it.
    fn readable(&self, gpa: u64, len: u64) -> Result<<GuestRam as GuestAddressSpace>::T, DmaError> {
        let mem = self.ram.memory();
        if mem.num_regions() == 0 {
            return Err(DmaError::NoMemory);
        }
        if !guest_ram::contains(&mem, gpa, len) {
            return Err(DmaError::OutOfRange {
                gpa,
                len,
                regions: guest_ram::describe(&mem),
            });
        }
        Ok(mem)
    }

    /// Closes the gate and waits until no write is in progress. When this returns, every
    /// device write that landed is already marked in QEMU's log.
    pub fn quiesce(&self) -> Duration {
        let started = Instant::now();
        // A writer waiting for the device throttle is woken first: it is refused at the gate
        // (or, woken just before it closed, lands and is waited for) instead of holding the
        // switchover back.
        self.throttle.lift();
        let was = self.gate.quiesce();
        let waited = started.elapsed();
        if !was {
            tracing::info!(
                waited_us = waited.as_micros() as u64,
                "device quiesced: no write in progress, all landed writes are logged"
            );
        }
        waited
    }

    /// Opens the gate again (the device was restarted, e.g. after a failed migration).
    pub fn resume(&self) {
        if self.gate.resume() {
            tracing::info!("device resumed: writes accepted again");
        }
    }

    /// QEMU turned dirty logging on or off (`VHOST_F_LOG_ALL` in `SET_FEATURES`). Turning it
    /// on starts a new migration epoch with an empty device-dirty bitmap.
    pub fn set_log_requested(&self, on: bool) {
        // Serialises epoch changes with each other and with `adopt_memory`.
        let _adopted = self.adopted.lock().unwrap_or_else(|e| e.into_inner());
        let was = self.log_requested.load(Ordering::SeqCst);
        if on && !was {
            let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            let end = guest_ram::end_gpa(&self.ram.memory());
            *self.device_dirty.write().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(DeviceDirtyBitmap::new(end));
            self.warned_no_log.store(false, Ordering::Relaxed);
            tracing::info!(epoch, "dirty logging on: migration epoch begins");
        } else if !on && was {
            let epoch = self.epoch.load(Ordering::SeqCst);
            tracing::info!(epoch, "dirty logging off");
        }
        self.log_requested.store(on, Ordering::SeqCst);
    }

    /// Switches dirty tracking of device writes on or off. Off exists only for the
    /// `unsafe-no-tracking` negative control: device writes then bypass QEMU's log and are lost.
    pub fn set_tracking(&self, on: bool) {
        let was = self.tracking.swap(on, Ordering::SeqCst);
        if was && !on {
            tracing::warn!(
                "dirty tracking of device writes is OFF (unsafe-no-tracking): writes made \
                 during a migration will be lost at the destination"
            );
        }
    }

    /// Whether device writes are tracked.
    pub fn tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// Adopts a new memory table: resizes the device-dirty bitmap, and gives new regions that
    /// have no log the log of the previous table, when QEMU sent `SET_LOG_BASE` before
    /// `SET_MEM_TABLE` (it does so when the table grows during a migration).
    pub fn adopt_memory(&self) {
        let mem = self.ram.memory().into_inner();
        let mut adopted = self.adopted.lock().unwrap_or_else(|e| e.into_inner());
        let carried = adopted
            .as_ref()
            .and_then(|old| old.iter().find_map(|r| r.bitmap().window()));
        if let Some(window) = carried {
            for region in mem.iter().filter(|r| !r.bitmap().is_logging()) {
                match window.for_region(region) {
                    Ok(w) => {
                        use vhost_user_backend::bitmap::BitmapReplace;
                        region.bitmap().replace(w);
                    }
                    Err(e) => tracing::warn!(
                        gpa = format_args!("{:#x}", region.start_addr().raw_value()),
                        error = %e,
                        "new guest RAM region is outside the current dirty log; \
                         writes there are held until QEMU sends a log that covers it"
                    ),
                }
            }
        }
        let end = guest_ram::end_gpa(&mem);
        {
            let mut dd = self.device_dirty.write().unwrap_or_else(|e| e.into_inner());
            if dd.capacity_pages() * crate::memory::LOG_PAGE_SIZE < end {
                let grown = DeviceDirtyBitmap::new(end);
                dd.harvest(|p| grown.mark(p * crate::memory::LOG_PAGE_SIZE, 1));
                *dd = Arc::new(grown);
            }
        }
        tracing::info!(regions = %guest_ram::describe(&mem), "guest RAM mapped");
        *adopted = Some(mem);
    }

    /// The current epoch's device-dirty bitmap.
    pub fn device_dirty_bitmap(&self) -> Arc<DeviceDirtyBitmap> {
        Arc::clone(&self.device_dirty.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Counters so far.
    pub fn stats(&self) -> DmaStats {
        let c = &self.counters;
        DmaStats {
            writes: c.writes.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            refused_out_of_range: c.refused_out_of_range.load(Ordering::Relaxed),
            held_no_log: c.held_no_log.load(Ordering::Relaxed),
            refused_quiesced: c.refused_quiesced.load(Ordering::Relaxed),
            untracked_writes: c.untracked_writes.load(Ordering::Relaxed),
        }
    }

    /// The gate's state.
    pub fn gate_state(&self) -> GateState {
        GateState {
            log_requested: self.log_requested.load(Ordering::SeqCst),
            quiesced: self.gate.quiesced(),
            in_flight: self.gate.in_flight(),
            epoch: self.epoch.load(Ordering::SeqCst),
        }
    }

    /// The rate limit of device writes (device auto-converge).
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// The guest memory this engine writes through.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

/// Writes without marking QEMU's log: the `unsafe-no-tracking` path.
fn write_untracked(mem: &GuestRamMmap, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
    let mut done = 0usize;
    while done < data.len() {
        let at = GuestAddress(gpa + done as u64);
        let region = mem.find_region(at).ok_or(DmaError::Memory {
            gpa: at.raw_value(),
            reason: "no region".into(),
        })?;
        let offset = at.raw_value() - region.start_addr().raw_value();
        let room = (region.len() - offset) as usize;
        let n = room.min(data.len() - done);
        let host = mem.get_host_address(at).map_err(|e| DmaError::Memory {
            gpa: at.raw_value(),
            reason: e.to_string(),
        })?;
        // SAFETY: `host` points into the mapping of `region`, which `mem` keeps alive for this
        // call; `n` bytes from `offset` stay inside the region (`n <= room`), and the source is
        // a distinct Rust slice, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), host, n) };
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{LogWindow, OwnedLog};
    use vhost_user_backend::bitmap::BitmapReplace;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;

    fn engine() -> (DmaEngine, GuestRam) {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 * MIB as usize),
            (GuestAddress(4 * MIB), 2 * MIB as usize),
        ])
        .unwrap();
        let ram = GuestMemoryAtomic::new(mem);
        let e = DmaEngine::new(ram.clone());
        e.adopt_memory();
        (e, ram)
    }

    fn install_log(ram: &GuestRam) -> Arc<OwnedLog> {
        let log = Arc::new(OwnedLog::covering(8 * MIB));
        for r in ram.memory().iter() {
            r.bitmap()
                .replace(LogWindow::over_owned(Arc::clone(&log), r).unwrap());
        }
        log
    }

    #[test]
    fn out_of_range_writes_are_refused_and_write_nothing() {
        let (e, _ram) = engine();
        // In the hole between the regions, past the end, and straddling a region's end.
        for (gpa, len) in [
            (3 * MIB, 8),
            (6 * MIB, 1),
            (2 * MIB - 4, 8),
            (u64::MAX - 2, 8),
        ] {
            let err = e.write(gpa, &vec![0xAB; len]).unwrap_err();
            assert!(matches!(err, DmaError::OutOfRange { .. }), "{err}");
            assert!(err.to_string().contains("outside guest RAM"));
        }
        assert_eq!(e.read(2 * MIB - 4, 4).unwrap(), vec![0; 4]);
        assert_eq!(e.stats().writes, 0);
        assert_eq!(e.stats().refused_out_of_range, 4);
        assert_eq!(e.device_dirty_bitmap().count(), 0);
    }

    #[test]
    fn writes_land_and_are_logged_while_migrating() {
        let (e, ram) = engine();
        let log = install_log(&ram);
        e.set_log_requested(true);
        e.write(4 * MIB + 0x1ffe, &[1, 2, 3, 4]).unwrap();
        assert_eq!(e.read(4 * MIB + 0x1ffe, 4).unwrap(), vec![1, 2, 3, 4]);
        assert!(log.is_set(4 * MIB + 0x1000) && log.is_set(4 * MIB + 0x2000));
        assert_eq!(log.count_set(), 2);
        assert_eq!(e.device_dirty_bitmap().count(), 2);
    }

    #[test]
    fn without_a_log_writes_are_held_during_a_migration() {
        let (e, ram) = engine();
        e.set_log_requested(true);
        let err = e.write(0x1000, &[9]).unwrap_err();
        assert_eq!(err, DmaError::HeldNoLog { gpa: 0x1000 });
        assert_eq!(e.read(0x1000, 1).unwrap(), vec![0], "nothing written");
        install_log(&ram);
        e.write(0x1000, &[9]).unwrap();
    }

    #[test]
    fn untracked_writes_land_but_mark_no_log() {
        let (e, ram) = engine();
        let log = install_log(&ram);
        e.set_log_requested(true);
        e.set_tracking(false);
        e.write(0x3000, &[5; 100]).unwrap();
        assert_eq!(e.read(0x3000, 100).unwrap(), vec![5; 100]);
        assert_eq!(log.count_set(), 0, "the negative control must not log");
        assert_eq!(e.stats().untracked_writes, 1);
    }

    #[test]
    fn quiesce_refuses_new_writes_until_resumed() {
        let (e, _ram) = engine();
        e.quiesce();
        assert_eq!(e.write(0, &[1]).unwrap_err(), DmaError::Quiesced);
        e.resume();
        e.write(0, &[1]).unwrap();
    }

    #[test]
    fn quiesce_waits_for_a_write_in_progress() {
        let (e, ram) = engine();
        install_log(&ram);
        let e = Arc::new(e);
        // Simulate a write in progress by holding a pass of the gate.
        let pass = e.gate.enter().unwrap();
        let e2 = Arc::clone(&e);
        let t = std::thread::spawn(move || e2.quiesce());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "quiesce returned with a write in flight");
        drop(pass);
        let waited = t.join().unwrap();
        assert!(waited >= Duration::from_millis(40));
    }

    #[test]
    fn a_new_epoch_starts_with_an_empty_device_bitmap() {
        let (e, _ram) = engine();
        e.write(0x1000, &[1]).unwrap();
        assert_eq!(e.device_dirty_bitmap().count(), 1);
        e.set_log_requested(true);
        assert_eq!(e.gate_state().epoch, 1);
        assert_eq!(e.device_dirty_bitmap().count(), 0);
    }

    #[test]
    fn mark_dirty_logs_pages_written_behind_the_engine() {
        let (e, ram) = engine();
        // Before the log: counted as unlogged, kept in the device bitmap.
        assert_eq!(e.mark_dirty(0x1000, 0x2000), 0x2000);
        let log = install_log(&ram);
        e.set_log_requested(true);
        // Straddles the end of the first region and the hole; the hole is ignored.
        assert_eq!(e.mark_dirty(2 * MIB - 0x1000, 3 * MIB + 0x1000), 0);
        assert!(log.is_set(2 * MIB - 0x1000));
        assert!(log.is_set(4 * MIB) && log.is_set(5 * MIB - 1));
        assert!(!log.is_set(3 * MIB) && !log.is_set(5 * MIB));
        assert_eq!(log.count_set(), 1 + 256);
        assert_eq!(e.device_dirty_bitmap().count(), 1 + 256);
        e.set_tracking(false);
        assert_eq!(e.mark_dirty(0x10_0000, 0x1000), 0);
        assert!(!log.is_set(0x10_0000), "the negative control logs nothing");
    }

    #[test]
    fn no_memory_table_means_no_writes() {
        let e = DmaEngine::new(crate::memory::guest_ram::empty());
        assert_eq!(e.write(0, &[1]).unwrap_err(), DmaError::NoMemory);
    }
}
