//! The send half of go-back-N: requests are numbered and kept until the target acks them,
//! sent in PSN order on the current link, sent again from the first unacked one after a
//! broken link or a "receiver not ready", and failed only after the hold or RNR timeout.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link;
use super::state::{
    fail_qp, lose_qp, opcode_of, pending_completion, Pending, Spare, State, NEVER_SENT,
    NOT_ON_A_LINK,
};
use super::wire::{AckStatus, Frame};
use super::{Inner, SoftVf};
use crate::memory::DmaError;
use crate::trace::steps;
use crate::vf::verbs::{Completion, MemoryRegion, SendOp, SendWr, Status, VerbsError};

/// Why a send request's local data could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum LocalReadError {
    /// The buffer is not inside a registered region.
    #[error("the local buffer is not inside a registered region")]
    NotRegistered,
    /// Guest RAM could not be read there.
    #[error("the local buffer could not be read from guest RAM")]
    Dma(#[from] DmaError),
}

impl SoftVf {
    /// Replays the requests held for peers now, rather than at the retry loop's next tick:
    /// the VM runs here now (its guest RAM arrived), so requests that moved with its state
    /// can be read and sent again.
    pub fn replay_now(&self) {
        kick(&self.inner);
    }

    /// Posts a send work request (WRITE, WRITE_WITH_IMM, SEND); it completes on the target's
    /// ack, or with an error status.
    pub fn post_send(&self, qp: u32, wr: SendWr) -> Result<(), VerbsError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let State {
            mrs,
            qps,
            cq,
            spare,
            ..
        } = &mut *st;
        let q = qps.get_mut(&qp).ok_or(VerbsError::NoSuchQp(qp))?;
        let fail = |cq: &mut std::collections::VecDeque<Completion>, status| {
            cq.push_back(Completion {
                wr_id: wr.wr_id,
                qp,
                opcode: opcode_of(&wr.op),
                status,
                byte_len: 0,
                imm: None,
            });
            inner.cq_ready.notify_all();
            Ok(())
        };
        if q.lost {
            return fail(cq, Status::RemoteLost);
        }
        if q.error {
            return fail(cq, Status::Flushed);
        }
        let Some((peer_vm, peer_qp)) = q.peer.clone() else {
            return fail(cq, Status::UnknownPeer);
        };
        let payload = match read_local(inner, mrs, &wr, spare) {
            Ok(p) => p,
            Err(_) => return fail(cq, Status::LocalProtectionError),
        };
        let psn = q.next_psn;
        q.next_psn += 1;
        let frame = frame_for(qp, peer_qp, psn, &wr, payload);
        q.unacked.push_back(Pending {
            psn,
            wr,
            frame: Some(Arc::new(frame)),
            sent_on: NEVER_SENT,
            since: Instant::now(),
            rnr_since: None,
            retry_after: None,
        });
        drop(st);
        flush_qp(inner, qp, &peer_vm);
        Ok(())
    }
}

/// Reads a send request's local data from guest RAM, checking it lies in one of `mrs`, into
/// a buffer from `spare`.
pub(super) fn read_local(
    inner: &Inner,
    mrs: &HashMap<u32, MemoryRegion>,
    wr: &SendWr,
    spare: &mut Spare,
) -> Result<Vec<u8>, LocalReadError> {
    let pieces = mrs
        .get(&wr.sge.lkey)
        .and_then(|m| m.translate(wr.sge.addr, u64::from(wr.sge.len)))
        .ok_or(LocalReadError::NotRegistered)?;
    let mut payload = spare.take(wr.sge.len as usize);
    let mut at = 0usize;
    for p in pieces {
        let end = at.saturating_add(p.len as usize);
        let read = match payload.get_mut(at..end) {
            Some(dst) => inner
                .dma
                .read_into(p.gpa, dst)
                .map_err(LocalReadError::from),
            None => Err(LocalReadError::NotRegistered),
        };
        if let Err(e) = read {
            spare.give(payload);
            return Err(e);
        }
        at = end;
    }
    Ok(payload)
}

