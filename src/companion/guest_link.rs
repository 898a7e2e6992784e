//! The guest's end of the VF: frames of EtherType 0x88B5 over the virtio-net queues
//! (`docs/guest-frames.md`).
//!
//! - Frames the guest transmits are decoded here and become verbs on the VF; commands get a
//!   REPLY frame.
//! - Replies, completions and events wait in an RX queue until the guest has posted receive
//!   buffers; the vring worker writes them into guest RAM (through the logged memory).
//! - A pump thread takes completions from the VF's completion queue and queues them as
//!   COMPLETIONS frames.
//!
//! At switchover nothing leaves the RX queue (the device is quiesced); frames still waiting
//! move to the destination with the VF state.
//!
//! What a guest can make the companion hold is bounded:
//! - a send larger than [`MAX_MESSAGE`] is refused at post time with a `LocalLengthError`
//!   completion, before the VF reads (and keeps) its payload;
//! - sends wait for their completion in a queue of [`SEND_QUEUE_DEPTH`] per QP and
//!   [`MAX_SEND_BYTES`] in all, receives in one of [`RECV_QUEUE_DEPTH`] per QP and
//!   [`MAX_RECVS`] in all; a post over either is refused with a `Flushed` completion (the
//!   request was not executed; post it again once completions have come);
//! - the frames waiting for the guest's receive buffers are at most [`MAX_RX_FRAMES`] (plus
//!   one ring of replies): when the queue is full, the vring worker stops taking the guest's
//!   TX frames, so that the guest's own ring fills, and the completion pump leaves
//!   completions in the VF's queue. Nothing is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vfmig_proto as proto;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::DmaEngine;
use crate::vf::verbs::{Access, GpaRange, RecvWr, SendWr, VerbsError};
use crate::vf::Vf;

use super::op_latency::{OpLatency, OpLatencyReport};

/// Largest message a guest may post (the fabric's largest payload).
pub const MAX_MESSAGE: u32 = 16 << 20;
/// Sends one QP may have waiting for their completion.
pub const SEND_QUEUE_DEPTH: usize = 1024;
/// Bytes of all sends waiting for their completion (each counted as at least
/// [`SEND_OVERHEAD`]): the payloads the VF holds for the guest.
pub const MAX_SEND_BYTES: u64 = 64 << 20;
/// What one waiting send costs at least, payload or not.
pub const SEND_OVERHEAD: u64 = 256;
/// Receives one QP may have posted.
pub const RECV_QUEUE_DEPTH: u32 = 4096;
/// Receives posted on all QPs.
pub const MAX_RECVS: u64 = 65_536;
/// Frames waiting for the guest's receive buffers before the guest's TX frames are no longer
/// taken; the completion pump stops a ring's worth earlier, so replies always fit.
pub const MAX_RX_FRAMES: usize = 1024;
/// Room kept for replies: the most frames one TX drain takes.
const REPLY_RESERVE: usize = 256;
/// How often the vring worker is woken while it owes the guest a turn (see
/// [`GuestLink::owe_tx_drain`]).
const OWED_WAKEUP_EVERY: Duration = Duration::from_millis(2);

/// Why a post was refused before it reached the VF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostRefused {
    /// The message is larger than the companion carries.
    #[error("a message of {len} bytes is larger than the {MAX_MESSAGE} bytes a post may carry")]
    TooLarge {
        /// The message's length.
        len: u32,
    },
    /// The QP's send queue is full.
    #[error("QP {qp} already has {SEND_QUEUE_DEPTH} sends waiting for their completion")]
    SendQueueFull {
        /// The QP.
        qp: u32,
    },
    /// The sends of all QPs hold too much.
    #[error("the sends waiting for completion already hold {MAX_SEND_BYTES} bytes")]
    SendBytes,
    /// The QP's receive queue is full.
    #[error("QP {qp} already has {RECV_QUEUE_DEPTH} receives posted")]
    RecvQueueFull {
        /// The QP.
        qp: u32,
    },
    /// The receives of all QPs are too many.
    #[error("{MAX_RECVS} receives are posted already")]
    Recvs,
}

impl PostRefused {
    /// The status of the error completion the guest gets.
    fn status(&self) -> proto::Status {
        match self {
            PostRefused::TooLarge { .. } => proto::Status::LocalLengthError,
            _ => proto::Status::Flushed,
        }
    }
}

/// The sends and receives of each QP that wait for their completion.
#[derive(Debug, Default)]
struct Budget {
    /// QP → the cost of each waiting send, in post order, and its posted receives.
    qps: HashMap<u32, (VecDeque<u64>, u32)>,
    send_bytes: u64,
    recvs: u64,
}

