//! The companion's one handle on its VF, whichever the backend ([`VfBackend`]): the soft VF
//! (`--fabric-listen`) or a VF bound to vfio-pci (`--vfio BDF`). Everything the companion does
//! with the VF goes through it:
//! - the guest link gets its verbs ([`Device::verbs`]);
//! - each new vhost-user memory table is mapped into the device at IOVA = GPA (a no-op for the
//!   soft VF, whose DMA engine reads the table itself);
//! - while a migration runs (QEMU asked for the log and the log is installed), a device that
//!   writes guest RAM behind the [`DmaEngine`] has its dirty pages fed into QEMU's log every
//!   [`SYNC_PERIOD`], through the engine's [`DmaEngine::mark_dirty`];
//! - at switchover, inside `GET_VRING_BASE` before the reply, [`Device::quiesce`] is the one
//!   quiesce path: it stops the VF's DMA (the soft VF: the engine's gate closes and writes in
//!   flight land; a VFIO VF: bus master off, then its last dirty pages are logged), then closes
//!   the engine's gate for the companion's own writes;
//! - the VF's state moves to the destination ([`Device::export`], [`Device::import`]); the
//!   export is a copy, so the source can take its state back ([`Device::reclaim`]) until the
//!   destination runs, and only then drops it ([`Device::drop_state`]);
//! - when QEMU is gone (its connection ended and its process with it) while the VF is live
//!   here, the VF retires and its peers are told ([`Device::on_qemu_gone`]);
//! - it is released on exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use super::control::{
    self, HexError, VfExportReply, VfImportReply, VfReclaimReply, VfReleaseReply,
};
use super::guest_link::GuestLink;
use crate::memory::guest_ram::GuestRamMmap;
use crate::memory::DmaEngine;
use crate::trace::steps;
use crate::vf::soft::{SoftVf, SoftVfStats, StateError, VfState};
use crate::vf::{
    BackendKind, DeviceStatus, DirtyTracking, MapChange, MappedRegion, QuiesceReport, Vf,
    VfBackend, VfDevice, VfPersist,
};

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

/// Why the VF's state could not move.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The companion has no VF.
    #[error("this companion has no soft VF (--fabric-listen)")]
    NoVf,
    /// The VF refused to export or import its state.
    #[error(transparent)]
    State(#[from] StateError),
    /// The VF's state was dropped here (`vf_release`): it lives in another companion now.
    #[error(
        "this companion dropped the VF's state (vf_release): the VM's VF lives in another \
         companion now; it cannot be exported or taken back here"
    )]
    Released,
    /// An import brought more waiting frames than a guest link holds.
    #[error(
        "the imported VF state has {got} waiting frames, at most {max} are accepted; nothing \
         of it was applied"
    )]
    TooManyFrames {
        /// How many it has.
        got: usize,
        /// The bound.
        max: usize,
    },
    /// A waiting frame of an import is not hex.
    #[error(
        "waiting frame #{index} of the imported VF state is not hex; pass the frames as \
         vf_export gave them"
    )]
    FrameHex {
        /// Which frame.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: HexError,
    },
}

/// Most frames waiting for the guest an import accepts.
pub const MAX_WAITING_FRAMES: usize = 65_536;

/// Where the VF's state stands in a switchover, at this companion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// The state is here and this companion owns it.
    Here,
    /// A copy went to a destination; this one is kept until the destination runs.
    Exported,
    /// Dropped: the VF lives in another companion.
    Released,
}

#[derive(Default)]
struct Record {
    last_quiesce: Option<QuiesceReport>,
    last_map: Option<MapChange>,
    last_error: Option<String>,
}

/// The companion's VF, shared by the vhost-user handlers, the sync thread, the guest link and
/// the control socket. Without a VF it still holds the engine's gate.
pub struct Device {
    dma: Arc<DmaEngine>,
    kind: Option<BackendKind>,
    dev: Option<Mutex<Box<dyn VfDevice>>>,
    verbs: Option<Arc<dyn Vf>>,
    persist: Option<Arc<dyn VfPersist>>,
    fabric: Option<SoftVf>,
    record: Mutex<Record>,
    syncs: AtomicU64,
    pages_synced: AtomicU64,
    unlogged_bytes: AtomicU64,
    released: AtomicBool,
    handover: Mutex<Handover>,
    /// Set by an import, cleared by the next memory table: see [`Device::on_qemu_gone`].
    awaiting_start: AtomicBool,
}

