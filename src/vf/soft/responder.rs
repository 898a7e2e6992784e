//! The receive half of go-back-N: a peer's requests on a QP are applied strictly in PSN
//! order, each once. A duplicate (already applied; its ack was lost) is acked again without
//! being applied; a request from the future (after a gap) is dropped, and the sender goes back
//! to the gap. The bytes reach guest RAM only through the DMA engine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::state::{complete, Qp, State};
use super::wire::{AckStatus, Frame};
use super::Inner;
use crate::memory::DmaError;
use crate::vf::verbs::{Completion, GpaRange, MemoryRegion, Opcode, Status};

/// What to do after a request.
pub(super) enum Outcome {
    /// Acknowledge with this status.
    Ack(AckStatus),
    /// Neither apply nor acknowledge.
    Drop,
    /// Close the connection.
    Close,
}

/// A peer's request, as the responder needs it.
struct Request {
    src_qp: u32,
    dst_qp: u32,
    psn: u64,
    imm: Option<u32>,
    payload: Vec<u8>,
    /// `(rkey, addr)` of an RDMA WRITE; `None` for a SEND.
    target: Option<(u32, u64)>,
}

impl Request {
    fn from_frame(frame: Frame) -> Option<Self> {
        match frame {
            Frame::Write {
                src_qp,
                dst_qp,
                psn,
                rkey,
                addr,
                imm,
                payload,
            } => Some(Self {
                src_qp,
                dst_qp,
                psn,
                imm,
                payload,
                target: Some((rkey, addr)),
            }),
            Frame::Send {
                src_qp,
                dst_qp,
                psn,
                imm,
                payload,
            } => Some(Self {
                src_qp,
                dst_qp,
                psn,
                imm,
                payload,
                target: None,
            }),
            _ => None,
        }
    }

    fn len(&self) -> u64 {
        self.payload.len() as u64
    }

    /// Whether it completes a posted receive: a SEND, or a WRITE with immediate.
    fn consumes_recv(&self) -> bool {
        self.target.is_none() || self.imm.is_some()
    }
}

/// Applies a request from `peer`.
pub(super) fn apply(inner: &Arc<Inner>, peer: &str, frame: Frame) -> Outcome {
    let Some(req) = Request::from_frame(frame) else {
        return Outcome::Ack(AckStatus::RemoteInvalid);
    };
    // One request at a time from placement to `finish`: a peer that redials (its link broke)
    // resends from its first unacked request on a new connection while the old connection's
    // thread may still be applying it; without this, both would see the same expected PSN
    // and apply it twice.
    let _applying = inner.applying.lock();
    let pieces = match place(inner, peer, &req) {
        Ok(pieces) => pieces,
        Err(outcome) => return outcome,
    };
    match dma_pieces(inner, &pieces, &req.payload) {
        Some(Ok(())) => finish(inner, &req),
        Some(Err(())) => Outcome::Ack(AckStatus::RemoteAccess),
        None => Outcome::Close,
    }
}

/// Where the request's bytes go, if it is the next in order and allowed; otherwise what to
/// answer (an out-of-order or refused request changes nothing but the error paths' PSN and
/// completions).
fn place(inner: &Inner, peer: &str, req: &Request) -> Result<Vec<GpaRange>, Outcome> {
    let mut st = inner.state.lock();
    let State { mrs, qps, cq, .. } = &mut *st;
    // A QP the target has not created or connected yet is a peer not ready yet (ranks set
    // up their QPs at their own pace): "receiver not ready", retried until the RNR timeout.
    let Some(q) = qps.get_mut(&req.dst_qp) else {
        return Err(Outcome::Ack(AckStatus::ReceiverNotReady));
    };
    match &q.peer {
        None => return Err(Outcome::Ack(AckStatus::ReceiverNotReady)),
        Some(p) if *p != (peer.to_string(), req.src_qp) => {
            return Err(Outcome::Ack(AckStatus::NoSuchQp))
        }
        Some(_) => {}
    }
    if req.psn < q.expected_psn {
        drop(st);
        inner.stats.lock().duplicates += 1;
        return Err(Outcome::Ack(AckStatus::Ok));
    }
    if req.psn > q.expected_psn {
        return Err(Outcome::Drop); // from the future: go-back-N, the sender resends from the gap
    }
    if req.consumes_recv() && q.recvs.is_empty() {
        return Err(Outcome::Ack(AckStatus::ReceiverNotReady));
    }
    match req.target {
        Some((rkey, addr)) => remote_target(mrs, q, rkey, addr, req.len()),
        None => receive_target(mrs, q, req).map_err(|failed| {
            cq.push_back(failed);
            inner.cq_ready.notify_all();
            Outcome::Ack(AckStatus::RemoteInvalid)
        }),
    }
}

