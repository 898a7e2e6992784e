//! The soft VF: a software RDMA engine standing in for an InfiniBand HCA.
//!
//! It gives the guest the semantics of RC verbs ([`crate::vf::verbs`]) and the same hazard as
//! real RDMA: peers write this VM's guest RAM behind QEMU's back. Every such write goes through
//! the [`DmaEngine`], so it is range-checked, logged into QEMU's dirty log while a migration
//! runs, and refused after the switchover quiesce.
//!
//! The fabric is TCP between companions ([`wire`]); endpoints are named by VM, and a
//! [`ClusterMap`] maps VM names to fabric addresses. Each VM dials the peers it sends to; a
//! connection carries the dialler's requests and the listener's acks.
//!
//! Reliability, as InfiniBand RC, go-back-N:
//! - each QP numbers its requests with a PSN; the target applies them strictly in order,
//!   acknowledges duplicates without applying them again, and drops requests from the future;
//! - a completion at the sender is posted only on the target's ack, i.e. once the data is in
//!   the target's guest RAM;
//! - requests not yet acked are kept; when the link to the peer breaks (the peer migrates),
//!   they are held and replayed, in order, once the peer can be reached again, so the guest
//!   sees a delay, never an error, and nothing is applied twice.

pub mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::GuestAddressSpace;

use super::verbs::{
    Access, Completion, GpaRange, MemoryRegion, Opcode, RecvWr, SendOp, SendWr, Status, VerbsError,
};
use super::{
    DeviceStatus, DirtyTracking, MapChange, MappedRegion, QuiesceReport, ResetReport, Vf, VfDevice,
    VfDeviceError,
};
use crate::memory::{DmaEngine, DmaError};
use wire::{AckStatus, Frame};

/// VM name → fabric address (`host:port`) of its companion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// The map.
    pub vms: BTreeMap<String, String>,
}

impl ClusterMap {
    /// Reads a cluster file: `{"vms": {"a": "10.0.0.1:7000", ...}}`.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read cluster file {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("cluster file {} is malformed: {e}", path.display()))
    }
}

/// Timing of the transport.
#[derive(Debug, Clone, Copy)]
pub struct FabricTiming {
    /// How often held requests are retried.
    pub retry_interval: Duration,
    /// How long requests are held for an unreachable peer before they fail.
    pub hold_timeout: Duration,
    /// How long a peer may have no receive posted before the request fails.
    pub rnr_timeout: Duration,
}

impl Default for FabricTiming {
    fn default() -> Self {
        Self {
            retry_interval: Duration::from_millis(20),
            hold_timeout: Duration::from_secs(120),
            rnr_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of the soft VF.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SoftVfStats {
    /// Requests sent (first transmissions).
    pub requests_sent: u64,
    /// Requests sent again (after a broken link or an RNR).
    pub requests_replayed: u64,
    /// Requests applied here (writes and sends from peers).
    pub requests_applied: u64,
    /// Duplicate requests acknowledged without applying.
    pub duplicates: u64,
    /// Requests held now for unreachable peers.
    pub held: u64,
    /// Malformed frames dropped.
    pub malformed_frames: u64,
}

/// `Pending::sent_on` of a request that no live link carries (it must be sent again).
const NOT_ON_A_LINK: u64 = u64::MAX;

struct Pending {
    psn: u64,
    wr: SendWr,
    /// The request's frame; `None` after a migration until it is rebuilt from guest RAM
    /// (the destination has no guest RAM until its device starts).
    frame: Option<Frame>,
    /// Link generation it was last sent on (0: never sent).
    sent_on: u64,
    since: Instant,
    rnr_since: Option<Instant>,
    retry_after: Option<Instant>,
}

struct Qp {
    peer: Option<(String, u32)>,
    next_psn: u64,
    expected_psn: u64,
    recvs: VecDeque<RecvWr>,
    unacked: VecDeque<Pending>,
    error: bool,
}

#[derive(Default)]
struct State {
    mrs: HashMap<u32, MemoryRegion>,
    next_key: u32,
    qps: HashMap<u32, Qp>,
    next_qp: u32,
    cq: VecDeque<Completion>,
}

/// A QP as it moves from the source companion to the destination's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpState {
    /// QP number.
    pub num: u32,
    /// The connected peer VM and its QP.
    pub peer: Option<(String, u32)>,
    /// PSN of the next request this QP sends.
    pub next_psn: u64,
    /// PSN of the next request this QP expects.
    pub expected_psn: u64,
    /// Posted receives, in order.
    pub recvs: Vec<RecvWr>,
    /// Requests sent and not yet acknowledged, by PSN. Their data is read again from guest
    /// RAM at the destination: the buffer of a posted request is not the guest's to change
    /// until it completes, and guest RAM arrives identical.
    pub unacked: Vec<(u64, SendWr)>,
    /// Whether the QP is in the error state.
    pub error: bool,
}

/// Everything of a soft VF that is not in guest RAM: what moves at switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfState {
    /// The VM.
    pub vm: String,
    /// Registered regions.
    pub mrs: Vec<MemoryRegion>,
    /// Next region key.
    pub next_key: u32,
    /// QPs.
    pub qps: Vec<QpState>,
    /// Next QP number.
    pub next_qp: u32,
    /// Completions not yet taken by the guest.
    pub cq: Vec<Completion>,
}

/// Why the VF state could not move.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Export needs the device quiesced first.
    #[error("VM {0}: the VF must be quiesced (switchover) before its state is exported")]
    NotQuiesced(String),
    /// The state is of another VM.
    #[error("VF state of VM {got} offered to VM {want}")]
    WrongVm {
        /// The importing VM.
        want: String,
        /// The state's VM.
        got: String,
    },
}

