//! The companion's hold on a VF's device side ([`VfDevice`]), for a VFIO VF (`--vfio BDF`).
//!
//! A VFIO VF writes guest RAM by DMA, behind both QEMU and the [`DmaEngine`]. So the companion:
//! - maps each new vhost-user memory table into the VF's IOMMU domain at IOVA = GPA;
//! - while a migration runs (QEMU asked for the log and the log is installed), feeds the VF's
//!   dirty pages into QEMU's log every [`SYNC_PERIOD`], through the engine's
//!   [`DmaEngine::mark_dirty`];
//! - at switchover, inside `GET_VRING_BASE` before the reply, quiesces the VF and syncs once
//!   more, so that QEMU's final log sync sees the VF's last writes;
//! - releases it on exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use crate::memory::guest_ram::GuestRamMmap;
use crate::memory::DmaEngine;
use crate::vf::{DeviceStatus, MapChange, MappedRegion, QuiesceReport, VfDevice};

/// How often the VF's dirty pages are fed into QEMU's log during precopy.
pub const SYNC_PERIOD: Duration = Duration::from_millis(100);

/// The device side and what the companion did with it, for `status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeviceSideStatus {
    /// The device.
    pub device: DeviceStatus,
    /// Syncs of its dirty pages into QEMU's log.
    pub syncs: u64,
    /// 4 KiB pages those syncs reported.
    pub pages_synced: u64,
    /// Bytes the device dirtied that could not be logged (no log installed there).
    pub unlogged_bytes: u64,
    /// The last quiesce.
    pub last_quiesce: Option<QuiesceReport>,
    /// The last change of its IOMMU mappings.
    pub last_map: Option<MapChange>,
    /// The last error, if any.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Record {
    last_quiesce: Option<QuiesceReport>,
    last_map: Option<MapChange>,
    last_error: Option<String>,
}

