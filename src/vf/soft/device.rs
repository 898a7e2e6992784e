//! The soft VF at the seam of [`crate::vf`]: its verbs ([`Vf`]), its device side
//! ([`VfDevice`]: the DMA engine is its device) and what moves at switchover ([`VfPersist`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestAddressSpace;

use super::state::Qp;
use super::{SoftVf, StateError, VfState};
use crate::vf::verbs::{Access, Completion, GpaRange, MemoryRegion, RecvWr, SendWr, VerbsError};
use crate::vf::{
    BackendKind, DeviceStatus, DirtyTracking, MapChange, MappedRegion, QuiesceReport, ResetReport,
    Vf, VfBackend, VfDevice, VfDeviceError, VfPersist,
};

/// The pages of one epoch's device-dirty bitmap already reported by `sync_dirty`.
#[derive(Default)]
pub(super) struct DirtySeen {
    bitmap: Option<Arc<crate::memory::DeviceDirtyBitmap>>,
    words: Vec<u64>,
}

/// The verbs. A soft VF serves every verb, so QPs and completions are given without a
/// `Result` here; [`Vf`] wraps them.
impl SoftVf {
    /// Registers guest memory: `segments` (guest-physical) appear at `addr` onwards.
    pub fn register_mr(
        &self,
        addr: u64,
        segments: Vec<GpaRange>,
        access: Access,
    ) -> Result<u32, VerbsError> {
        let mem = self.inner.dma.ram().memory();
        for s in &segments {
            if !crate::memory::guest_ram::contains(&mem, s.gpa, s.len) {
                return Err(VerbsError::SegmentOutsideRam {
                    gpa: s.gpa,
                    len: s.len,
                });
            }
        }
        let mut st = self.inner.state.lock();
        let key = st.next_key;
        st.advance_key(self.inner.random_ids.load(Ordering::Relaxed));
        st.mrs.insert(
            key,
            MemoryRegion {
                key,
                addr,
                segments,
                access,
            },
        );
        Ok(key)
    }

    /// Drops a region.
    pub fn deregister_mr(&self, key: u32) -> Result<(), VerbsError> {
        // A peer's request in progress has its pages in hand: it lands first, so nothing is
        // written there once the guest has the reply (and may free them).
        let _applying = self.inner.applying.lock();
        self.inner
            .state
            .lock()
            .mrs
            .remove(&key)
            .map(drop)
            .ok_or(VerbsError::NoSuchMr(key))
    }

    /// A new reliable-connected QP, not yet connected.
    pub fn create_qp(&self) -> u32 {
        let random = self.inner.random_ids.load(Ordering::Relaxed);
        let mut st = self.inner.state.lock();
        // Numbers asked for with `create_qp_at` may lie ahead of the counter: skip them.
        while st.next_qp == 0 || st.qps.contains_key(&st.next_qp) {
            st.advance_qp(random);
        }
        let n = st.next_qp;
        st.advance_qp(random);
        st.qps.insert(n, Qp::new());
        n
    }

    /// Whether the guest may add a QP: no more than a VF state carries through a migration
    /// (a state with more would be refused at the destination).
    fn qp_room(&self) -> Result<(), VerbsError> {
        let n = self.inner.state.lock().qps.len();
        if n >= super::persist::limits::MAX_QPS {
            return Err(VerbsError::TooManyQps(n));
        }
        Ok(())
    }

    /// A new QP numbered `qp`, so that a peer can compute its number; refused if 0 or in
    /// use.
    pub fn create_qp_at(&self, qp: u32) -> Result<u32, VerbsError> {
        let mut st = self.inner.state.lock();
        if qp == 0 || st.qps.contains_key(&qp) {
            return Err(VerbsError::QpInUse(qp));
        }
        st.qps.insert(qp, Qp::new());
        Ok(qp)
    }

    /// Destroys a QP: its posted sends and receives are dropped without completions (acks
    /// that come for them later find no QP), and a peer's requests to it are answered
    /// "receiver not ready", as for a QP not created yet. Its number may be created again.
    pub fn destroy_qp(&self, qp: u32) -> Result<(), VerbsError> {
        // As for a region: a request in progress for this QP lands before the reply.
        let _applying = self.inner.applying.lock();
        {
            let mut st = self.inner.state.lock();
            let q = st.qps.remove(&qp).ok_or(VerbsError::NoSuchQp(qp))?;
            for p in q.unacked {
                st.spare.give_frame(p.frame);
            }
        }
        self.inner.rx.lock().forget(qp);
        Ok(())
    }