/// When a VM whose VF state is imported runs here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStart {
    /// It runs already: the handoff imports at the VM's first memory table here.
    Runs,
    /// It starts later (`vf_import` before `cont`): its first memory table says so.
    Later,
}

impl Device {
    /// Holds `backend` (none: the companion has no VF), whose writes are logged through
    /// `dma`'s guest memory.
    pub fn new(backend: Option<VfBackend>, dma: Arc<DmaEngine>) -> Arc<Self> {
        let (kind, dev, verbs, persist, fabric) = match backend {
            Some(b) => (
                Some(b.kind),
                Some(Mutex::new(b.device)),
                Some(b.verbs),
                Some(b.persist),
                b.fabric,
            ),
            None => (None, None, None, None, None),
        };
        Arc::new(Self {
            dma,
            kind,
            dev,
            verbs,
            persist,
            fabric,
            record: Mutex::new(Record::default()),
            syncs: AtomicU64::new(0),
            pages_synced: AtomicU64::new(0),
            unlogged_bytes: AtomicU64::new(0),
            released: AtomicBool::new(false),
            handover: Mutex::new(Handover::Here),
            awaiting_start: AtomicBool::new(false),
        })
    }

    /// The VF's verbs, for the guest link; `None` without a VF.
    pub fn verbs(&self) -> Option<Arc<dyn Vf>> {
        self.verbs.clone()
    }

    /// The soft VF, if that is the backend.
    pub fn fabric(&self) -> Option<&SoftVf> {
        self.fabric.as_ref()
    }

    /// Whether this companion owns the VM's VF state now: a soft VF whose state is here (not
    /// exported, not released) and that was not released.
    pub fn owns_vf_state(&self) -> bool {
        self.persist.is_some()
            && !self.released.load(Ordering::SeqCst)
            && *self.handover.lock() == Handover::Here
    }

    /// Whether a migration runs (QEMU asked for its dirty log).
    pub fn migrating(&self) -> bool {
        self.dma.gate_state().log_requested
    }

    /// The device side, unless there is none or it was released.
    fn device(&self) -> Option<&Mutex<Box<dyn VfDevice>>> {
        if self.released.load(Ordering::SeqCst) {
            return None;
        }
        self.dev.as_ref()
    }

    /// Whether the device writes guest RAM behind the engine, so that its dirty pages must be
    /// fed into QEMU's log (the soft VF's engine logs its writes itself).
    fn writes_behind_the_engine(&self) -> bool {
        self.dev
            .as_ref()
            .is_some_and(|d| d.lock().dirty_tracking() != DirtyTracking::DmaEngine)
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) {
        let msg = format!("{what}: {e}");
        tracing::error!("VF device: {msg}");
        self.record.lock().last_error = Some(msg);
    }

    /// The requests that moved with the state can be read from guest RAM: the VM runs here.
    fn replay_now(&self) {
        if let Some(vf) = &self.fabric {
            vf.replay_now();
        }
    }