/// The guest-physical pieces an RDMA WRITE lands in: inside region `rkey`, which must allow
/// remote writes. A refused write still takes its PSN.
fn remote_target(
    mrs: &HashMap<u32, MemoryRegion>,
    q: &mut Qp,
    rkey: u32,
    addr: u64,
    len: u64,
) -> Result<Vec<GpaRange>, Outcome> {
    let pieces = mrs
        .get(&rkey)
        .filter(|m| m.access.remote_write)
        .and_then(|m| m.translate(addr, len));
    pieces.ok_or_else(|| {
        q.expected_psn += 1;
        Outcome::Ack(AckStatus::RemoteAccess)
    })
}

/// The guest-physical pieces a SEND lands in: the first posted receive's buffer. If it does
/// not fit or is not writable, the receive completes with an error (returned) and the request
/// takes its PSN.
fn receive_target(
    mrs: &HashMap<u32, MemoryRegion>,
    q: &mut Qp,
    req: &Request,
) -> Result<Vec<GpaRange>, Completion> {
    let Some(recv) = q.recvs.front().copied() else {
        // Checked by the caller; kept for a total function.
        return Ok(Vec::new());
    };
    let len = req.len();
    let fits = len <= u64::from(recv.sge.len);
    let pieces = mrs
        .get(&recv.sge.lkey)
        .filter(|m| m.access.local_write)
        .and_then(|m| m.translate(recv.sge.addr, len));
    match (fits, pieces) {
        (true, Some(p)) => Ok(p),
        (fits, _) => {
            q.recvs.pop_front();
            q.expected_psn += 1;
            Err(Completion {
                wr_id: recv.wr_id,
                qp: req.dst_qp,
                opcode: Opcode::Recv,
                status: if fits {
                    Status::LocalProtectionError
                } else {
                    Status::LocalLengthError
                },
                byte_len: 0,
                imm: req.imm,
            })
        }
    }
}

/// After the bytes landed: the QP expects the next PSN, and the receive (if any) completes.
fn finish(inner: &Inner, req: &Request) -> Outcome {
    let mut st = inner.state.lock();
    let Some(q) = st.qps.get_mut(&req.dst_qp) else {
        return Outcome::Ack(AckStatus::NoSuchQp);
    };
    q.expected_psn += 1;
    let recv = if req.consumes_recv() {
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
                qp: req.dst_qp,
                opcode: if req.target.is_some() {
                    Opcode::RecvRdmaWithImm
                } else {
                    Opcode::Recv
                },
                status: Status::Success,
                byte_len: req.len() as u32,
                imm: req.imm,
            },
        );
    }
    drop(st);
    inner.stats.lock().requests_applied += 1;
    Outcome::Ack(AckStatus::Ok)
}

/// Writes `payload` into guest RAM at the pieces, as the device. `None` when the device is
/// quiesced (the request must not be acked).
fn dma_pieces(inner: &Inner, pieces: &[GpaRange], payload: &[u8]) -> Option<Result<(), ()>> {
    let mut at = 0usize;
    for p in pieces {
        let Some(chunk) = payload.get(at..at.saturating_add(p.len as usize)) else {
            return Some(Err(())); // the pieces are longer than the data: refuse, never panic
        };
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