    /// Connects a QP to a peer VM's QP; the peer must be in the cluster map.
    pub fn connect_qp(&self, qp: u32, peer_vm: &str, peer_qp: u32) -> Result<(), VerbsError> {
        if !self.inner.book.lock().contains_key(peer_vm) {
            return Err(VerbsError::UnknownPeer(peer_vm.into()));
        }
        let mut st = self.inner.state.lock();
        let q = st.qps.get_mut(&qp).ok_or(VerbsError::NoSuchQp(qp))?;
        q.peer = Some((peer_vm.into(), peer_qp));
        Ok(())
    }

    /// Posts a receive work request. On a QP in error it completes at once: `RemoteLost` when
    /// the peer's VF state is gone, `Flushed` otherwise.
    pub fn post_recv(&self, qp: u32, wr: RecvWr) -> Result<(), VerbsError> {
        let mut st = self.inner.state.lock();
        let q = st.qps.get_mut(&qp).ok_or(VerbsError::NoSuchQp(qp))?;
        // A QP in error takes no receive: it comes back at once, as the HCA flushes it.
        let status = match (q.lost, q.error) {
            (true, _) => Some(crate::vf::verbs::Status::RemoteLost),
            (false, true) => Some(crate::vf::verbs::Status::Flushed),
            _ => None,
        };
        if let Some(status) = status {
            let c = super::state::recv_completion(qp, &wr, status);
            super::state::complete(&mut st, &self.inner, c);
            return Ok(());
        }
        q.recvs.push_back(wr);
        Ok(())
    }

    /// Takes up to `max` completions.
    pub fn poll_cq(&self, max: usize) -> Vec<Completion> {
        let mut st = self.inner.state.lock();
        let n = st.cq.len().min(max);
        st.cq.drain(..n).collect()
    }

    /// Waits up to `timeout` for at least one completion, then returns up to `max`.
    pub fn wait_cq(&self, max: usize, timeout: Duration) -> Vec<Completion> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        while st.cq.is_empty() {
            // Quiesced, the VF completes nothing more here: its completions move with its
            // state, and a waiter (the guest link's pump) must not hold up the export.
            if Instant::now() >= deadline || self.inner.dma.gate_state().quiesced {
                return vec![];
            }
            self.inner.cq_ready.wait_until(&mut st, deadline);
        }
        let n = st.cq.len().min(max);
        st.cq.drain(..n).collect()
    }

    /// The soft VF as a backend of the seam: its verbs, its device side and its state are
    /// all this VF.
    pub fn backend(&self) -> VfBackend {
        VfBackend {
            kind: BackendKind::Soft,
            verbs: Arc::new(self.clone()),
            device: Box::new(self.clone()),
            persist: Arc::new(self.clone()),
            fabric: Some(self.clone()),
        }
    }
}

impl Vf for SoftVf {
    fn register_mr(
        &self,
        addr: u64,
        segments: Vec<GpaRange>,
        access: Access,
    ) -> Result<u32, VerbsError> {
        SoftVf::register_mr(self, addr, segments, access)
    }

    fn deregister_mr(&self, key: u32) -> Result<(), VerbsError> {
        SoftVf::deregister_mr(self, key)
    }

    fn create_qp(&self) -> Result<u32, VerbsError> {
        self.qp_room()?;
        Ok(SoftVf::create_qp(self))
    }

    fn create_qp_at(&self, qp: u32) -> Result<u32, VerbsError> {
        self.qp_room()?;
        SoftVf::create_qp_at(self, qp)
    }

    fn destroy_qp(&self, qp: u32) -> Result<(), VerbsError> {
        SoftVf::destroy_qp(self, qp)
    }

    fn arrival(&self, qp: u32, wr_id: u64) -> Option<std::time::Instant> {
        SoftVf::arrival(self, qp, wr_id)
    }

    fn connect_qp(&self, qp: u32, peer_vm: &str, peer_qp: u32) -> Result<(), VerbsError> {
        SoftVf::connect_qp(self, qp, peer_vm, peer_qp)
    }

    fn post_send(&self, qp: u32, wr: SendWr) -> Result<(), VerbsError> {
        SoftVf::post_send(self, qp, wr)
    }

    fn post_recv(&self, qp: u32, wr: RecvWr) -> Result<(), VerbsError> {
        SoftVf::post_recv(self, qp, wr)
    }

    fn poll_cq(&self, max: usize) -> Result<Vec<Completion>, VerbsError> {
        Ok(SoftVf::poll_cq(self, max))
    }

