//! The soft VF's tables: memory regions, queue pairs with their go-back-N state, and the
//! completion queue.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::wire::Frame;
use super::Inner;
use crate::vf::verbs::{Completion, MemoryRegion, Opcode, RecvWr, SendOp, SendWr, Status};

/// `Pending::sent_on` of a request never sent.
pub(super) const NEVER_SENT: u64 = 0;

/// `Pending::sent_on` of a request that no live link carries (it must be sent again).
pub(super) const NOT_ON_A_LINK: u64 = u64::MAX;

/// A request sent (or to be sent) and not yet acknowledged.
pub(super) struct Pending {
    pub(super) psn: u64,
    pub(super) wr: SendWr,
    /// The request's frame; `None` after a migration until it is rebuilt from guest RAM
    /// (the destination has no guest RAM until its device starts).
    /// Shared, so that it is written to a link without a copy after the state lock is released.
    pub(super) frame: Option<Arc<Frame>>,
    /// Link generation it was last sent on (0: never sent).
    pub(super) sent_on: u64,
    pub(super) since: Instant,
    pub(super) rnr_since: Option<Instant>,
    pub(super) retry_after: Option<Instant>,
}

/// A reliable-connected queue pair.
pub(super) struct Qp {
    pub(super) peer: Option<(String, u32)>,
    pub(super) next_psn: u64,
    pub(super) expected_psn: u64,
    pub(super) recvs: VecDeque<RecvWr>,
    pub(super) unacked: VecDeque<Pending>,
    pub(super) error: bool,
    /// In error because the peer's VF state is gone ([`lose_qp`]): later posts fail at once
    /// with [`Status::RemoteLost`], and the peer's requests to it are refused.
    pub(super) lost: bool,
}

impl Qp {
    /// A new QP, not connected, both PSNs at 1.
    pub(super) fn new() -> Self {
        Self {
            peer: None,
            next_psn: 1,
            expected_psn: 1,
            recvs: VecDeque::new(),
            unacked: VecDeque::new(),
            error: false,
            lost: false,
        }
    }
}

/// Everything the verbs change, under one lock.
pub(super) struct State {
    pub(super) mrs: HashMap<u32, MemoryRegion>,
    pub(super) next_key: u32,
    pub(super) qps: HashMap<u32, Qp>,
    pub(super) next_qp: u32,
    pub(super) cq: VecDeque<Completion>,
    /// Payload buffers of acknowledged requests, for the next requests' data.
    pub(super) spare: Spare,
}

impl Default for State {
    fn default() -> Self {
        Self {
            mrs: HashMap::new(),
            next_key: 1,
            qps: HashMap::new(),
            next_qp: 1,
            cq: VecDeque::new(),
            spare: Spare::default(),
        }
    }
}

/// Bytes of payload buffers a VF keeps for reuse.
const SPARE_BYTES: usize = 8 << 20;
/// Largest payload buffer kept for reuse.
const SPARE_LARGEST: usize = 1 << 20;

/// Payload buffers kept from acknowledged requests, so that a request's data is read from
/// guest RAM into memory already touched rather than into a fresh, zero-filled allocation; at
/// most [`SPARE_BYTES`], none larger than [`SPARE_LARGEST`].
#[derive(Default)]
pub(super) struct Spare {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl Spare {
    /// A buffer of `len` bytes (their values are left over from its last use).
    pub(super) fn take(&mut self, len: usize) -> Vec<u8> {
        let mut b = match self.bufs.pop() {
            Some(b) => {
                self.bytes -= b.capacity();
                b
            }
            None => Vec::new(),
        };
        b.resize(len, 0);
        b
    }

    /// Keeps `b` for a later [`Self::take`], within the bounds.
    pub(super) fn give(&mut self, b: Vec<u8>) {
        let cap = b.capacity();
        if cap > 0 && cap <= SPARE_LARGEST && self.bytes + cap <= SPARE_BYTES {
            self.bytes += cap;
            self.bufs.push(b);
        }
    }