impl Budget {
    fn admit_send(&mut self, qp: u32, len: u32) -> Result<u64, PostRefused> {
        if len > MAX_MESSAGE {
            return Err(PostRefused::TooLarge { len });
        }
        let cost = u64::from(len).max(SEND_OVERHEAD);
        let (sends, _) = self.qps.entry(qp).or_default();
        if sends.len() >= SEND_QUEUE_DEPTH {
            return Err(PostRefused::SendQueueFull { qp });
        }
        if self.send_bytes + cost > MAX_SEND_BYTES {
            return Err(PostRefused::SendBytes);
        }
        sends.push_back(cost);
        self.send_bytes += cost;
        Ok(cost)
    }

    fn admit_recv(&mut self, qp: u32) -> Result<(), PostRefused> {
        let (_, recvs) = self.qps.entry(qp).or_default();
        if *recvs >= RECV_QUEUE_DEPTH {
            return Err(PostRefused::RecvQueueFull { qp });
        }
        if self.recvs >= MAX_RECVS {
            return Err(PostRefused::Recvs);
        }
        *recvs += 1;
        self.recvs += 1;
        Ok(())
    }

    /// Frees what a completion ends (the oldest send of its QP, or one receive). A
    /// completion of a request posted before a migration has nothing to free here.
    fn complete(&mut self, c: &proto::Completion) {
        let Some((sends, recvs)) = self.qps.get_mut(&c.qp) else {
            return;
        };
        match c.opcode {
            proto::Opcode::Write | proto::Opcode::Send => {
                if let Some(cost) = sends.pop_front() {
                    self.send_bytes -= cost;
                }
            }
            proto::Opcode::Recv | proto::Opcode::RecvRdmaWithImm => {
                if *recvs > 0 {
                    *recvs -= 1;
                    self.recvs -= 1;
                }
            }
        }
        if sends.is_empty() && *recvs == 0 {
            self.qps.remove(&c.qp);
        }
    }

    /// Frees everything of a destroyed QP: its posts will never complete.
    fn forget_qp(&mut self, qp: u32) {
        if let Some((sends, recvs)) = self.qps.remove(&qp) {
            self.send_bytes -= sends.iter().sum::<u64>();
            self.recvs -= u64::from(recvs);
        }
    }

    /// Frees a send the VF refused (it completes nothing).
    fn unpost_send(&mut self, qp: u32) {
        if let Some((sends, _)) = self.qps.get_mut(&qp) {
            if let Some(cost) = sends.pop_back() {
                self.send_bytes -= cost;
            }
        }
    }

    /// Frees a receive the VF refused.
    fn unpost_recv(&mut self, qp: u32) {
        if let Some((_, recvs)) = self.qps.get_mut(&qp) {
            if *recvs > 0 {
                *recvs -= 1;
                self.recvs -= 1;
            }
        }
    }
}

/// Counters of the guest link.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct GuestLinkStats {
    /// vfmig frames received from the guest.
    pub frames_from_guest: u64,
    /// Frames of other EtherTypes (dropped).
    pub other_frames: u64,
    /// Malformed vfmig frames (dropped).
    pub malformed_frames: u64,
    /// Frames written into the guest's receive queue.
    pub frames_to_guest: u64,
    /// Frames waiting for receive buffers now.
    pub frames_waiting: u64,
    /// SUSPEND events the guest runtime acknowledged (it is ready to migrate).
    pub suspend_acks: u64,
    /// RESUME events the guest runtime acknowledged.
    pub resume_acks: u64,
    /// What the companion adds to each operation's latency (see `op_latency`).
    pub op_latency: OpLatencyReport,
}

#[derive(Default)]
struct Counters {
    from_guest: AtomicU64,
    other: AtomicU64,
    malformed: AtomicU64,
    to_guest: AtomicU64,
    suspend_acks: AtomicU64,
    resume_acks: AtomicU64,
}

/// A frame for the guest, with when the fabric delivered the requests behind the receive
/// completions it carries (for the companion's RX latency).
#[derive(Debug)]
pub struct ForGuest {
    frame: Vec<u8>,
    arrivals: Vec<Instant>,
}

impl std::ops::Deref for ForGuest {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.frame
    }
}

/// The guest's end of the VF.
pub struct GuestLink {
    vf: Option<Arc<dyn Vf>>,
    dma: Arc<DmaEngine>,
    rx: Mutex<VecDeque<ForGuest>>,
    /// What the companion adds to each operation's latency.
    latency: OpLatency,
    /// Written when frames are queued; the vring worker then fills the receive queue.
    pub rx_event: EventFd,
    guest_mac: Mutex<[u8; 6]>,
    counters: Counters,
    /// Held while completions move from the VF's queue to the RX queue, so an export sees
    /// each completion in exactly one of them.
    pump: Mutex<()>,
    /// What the guest's posts hold in the VF.
    budget: Mutex<Budget>,
    /// Posts refused by the budget.
    refused_posts: AtomicU64,
    /// Whether the vring worker left TX frames in the guest's ring because the RX queue was
    /// full, or because the device was quiesced.
    tx_paused: AtomicBool,
    /// The vring worker's turn at the guest's TX ring: held while it takes frames (their
    /// posts reach the VF), and by an export, so that no post lands in the VF after its
    /// state was copied for the destination.
    tx_turn: Mutex<()>,
}