    fn wait_cq(&self, max: usize, timeout: Duration) -> Result<Vec<Completion>, VerbsError> {
        Ok(SoftVf::wait_cq(self, max, timeout))
    }
}

impl VfPersist for SoftVf {
    fn device_name(&self) -> String {
        format!("the soft VF of VM {}", self.inner.vm)
    }

    fn export_state(&self) -> Result<VfState, StateError> {
        SoftVf::export_state(self)
    }

    fn import_state(&self, state: VfState) -> Result<(), StateError> {
        SoftVf::import_state(self, state)
    }

    fn announce(&self) -> Vec<String> {
        SoftVf::announce(self)
    }

    fn discard_state(&self) {
        SoftVf::discard_state(self)
    }
}

/// The soft VF's device side. Its "device" is the [`crate::memory::DmaEngine`], which already
/// writes through the guest memory table and logs every write into QEMU's log as it makes it:
/// mapping needs nothing, quiesce (close the gate, wait for writes in flight) and resume are
/// the engine's, and `sync_dirty` reports the pages the engine wrote for the first time in
/// this epoch since the last sync (from its device-dirty bitmap, which it leaves whole for
/// statistics). A page written again after it was reported is not reported again: the engine
/// has already logged that write into QEMU's log itself.
impl VfDevice for SoftVf {
    fn name(&self) -> String {
        self.inner.vm.clone()
    }

    fn describe(&self) -> String {
        format!(
            "soft VF of VM {} (fabric {}), dirty tracking {}",
            self.inner.vm,
            self.inner.listen,
            DirtyTracking::DmaEngine
        )
    }

    fn map_guest_ram(&mut self, regions: &[MappedRegion]) -> Result<MapChange, VfDeviceError> {
        // The DMA engine reads the memory table itself; nothing to map.
        Ok(MapChange {
            kept: regions.iter().map(|r| (r.gpa, r.size)).collect(),
            ..Default::default()
        })
    }

    fn quiesce(&mut self) -> Result<QuiesceReport, VfDeviceError> {
        let was = !self.inner.dma.gate_state().quiesced;
        let started = Instant::now();
        self.inner.dma.quiesce();
        // A peer's request whose DMA landed before the gate closed is finished (PSN, receive
        // completion) before the state can be exported: wait for every apply in progress, not
        // only for the write in flight.
        drop(self.inner.applying.lock());
        // Wake whoever waits for completions: there will be none here until a resume.
        self.inner.cq_ready.notify_all();
        Ok(QuiesceReport {
            waited_us: started.elapsed().as_micros() as u64,
            was_bus_master: was,
            detail: "DMA engine gate closed; no write and no request in progress".into(),
        })
    }

    fn resume(&mut self) -> Result<(), VfDeviceError> {
        self.inner.dma.resume();
        Ok(())
    }

    fn reset(&mut self) -> Result<ResetReport, VfDeviceError> {
        Ok(ResetReport {
            performed: false,
            flr_advertised: None,
            detail: "the soft VF has no device to reset; nothing done".into(),
        })
    }

    fn dirty_tracking(&self) -> DirtyTracking {
        DirtyTracking::DmaEngine
    }

    fn sync_dirty(&mut self, report: &mut dyn FnMut(u64, u64)) -> Result<u64, VfDeviceError> {
        let bitmap = self.inner.dma.device_dirty_bitmap();
        let mut seen = self.inner.dirty_seen.lock();
        if !seen
            .bitmap
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, &bitmap))
        {
            // A new epoch (or a grown table): its bitmap starts from what it holds now.
            seen.bitmap = Some(Arc::clone(&bitmap));
            seen.words.clear();
        }
        let page = crate::memory::LOG_PAGE_SIZE;
        Ok(bitmap.report_new(&mut seen.words, |p| report(p * page, page)))
    }

    fn release(&mut self) -> Result<(), VfDeviceError> {
        self.close();
        Ok(())
    }

    fn status(&self) -> DeviceStatus {
        let mem = self.inner.dma.ram().memory();
        let regions = crate::memory::guest_ram::regions(&mem);
        DeviceStatus {
            name: VfDevice::name(self),
            description: self.describe(),
            dirty_tracking: Some(DirtyTracking::DmaEngine),
            mapped_regions: regions.len(),
            mapped_bytes: regions.iter().map(|r| r.size).sum(),
            quiesced: self.inner.dma.gate_state().quiesced,
            released: self.inner.closed.load(Ordering::SeqCst),
        }
    }
}