/// A VF's device side, shared by the vhost-user handlers, the sync thread and the control
/// socket.
pub struct DeviceSide {
    dev: Mutex<Box<dyn VfDevice>>,
    dma: Arc<DmaEngine>,
    record: Mutex<Record>,
    syncs: AtomicU64,
    pages_synced: AtomicU64,
    unlogged_bytes: AtomicU64,
    released: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceSide {
    /// Holds `dev`, whose writes are logged through `dma`'s guest memory.
    pub fn new(dev: Box<dyn VfDevice>, dma: Arc<DmaEngine>) -> Arc<Self> {
        Arc::new(Self {
            dev: Mutex::new(dev),
            dma,
            record: Mutex::new(Record::default()),
            syncs: AtomicU64::new(0),
            pages_synced: AtomicU64::new(0),
            unlogged_bytes: AtomicU64::new(0),
            released: AtomicBool::new(false),
        })
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) {
        let msg = format!("{what}: {e}");
        tracing::error!("VF device: {msg}");
        lock(&self.record).last_error = Some(msg);
    }

    /// Maps the memory table `mem` into the device at IOVA = GPA (unmapping what changed).
    pub fn on_memory_table(&self, mem: &Arc<GuestRamMmap>) {
        if self.released.load(Ordering::SeqCst) {
            return;
        }
        let regions = MappedRegion::from_guest_ram(mem);
        let result = lock(&self.dev).map_guest_ram(&regions);
        match result {
            Ok(change) => lock(&self.record).last_map = Some(change),
            Err(e) => self.error(
                &format!(
                    "mapping the new guest RAM table ({} regions) into the VF",
                    mem.num_regions()
                ),
                e,
            ),
        }
    }

    /// Whether a migration runs with QEMU's log installed over all guest RAM: then the
    /// device's dirty pages can, and must, go into it.
    fn migrating_with_log(&self) -> bool {
        let gate = self.dma.gate_state();
        if !gate.log_requested {
            return false;
        }
        let mem = self.dma.ram().memory();
        mem.num_regions() > 0
            && crate::memory::guest_ram::regions(&mem)
                .iter()
                .all(|r| r.logged)
    }

    /// Feeds the pages the device dirtied since the last sync into QEMU's log, if a migration
    /// runs with the log installed. Returns the pages reported, or `None` if no sync ran.
    pub fn sync_into_log(&self, why: &str) -> Option<u64> {
        if self.released.load(Ordering::SeqCst) || !self.migrating_with_log() {
            return None;
        }
        let mut unlogged = 0u64;
        let dma = &self.dma;
        let result = lock(&self.dev).sync_dirty(&mut |gpa, len| {
            unlogged += dma.mark_dirty(gpa, len);
        });
        match result {
            Ok(pages) => {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                self.pages_synced.fetch_add(pages, Ordering::Relaxed);
                if unlogged > 0 {
                    self.unlogged_bytes.fetch_add(unlogged, Ordering::Relaxed);
                    tracing::warn!(
                        why,
                        unlogged_bytes = unlogged,
                        "VF dirty pages outside QEMU's installed log: those writes may be lost"
                    );
                }
                tracing::debug!(why, pages, "VF dirty pages fed into QEMU's log");
                Some(pages)
            }
            Err(e) => {
                self.error(&format!("syncing the VF's dirty pages ({why})"), e);
                None
            }
        }
    }

    /// Quiesces the device, then syncs its last dirty pages into QEMU's log: call before the
    /// reply to `GET_VRING_BASE`.
    pub fn quiesce(&self, message: &str) {
        if self.released.load(Ordering::SeqCst) {
            return;
        }
        let result = lock(&self.dev).quiesce();
        match result {
            Ok(report) => {
                tracing::info!(
                    waited_us = report.waited_us,
                    "{message}: VFIO VF quiesced: {}",
                    report.detail
                );
                lock(&self.record).last_quiesce = Some(report);
            }
            Err(e) => self.error(&format!("quiescing the VF at {message}"), e),
        }
        if let Some(pages) = self.sync_into_log(message) {
            tracing::info!(
                pages,
                "{message}: VF's last dirty pages logged before the reply"
            );
        }
    }

    /// Lets the device DMA again (QEMU restarted the device after a quiesce).
    pub fn resume(&self) {
        if self.released.load(Ordering::SeqCst) {
            return;
        }
        let result = lock(&self.dev).resume();
        if let Err(e) = result {
            self.error("resuming the VF", e);
        }
    }

    /// Releases the device (idempotent). Later calls of the other methods do nothing.
    pub fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        let result = lock(&self.dev).release();
        if let Err(e) = result {
            self.error("releasing the VF", e);
        }
    }

    /// The device side's state.
    pub fn status(&self) -> DeviceSideStatus {
        let device = lock(&self.dev).status();
        let r = lock(&self.record);
        DeviceSideStatus {
            device,
            syncs: self.syncs.load(Ordering::Relaxed),
            pages_synced: self.pages_synced.load(Ordering::Relaxed),
            unlogged_bytes: self.unlogged_bytes.load(Ordering::Relaxed),
            last_quiesce: r.last_quiesce.clone(),
            last_map: r.last_map.clone(),
            last_error: r.last_error.clone(),
        }
    }

    /// Starts the thread that syncs the device's dirty pages into QEMU's log every `period`
    /// while a migration runs and the device is not quiesced. It ends on release.
    pub fn start_sync_thread(self: &Arc<Self>, period: Duration) -> std::io::Result<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("vfmig-vf-dirty-sync".into())
            .spawn(move || {
                while !me.released.load(Ordering::SeqCst) {
                    std::thread::sleep(period);
                    if !me.dma.gate_state().quiesced {
                        me.sync_into_log("precopy");
                    }
                }
            })
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{LogWindow, OwnedLog};
    use crate::vf::{DirtyTracking, ResetReport, VfDeviceError};
    use vhost_user_backend::bitmap::BitmapReplace;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    /// A device that dirties the pages it is told to, and records calls.
    #[derive(Default)]
    struct FakeDevice {
        calls: Arc<Mutex<Vec<String>>>,
        dirty: Arc<Mutex<Vec<(u64, u64)>>>,
    }