/// The fabric frame of a send request.
pub(super) fn frame_for(qp: u32, peer_qp: u32, psn: u64, wr: &SendWr, payload: Vec<u8>) -> Frame {
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

/// Sends every request of `qp` that the current link has not carried yet, in PSN order.
///
/// Lock order: the link's writer, then the state; the frames (shared, not copied) are taken
/// under the state lock and written after it is released, so the link's ack reader (which needs
/// the state) keeps draining acks while a large write blocks on a full socket.
pub(super) fn flush_qp(inner: &Arc<Inner>, qp: u32, peer_vm: &str) {
    if inner.dma.gate_state().quiesced {
        return; // the VM is switching over: its requests move with its state
    }
    let Some(link) = link::link_to(inner, peer_vm) else {
        return; // held: the retry loop tries again
    };
    let mut w = link.writer.lock();
    let (mut first, mut again) = (0u64, 0u64);
    let frames: Vec<Arc<Frame>> = {
        let mut st = inner.state.lock();
        let State {
            mrs, qps, spare, ..
        } = &mut *st;
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
                match read_local(inner, mrs, &p.wr, spare) {
                    Ok(payload) => {
                        p.frame = Some(Arc::new(frame_for(qp, peer_qp, p.psn, &p.wr, payload)))
                    }
                    Err(_) => break, // no guest RAM yet: the retry loop comes back
                }
            }
            let Some(frame) = &p.frame else { break };
            if p.sent_on == NEVER_SENT {
                first += 1;
            } else {
                again += 1;
            }
            out.push(frame.clone());
            p.sent_on = link.generation;
            p.retry_after = None;
        }
        out
    };
    let sent = frames.iter().all(|f| w.frame(&**f).is_ok()) && w.flush().is_ok();
    if !sent {
        link.alive.store(false, Ordering::SeqCst);
    }
    drop(w);
    if again > 0 && sent {
        steps::first("replay-sent", peer_vm);
    }
    let mut s = inner.stats.lock();
    s.requests_sent += first;
    s.requests_replayed += again;
}