struct Link {
    writer: Mutex<BufWriter<TcpStream>>,
    generation: u64,
    alive: AtomicBool,
}

struct Inner {
    vm: String,
    listen: String,
    dma: Arc<DmaEngine>,
    state: Mutex<State>,
    cq_ready: Condvar,
    book: Mutex<BTreeMap<String, String>>,
    links: Mutex<HashMap<String, Arc<Link>>>,
    generation: AtomicU64,
    timing: FabricTiming,
    closed: AtomicBool,
    stats: Mutex<SoftVfStats>,
    /// What `VfDevice::sync_dirty` reported so far of the current epoch's device-dirty bitmap.
    dirty_seen: Mutex<DirtySeen>,
    /// Tests only: apply the next N requests but send no ack for them, as if the acks were
    /// lost on a link that broke.
    #[cfg(test)]
    swallow_acks: AtomicU64,
}

/// The pages of one epoch's device-dirty bitmap already reported by `sync_dirty`.
#[derive(Default)]
struct DirtySeen {
    bitmap: Option<Arc<crate::memory::DeviceDirtyBitmap>>,
    words: Vec<u64>,
}

/// The soft VF of one VM.
#[derive(Clone)]
pub struct SoftVf {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SoftVf {
    /// A soft VF for `vm`, writing guest RAM through `dma`, listening for peers on `listen`
    /// (e.g. `0.0.0.0:7000`; port 0 picks one), knowing peers from `cluster`.
    pub fn start(
        vm: &str,
        dma: Arc<DmaEngine>,
        listen: &str,
        cluster: ClusterMap,
        timing: FabricTiming,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let local = listener.local_addr()?;
        let inner = Arc::new(Inner {
            vm: vm.into(),
            listen: local.to_string(),
            dma,
            state: Mutex::new(State {
                next_key: 1,
                next_qp: 1,
                ..Default::default()
            }),
            cq_ready: Condvar::new(),
            book: Mutex::new(cluster.vms),
            links: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            timing,
            closed: AtomicBool::new(false),
            stats: Mutex::new(SoftVfStats::default()),
            dirty_seen: Mutex::new(DirtySeen::default()),
            #[cfg(test)]
            swallow_acks: AtomicU64::new(0),
        });
        listener.set_nonblocking(true)?;
        {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("vfmig-fabric-listen-{vm}"))
                .spawn(move || accept_loop(&inner, listener))?;
        }
        {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("vfmig-fabric-retry-{vm}"))
                .spawn(move || retry_loop(&inner))?;
        }
        tracing::info!(vm, listen = %local, "soft VF fabric listening");
        Ok(Self { inner })
    }

    /// The fabric address peers reach this VF at.
    pub fn listen_addr(&self) -> &str {
        &self.inner.listen
    }

    /// Counters.
    pub fn stats(&self) -> SoftVfStats {
        let mut s = lock(&self.inner.stats).clone();
        s.held = lock(&self.inner.state)
            .qps
            .values()
            .map(|q| q.unacked.len() as u64)
            .sum();
        s
    }

    /// Adds or changes a peer's address.
    pub fn set_peer_address(&self, vm: &str, addr: &str) {
        lock(&self.inner.book).insert(vm.into(), addr.into());
        drop_link(&self.inner, vm);
    }

    /// Waits up to `timeout` for at least one completion, then returns up to `max`.
    pub fn wait_cq(&self, max: usize, timeout: Duration) -> Vec<Completion> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.inner.state);
        while st.cq.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return vec![];
            }
            st = self
                .inner
                .cq_ready
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let n = st.cq.len().min(max);
        st.cq.drain(..n).collect()
    }

    /// Takes the VF's state for the destination, at switchover. The device must be quiesced:
    /// from then on nothing is applied or acknowledged here, so the state is final. Links to
    /// peers are closed, so they hold what they send until the destination announces itself.
    pub fn export_state(&self) -> Result<VfState, StateError> {
        let inner = &self.inner;
        if !inner.dma.gate_state().quiesced {
            return Err(StateError::NotQuiesced(inner.vm.clone()));
        }
        let links: Vec<_> = lock(&inner.links).keys().cloned().collect();
        for vm in links {
            drop_link(inner, &vm);
        }
        let st = lock(&inner.state);
        let mut qps: Vec<QpState> = st
            .qps
            .iter()
            .map(|(&num, q)| QpState {
                num,
                peer: q.peer.clone(),
                next_psn: q.next_psn,
                expected_psn: q.expected_psn,
                recvs: q.recvs.iter().copied().collect(),
                unacked: q.unacked.iter().map(|p| (p.psn, p.wr.clone())).collect(),
                error: q.error,
            })
            .collect();
        qps.sort_by_key(|q| q.num);
        let mut mrs: Vec<MemoryRegion> = st.mrs.values().cloned().collect();
        mrs.sort_by_key(|m| m.key);
        Ok(VfState {
            vm: inner.vm.clone(),
            mrs,
            next_key: st.next_key,
            qps,
            next_qp: st.next_qp,
            cq: st.cq.iter().copied().collect(),
        })
    }

    /// Takes over a migrated VM's VF state. Pending requests will be rebuilt from guest RAM
    /// (it arrives identical) once the device has it, and replayed; call
    /// [`SoftVf::announce`] next, before the VM resumes.
    pub fn import_state(&self, state: VfState) -> Result<(), StateError> {
        let inner = &self.inner;
        if state.vm != inner.vm {
            return Err(StateError::WrongVm {
                want: inner.vm.clone(),
                got: state.vm,
            });
        }
        let mut fresh = State {
            mrs: state.mrs.into_iter().map(|m| (m.key, m)).collect(),
            next_key: state.next_key,
            qps: HashMap::new(),
            next_qp: state.next_qp,
            cq: state.cq.into_iter().collect(),
        };
        let now = Instant::now();
        for q in state.qps {
            let unacked = q
                .unacked
                .into_iter()
                .map(|(psn, wr)| Pending {
                    psn,
                    wr,
                    frame: None,
                    sent_on: NOT_ON_A_LINK,
                    since: now,
                    rnr_since: None,
                    retry_after: None,
                })
                .collect();
            fresh.qps.insert(
                q.num,
                Qp {
                    peer: q.peer,
                    next_psn: q.next_psn,
                    expected_psn: q.expected_psn,
                    recvs: q.recvs.into_iter().collect(),
                    unacked,
                    error: q.error,
                },
            );
        }
        *lock(&inner.state) = fresh;
        inner.cq_ready.notify_all();
        Ok(())
    }

    /// Tells every peer in the cluster map that this VM now lives here: they point their
    /// links at this VF and replay what they hold for it. Returns the peers reached.
    pub fn announce(&self) -> Vec<String> {
        let peers: Vec<String> = lock(&self.inner.book)
            .keys()
            .filter(|vm| **vm != self.inner.vm)
            .cloned()
            .collect();
        let mut reached = Vec::new();
        for vm in peers {
            drop_link(&self.inner, &vm);
            if dial(&self.inner, &vm, true).is_some() {
                reached.push(vm);
            } else {
                tracing::warn!(peer = %vm, "could not announce the migrated VM to a peer; it will learn on its next request");
            }
        }
        tracing::info!(vm = %self.inner.vm, ?reached, "announced the VM's new place on the fabric");
        reached
    }

    /// Stops the VF's threads.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let links: Vec<_> = lock(&self.inner.links).drain().collect();
        for (_, l) in links {
            l.alive.store(false, Ordering::SeqCst);
            let _ = lock(&l.writer).get_ref().shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The soft VF's device side. Its "device" is the [`DmaEngine`], which already writes through
/// the guest memory table and logs every write into QEMU's log as it makes it: mapping needs
/// nothing, quiesce and resume are the engine's, and `sync_dirty` reports the pages the engine
/// wrote for the first time in this epoch since the last sync (from its device-dirty bitmap,
/// which it leaves whole for statistics). A page written again after it was reported is not
/// reported again: the engine has already logged that write into QEMU's log itself.
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
        let waited = self.inner.dma.quiesce();
        Ok(QuiesceReport {
            waited_us: waited.as_micros() as u64,
            was_bus_master: was,
            detail: "DMA engine gate closed; no write in progress".into(),
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
        let mut seen = lock(&self.inner.dirty_seen);
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
            name: self.name(),
            description: self.describe(),
            dirty_tracking: Some(DirtyTracking::DmaEngine),
            mapped_regions: regions.len(),
            mapped_bytes: regions.iter().map(|r| r.size).sum(),
            quiesced: self.inner.dma.gate_state().quiesced,
            released: self.inner.closed.load(Ordering::SeqCst),
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
        let mem = self.inner.dma.ram().memory();
        for s in &segments {
            if !crate::memory::guest_ram::contains(&mem, s.gpa, s.len) {
                return Err(VerbsError::SegmentOutsideRam {
                    gpa: s.gpa,
                    len: s.len,
                });
            }
        }
        let mut st = lock(&self.inner.state);
        let key = st.next_key;
        st.next_key += 1;
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

    fn deregister_mr(&self, key: u32) -> Result<(), VerbsError> {
        lock(&self.inner.state)
            .mrs
            .remove(&key)
            .map(drop)
            .ok_or(VerbsError::NoSuchMr(key))
    }

    fn create_qp(&self) -> u32 {
        let mut st = lock(&self.inner.state);
        let n = st.next_qp;
        st.next_qp += 1;
        st.qps.insert(
            n,
            Qp {
                peer: None,
                next_psn: 1,
                expected_psn: 1,
                recvs: VecDeque::new(),
                unacked: VecDeque::new(),
                error: false,
            },
        );
        n
    }

    fn connect_qp(&self, qp: u32, peer_vm: &str, peer_qp: u32) -> Result<(), VerbsError> {
        if !lock(&self.inner.book).contains_key(peer_vm) {
            return Err(VerbsError::UnknownPeer(peer_vm.into()));
        }
        let mut st = lock(&self.inner.state);
        let q = st.qps.get_mut(&qp).ok_or(VerbsError::NoSuchQp(qp))?;
        q.peer = Some((peer_vm.into(), peer_qp));
        Ok(())
    }

    fn post_recv(&self, qp: u32, wr: RecvWr) -> Result<(), VerbsError> {
        let mut st = lock(&self.inner.state);
        let q = st.qps.get_mut(&qp).ok_or(VerbsError::NoSuchQp(qp))?;
        q.recvs.push_back(wr);
        Ok(())
    }

    fn post_send(&self, qp: u32, wr: SendWr) -> Result<(), VerbsError> {
        let inner = &self.inner;
        let mut st = lock(&inner.state);
        let State { mrs, qps, cq, .. } = &mut *st;
        let q = qps.get_mut(&qp).ok_or(VerbsError::NoSuchQp(qp))?;
        let opcode = match wr.op {
            SendOp::Write { .. } => Opcode::Write,
            SendOp::Send { .. } => Opcode::Send,
        };
        let fail = |cq: &mut VecDeque<Completion>, status| {
            cq.push_back(Completion {
                wr_id: wr.wr_id,
                qp,
                opcode,
                status,
                byte_len: 0,
                imm: None,
            });
            inner.cq_ready.notify_all();
            Ok(())
        };
        if q.error {
            return fail(cq, Status::Flushed);
        }
        let Some((peer_vm, peer_qp)) = q.peer.clone() else {
            return fail(cq, Status::UnknownPeer);
        };
        let payload = match read_local(inner, mrs, &wr) {
            Ok(p) => p,
            Err(_) => return fail(cq, Status::LocalProtectionError),
        };
        let psn = q.next_psn;
        q.next_psn += 1;
        let frame = frame_for(qp, peer_qp, psn, &wr, payload);
        q.unacked.push_back(Pending {
            psn,
            wr,
            frame: Some(frame),
            sent_on: 0,
            since: Instant::now(),
            rnr_since: None,
            retry_after: None,
        });
        drop(st);
        flush_qp(inner, qp, &peer_vm);
        Ok(())
    }

    fn poll_cq(&self, max: usize) -> Vec<Completion> {
        let mut st = lock(&self.inner.state);
        let n = st.cq.len().min(max);
        st.cq.drain(..n).collect()
    }
}

/// Reads a send request's local data from guest RAM, checking it lies in one of `mrs`.
fn read_local(
    inner: &Inner,
    mrs: &HashMap<u32, MemoryRegion>,
    wr: &SendWr,
) -> Result<Vec<u8>, String> {
    let pieces = mrs
        .get(&wr.sge.lkey)
        .and_then(|m| m.translate(wr.sge.addr, u64::from(wr.sge.len)))
        .ok_or_else(|| "the local buffer is not inside a registered region".to_string())?;
    let mut payload = Vec::with_capacity(wr.sge.len as usize);
    for p in pieces {
        payload.extend_from_slice(&inner.dma.read(p.gpa, p.len).map_err(|e| e.to_string())?);
    }
    Ok(payload)
}

/// The fabric frame of a send request.
fn frame_for(qp: u32, peer_qp: u32, psn: u64, wr: &SendWr, payload: Vec<u8>) -> Frame {
    match wr.op {
        SendOp::Write {
            remote_addr,
            rkey,
            imm,
        } => Frame::Write {
            src_qp: qp,
            dst_qp: peer_qp,
            psn,
            rkey,
            addr: remote_addr,
            imm,
            payload,
        },
        SendOp::Send { imm } => Frame::Send {
            src_qp: qp,
            dst_qp: peer_qp,
            psn,
            imm,
            payload,
        },
    }
}

/// The link to `vm`, dialling it if there is none.
fn link_to(inner: &Arc<Inner>, vm: &str) -> Option<Arc<Link>> {
    if let Some(l) = lock(&inner.links).get(vm) {
        if l.alive.load(Ordering::SeqCst) {
            return Some(l.clone());
        }
    }
    dial(inner, vm, false)
}

/// Dials `vm` and says Hello (announcing a migration when `announce`).
fn dial(inner: &Arc<Inner>, vm: &str, announce: bool) -> Option<Arc<Link>> {
    let addr = lock(&inner.book).get(vm).cloned()?;
    let sock: SocketAddr = addr.to_socket_addrs().ok()?.next()?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_millis(500)).ok()?;
    let _ = stream.set_nodelay(true);
    let reader = stream.try_clone().ok()?;
    let mut writer = BufWriter::new(stream);
    wire::write_frame(
        &mut writer,
        &Frame::Hello {
            vm: inner.vm.clone(),
            listen: inner.listen.clone(),
            announce,
        },
    )
    .ok()?;
    writer.flush().ok()?;
    let generation = inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
    let link = Arc::new(Link {
        writer: Mutex::new(writer),
        generation,
        alive: AtomicBool::new(true),
    });
    lock(&inner.links).insert(vm.into(), link.clone());
    {
        let (inner, link, vm) = (inner.clone(), link.clone(), vm.to_string());
        let _ = std::thread::Builder::new()
            .name(format!("vfmig-fabric-acks-{vm}"))
            .spawn(move || {
                let mut r = BufReader::new(reader);
                loop {
                    match wire::read_frame(&mut r) {
                        Ok(Some(Frame::Ack { qp, psn, status })) => {
                            handle_ack(&inner, qp, psn, status)
                        }
                        Ok(Some(other)) => {
                            tracing::warn!(peer = %vm, ?other, "unexpected frame on a request link");
                            lock(&inner.stats).malformed_frames += 1;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::info!(peer = %vm, error = %e, "fabric link to peer lost");
                            break;
                        }
                    }
                }
                link.alive.store(false, Ordering::SeqCst);
            });
    }
    tracing::debug!(peer = vm, %addr, generation, "fabric link up");
    Some(link)
}

fn drop_link(inner: &Inner, vm: &str) {
    if let Some(l) = lock(&inner.links).remove(vm) {
        l.alive.store(false, Ordering::SeqCst);
        let _ = lock(&l.writer).get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// Sends every request of `qp` that the current link has not carried yet, in PSN order.
///
/// Lock order: the link's writer, then the state; the frames are encoded under the state lock
/// and written after it is released, so the link's ack reader (which needs the state) keeps
/// draining acks while a large write blocks on a full socket.
fn flush_qp(inner: &Arc<Inner>, qp: u32, peer_vm: &str) {
    if inner.dma.gate_state().quiesced {
        return; // the VM is switching over: its requests move with its state
    }
    let Some(link) = link_to(inner, peer_vm) else {
        return; // held: the retry loop tries again
    };
    let mut w = lock(&link.writer);
    let (mut first, mut again) = (0u64, 0u64);
    let frames: Vec<Vec<u8>> = {
        let mut st = lock(&inner.state);
        let State { mrs, qps, .. } = &mut *st;
        let Some(q) = qps.get_mut(&qp) else { return };
        let peer_qp = q.peer.as_ref().map(|p| p.1).unwrap_or(0);
        let now = Instant::now();
        let mut out = Vec::new();
        for p in q.unacked.iter_mut() {
            if p.retry_after.is_some_and(|t| t > now) {
                break; // go-back-N: nothing after a request waiting out an RNR
            }
            if p.sent_on == link.generation && p.retry_after.is_none() {
                continue;
            }
            if p.frame.is_none() {
                // Moved with a migration: read the data again from this VM's guest RAM.
                match read_local(inner, mrs, &p.wr) {
                    Ok(payload) => p.frame = Some(frame_for(qp, peer_qp, p.psn, &p.wr, payload)),
                    Err(_) => break, // no guest RAM yet: the retry loop comes back
                }
            }
            let Some(frame) = &p.frame else { break };
            if p.sent_on == 0 {
                first += 1;
            } else {
                again += 1;
            }
            out.push(wire::encode(frame));
            p.sent_on = link.generation;
            p.retry_after = None;
        }
        out
    };
    let sent = frames.iter().all(|f| w.write_all(f).is_ok()) && w.flush().is_ok();
    if !sent {
        link.alive.store(false, Ordering::SeqCst);
    }
    drop(w);
    let mut s = lock(&inner.stats);
    s.requests_sent += first;
    s.requests_replayed += again;
}

fn complete(st: &mut State, inner: &Inner, c: Completion) {
    st.cq.push_back(c);
    inner.cq_ready.notify_all();
}

fn pending_completion(qp: u32, p: &Pending, status: Status) -> Completion {
    Completion {
        wr_id: p.wr.wr_id,
        qp,
        opcode: match p.wr.op {
            SendOp::Write { .. } => Opcode::Write,
            SendOp::Send { .. } => Opcode::Send,
        },
        status,
        byte_len: if status == Status::Success {
            p.wr.sge.len
        } else {
            0
        },
        imm: None,
    }
}

/// Moves a QP to the error state: the failing request completes with `status`, the rest are
/// flushed.
fn fail_qp(st: &mut State, inner: &Inner, qp: u32, status: Status) {
    let Some(q) = st.qps.get_mut(&qp) else { return };
    q.error = true;
    let mut done: Vec<Completion> = Vec::new();
    if let Some(p) = q.unacked.pop_front() {
        done.push(pending_completion(qp, &p, status));
    }
    for p in q.unacked.drain(..) {
        done.push(pending_completion(qp, &p, Status::Flushed));
    }
    for c in done {
        complete(st, inner, c);
    }
}

fn handle_ack(inner: &Arc<Inner>, qp: u32, psn: u64, status: AckStatus) {
    if inner.dma.gate_state().quiesced {
        return; // after the switchover the destination owns completions
    }
    let mut st = lock(&inner.state);
    let Some(q) = st.qps.get_mut(&qp) else { return };
    match status {
        AckStatus::Ok => {
            let mut done = Vec::new();
            while q.unacked.front().is_some_and(|p| p.psn <= psn) {
                if let Some(p) = q.unacked.pop_front() {
                    done.push(pending_completion(qp, &p, Status::Success));
                }
            }
            for c in done {
                complete(&mut st, inner, c);
            }
        }
        AckStatus::ReceiverNotReady => {
            let now = Instant::now();
            let Some(p) = q.unacked.iter_mut().find(|p| p.psn == psn) else {
                return;
            };
            let since = *p.rnr_since.get_or_insert(now);
            if now - since > inner.timing.rnr_timeout {
                fail_qp(&mut st, inner, qp, Status::RnrRetryExceeded);
                return;
            }
            // Go back to this request after a pause; everything after it is resent too.
            p.retry_after = Some(now + Duration::from_millis(2));
            // The target drops what follows a gap; all of it goes again after the pause.
            for later in q.unacked.iter_mut().filter(|x| x.psn > psn) {
                later.sent_on = NOT_ON_A_LINK;
            }
        }
        AckStatus::RemoteAccess => fail_qp(&mut st, inner, qp, Status::RemoteAccessError),
        AckStatus::RemoteInvalid => fail_qp(&mut st, inner, qp, Status::RemoteInvalidRequest),
        AckStatus::NoSuchQp => fail_qp(&mut st, inner, qp, Status::UnknownPeer),
    }
}

/// Retries held requests; fails those held too long.
fn retry_loop(inner: &Arc<Inner>) {
    while !inner.closed.load(Ordering::SeqCst) {
        std::thread::sleep(inner.timing.retry_interval);
        if inner.dma.gate_state().quiesced {
            continue;
        }
        let work: Vec<(u32, String)> = {
            let mut st = lock(&inner.state);
            let now = Instant::now();
            let mut expired = Vec::new();
            let mut out = Vec::new();
            for (&n, q) in st.qps.iter() {
                let Some((vm, _)) = &q.peer else { continue };
                let Some(first) = q.unacked.front() else {
                    continue;
                };
                if now - first.since > inner.timing.hold_timeout {
                    expired.push(n);
                } else {
                    out.push((n, vm.clone()));
                }
            }
            for n in expired {
                tracing::warn!(
                    qp = n,
                    "peer unreachable for too long: failing held requests"
                );
                fail_qp(&mut st, inner, n, Status::RetryExceeded);
            }
            out
        };
        for (qp, vm) in work {
            // A dead link means the peer moved or restarted: start a new one and replay.
            let alive = lock(&inner.links)
                .get(&vm)
                .is_some_and(|l| l.alive.load(Ordering::SeqCst));
            if !alive {
                let mut st = lock(&inner.state);
                if let Some(q) = st.qps.get_mut(&qp) {
                    for p in q.unacked.iter_mut() {
                        if p.sent_on != 0 {
                            p.sent_on = NOT_ON_A_LINK;
                        }
                    }
                }
            }
            flush_qp(inner, qp, &vm);
        }
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: TcpListener) {
    while !inner.closed.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, from)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                let inner = inner.clone();
                let _ = std::thread::Builder::new()
                    .name("vfmig-fabric-peer".into())
                    .spawn(move || {
                        if let Err(e) = serve_peer(&inner, stream) {
                            tracing::info!(%from, error = %e, "fabric peer connection ended");
                        }
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "fabric accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_peer(inner: &Arc<Inner>, stream: TcpStream) -> Result<(), wire::WireError> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let peer = match wire::read_frame(&mut reader)? {
        Some(Frame::Hello {
            vm,
            listen,
            announce,
        }) => {
            if announce {
                tracing::info!(peer = %vm, %listen, "peer announces its new place: replaying held requests");
                lock(&inner.book).insert(vm.clone(), listen);
                drop_link(inner, &vm);
            }
            vm
        }
        Some(other) => {
            lock(&inner.stats).malformed_frames += 1;
            return Err(wire::WireError::Malformed(format!(
                "expected Hello first, got {other:?}"
            )));
        }
        None => return Ok(()),
    };
    loop {
        let frame = match wire::read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                if matches!(e, wire::WireError::Malformed(_)) {
                    lock(&inner.stats).malformed_frames += 1;
                }
                return Err(e);
            }
        };
        let (qp, psn) = match &frame {
            Frame::Write { src_qp, psn, .. } | Frame::Send { src_qp, psn, .. } => (*src_qp, *psn),
            other => {
                lock(&inner.stats).malformed_frames += 1;
                tracing::warn!(%peer, ?other, "unexpected frame from a peer: dropped");
                continue;
            }
        };
        let status = match apply(inner, &peer, frame) {
            Outcome::Ack(status) => status,
            // From the future (after a gap): the sender goes back and resends from the gap.
            Outcome::Drop => continue,
            // Quiesced for switchover: close, so the peer holds what it sends and replays it
            // to wherever this VM comes up.
            Outcome::Close => {
                tracing::info!(%peer, "VF quiesced: closing the peer's link");
                return Ok(());
            }
        };
        #[cfg(test)]
        if inner
            .swallow_acks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            continue;
        }
        wire::write_frame(&mut writer, &Frame::Ack { qp, psn, status })?;
        writer.flush()?;
    }
}

/// Writes `payload` into guest RAM at the pieces, as the device. `None` when the device is
/// quiesced (the request must not be acked).
fn dma_pieces(inner: &Inner, pieces: &[GpaRange], payload: &[u8]) -> Option<Result<(), ()>> {
    let mut at = 0usize;
    for p in pieces {
        let chunk = &payload[at..at + p.len as usize];
        loop {
            match inner.dma.write(p.gpa, chunk) {
                Ok(()) => break,
                Err(DmaError::Quiesced) => return None,
                Err(DmaError::HeldNoLog { .. }) | Err(DmaError::NoMemory) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "device write refused");
                    return Some(Err(()));
                }
            }
        }
        at += p.len as usize;
    }
    Some(Ok(()))
}