    /// Maps the memory table `mem` into the device at IOVA = GPA (unmapping what changed).
    pub fn on_memory_table(&self, mem: &Arc<GuestRamMmap>) {
        if self.awaiting_start.swap(false, Ordering::SeqCst) {
            tracing::info!("the VM runs here: the imported VF is live");
            steps::instant("vm-runs-here", "first memory table after the import");
            self.replay_now();
        }
        let Some(dev) = self.device() else { return };
        let regions = MappedRegion::from_guest_ram(mem);
        let result = dev.lock().map_guest_ram(&regions);
        match result {
            Ok(change) => self.record.lock().last_map = Some(change),
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
        let dev = self.device()?;
        if !self.migrating_with_log() {
            return None;
        }
        let mut unlogged = 0u64;
        let dma = &self.dma;
        let result = dev.lock().sync_dirty(&mut |gpa, len| {
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

    /// The switchover quiesce, the one path for every backend; call it before the reply to
    /// `GET_VRING_BASE`. When it returns, the VF's DMA has stopped, every write that landed is
    /// marked in QEMU's log, and the engine's gate is closed. Idempotent: returns how long it
    /// took, or `None` if the engine was quiesced already.
    pub fn quiesce(&self, message: &str) -> Option<Duration> {
        if self.dma.gate_state().quiesced {
            return None;
        }
        let started = Instant::now();
        steps::rearm();
        // A writer waiting for the device throttle goes on (or is refused) at once: it may
        // hold what the VF's quiesce waits for (the soft VF's responder, its socket).
        self.dma.throttle().lift();
        // The VF's own DMA first: stop it, then log what it wrote, before the reply.
        if let Some(dev) = self.device() {
            let result = dev.lock().quiesce();
            match result {
                Ok(report) => {
                    tracing::info!(
                        waited_us = report.waited_us,
                        "{message}: VF quiesced: {}",
                        report.detail
                    );
                    self.record.lock().last_quiesce = Some(report);
                }
                Err(e) => self.error(&format!("quiescing the VF at {message}"), e),
            }
            if self.writes_behind_the_engine() {
                if let Some(pages) = self.sync_into_log(message) {
                    tracing::info!(
                        pages,
                        "{message}: VF's last dirty pages logged before the reply"
                    );
                }
            }
        }
        // Then the companion's own writes through the engine (rings, the traffic generator).
        self.dma.quiesce();
        steps::span("quiesce", started, message);
        Some(started.elapsed())
    }

    /// Lets the VF and the engine work again (QEMU restarted the device after a quiesce: the
    /// migration failed or was cancelled).
    pub fn resume(&self) {
        self.dma.resume();
        let Some(dev) = self.device() else { return };
        let result = dev.lock().resume();
        if let Err(e) = result {
            self.error("resuming the VF", e);
        }
    }

    /// Copies the VF's state for the destination, with the frames that wait for the guest
    /// (the guest link's pump is stopped meanwhile). The VF must be quiesced. This companion
    /// keeps its state, frozen (quiesced), until [`Device::drop_state`] (the destination runs)
    /// or [`Device::reclaim`] (it does not).
    pub fn export(&self, guest: &GuestLink) -> Result<VfExportReply, DeviceError> {
        let persist = self.persist.as_ref().ok_or(DeviceError::NoVf)?;
        let mut handover = self.handover.lock();
        if *handover == Handover::Released {
            return Err(DeviceError::Released);
        }
        let started = Instant::now();
        // A TX drain that began before the quiesce finishes first: its posts are in the copy.
        let _tx = guest.hold_tx();
        let vf = persist.export_state()?;
        let frames = guest.take_waiting();
        let rx_frames: Vec<String> = frames.iter().map(|f| control::to_hex(f)).collect();
        // Quiesced: they stay queued, not delivered, and go to the guest here only if the
        // source takes its state back.
        guest.restore_waiting(frames);
        *handover = Handover::Exported;
        tracing::info!("VF state exported; this copy is kept until the destination runs");
        steps::span(
            "vf-export",
            started,
            format!(
                "{} QPs, {} requests held, {} frames waiting; links to peers closed",
                vf.qps.len(),
                vf.qps.iter().map(|q| q.unacked.len()).sum::<usize>(),
                rx_frames.len()
            ),
        );
        Ok(VfExportReply { vf, rx_frames })
    }

    /// Takes over a migrated VM's VF state and the frames that waited for its guest, then
    /// tells the VF's peers where the VM now lives. The state is validated before any of it
    /// is applied. `start` says whether the VM runs here already (the handoff imports at its
    /// first memory table) or starts later (`vf_import` before `cont`).
    pub fn import(
        &self,
        guest: &GuestLink,
        state: VfState,
        rx_frames: &[String],
        start: VmStart,
    ) -> Result<VfImportReply, DeviceError> {
        let persist = self.persist.as_ref().ok_or(DeviceError::NoVf)?;
        if rx_frames.len() > MAX_WAITING_FRAMES {
            let e = DeviceError::TooManyFrames {
                got: rx_frames.len(),
                max: MAX_WAITING_FRAMES,
            };
            tracing::warn!(error = %e, "VF state refused at import");
            return Err(e);
        }
        let frames = rx_frames
            .iter()
            .enumerate()
            .map(|(index, h)| {
                control::from_hex(h).map_err(|source| DeviceError::FrameHex { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let started = Instant::now();
        steps::rearm();
        let qps = state.qps.len();
        persist.import_state(state)?;
        guest.restore_waiting(frames);
        // TX frames the guest queued before it stopped were kicked at the source: nobody
        // kicks for them here, so the vring worker takes them once the rings run.
        guest.owe_tx_drain();
        *self.handover.lock() = Handover::Here;
        if start == VmStart::Later {
            self.awaiting_start.store(true, Ordering::SeqCst);
        }
        steps::span("vf-import", started, format!("{qps} QPs"));
        let started = Instant::now();
        let announced_to = persist.announce();
        steps::span("announce", started, announced_to.join(","));
        if start == VmStart::Runs {
            self.replay_now();
        }
        Ok(VfImportReply { announced_to })
    }

    /// `vf_release`: drops this companion's VF state, for good: at the source once the
    /// destination runs, at a destination whose takeover was rolled back. The device stays
    /// quiesced and the frames waiting for the guest are dropped with it.
    pub fn drop_state(&self, guest: &GuestLink) -> Result<VfReleaseReply, DeviceError> {
        let Some(persist) = self.persist.as_ref() else {
            return Ok(VfReleaseReply { had_state: false });
        };
        let mut handover = self.handover.lock();
        let was = *handover;
        if was != Handover::Released {
            self.quiesce("vf_release");
            persist.discard_state();
            drop(guest.take_waiting());
            *handover = Handover::Released;
        }
        tracing::info!(
            ?was,
            "VF state released: the VM's VF lives in another companion"
        );
        steps::instant("vf-release", format!("{was:?}"));
        Ok(VfReleaseReply {
            had_state: was != Handover::Released,
        })
    }

    /// `vf_reclaim`: the source takes back the state it exported (the destination's takeover
    /// or start failed): its peers are told the VM lives here again. The device resumes when
    /// QEMU starts it again (`cont`).
    pub fn reclaim(&self) -> Result<VfReclaimReply, DeviceError> {
        // Without a VF there is nothing to take back: the VM may resume.
        let Some(persist) = self.persist.as_ref() else {
            return Ok(VfReclaimReply {
                announced_to: Vec::new(),
            });
        };
        let mut handover = self.handover.lock();
        if *handover == Handover::Released {
            return Err(DeviceError::Released);
        }
        let exported = *handover == Handover::Exported;
        *handover = Handover::Here;
        drop(handover);
        let announced_to = persist.announce();
        steps::instant("vf-reclaim", announced_to.join(","));
        tracing::warn!(
            exported,
            ?announced_to,
            "VF state taken back: the VM stays here"
        );
        Ok(VfReclaimReply { announced_to })
    }

    /// QEMU is gone (its connection ended and its process with it): if the soft VF is live
    /// here, the VM stopped with it, so the VF retires and every peer with a QP connected to
    /// the VM is told; those QPs fail with `RemoteLost` instead of waiting forever. Returns the
    /// peers told, or `None` if the VF did not retire.
    ///
    /// Live means that this companion runs the VM's VF state now. It is not live:
    /// - without a soft VF, or with one that has no state (no QP, no region);
    /// - after `vf_export` (the state moved: the source QEMU quits after a migration) or
    ///   `vf_release` (it lives in another companion), or once the device was released;
    /// - after `vf_import`, until the device starts here. QEMU sends its first memory table
    ///   (`SET_MEM_TABLE`) when it starts the vhost device, which it does only once the VM runs;
    ///   a destination stays paused (`-S`) until `cont`, so until then the orchestrator may
    ///   still roll back to the source (`orchestrator::takeover::roll_back`), which takes the
    ///   state back with the same epoch: peers must not have failed their QPs meanwhile. The
    ///   flag is set by the import and cleared by the first memory table after it.
    pub fn on_qemu_gone(&self) -> Option<Vec<String>> {
        let vf = self.fabric.as_ref()?;
        // Held while the VF retires: no export or import runs meanwhile.
        let handover = self.handover.lock();
        let not_live = if self.released.load(Ordering::SeqCst) {
            Some("the VF was released")
        } else {
            match *handover {
                Handover::Exported => Some("its state was exported to a destination"),
                Handover::Released => Some("its state was released to another companion"),
                Handover::Here if self.awaiting_start.load(Ordering::SeqCst) => Some(
                    "its state was imported but the VM never ran here (a roll-back may still \
                     give it to the source)",
                ),
                Handover::Here => None,
            }
        };
        if let Some(why) = not_live {
            tracing::info!("QEMU is gone; the VF does not retire: {why}");
            return None;
        }
        let told = vf.retire();
        if told.is_none() {
            tracing::info!("QEMU is gone; the VF has no state: nothing to retire");
        }
        told
    }

    /// Releases the device (idempotent). Later calls of the other methods leave it alone.
    pub fn release(&self) {
        let Some(dev) = self.dev.as_ref() else { return };
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        let result = dev.lock().release();
        if let Err(e) = result {
            self.error("releasing the VF", e);
        }
    }

    /// The device side's state, for `status`: a VFIO VF's only (`None` for the soft VF, whose
    /// counters are [`Device::fabric_stats`], and without a VF).
    pub fn vfio_status(&self) -> Option<DeviceSideStatus> {
        if self.kind != Some(BackendKind::Vfio) {
            return None;
        }
        self.dev.as_ref().map(|dev| self.status_of(dev))
    }

    fn status_of(&self, dev: &Mutex<Box<dyn VfDevice>>) -> DeviceSideStatus {
        let device = dev.lock().status();
        let r = self.record.lock();
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

    /// The soft VF's fabric counters; `None` for other backends and without a VF.
    pub fn fabric_stats(&self) -> Option<SoftVfStats> {
        self.fabric.as_ref().map(SoftVf::stats)
    }

    /// Starts the thread that syncs the device's dirty pages into QEMU's log every `period`
    /// while a migration runs and the device is not quiesced, if the device writes guest RAM
    /// behind the engine. It ends on release.
    pub fn start_sync_thread(self: &Arc<Self>, period: Duration) -> std::io::Result<()> {
        if !self.writes_behind_the_engine() {
            return Ok(());
        }
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
pub(crate) mod tests {
    use super::*;
    use crate::memory::{LogWindow, OwnedLog};
    use crate::vf::{DirtyTracking, ResetReport, VfDeviceError};
    use vhost_user_backend::bitmap::BitmapReplace;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    fn lock<T>(m: &Mutex<T>) -> parking_lot::MutexGuard<'_, T> {
        m.lock()
    }

    /// A handle on a VFIO-like device side alone (no verbs, no state).
    fn device_handle(dev: Box<dyn VfDevice>, dma: Arc<DmaEngine>) -> Arc<Device> {
        Arc::new(Device {
            dma,
            kind: Some(BackendKind::Vfio),
            dev: Some(Mutex::new(dev)),
            verbs: None,
            persist: None,
            fabric: None,
            record: Mutex::new(Record::default()),
            syncs: AtomicU64::new(0),
            pages_synced: AtomicU64::new(0),
            unlogged_bytes: AtomicU64::new(0),
            released: AtomicBool::new(false),
            handover: Mutex::new(Handover::Here),
            awaiting_start: AtomicBool::new(false),
        })
    }

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
        Arc<Device>,
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
        (device_handle(Box::new(fake), dma.clone()), dma, handle, ram)
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
        assert_eq!(side.vfio_status().unwrap().pages_synced, 1);
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
        let st = side.vfio_status().unwrap();
        assert!(st.last_quiesce.is_some());
        assert_eq!(st.last_map.unwrap().mapped, vec![(0, 1 << 20)]);
    }

    /// A soft VF of `vm` behind the companion's handle, with its engine and guest link.
    pub(crate) fn soft_handle(vm: &str) -> (Arc<Device>, Arc<DmaEngine>, Arc<GuestLink>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dma = Arc::new(DmaEngine::new(GuestMemoryAtomic::new(mem)));
        dma.adopt_memory();
        let vf = SoftVf::start(
            vm,
            dma.clone(),
            "127.0.0.1:0",
            Default::default(),
            Default::default(),
            crate::vf::soft::test_auth(vm),
        )
        .unwrap();
        let device = Device::new(Some(vf.backend()), dma.clone());
        let guest = GuestLink::new(device.verbs(), dma.clone()).unwrap();
        (device, dma, guest)
    }

    #[test]
    fn the_soft_vf_quiesces_and_moves_through_the_one_handle() {
        let (src, src_dma, src_guest) = soft_handle("m");
        assert!(src.vfio_status().is_none(), "status shows a VFIO VF only");
        assert!(src.fabric_stats().is_some());
        let verbs = src.verbs().unwrap();
        let qp = verbs.create_qp().unwrap();
        assert!(matches!(
            src.export(&src_guest),
            Err(DeviceError::State(StateError::NotQuiesced(_)))
        ));
        let waited = src.quiesce("GET_VRING_BASE");
        assert!(waited.is_some());
        assert!(src_dma.gate_state().quiesced, "the engine's gate is closed");
        assert_eq!(
            src_dma.write(0, &[1]).unwrap_err(),
            crate::memory::DmaError::Quiesced
        );
        assert_eq!(src.quiesce("GET_VRING_BASE"), None, "once per switchover");
        let exported = src.export(&src_guest).unwrap();
        assert_eq!(exported.vf.qps.len(), 1);

        let (dst, _, dst_guest) = soft_handle("m");
        let json = serde_json::to_value(&exported).unwrap();
        assert!(json["vf"].is_object() && json["rx_frames"].is_array());
        let bad = [String::from("zz")];
        assert!(matches!(
            dst.import(&dst_guest, exported.vf.clone(), &bad, VmStart::Later),
            Err(DeviceError::FrameHex { index: 0, .. })
        ));
        let imported = dst
            .import(&dst_guest, exported.vf, &[], VmStart::Later)
            .unwrap();
        assert!(imported.announced_to.is_empty(), "no peers in the cluster");
        assert!(dst.verbs().unwrap().connect_qp(qp, "nobody", 1).is_err());
        src.resume();
        assert!(!src_dma.gate_state().quiesced);
        src.release();
        dst.release();
    }

    #[test]
    fn an_export_waits_for_a_tx_drain_that_began_before_the_quiesce() {
        let (src, _, src_guest) = soft_handle("m");
        // The vring worker is taking the guest's TX frames (their posts reach the VF).
        let turn = src_guest.tx_turn().expect("not quiesced yet");
        src.quiesce("GET_VRING_BASE");
        std::thread::scope(|s| {
            let export = s.spawn(|| src.export(&src_guest).map(|e| e.vf.qps.len()));
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !export.is_finished(),
                "the state was copied while a post could still reach the VF"
            );
            // The drain's post lands, then the turn ends: the copy has it.
            src.verbs().unwrap().create_qp().unwrap();
            drop(turn);
            assert_eq!(export.join().unwrap().unwrap(), 1);
        });
        // Quiesced, the worker gets no turn: the frames wait for the destination.
        assert!(src_guest.tx_turn().is_none());
        src.release();
    }

    #[test]
    fn the_export_is_a_copy_the_source_takes_back_until_it_releases_it() {
        let (src, _, src_guest) = soft_handle("m");
        let verbs = src.verbs().unwrap();
        let qp = verbs.create_qp().unwrap();
        src_guest.queue(0, vfmig_proto::Message::Event(vfmig_proto::Event::Resume));
        src.quiesce("GET_VRING_BASE");
        let exported = src.export(&src_guest).unwrap();
        assert_eq!(exported.rx_frames.len(), 1);
        // The source keeps all of it: a second export (a retried takeover) sees the same.
        let again = src.export(&src_guest).unwrap();
        assert_eq!(again.vf, exported.vf);
        assert_eq!(again.rx_frames, exported.rx_frames);
        assert_eq!(
            src_guest.stats().frames_waiting,
            1,
            "the frame waits here still"
        );
        // The destination failed: the source takes its state back and works on with it.
        src.reclaim().unwrap();
        src.resume();
        verbs
            .post_recv(
                qp,
                crate::vf::verbs::RecvWr {
                    wr_id: 1,
                    sge: crate::vf::verbs::Sge {
                        addr: 0,
                        len: 8,
                        lkey: 1,
                    },
                },
            )
            .unwrap();
        // A committed migration: the source drops its state; nothing takes it back.
        src.quiesce("GET_VRING_BASE");
        src.export(&src_guest).unwrap();
        assert!(src.drop_state(&src_guest).unwrap().had_state);
        assert!(!src.drop_state(&src_guest).unwrap().had_state, "idempotent");
        assert!(matches!(src.reclaim(), Err(DeviceError::Released)));
        assert!(matches!(src.export(&src_guest), Err(DeviceError::Released)));
        assert_eq!(src_guest.stats().frames_waiting, 0);
        assert!(matches!(
            verbs.post_recv(
                qp,
                crate::vf::verbs::RecvWr {
                    wr_id: 2,
                    sge: crate::vf::verbs::Sge {
                        addr: 0,
                        len: 8,
                        lkey: 1
                    },
                }
            ),
            Err(crate::vf::verbs::VerbsError::NoSuchQp(_))
        ));
        src.release();
    }

    #[test]
    fn an_import_with_too_many_waiting_frames_is_refused_before_any_of_it_is_applied() {
        let (dst, _, dst_guest) = soft_handle("m");
        let (src, _, src_guest) = soft_handle("m");
        src.quiesce("GET_VRING_BASE");
        let exported = src.export(&src_guest).unwrap();
        let frames = vec![String::from("00"); MAX_WAITING_FRAMES + 1];
        assert!(matches!(
            dst.import(&dst_guest, exported.vf, &frames, VmStart::Later),
            Err(DeviceError::TooManyFrames { .. })
        ));
        assert_eq!(dst_guest.stats().frames_waiting, 0);
        src.release();
        dst.release();
    }

    fn retired(d: &Device) -> bool {
        d.fabric.as_ref().is_some_and(SoftVf::is_retired)
    }

    #[test]
    fn qemu_gone_retires_the_vf_only_where_it_is_live() {
        // No VF, and a VF without state: nothing to retire.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let none = Device::new(None, Arc::new(DmaEngine::new(GuestMemoryAtomic::new(mem))));
        assert_eq!(none.on_qemu_gone(), None);
        let (fresh, _, _) = soft_handle("m");
        assert_eq!(fresh.on_qemu_gone(), None);
        assert!(!retired(&fresh), "a VF without state retired");

        // The source after vf_export: its state moved; its QEMU quitting fails nothing.
        let (src, _, src_guest) = soft_handle("m");
        src.verbs().unwrap().create_qp().unwrap();
        src.quiesce("GET_VRING_BASE");
        let exported = src.export(&src_guest).unwrap();
        assert_eq!(src.on_qemu_gone(), None);
        assert!(!retired(&src), "retired after vf_export");
        // ... and after vf_release.
        src.drop_state(&src_guest).unwrap();
        assert_eq!(src.on_qemu_gone(), None);
        assert!(!retired(&src), "retired after vf_release");

        // A destination that imported, its VM not started yet (a roll-back may follow).
        let (dst, dst_dma, dst_guest) = soft_handle("m");
        dst.import(&dst_guest, exported.vf, &[], VmStart::Later)
            .unwrap();
        assert_eq!(dst.on_qemu_gone(), None);
        assert!(!retired(&dst), "retired before the VM ran here");
        // QEMU starts the device (its first memory table): the VF is live here now.
        dst.on_memory_table(&dst_dma.ram().memory().into_inner());
        assert_eq!(dst.on_qemu_gone(), Some(vec![]), "no peer to tell");
        assert!(retired(&dst), "a live VF did not retire");

        // A VF that was never moved, with state: live.
        let (live, _, _) = soft_handle("m");
        live.verbs().unwrap().create_qp().unwrap();
        assert!(live.on_qemu_gone().is_some());
        assert!(retired(&live));
        // ... and one taken back by the source after a failed takeover: live again.
        let (back, _, back_guest) = soft_handle("m");
        back.verbs().unwrap().create_qp().unwrap();
        back.quiesce("GET_VRING_BASE");
        back.export(&back_guest).unwrap();
        back.reclaim().unwrap();
        assert!(back.on_qemu_gone().is_some());
        assert!(retired(&back));
        for d in [none, fresh, src, dst, live, back] {
            d.release();
        }
    }

    #[test]
    fn without_a_vf_the_handle_still_closes_the_engine_gate() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dma = Arc::new(DmaEngine::new(GuestMemoryAtomic::new(mem)));
        let device = Device::new(None, dma.clone());
        assert!(device.verbs().is_none());
        assert!(device.quiesce("GET_VRING_BASE").is_some());
        assert!(dma.gate_state().quiesced);
        let guest = GuestLink::new(None, dma.clone()).unwrap();
        assert!(matches!(device.export(&guest), Err(DeviceError::NoVf)));
        device.release();
    }
}