impl GuestLink {
    /// A guest link to the verbs of `vf` (none: the companion has no VF; commands get an
    /// error reply).
    pub fn new(vf: Option<Arc<dyn Vf>>, dma: Arc<DmaEngine>) -> std::io::Result<Arc<Self>> {
        let link = Arc::new(Self {
            vf,
            dma,
            rx: Mutex::new(VecDeque::new()),
            latency: OpLatency::default(),
            rx_event: EventFd::new(EFD_NONBLOCK)?,
            guest_mac: Mutex::new([0xff; 6]),
            counters: Counters::default(),
            pump: Mutex::new(()),
            budget: Mutex::new(Budget::default()),
            refused_posts: AtomicU64::new(0),
            tx_paused: AtomicBool::new(false),
            tx_turn: Mutex::new(()),
        });
        if link.vf.is_some() {
            let l = link.clone();
            std::thread::Builder::new()
                .name("vfmig-completions".into())
                .spawn(move || l.pump_completions())?;
        }
        Ok(link)
    }

    /// Counters.
    pub fn stats(&self) -> GuestLinkStats {
        let c = &self.counters;
        GuestLinkStats {
            frames_from_guest: c.from_guest.load(Ordering::Relaxed),
            other_frames: c.other.load(Ordering::Relaxed),
            malformed_frames: c.malformed.load(Ordering::Relaxed),
            frames_to_guest: c.to_guest.load(Ordering::Relaxed),
            frames_waiting: self.rx.lock().len() as u64,
            suspend_acks: c.suspend_acks.load(Ordering::Relaxed),
            resume_acks: c.resume_acks.load(Ordering::Relaxed),
            op_latency: self.latency.report(),
        }
    }