    impl VfDevice for FakeDevice {
        fn name(&self) -> String {
            "fake".into()
        }
        fn describe(&self) -> String {
            "fake VF".into()
        }
        fn map_guest_ram(&mut self, r: &[MappedRegion]) -> Result<MapChange, VfDeviceError> {
            lock(&self.calls).push(format!("map {}", r.len()));
            Ok(MapChange {
                mapped: r.iter().map(|r| (r.gpa, r.size)).collect(),
                ..Default::default()
            })
        }
        fn quiesce(&mut self) -> Result<QuiesceReport, VfDeviceError> {
            lock(&self.calls).push("quiesce".into());
            Ok(QuiesceReport::default())
        }
        fn resume(&mut self) -> Result<(), VfDeviceError> {
            lock(&self.calls).push("resume".into());
            Ok(())
        }
        fn reset(&mut self) -> Result<ResetReport, VfDeviceError> {
            Ok(ResetReport::default())
        }
        fn dirty_tracking(&self) -> DirtyTracking {
            DirtyTracking::DeviceDmaLogging
        }
        fn sync_dirty(&mut self, report: &mut dyn FnMut(u64, u64)) -> Result<u64, VfDeviceError> {
            lock(&self.calls).push("sync".into());
            let mut pages = 0;
            for (g, l) in lock(&self.dirty).drain(..) {
                report(g, l);
                pages += l / 4096;
            }
            Ok(pages)
        }
        fn release(&mut self) -> Result<(), VfDeviceError> {
            lock(&self.calls).push("release".into());
            Ok(())
        }
        fn status(&self) -> DeviceStatus {
            DeviceStatus {
                name: "fake".into(),
                ..Default::default()
            }
        }
    }

    fn setup() -> (
        Arc<DeviceSide>,
        Arc<DmaEngine>,
        FakeDevice,
        crate::memory::guest_ram::GuestRam,
    ) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ram = GuestMemoryAtomic::new(mem);
        let dma = Arc::new(DmaEngine::new(ram.clone()));
        dma.adopt_memory();
        let fake = FakeDevice::default();
        let handle = FakeDevice {
            calls: fake.calls.clone(),
            dirty: fake.dirty.clone(),
        };
        (
            DeviceSide::new(Box::new(fake), dma.clone()),
            dma,
            handle,
            ram,
        )
    }

    #[test]
    fn no_sync_without_a_migration_and_its_log() {
        let (side, dma, dev, ram) = setup();
        lock(&dev.dirty).push((0x1000, 0x1000));
        assert_eq!(side.sync_into_log("test"), None, "no migration");
        dma.set_log_requested(true);
        assert_eq!(side.sync_into_log("test"), None, "no log installed yet");
        assert_eq!(
            lock(&dev.dirty).len(),
            1,
            "the device's record is kept for later"
        );
        let log = Arc::new(OwnedLog::covering(1 << 20));
        for r in ram.memory().iter() {
            r.bitmap()
                .replace(LogWindow::over_owned(Arc::clone(&log), r).unwrap());
        }
        assert_eq!(side.sync_into_log("test"), Some(1));
        assert!(log.is_set(0x1000) && log.count_set() == 1);
        assert_eq!(side.status().pages_synced, 1);
    }

    #[test]
    fn quiesce_syncs_after_stopping_the_device_and_release_is_final() {
        let (side, dma, dev, ram) = setup();
        side.on_memory_table(&ram.memory().into_inner());
        dma.set_log_requested(true);
        let log = Arc::new(OwnedLog::covering(1 << 20));
        for r in ram.memory().iter() {
            r.bitmap()
                .replace(LogWindow::over_owned(Arc::clone(&log), r).unwrap());
        }
        lock(&dev.dirty).push((0x8000, 0x2000));
        side.quiesce("GET_VRING_BASE");
        assert_eq!(*lock(&dev.calls), vec!["map 1", "quiesce", "sync"]);
        assert_eq!(log.count_set(), 2);
        side.resume();
        side.release();
        side.release();
        side.quiesce("GET_VRING_BASE");
        assert_eq!(
            *lock(&dev.calls),
            vec!["map 1", "quiesce", "sync", "resume", "release"]
        );
        let st = side.status();
        assert!(st.last_quiesce.is_some());
        assert_eq!(st.last_map.unwrap().mapped, vec![(0, 1 << 20)]);
    }
}