    /// Keeps the payload of a request's frame, if no link is still writing it.
    pub(super) fn give_frame(&mut self, frame: Option<Arc<Frame>>) {
        if let Some(Frame::Write { payload, .. } | Frame::Send { payload, .. }) =
            frame.and_then(|f| Arc::try_unwrap(f).ok())
        {
            self.give(payload);
        }
    }
}

/// A random id, neither 0 nor `u32::MAX`, for which `taken` is false: memory keys and QP
/// numbers that a stranger cannot guess from one it has seen.
pub(super) fn random_id(taken: impl Fn(u32) -> bool) -> u32 {
    loop {
        let mut b = [0u8; 4];
        if getrandom::fill(&mut b).is_err() {
            // No OS randomness (never seen on Linux): fall back to the clock, still not 1, 2, 3.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16))
                .unwrap_or(0x5eed);
            b = xxhash_rust::xxh3::xxh3_64(&t.to_le_bytes()).to_le_bytes()[..4]
                .try_into()
                .unwrap_or([7; 4]);
        }
        let id = u32::from_le_bytes(b);
        if id != 0 && id != u32::MAX && !taken(id) {
            return id;
        }
    }
}

impl State {
    /// Moves `next_key` on: the next in order, or (`random`) an unused, unpredictable one.
    pub(super) fn advance_key(&mut self, random: bool) {
        if !random {
            self.next_key = self.next_key.wrapping_add(1).max(1);
            return;
        }
        let mrs = &self.mrs;
        let now = self.next_key;
        self.next_key = random_id(|k| k == now || mrs.contains_key(&k));
    }

    /// Moves `next_qp` on: the next in order, or (`random`) an unused, unpredictable one.
    pub(super) fn advance_qp(&mut self, random: bool) {
        if !random {
            self.next_qp = self.next_qp.wrapping_add(1).max(1);
            return;
        }
        let qps = &self.qps;
        let now = self.next_qp;
        self.next_qp = random_id(|n| n == now || qps.contains_key(&n));
    }
}

/// The completion opcode of a send request.
pub(super) fn opcode_of(op: &SendOp) -> Opcode {
    match op {
        SendOp::Write { .. } => Opcode::Write,
        SendOp::Send { .. } => Opcode::Send,
    }
}

/// Posts a completion and wakes whoever waits for one.
pub(super) fn complete(st: &mut State, inner: &Inner, c: Completion) {
    st.cq.push_back(c);
    inner.cq_ready.notify_all();
}

/// The completion of a pending request.
pub(super) fn pending_completion(qp: u32, p: &Pending, status: Status) -> Completion {
    Completion {
        wr_id: p.wr.wr_id,
        qp,
        opcode: opcode_of(&p.wr.op),
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
pub(super) fn fail_qp(st: &mut State, inner: &Inner, qp: u32, status: Status) {
    let Some(q) = st.qps.get_mut(&qp) else { return };
    q.error = true;
    let mut done: Vec<Completion> = Vec::new();
    if let Some(p) = q.unacked.pop_front() {
        done.push(pending_completion(qp, &p, status));
    }
    for p in q.unacked.drain(..) {
        done.push(pending_completion(qp, &p, Status::Flushed));
    }
    // As on a real HCA, a QP in error flushes its posted receives: a guest that only waits
    // for the peer wakes with an error too (the cause's, when no send carried it).
    let mut cause = done.is_empty().then_some(status);
    done.extend(
        q.recvs
            .drain(..)
            .map(|r| recv_completion(qp, &r, cause.take().unwrap_or(Status::Flushed))),
    );
    for c in done {
        complete(st, inner, c);
    }
}

/// Moves a QP to the error state because the peer's VF state is gone: every posted receive
/// and every unacked or held send completes with [`Status::RemoteLost`], so a guest that waits
/// on the QP wakes with an error that says why. Returns false if it was lost already (or does
/// not exist).
pub(super) fn lose_qp(st: &mut State, inner: &Inner, qp: u32) -> bool {
    let Some(q) = st.qps.get_mut(&qp) else {
        return false;
    };
    if q.lost {
        return false;
    }
    q.error = true;
    q.lost = true;
    let mut done: Vec<Completion> = q
        .unacked
        .drain(..)
        .map(|p| pending_completion(qp, &p, Status::RemoteLost))
        .collect();
    done.extend(
        q.recvs
            .drain(..)
            .map(|r| recv_completion(qp, &r, Status::RemoteLost)),
    );
    for c in done {
        complete(st, inner, c);
    }
    true
}

/// The completion of a receive that a QP in error gives back unused, with `status`.
pub(super) fn recv_completion(qp: u32, r: &RecvWr, status: Status) -> Completion {
    Completion {
        wr_id: r.wr_id,
        qp,
        opcode: Opcode::Recv,
        status,
        byte_len: 0,
        imm: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_payload_buffers_stay_within_their_bounds() {
        let mut s = Spare::default();
        s.give(vec![0; SPARE_LARGEST + 1]);
        assert!(s.bufs.is_empty(), "a buffer above the largest kept size");
        for _ in 0..(SPARE_BYTES / SPARE_LARGEST) * 2 {
            s.give(Vec::with_capacity(SPARE_LARGEST));
        }
        assert!(s.bytes <= SPARE_BYTES, "{} bytes kept", s.bytes);
        let b = s.take(100);
        assert_eq!(b.len(), 100);
        assert_eq!(s.bytes, s.bufs.iter().map(Vec::capacity).sum::<usize>());
    }
}