    fn pump_completions(&self) {
        let Some(vf) = &self.vf else { return };
        loop {
            if self.dma.gate_state().quiesced
                || self.rx.lock().len() >= MAX_RX_FRAMES - REPLY_RESERVE
            {
                // Completions stay in the VF's queue: they move with its state, or wait for
                // the guest to take the frames before them.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let _pump = self.pump.lock();
            // While something waits for the guest's rings, the idle turns come quickly: the
            // destination's rings start a few ms after its VM runs, and nobody else says when.
            let idle = if self.owes_wakeup() {
                OWED_WAKEUP_EVERY
            } else {
                Duration::from_millis(50)
            };
            let cs = match vf.wait_cq(proto::MAX_COMPLETIONS, idle) {
                Ok(cs) => cs,
                Err(e) => {
                    // A VF whose completions are not the companion's (a VFIO VF's are in the
                    // HCA's queues): nothing to pump.
                    tracing::info!(reason = %e, "no completions to forward to the guest");
                    return;
                }
            };
            if cs.is_empty() {
                // A wake-up that the vring worker took while the RX queue was not ready (a
                // destination before its device starts) is never repeated by anyone else:
                // frames still waiting, and TX frames owed a drain, get another one on every
                // idle turn, or the guest would wait for them while its posts wait behind them.
                if self.owes_wakeup() {
                    let _ = self.rx_event.write(1);
                }
                continue;
            }
            {
                let mut budget = self.budget.lock();
                for c in &cs {
                    budget.complete(c);
                }
            }
            let arrivals: Vec<Instant> = cs
                .iter()
                .filter(|c| {
                    matches!(
                        c.opcode,
                        proto::Opcode::Recv | proto::Opcode::RecvRdmaWithImm
                    )
                })
                .filter_map(|c| vf.arrival(c.qp, c.wr_id))
                .collect();
            self.queue_with(0, proto::Message::Completions(cs), arrivals);
            crate::trace::steps::first("first-completion-to-guest", "");
        }
    }

    /// Whether the vring worker owes the guest a turn: frames wait for its receive buffers,
    /// or TX frames may wait in its ring.
    fn owes_wakeup(&self) -> bool {
        self.tx_paused.load(Ordering::Relaxed) || !self.rx.lock().is_empty()
    }

    /// The VM arrived here with the VF state: TX frames it queued before it stopped were
    /// kicked at the source, and nobody kicks for them here; the vring worker takes them on
    /// its next turn.
    pub fn owe_tx_drain(&self) {
        self.tx_paused.store(true, Ordering::Relaxed);
        let _ = self.rx_event.write(1);
    }

    /// Takes the vring worker's turn at the guest's TX ring, unless the device is quiesced.
    /// Quiesced (switchover), the guest's TX frames stay in its ring: the destination takes
    /// them (its import owes them a drain), or this companion does once the device resumes.
    /// A post taken here after the VF's state was exported would be lost with the frozen
    /// copy, and the guest would wait for its completion for ever.
    pub fn tx_turn(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        let turn = self.tx_turn.lock();
        if self.dma.gate_state().quiesced {
            // Taken on the first idle turn after a resume (see `owes_wakeup`).
            self.tx_paused.store(true, Ordering::Relaxed);
            return None;
        }
        Some(turn)
    }

    /// Waits until the vring worker has finished taking TX frames, and keeps it from taking
    /// more while the guard lives (the device is quiesced: it takes none after either).
    pub fn hold_tx(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.tx_turn.lock()
    }

    /// Queues a frame for the guest.
    pub fn queue(&self, seq: u32, msg: proto::Message) {
        self.queue_with(seq, msg, Vec::new());
    }

    /// Queues a frame for the guest whose completions' requests came off the fabric at
    /// `arrivals`.
    fn queue_with(&self, seq: u32, msg: proto::Message, arrivals: Vec<Instant>) {
        let frame = proto::encode(&proto::Frame {
            dst: *self.guest_mac.lock(),
            src: proto::COMPANION_MAC,
            seq,
            msg,
        });
        self.rx.lock().push_back(ForGuest { frame, arrivals });
        let _ = self.rx_event.write(1);
    }

    /// How many TX frames the vring worker may take from the guest now: each may add one
    /// reply to the RX queue.
    pub fn tx_room(&self) -> usize {
        MAX_RX_FRAMES
            .saturating_sub(self.rx.lock().len())
            .min(REPLY_RESERVE)
    }

    /// Notes that the vring worker took all the room and may have left TX frames in the
    /// guest's ring; [`Self::resume_tx`] then says when to take them.
    pub fn pause_tx(&self, room: usize) {
        if !self.tx_paused.swap(true, Ordering::Relaxed) && room == 0 {
            tracing::warn!(
                waiting = MAX_RX_FRAMES,
                "the guest takes no frames: its TX frames wait in its ring until it posts \
                 receive buffers"
            );
        }
    }

    /// Whether TX frames were left in the guest's ring and there is room for them now (the
    /// vring worker should drain TX again).
    pub fn resume_tx(&self) -> bool {
        self.tx_paused.load(Ordering::Relaxed)
            && self.rx.lock().len() < MAX_RX_FRAMES
            && self.tx_paused.swap(false, Ordering::Relaxed)
    }

    /// Posts the guest made that were refused at post time (size or queue depth).
    pub fn refused_posts(&self) -> u64 {
        self.refused_posts.load(Ordering::Relaxed)
    }

    /// Tells the guest that a post was refused, with an error completion for its request.
    fn refuse_post(&self, refused: PostRefused, qp: u32, wr_id: u64, opcode: proto::Opcode) {
        let n = self.refused_posts.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 10 || n.is_power_of_two() {
            tracing::warn!(
                error = %refused,
                qp,
                wr_id,
                refused_posts = n,
                "guest post refused before it reached the VF: the guest gets an error completion"
            );
        }
        self.queue(
            0,
            proto::Message::Completions(vec![proto::Completion {
                wr_id,
                qp,
                opcode,
                status: refused.status(),
                byte_len: 0,
                imm: None,
            }]),
        );
    }

    /// Takes the next frame for the guest, unless the device is quiesced.
    pub fn next_for_guest(&self) -> Option<ForGuest> {
        if self.dma.gate_state().quiesced {
            return None;
        }
        self.rx.lock().pop_front()
    }

    /// Puts back a frame that found no receive buffer.
    pub fn put_back(&self, frame: ForGuest) {
        self.rx.lock().push_front(frame);
    }

    /// Counts a frame written into the guest's receive queue (its used ring): the receive
    /// completions in it are measured from their arrival off the fabric.
    pub fn delivered(&self, frame: &ForGuest) {
        self.counters.to_guest.fetch_add(1, Ordering::Relaxed);
        for at in &frame.arrivals {
            self.latency.rx(at.elapsed());
        }
    }

    /// Frames waiting for the guest, taken for a migration (with the pump stopped).
    pub fn take_waiting(&self) -> Vec<Vec<u8>> {
        let _pump = self.pump.lock();
        self.rx.lock().drain(..).map(|f| f.frame).collect()
    }

    /// Queues frames that waited at the source.
    pub fn restore_waiting(&self, frames: Vec<Vec<u8>>) {
        let mut rx = self.rx.lock();
        for frame in frames.into_iter().rev() {
            rx.push_front(ForGuest {
                frame,
                arrivals: Vec::new(),
            });
        }
        drop(rx);
        let _ = self.rx_event.write(1);
    }

    /// Handles one frame the guest transmitted (without the virtio-net header).
    pub fn on_frame(&self, bytes: &[u8]) {
        self.on_frame_taken_at(bytes, Instant::now());
    }

    /// [`Self::on_frame`], for a frame taken off the TX queue at `taken` (a POST_SEND is
    /// measured from there to its request on the fabric).
    pub fn on_frame_taken_at(&self, bytes: &[u8], taken: Instant) {
        if bytes.len() < 14 || u16::from_be_bytes([bytes[12], bytes[13]]) != proto::ETHERTYPE {
            self.counters.other.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let frame = match proto::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                let n = self.counters.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                if n <= 10 || n.is_power_of_two() {
                    tracing::warn!(error = %e, malformed = n, "malformed frame from the guest: dropped");
                }
                return;
            }
        };
        self.counters.from_guest.fetch_add(1, Ordering::Relaxed);
        *self.guest_mac.lock() = frame.src;
        let reply = |r: Result<u64, VerbsError>| match r {
            Ok(value) => proto::Message::Reply {
                status: 0,
                value,
                error: String::new(),
            },
            Err(error) => proto::Message::Reply {
                status: 1,
                value: 0,
                error: error.to_string(),
            },
        };
        let Some(vf) = &self.vf else {
            if !matches!(
                frame.msg,
                proto::Message::PostSend { .. } | proto::Message::PostRecv { .. }
            ) {
                self.queue(frame.seq, reply(Err(VerbsError::NoVf)));
            }
            return;
        };
        let answer = match frame.msg {
            proto::Message::Open => Some(Ok(0)),
            proto::Message::RegMr {
                addr,
                access,
                segments,
            } => Some(
                vf.register_mr(
                    addr,
                    segments
                        .iter()
                        .map(|s| GpaRange {
                            gpa: s.gpa,
                            len: s.len,
                        })
                        .collect(),
                    Access {
                        local_write: access & proto::access::LOCAL_WRITE != 0,
                        remote_write: access & proto::access::REMOTE_WRITE != 0,
                    },
                )
                .map(u64::from),
            ),
            proto::Message::DeregMr { key } => Some(vf.deregister_mr(key).map(|_| 0)),
            proto::Message::CreateQp => Some(vf.create_qp().map(u64::from)),
            proto::Message::CreateQpAt { qp } => Some(vf.create_qp_at(qp).map(u64::from)),
            proto::Message::DestroyQp { qp } => Some(vf.destroy_qp(qp).map(|()| {
                self.budget.lock().forget_qp(qp);
                0
            })),
            proto::Message::ConnectQp { qp, peer, peer_qp } => {
                Some(vf.connect_qp(qp, &peer, peer_qp).map(|_| 0))
            }
            proto::Message::PostSend {
                qp,
                wr_id,
                sge: s,
                op,
            } => {
                let opcode = match op {
                    proto::SendOp::Write { .. } => proto::Opcode::Write,
                    proto::SendOp::Send { .. } => proto::Opcode::Send,
                };
                // Admitted before the VF reads (and holds) the payload.
                let admitted = self.budget.lock().admit_send(qp, s.len);
                match admitted {
                    Err(refused) => self.refuse_post(refused, qp, wr_id, opcode),
                    Ok(_) => match vf.post_send(qp, SendWr { wr_id, sge: s, op }) {
                        Ok(()) => self.latency.tx(taken.elapsed()),
                        Err(err) => {
                            self.budget.lock().unpost_send(qp);
                            tracing::warn!(error = %err, "POST_SEND refused");
                        }
                    },
                }
                None
            }
            proto::Message::PostRecv { qp, wr_id, sge: s } => {
                let admitted = self.budget.lock().admit_recv(qp);
                match admitted {
                    Err(refused) => self.refuse_post(refused, qp, wr_id, proto::Opcode::Recv),
                    Ok(()) => {
                        if let Err(err) = vf.post_recv(qp, RecvWr { wr_id, sge: s }) {
                            self.budget.lock().unpost_recv(qp);
                            tracing::warn!(error = %err, "POST_RECV refused");
                        }
                    }
                }
                None
            }
            proto::Message::EventAck { event } => {
                tracing::info!(?event, "guest runtime acknowledged an event");
                let counter = match event {
                    proto::Event::Suspend => Some(&self.counters.suspend_acks),
                    proto::Event::Resume => Some(&self.counters.resume_acks),
                    proto::Event::Migrated => None,
                };
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            other => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    ?other,
                    "a companion-to-guest frame came from the guest: dropped"
                );
                None
            }
        };
        if let Some(r) = answer {
            self.queue(frame.seq, reply(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vf::soft::{test_auth, ClusterMap, FabricTiming, SoftVf};
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    fn dma() -> Arc<DmaEngine> {
        let ram = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap(),
        );
        let d = Arc::new(DmaEngine::new(ram));
        d.adopt_memory();
        d
    }

    fn command(seq: u32, msg: proto::Message) -> Vec<u8> {
        proto::encode(&proto::Frame {
            dst: proto::COMPANION_MAC,
            src: GUEST_MAC,
            seq,
            msg,
        })
    }

    /// The next frame for the guest, decoded, waiting up to 5 s (completions come from the
    /// pump thread).
    fn next(link: &GuestLink) -> proto::Frame {
        for _ in 0..500 {
            if let Some(f) = link.next_for_guest() {
                return proto::decode(&f).expect("companion frames decode");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no frame for the guest within 5 s");
    }

    fn value(f: proto::Frame, seq: u32) -> u64 {
        assert_eq!(f.seq, seq);
        assert_eq!(f.dst, GUEST_MAC, "frames go back to the guest's MAC");
        match f.msg {
            proto::Message::Reply {
                status: 0, value, ..
            } => value,
            other => panic!("expected a success reply, got {other:?}"),
        }
    }

    #[test]
    fn guest_frames_drive_the_soft_vf_end_to_end() {
        let (da, db) = (dma(), dma());
        let t = FabricTiming::default();
        let a = SoftVf::start(
            "a",
            da.clone(),
            "127.0.0.1:0",
            ClusterMap::default(),
            t,
            test_auth("a"),
        )
        .unwrap();
        let b = SoftVf::start(
            "b",
            db.clone(),
            "127.0.0.1:0",
            ClusterMap::default(),
            t,
            test_auth("b"),
        )
        .unwrap();
        a.set_peer_address("b", b.listen_addr());
        let link = GuestLink::new(Some(Arc::new(a.clone())), da.clone()).unwrap();
        // b's side, directly through the verbs: a region and a QP for a.
        let kb = b
            .register_mr(
                0,
                vec![GpaRange {
                    gpa: 0x20_0000,
                    len: 4096,
                }],
                Access {
                    local_write: true,
                    remote_write: true,
                },
            )
            .unwrap();
        let qb = b.create_qp();
        b.set_peer_address("a", a.listen_addr());

        link.on_frame(&command(1, proto::Message::Open));
        assert_eq!(value(next(&link), 1), 0);
        link.on_frame(&command(
            2,
            proto::Message::RegMr {
                addr: 0,
                access: proto::access::LOCAL_WRITE,
                segments: vec![proto::Segment {
                    gpa: 0x10_0000,
                    len: 4096,
                }],
            },
        ));
        let ka = value(next(&link), 2) as u32;
        link.on_frame(&command(3, proto::Message::CreateQp));
        let qa = value(next(&link), 3) as u32;
        assert_eq!(qa, 1);
        b.connect_qp(qb, "a", qa).unwrap();
        link.on_frame(&command(
            4,
            proto::Message::ConnectQp {
                qp: qa,
                peer: "b".into(),
                peer_qp: qb,
            },
        ));
        assert_eq!(value(next(&link), 4), 0);
        da.write(0x10_0000, b"from the guest").unwrap();
        link.on_frame(&command(
            5,
            proto::Message::PostSend {
                qp: qa,
                wr_id: 42,
                sge: proto::Sge {
                    addr: 0,
                    len: 14,
                    lkey: ka,
                },
                op: proto::SendOp::Write {
                    remote_addr: 0x10,
                    rkey: kb,
                    imm: None,
                },
            },
        ));
        match next(&link).msg {
            proto::Message::Completions(cs) => {
                assert_eq!(cs.len(), 1);
                assert_eq!(cs[0].wr_id, 42);
                assert_eq!(cs[0].status, proto::Status::Success);
            }
            other => panic!("expected a completion, got {other:?}"),
        }
        assert_eq!(db.read(0x20_0010, 14).unwrap(), b"from the guest");
        // A command that fails gets an error reply with the reason.
        link.on_frame(&command(
            6,
            proto::Message::ConnectQp {
                qp: qa,
                peer: "nobody".into(),
                peer_qp: 1,
            },
        ));
        match next(&link).msg {
            proto::Message::Reply { status, error, .. } => {
                assert_ne!(status, 0);
                assert!(error.contains("nobody"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        a.close();
        b.close();
    }

    #[test]
    fn malformed_and_foreign_frames_are_counted_and_dropped() {
        let link = GuestLink::new(None, dma()).unwrap();
        let mut bad = command(1, proto::Message::Open);
        bad[14] = 0; // bad magic
        link.on_frame(&bad);
        link.on_frame(&bad[..15]);
        let mut ipv4 = command(1, proto::Message::Open);
        ipv4[12] = 0x08;
        ipv4[13] = 0x00;
        link.on_frame(&ipv4);
        link.on_frame(&[1, 2, 3]);
        let s = link.stats();
        assert_eq!(
            (s.malformed_frames, s.other_frames, s.frames_from_guest),
            (2, 2, 0)
        );
        assert!(link.next_for_guest().is_none(), "nothing answered");
        // Without a fabric, commands are refused with the reason.
        link.on_frame(&command(9, proto::Message::CreateQp));
        match proto::decode(&link.next_for_guest().unwrap()).unwrap().msg {
            proto::Message::Reply { status, error, .. } => {
                assert_ne!(status, 0);
                assert!(error.contains("--fabric-listen"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_leaves_for_the_guest_once_quiesced() {
        let d = dma();
        let link = GuestLink::new(None, d.clone()).unwrap();
        link.queue(1, proto::Message::Event(proto::Event::Migrated));
        d.quiesce();
        assert!(link.next_for_guest().is_none());
        assert_eq!(
            link.take_waiting().len(),
            1,
            "the frame moves with the state"
        );
    }

    #[test]
    fn frames_restored_before_the_device_starts_wake_the_worker_again() {
        let link = GuestLink::new(Some(Arc::new(Unreachable::default())), dma()).unwrap();
        link.restore_waiting(vec![vec![1u8; 60]]);
        // The vring worker takes the wake-up while the RX queue is not ready yet, and
        // delivers nothing.
        assert!(link.rx_event.read().is_ok());
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            link.rx_event.read().is_ok(),
            "the waiting frame must wake the worker again"
        );
    }

    /// A VF whose peer never answers: it keeps every post, and completes only what the test
    /// pushes into its queue.
    #[derive(Default)]
    struct Unreachable {
        sends: Mutex<Vec<(u32, SendWr)>>,
        recvs: Mutex<u32>,
        cq: Mutex<VecDeque<proto::Completion>>,
    }

    impl Vf for Unreachable {
        fn register_mr(&self, _: u64, _: Vec<GpaRange>, _: Access) -> Result<u32, VerbsError> {
            Ok(1)
        }
        fn deregister_mr(&self, _: u32) -> Result<(), VerbsError> {
            Ok(())
        }
        fn create_qp(&self) -> Result<u32, VerbsError> {
            Ok(1)
        }
        fn create_qp_at(&self, qp: u32) -> Result<u32, VerbsError> {
            Ok(qp)
        }
        fn destroy_qp(&self, _: u32) -> Result<(), VerbsError> {
            Ok(())
        }
        fn connect_qp(&self, _: u32, _: &str, _: u32) -> Result<(), VerbsError> {
            Ok(())
        }
        fn post_send(&self, qp: u32, wr: SendWr) -> Result<(), VerbsError> {
            self.sends.lock().push((qp, wr));
            Ok(())
        }
        fn post_recv(&self, _: u32, _: RecvWr) -> Result<(), VerbsError> {
            *self.recvs.lock() += 1;
            Ok(())
        }
        fn poll_cq(&self, max: usize) -> Result<Vec<proto::Completion>, VerbsError> {
            let mut cq = self.cq.lock();
            let n = max.min(cq.len());
            Ok(cq.drain(..n).collect())
        }
        fn wait_cq(
            &self,
            max: usize,
            timeout: Duration,
        ) -> Result<Vec<proto::Completion>, VerbsError> {
            std::thread::sleep(timeout.min(Duration::from_millis(5)));
            self.poll_cq(max)
        }
    }

    fn post_send(seq: u32, qp: u32, wr_id: u64, len: u32) -> Vec<u8> {
        command(
            seq,
            proto::Message::PostSend {
                qp,
                wr_id,
                sge: proto::Sge {
                    addr: 0,
                    len,
                    lkey: 1,
                },
                op: proto::SendOp::Send { imm: None },
            },
        )
    }

    /// Every completion the guest was sent, waiting until `n` have come.
    fn completions(link: &GuestLink, n: usize) -> Vec<proto::Completion> {
        let mut out = vec![];
        for _ in 0..500 {
            while let Some(f) = link.next_for_guest() {
                if let proto::Message::Completions(cs) = proto::decode(&f).unwrap().msg {
                    out.extend(cs);
                }
            }
            if out.len() >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        out
    }

    #[test]
    fn held_sends_are_bounded_and_the_guest_gets_an_error_completion_for_each_refused() {
        let vf = Arc::new(Unreachable::default());
        let link = GuestLink::new(Some(vf.clone()), dma()).unwrap();
        // 40 sends of 8 MiB to a peer that never answers: the VF holds 64 MiB of them.
        for i in 0..40 {
            link.on_frame(&post_send(i, 1, u64::from(i), 8 << 20));
        }
        let held = (MAX_SEND_BYTES / (8 << 20)) as usize;
        assert_eq!(vf.sends.lock().len(), held);
        // Each send the VF took is measured from the TX queue; refused ones are not.
        assert_eq!(link.stats().op_latency.tx.ops, held as u64);
        let refused = completions(&link, 40 - held);
        assert_eq!(refused.len(), 40 - held);
        assert!(refused
            .iter()
            .all(|c| c.status == proto::Status::Flushed && c.opcode == proto::Opcode::Send));
        assert_eq!(refused[0].wr_id, held as u64);
        assert_eq!(link.refused_posts(), (40 - held) as u64);
        // A completion frees its send's room: the next post goes through.
        vf.cq.lock().push_back(proto::Completion {
            wr_id: 0,
            qp: 1,
            opcode: proto::Opcode::Send,
            status: proto::Status::RetryExceeded,
            byte_len: 0,
            imm: None,
        });
        assert_eq!(completions(&link, 1).len(), 1);
        link.on_frame(&post_send(99, 1, 99, 8 << 20));
        assert_eq!(vf.sends.lock().len(), held + 1);
        // A message over the size limit never reaches the VF.
        link.on_frame(&post_send(100, 2, 100, MAX_MESSAGE + 1));
        let c = completions(&link, 1);
        assert_eq!(
            (c[0].wr_id, c[0].status),
            (100, proto::Status::LocalLengthError)
        );
        assert_eq!(vf.sends.lock().len(), held + 1);
    }

    #[test]
    fn a_destroyed_qp_gives_back_the_room_its_posts_held() {
        let vf = Arc::new(Unreachable::default());
        let link = GuestLink::new(Some(vf.clone()), dma()).unwrap();
        let held = (MAX_SEND_BYTES / (8 << 20)) as u32;
        for i in 0..held {
            link.on_frame(&post_send(i, 1, u64::from(i), 8 << 20));
        }
        link.on_frame(&post_send(50, 2, 50, 8 << 20));
        assert_eq!(completions(&link, 1)[0].status, proto::Status::Flushed);
        // QP 1 goes, with its sends that never completed: their bytes are free again.
        link.on_frame(&command(51, proto::Message::DestroyQp { qp: 1 }));
        let reply = proto::decode(&link.next_for_guest().unwrap()).unwrap();
        assert_eq!(reply.seq, 51);
        assert!(matches!(reply.msg, proto::Message::Reply { status: 0, .. }));
        link.on_frame(&post_send(52, 2, 52, 8 << 20));
        assert_eq!(vf.sends.lock().len(), held as usize + 1);
        assert_eq!(link.refused_posts(), 1);
    }

    #[test]
    fn a_qp_send_queue_and_its_receives_have_a_depth() {
        let vf = Arc::new(Unreachable::default());
        let link = GuestLink::new(Some(vf.clone()), dma()).unwrap();
        for i in 0..=SEND_QUEUE_DEPTH as u32 {
            link.on_frame(&post_send(i, 3, u64::from(i), 8));
        }
        assert_eq!(vf.sends.lock().len(), SEND_QUEUE_DEPTH);
        // Another QP has its own queue.
        link.on_frame(&post_send(0, 4, 7, 8));
        assert_eq!(vf.sends.lock().len(), SEND_QUEUE_DEPTH + 1);
        let c = completions(&link, 1);
        assert_eq!((c.len(), c[0].qp), (1, 3));
        for i in 0..=RECV_QUEUE_DEPTH {
            link.on_frame(&command(
                i,
                proto::Message::PostRecv {
                    qp: 3,
                    wr_id: u64::from(i),
                    sge: proto::Sge {
                        addr: 0,
                        len: 64,
                        lkey: 1,
                    },
                },
            ));
        }
        assert_eq!(*vf.recvs.lock(), RECV_QUEUE_DEPTH);
        let c = completions(&link, 1);
        assert_eq!(
            (c[0].opcode, c[0].status, c[0].wr_id),
            (
                proto::Opcode::Recv,
                proto::Status::Flushed,
                u64::from(RECV_QUEUE_DEPTH)
            )
        );
    }

    #[test]
    fn a_full_reply_queue_stops_taking_guest_frames_and_drops_nothing() {
        let link = GuestLink::new(None, dma()).unwrap();
        let mut taken = 0;
        // 64,000 OPENs from a guest that posts no receive buffer: the worker takes frames
        // only while there is room for their replies.
        while taken < 64_000 {
            let room = link.tx_room();
            if room == 0 {
                break;
            }
            for _ in 0..room {
                link.on_frame(&command(taken, proto::Message::Open));
                taken += 1;
            }
        }
        assert_eq!(taken as usize, MAX_RX_FRAMES);
        assert_eq!(link.stats().frames_waiting, MAX_RX_FRAMES as u64);
        link.pause_tx(0);
        assert!(!link.resume_tx(), "no room yet");
        assert!(link.next_for_guest().is_some());
        assert!(link.resume_tx(), "room again: the worker takes TX frames");
        assert!(!link.resume_tx(), "once");
    }
}