/// Takes the target's ack of `psn` on `qp`: completes what it covers, or goes back after an
/// RNR or a NAK, or fails the QP. An ack of a PSN this QP never sent is refused (logged; what
/// it would cover stays pending).
pub(super) fn handle_ack(inner: &Arc<Inner>, qp: u32, psn: u64, status: AckStatus) {
    let mut st = inner.state.lock();
    // Checked under the state lock: an export (after the quiesce) then sees every ack taken
    // before it and none after.
    if inner.dma.gate_state().quiesced {
        return; // after the switchover the destination owns completions
    }
    let Some(q) = st.qps.get_mut(&qp) else {
        return;
    };
    if psn >= q.next_psn {
        let highest_sent = q.next_psn - 1;
        drop(st);
        tracing::warn!(
            qp,
            psn,
            highest_sent,
            ?status,
            "ack of a PSN this QP never sent: refused, its requests stay pending"
        );
        inner.stats.lock().malformed_frames += 1;
        return;
    }
    match status {
        AckStatus::Ok => {
            steps::first("first-ack", "");
            if take_ok(&mut st, qp, psn) > 0 {
                inner.cq_ready.notify_all();
            }
        }
        AckStatus::SequenceGap => {
            // The target expects an earlier request than `psn`: all that is unacked goes again,
            // from the first, on the retry loop's next turn (not from this ack reader, which
            // must keep draining acks while the frames are written).
            let mut again = 0usize;
            for p in q.unacked.iter_mut().filter(|p| p.sent_on != NEVER_SENT) {
                p.sent_on = NOT_ON_A_LINK;
                again += 1;
            }
            drop(st);
            tracing::info!(
                qp,
                psn,
                again,
                "NAK (sequence gap) from the target: resending from the first unacked request"
            );
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
        AckStatus::Gone => {
            if lose_qp(&mut st, inner, qp) {
                let peer = q_peer(&st, qp);
                inner.stats.lock().qps_lost += 1;
                drop(st);
                tracing::warn!(
                    qp,
                    psn,
                    ?peer,
                    "the target's VF state for this QP is gone (its VM stopped, or it lost ours                      before): the QP fails with RemoteLost"
                );
            }
        }
    }
}

/// Queues the completions of what an ack of `psn` (status Ok) covers on `qp`, without waking
/// the completion queue's waiters; returns how many.
fn take_ok(st: &mut State, qp: u32, psn: u64) -> usize {
    let State { qps, cq, spare, .. } = st;
    let Some(q) = qps.get_mut(&qp) else { return 0 };
    let mut n = 0;
    while q.unacked.front().is_some_and(|p| p.psn <= psn) {
        if let Some(p) = q.unacked.pop_front() {
            cq.push_back(pending_completion(qp, &p, Status::Success));
            spare.give_frame(p.frame);
            n += 1;
        }
    }
    n
}

/// Takes acks read together from one link, in order: those of an `Ok` the QP expects under one
/// state lock and with one wake-up of the completion queue's waiters (not one per ack, which
/// woke the poster once per 4 KiB request), the others through [`handle_ack`].
pub(super) fn handle_acks(inner: &Arc<Inner>, acks: &[(u32, u64, AckStatus)]) {
    let mut done = 0;
    let mut st = inner.state.lock();
    for &(qp, psn, status) in acks {
        // The quiesce is checked under the state lock, as `handle_ack` does.
        let plain = status == AckStatus::Ok
            && st.qps.get(&qp).is_some_and(|q| psn < q.next_psn)
            && !inner.dma.gate_state().quiesced;
        if plain {
            done += take_ok(&mut st, qp, psn);
        } else {
            parking_lot::MutexGuard::unlocked(&mut st, || handle_ack(inner, qp, psn, status));
        }
    }
    drop(st);
    if done > 0 {
        steps::first("first-ack", "");
        inner.cq_ready.notify_all();
    }
}

/// The peer VM of `qp`, for logs.
fn q_peer(st: &State, qp: u32) -> Option<String> {
    st.qps.get(&qp)?.peer.as_ref().map(|(p, _)| p.clone())
}

/// Retries held requests; fails those held too long.
pub(super) fn retry_loop(inner: &Arc<Inner>) {
    while !inner.closed.load(Ordering::SeqCst) {
        {
            let mut kicked = inner.retry_kick.lock();
            if !*kicked {
                inner
                    .retry_wake
                    .wait_for(&mut kicked, inner.timing.retry_interval);
            }
            *kicked = false;
        }
        if inner.dma.gate_state().quiesced {
            continue;
        }
        for (qp, vm) in held_work(inner) {
            // A dead link means the peer moved or restarted: start a new one and replay.
            let alive = inner
                .links
                .lock()
                .get(&vm)
                .is_some_and(|l| l.alive.load(Ordering::SeqCst));
            if !alive {
                let mut st = inner.state.lock();
                if let Some(q) = st.qps.get_mut(&qp) {
                    for p in q.unacked.iter_mut() {
                        if p.sent_on != NEVER_SENT {
                            p.sent_on = NOT_ON_A_LINK;
                        }
                    }
                }
            }
            flush_qp(inner, qp, &vm);
        }
    }
}

/// Makes the retry loop turn now rather than at its next tick: a held request can go (a peer
/// announced its new place, or guest RAM arrived for requests that moved here).
pub(super) fn kick(inner: &Inner) {
    *inner.retry_kick.lock() = true;
    inner.retry_wake.notify_one();
}

/// The QPs with requests held for a peer, as `(qp, peer VM)`; QPs whose oldest request was
/// held past the hold timeout are failed instead.
fn held_work(inner: &Inner) -> Vec<(u32, String)> {
    let mut st = inner.state.lock();
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
}