/// What to do after a request.
enum Outcome {
    /// Acknowledge with this status.
    Ack(AckStatus),
    /// Neither apply nor acknowledge.
    Drop,
    /// Close the connection.
    Close,
}

/// Applies a request from `peer`.
fn apply(inner: &Arc<Inner>, peer: &str, frame: Frame) -> Outcome {
    use Outcome::{Ack, Close, Drop};
    let (src_qp, dst_qp, psn, imm, payload, target) = match frame {
        Frame::Write {
            src_qp,
            dst_qp,
            psn,
            rkey,
            addr,
            imm,
            payload,
        } => (src_qp, dst_qp, psn, imm, payload, Some((rkey, addr))),
        Frame::Send {
            src_qp,
            dst_qp,
            psn,
            imm,
            payload,
        } => (src_qp, dst_qp, psn, imm, payload, None),
        _ => return Ack(AckStatus::RemoteInvalid),
    };
    let mut st = lock(&inner.state);
    let State { mrs, qps, .. } = &mut *st;
    // A QP the target has not created or connected yet is a peer not ready yet (ranks set
    // up their QPs at their own pace): "receiver not ready", retried until the RNR timeout.
    let Some(q) = qps.get_mut(&dst_qp) else {
        return Ack(AckStatus::ReceiverNotReady);
    };
    match &q.peer {
        None => return Ack(AckStatus::ReceiverNotReady),
        Some(p) if *p != (peer.to_string(), src_qp) => return Ack(AckStatus::NoSuchQp),
        Some(_) => {}
    }
    if psn < q.expected_psn {
        drop(st);
        lock(&inner.stats).duplicates += 1;
        return Ack(AckStatus::Ok);
    }
    if psn > q.expected_psn {
        return Drop; // from the future: go-back-N, the sender resends from the gap
    }
    let len = payload.len() as u64;
    // Where the bytes go, and which receive (if any) completes.
    let consumes_recv = target.is_none() || imm.is_some();
    if consumes_recv && q.recvs.is_empty() {
        return Ack(AckStatus::ReceiverNotReady);
    }
    let pieces = match target {
        Some((rkey, addr)) => match mrs.get(&rkey) {
            Some(m) if m.access.remote_write => match m.translate(addr, len) {
                Some(p) => p,
                None => {
                    q.expected_psn += 1;
                    return Ack(AckStatus::RemoteAccess);
                }
            },
            _ => {
                q.expected_psn += 1;
                return Ack(AckStatus::RemoteAccess);
            }
        },
        None => {
            let Some(recv) = q.recvs.front().copied() else {
                return Ack(AckStatus::ReceiverNotReady);
            };
            let fits = len <= u64::from(recv.sge.len);
            let pieces = mrs
                .get(&recv.sge.lkey)
                .filter(|m| m.access.local_write)
                .and_then(|m| m.translate(recv.sge.addr, len));
            match (fits, pieces) {
                (true, Some(p)) => p,
                (fits, _) => {
                    q.recvs.pop_front();
                    q.expected_psn += 1;
                    let status = if fits {
                        Status::LocalProtectionError
                    } else {
                        Status::LocalLengthError
                    };
                    st.cq.push_back(Completion {
                        wr_id: recv.wr_id,
                        qp: dst_qp,
                        opcode: Opcode::Recv,
                        status,
                        byte_len: 0,
                        imm,
                    });
                    inner.cq_ready.notify_all();
                    return Ack(AckStatus::RemoteInvalid);
                }
            }
        }
    };
    drop(st);
    // Requests on one QP come from one connection, handled by one thread: nothing else
    // advances this QP's expected PSN between here and the re-lock below.
    match dma_pieces(inner, &pieces, &payload) {
        Some(Ok(())) => {}
        Some(Err(())) => return Ack(AckStatus::RemoteAccess),
        None => return Close,
    }
    let mut st = lock(&inner.state);
    let Some(q) = st.qps.get_mut(&dst_qp) else {
        return Ack(AckStatus::NoSuchQp);
    };
    q.expected_psn += 1;
    let recv = if consumes_recv {
        q.recvs.pop_front()
    } else {
        None
    };
    if let Some(r) = recv {
        complete(
            &mut st,
            inner,
            Completion {
                wr_id: r.wr_id,
                qp: dst_qp,
                opcode: if target.is_some() {
                    Opcode::RecvRdmaWithImm
                } else {
                    Opcode::Recv
                },
                status: Status::Success,
                byte_len: len as u32,
                imm,
            },
        );
    }
    drop(st);
    lock(&inner.stats).requests_applied += 1;
    Ack(AckStatus::Ok)
}

#[cfg(test)]
mod tests;
