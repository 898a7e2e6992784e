//! The receive half of go-back-N: a peer's requests on a QP are applied strictly in PSN
//! order, each once. A duplicate (already applied; its ack was lost) is acked again without
//! being applied; a request from the future (after a gap) is dropped and answered, once per
//! gap, with a NAK ([`AckStatus::SequenceGap`]), so the sender goes back to the gap at once.
//! The bytes reach guest RAM only through the DMA engine.
//!
//! One stream applies to a QP: each connection serving a peer runs on its own thread, and the
//! newest one to apply to a QP owns it; an older connection that still carries requests for
//! that QP is refused and closed (a peer that redialled resends on its new one).
//!
//! A request to a QP whose peer's VF state is gone (`super::lost`), or to a VF that retired,
//! is refused with [`AckStatus::Gone`]: the requester fails its QP with `RemoteLost`.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::state::{complete, Qp, State};
use super::wire::{AckStatus, FrameOf};
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

/// The responder's own table, beside the QPs.
#[derive(Default)]
pub(super) struct Receive {
    /// Per local QP: the stream that applies to it and the gap a NAK was sent for.
    qps: HashMap<u32, RxQp>,
    /// Tests only: once armed, the next `apply` stops after its DMA and before `finish`,
    /// tells the test, and waits until the test lets it go on.
    #[cfg(test)]
    pause_after_dma: Option<PauseAfterDma>,
}

#[cfg(test)]
pub(super) struct PauseAfterDma {
    pub(super) reached: std::sync::mpsc::Sender<()>,
    pub(super) go_on: std::sync::mpsc::Receiver<()>,
}

impl Receive {
    /// A destroyed QP's receive side goes with it.
    pub(super) fn forget(&mut self, qp: u32) {
        self.qps.remove(&qp);
    }
}

/// A local QP's receive side, beside its PSNs.
#[derive(Default)]
struct RxQp {
    /// The stream (connection) that applies to this QP (0: none yet).
    stream: u64,
    /// The expected PSN a NAK was sent for: one NAK per gap, not one per dropped request.
    nak_for: Option<u64>,
}

/// The last stream number given out; each connection's thread takes one at its first request.
static STREAMS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static STREAM: Cell<u64> = const { Cell::new(0) };
}

/// The stream number of the calling connection thread.
fn this_stream() -> u64 {
    STREAM.with(|s| {
        if s.get() == 0 {
            s.set(STREAMS.fetch_add(1, Ordering::Relaxed) + 1);
        }
        s.get()
    })
}

/// A peer's request, as the responder needs it; the payload stays where it was read.
struct Request<'a> {
    src_qp: u32,
    dst_qp: u32,
    psn: u64,
    imm: Option<u32>,
    payload: &'a [u8],
    /// `(rkey, addr)` of an RDMA WRITE; `None` for a SEND.
    target: Option<(u32, u64)>,
}

impl<'a> Request<'a> {
    fn from_frame<P: AsRef<[u8]>>(frame: &'a FrameOf<P>) -> Option<Self> {
        match *frame {
            FrameOf::Write {
                src_qp,
                dst_qp,
                psn,
                rkey,
                addr,
                imm,
                ref payload,
            } => Some(Self {
                src_qp,
                dst_qp,
                psn,
                imm,
                payload: payload.as_ref(),
                target: Some((rkey, addr)),
            }),
            FrameOf::Send {
                src_qp,
                dst_qp,
                psn,
                imm,
                ref payload,
            } => Some(Self {
                src_qp,
                dst_qp,
                psn,
                imm,
                payload: payload.as_ref(),
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
pub(super) fn apply<P: AsRef<[u8]>>(inner: &Arc<Inner>, peer: &str, frame: FrameOf<P>) -> Outcome {
    let arrived = std::time::Instant::now();
    let Some(req) = Request::from_frame(&frame) else {
        return Outcome::Ack(AckStatus::RemoteInvalid);
    };
    // One request at a time from placement to `finish`: a peer that redials (its link broke)
    // resends from its first unacked request on a new connection while the old connection's
    // thread may still be applying it; without this, both would see the same expected PSN
    // and apply it twice.
    // Quiesce and export take this lock too, so they wait for a whole apply (DMA, PSN,
    // receive completion), never for half of one.
    let _applying = inner.applying.lock();
    if inner.retired.load(Ordering::SeqCst) {
        // This VM stopped: nothing lands in its RAM again, and the peer learns why.
        return Outcome::Ack(AckStatus::Gone);
    }
    if inner.moved.load(Ordering::SeqCst) {
        // The VM runs elsewhere now: the peer holds the request and finds it there.
        return Outcome::Close;
    }
    if let Err(outcome) = own_stream(inner, peer, &req) {
        return outcome;
    }
    let pieces = match place(inner, peer, &req) {
        Ok(pieces) => pieces,
        Err(outcome) => return outcome,
    };
    match dma_pieces(inner, &pieces, req.payload) {
        Some(Ok(())) => {
            #[cfg(test)]
            pause_after_dma(inner);
            finish(inner, &req, arrived)
        }
        Some(Err(())) => Outcome::Ack(AckStatus::RemoteAccess),
        None => Outcome::Close,
    }
}

#[cfg(test)]
fn pause_after_dma(inner: &Inner) {
    let pause = inner.rx.lock().pause_after_dma.take();
    if let Some(p) = pause {
        let _ = p.reached.send(());
        let _ = p.go_on.recv();
    }
}

/// One applying stream per QP: the calling connection takes the QP over if it is newer than
/// the one that applied to it so far; an older connection is refused and closed.
fn own_stream(inner: &Inner, peer: &str, req: &Request) -> Result<(), Outcome> {
    let me = this_stream();
    let mut rx = inner.rx.lock();
    let q = rx.qps.entry(req.dst_qp).or_default();
    if me < q.stream {
        tracing::warn!(
            peer,
            qp = req.dst_qp,
            psn = req.psn,
            "a request on an older connection for a QP a newer connection applies to: \
             refused, closing the older connection"
        );
        return Err(Outcome::Close);
    }
    if me > q.stream {
        if q.stream != 0 {
            tracing::debug!(
                peer,
                qp = req.dst_qp,
                "a newer connection of the peer now applies to the QP"
            );
        }
        q.stream = me;
    }
    Ok(())
}

/// The answer to a request after a gap: a NAK, once per gap; nothing for the rest.
fn after_gap(inner: &Inner, peer: &str, req: &Request, expected: u64) -> Outcome {
    let mut rx = inner.rx.lock();
    let q = rx.qps.entry(req.dst_qp).or_default();
    if q.nak_for == Some(expected) {
        return Outcome::Drop;
    }
    q.nak_for = Some(expected);
    tracing::info!(
        peer,
        qp = req.dst_qp,
        psn = req.psn,
        expected,
        "request after a sequence gap: dropped, NAK sent so the peer resends from the gap"
    );
    Outcome::Ack(AckStatus::SequenceGap)
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
    if q.lost {
        // The peer's VF state was lost before: this QP never works again.
        return Err(Outcome::Ack(AckStatus::Gone));
    }
    if req.psn < q.expected_psn {
        drop(st);
        inner.stats.lock().duplicates += 1;
        return Err(Outcome::Ack(AckStatus::Ok));
    }
    if req.psn > q.expected_psn {
        // From the future: go-back-N, the sender resends from the gap on the NAK.
        let expected = q.expected_psn;
        drop(st);
        return Err(after_gap(inner, peer, req, expected));
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
fn finish(inner: &Inner, req: &Request, arrived: std::time::Instant) -> Outcome {
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
        {
            let mut a = inner.arrivals.lock();
            if a.len() >= super::MAX_ARRIVALS {
                a.pop_front();
            }
            a.push_back((req.dst_qp, r.wr_id, arrived));
        }
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
                    // A quiesce waits for this apply: give up rather than wait for memory.
                    if inner.dma.gate_state().quiesced {
                        return None;
                    }
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

#[cfg(test)]
pub(super) mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::super::state::Pending;
    use super::super::wire::Frame;
    use super::super::{requester, ClusterMap, FabricAuth, FabricTiming, SoftVf};
    use super::*;
    use crate::memory::DmaEngine;
    use crate::vf::verbs::{Access, SendOp, SendWr, Sge};
    use crate::vf::{VfDevice, VfPersist};

    const BUF: u64 = 0x40_0000;

    pub(in crate::vf::soft) fn vm(name: &str) -> SoftVf {
        let ram = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("guest RAM"),
        );
        let dma = Arc::new(DmaEngine::new(ram));
        dma.adopt_memory();
        let timing = FabricTiming {
            retry_interval: Duration::from_millis(5),
            hold_timeout: Duration::from_secs(5),
            rnr_timeout: Duration::from_secs(5),
        };
        SoftVf::start(
            name,
            dma,
            "127.0.0.1:0",
            ClusterMap::default(),
            timing,
            FabricAuth::Insecure,
        )
        .expect("soft VF")
    }

    /// `vm` with one QP connected to `peer`'s QP 1 and one remotely writable region at `BUF`.
    fn target(name: &str, peer: &str) -> (SoftVf, u32, u32) {
        let vf = vm(name);
        vf.set_peer_address(peer, "127.0.0.1:1");
        let access = Access {
            local_write: true,
            remote_write: true,
        };
        let seg = vec![GpaRange {
            gpa: BUF,
            len: 64 << 10,
        }];
        let key = vf.register_mr(BUF, seg, access).unwrap();
        let qp = vf.create_qp();
        vf.connect_qp(qp, peer, 1).unwrap();
        (vf, qp, key)
    }

    fn write(dst_qp: u32, psn: u64, rkey: u32) -> Frame {
        Frame::Write {
            src_qp: 1,
            dst_qp,
            psn,
            rkey,
            addr: BUF + psn * 8,
            imm: None,
            payload: psn.to_le_bytes().to_vec(),
        }
    }

    fn expected(vf: &SoftVf, qp: u32) -> u64 {
        vf.inner.state.lock().qps[&qp].expected_psn
    }

    fn is_ack(o: &Outcome, want: AckStatus) -> bool {
        matches!(o, Outcome::Ack(s) if *s == want)
    }

    /// Applies a WRITE from `a` to `b`'s `qp` and pauses it after its DMA, before `finish`;
    /// runs `call` meanwhile, which must not return within 200 ms (`what` says what returned
    /// too early), then lets the apply go on. Returns the apply's outcome and `call`'s result.
    fn call_mid_apply<R: Send + 'static>(
        b: &SoftVf,
        qp: u32,
        key: u32,
        what: &str,
        call: impl FnOnce() -> R + Send + 'static,
    ) -> (Outcome, R) {
        let (reached_tx, reached) = mpsc::channel();
        let (go_on, go_on_rx) = mpsc::channel();
        b.inner.rx.lock().pause_after_dma = Some(PauseAfterDma {
            reached: reached_tx,
            go_on: go_on_rx,
        });
        let applier = {
            let inner = b.inner.clone();
            std::thread::spawn(move || apply(&inner, "a", write(qp, 1, key)))
        };
        reached.recv_timeout(Duration::from_secs(5)).unwrap();
        let (done_tx, done) = mpsc::channel();
        let caller = std::thread::spawn(move || {
            let r = call();
            let _ = done_tx.send(());
            r
        });
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "{what} returned while a request was half-applied"
        );
        go_on.send(()).unwrap();
        done.recv_timeout(Duration::from_secs(5)).unwrap();
        let r = caller.join().unwrap();
        (applier.join().unwrap(), r)
    }

    #[test]
    fn quiesce_and_export_wait_for_a_whole_apply_not_only_its_dma() {
        let (b, qp, key) = target("b", "a");
        // The DMA has landed; the PSN has not moved yet. A quiesce now must wait.
        let mut dev = b.clone();
        let (applied, ()) = call_mid_apply(&b, qp, key, "the quiesce", move || {
            dev.quiesce().unwrap();
        });
        assert!(
            is_ack(&applied, AckStatus::Ok),
            "the request was applied and acked"
        );
        let state = VfPersist::export_state(&b).unwrap();
        assert_eq!(
            state.qps[0].expected_psn, 2,
            "the export carries the acked request's PSN"
        );
    }

    #[test]
    fn a_qp_or_region_the_guest_gives_back_is_free_only_once_a_write_into_it_has_landed() {
        // The guest must not get its reply (and free the pages) before the write has landed.
        let (b, qp, key) = target("b", "a");
        let vf = b.clone();
        let (_, destroyed) = call_mid_apply(&b, qp, key, "DESTROY_QP", move || vf.destroy_qp(qp));
        destroyed.unwrap();
        let (b, qp, key) = target("b", "a");
        let vf = b.clone();
        let (_, deregistered) =
            call_mid_apply(&b, qp, key, "DEREG_MR", move || vf.deregister_mr(key));
        deregistered.unwrap();
    }

    #[test]
    fn a_request_after_a_gap_is_nakked_once_per_gap() {
        let (b, qp, key) = target("b", "a");
        assert!(is_ack(
            &apply(&b.inner, "a", write(qp, 2, key)),
            AckStatus::SequenceGap
        ));
        assert!(matches!(
            apply(&b.inner, "a", write(qp, 3, key)),
            Outcome::Drop
        ));
        assert!(is_ack(
            &apply(&b.inner, "a", write(qp, 1, key)),
            AckStatus::Ok
        ));
        // A new gap (PSN 2 is expected now) gets its own NAK.
        assert!(is_ack(
            &apply(&b.inner, "a", write(qp, 3, key)),
            AckStatus::SequenceGap
        ));
        assert_eq!(expected(&b, qp), 2);
    }

    #[test]
    fn an_older_connection_is_refused_once_a_newer_one_applies_to_the_qp() {
        let (b, qp, key) = target("b", "a");
        let (first_tx, first) = mpsc::channel();
        let (again_tx, again) = mpsc::channel::<()>();
        let older = {
            let inner = b.inner.clone();
            std::thread::spawn(move || {
                let one = apply(&inner, "a", write(qp, 1, key));
                first_tx.send(is_ack(&one, AckStatus::Ok)).unwrap();
                again.recv().unwrap();
                matches!(apply(&inner, "a", write(qp, 3, key)), Outcome::Close)
            })
        };
        assert!(first.recv().unwrap());
        let newer = {
            let inner = b.inner.clone();
            std::thread::spawn(move || {
                is_ack(&apply(&inner, "a", write(qp, 2, key)), AckStatus::Ok)
            })
        };
        assert!(newer.join().unwrap());
        again_tx.send(()).unwrap();
        assert!(
            older.join().unwrap(),
            "the older connection must be refused and closed"
        );
        assert_eq!(
            expected(&b, qp),
            3,
            "nothing applied from the older connection"
        );
    }

    #[test]
    fn a_vf_whose_state_moved_away_closes_the_link_instead_of_saying_not_ready() {
        // A peer whose dial to the VM's old place completes after the VM moved: "receiver not
        // ready" would keep it there until its RNR timeout failed the QP (a lost halo in
        // lu-lite); a close makes it hold the request and dial the new place.
        let (b, qp, key) = target("b", "a");
        assert!(is_ack(
            &apply(&b.inner, "a", write(qp, 1, key)),
            AckStatus::Ok
        ));
        b.inner.dma.quiesce();
        let state = b.export_state().unwrap();
        b.discard_state();
        assert!(matches!(
            apply(&b.inner, "a", write(qp, 2, key)),
            Outcome::Close
        ));
        // The VM comes back here (its state imported again): it serves again.
        b.import_state(state).unwrap();
        b.inner.dma.resume();
        assert!(is_ack(
            &apply(&b.inner, "a", write(qp, 2, key)),
            AckStatus::Ok
        ));
    }

    #[test]
    fn a_peer_with_a_new_epoch_has_its_qps_failed_and_their_requests_refused() {
        let (b, qp, key) = target("b", "a");
        b.set_peer_address("c", "127.0.0.1:1");
        let other = b.create_qp();
        b.connect_qp(other, "c", 1).unwrap();
        assert!(!b.on_peer_epoch("a", 7), "first sighting");
        assert!(!b.on_peer_epoch("c", 9), "first sighting");
        assert!(is_ack(
            &apply(&b.inner, "a", write(qp, 1, key)),
            AckStatus::Ok
        ));
        let recv = crate::vf::verbs::RecvWr {
            wr_id: 5,
            sge: Sge {
                addr: BUF,
                len: 64,
                lkey: key,
            },
        };
        b.post_recv(qp, recv).unwrap();
        b.post_recv(other, recv).unwrap();
        assert!(!b.on_peer_epoch("a", 7), "same companion");
        assert!(b.poll_cq(8).is_empty());
        assert!(b.on_peer_epoch("a", 8), "a restart");
        let done = b.poll_cq(8);
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(
            (done[0].wr_id, done[0].qp, done[0].status),
            (5, qp, Status::RemoteLost),
            "the posted receive wakes with the reason"
        );
        let applied = b.inner.stats.lock().requests_applied;
        // The new incarnation's requests to the failed QP, from PSN 1 or on: refused.
        for psn in [1, 2] {
            assert!(is_ack(
                &apply(&b.inner, "a", write(qp, psn, key)),
                AckStatus::Gone
            ));
        }
        assert_eq!(b.inner.stats.lock().requests_applied, applied);
        assert_eq!(b.inner.stats.lock().qps_lost, 1, "c's QP untouched");
    }

    fn write_wr(wr_id: u64, lkey: u32, rkey: u32) -> SendWr {
        SendWr {
            wr_id,
            sge: Sge {
                addr: BUF,
                len: 8,
                lkey,
            },
            op: SendOp::Write {
                remote_addr: BUF + 0x100,
                rkey,
                imm: None,
            },
        }
    }

    #[test]
    fn an_ack_beyond_the_highest_psn_sent_is_refused_and_the_request_stays_pending() {
        let (a, qp, key) = target("a", "b");
        a.post_send(qp, write_wr(1, key, key)).unwrap();
        requester::handle_ack(&a.inner, qp, u64::MAX, AckStatus::Ok);
        requester::handle_ack(&a.inner, qp, 2, AckStatus::Ok);
        assert!(a.poll_cq(8).is_empty(), "a forged ack completed a request");
        assert_eq!(a.inner.state.lock().qps[&qp].unacked.len(), 1);
        requester::handle_ack(&a.inner, qp, 1, AckStatus::Ok);
        assert_eq!(a.poll_cq(8).len(), 1);
    }

    #[test]
    fn acks_read_together_are_taken_in_order_each_as_if_alone() {
        use crate::vf::verbs::Status::{Flushed, RemoteAccessError, Success};
        let (a, qp, key) = target("a", "b");
        for id in 1..=4 {
            a.post_send(qp, write_wr(id, key, key)).unwrap();
        }
        requester::handle_acks(
            &a.inner,
            &[
                (qp, 2, AckStatus::Ok),           // covers PSNs 1 and 2
                (qp, 9, AckStatus::Ok),           // beyond what was sent: refused
                (qp, 3, AckStatus::RemoteAccess), // fails the QP: 3 fails, 4 is flushed
                (qp, 4, AckStatus::Ok),           // nothing left to complete
            ],
        );
        let got: Vec<_> = a.poll_cq(8).iter().map(|c| (c.wr_id, c.status)).collect();
        assert_eq!(
            got,
            [
                (1, Success),
                (2, Success),
                (3, RemoteAccessError),
                (4, Flushed)
            ]
        );
        assert_eq!(a.inner.stats.lock().malformed_frames, 1, "the forged ack");
    }

    #[test]
    fn a_request_lost_before_a_gap_is_resent_at_once_on_the_nak() {
        let (a, b) = (vm("a"), vm("b"));
        a.set_peer_address("b", b.listen_addr());
        b.set_peer_address("a", a.listen_addr());
        let access = Access {
            local_write: true,
            remote_write: true,
        };
        let seg = vec![GpaRange {
            gpa: BUF,
            len: 64 << 10,
        }];
        let ka = a.register_mr(BUF, seg.clone(), access).unwrap();
        let kb = b.register_mr(BUF, seg, access).unwrap();
        let (qa, qb) = (a.create_qp(), b.create_qp());
        a.connect_qp(qa, "b", qb).unwrap();
        b.connect_qp(qb, "a", qa).unwrap();
        a.post_send(qa, write_wr(1, ka, kb)).unwrap();
        assert_eq!(a.wait_cq(1, Duration::from_secs(5)).len(), 1);
        // PSN 2 goes out on the link and is lost on the way.
        {
            let generation = a.inner.links.lock()["b"].generation;
            let mut st = a.inner.state.lock();
            let q = st.qps.get_mut(&qa).unwrap();
            let wr = write_wr(2, ka, kb);
            let frame = requester::frame_for(qa, qb, 2, &wr, vec![2; 8]);
            q.next_psn = 3;
            q.unacked.push_back(Pending {
                psn: 2,
                wr,
                frame: Some(Arc::new(frame)),
                sent_on: generation,
                since: Instant::now(),
                rnr_since: None,
                retry_after: None,
            });
        }
        a.post_send(qa, write_wr(3, ka, kb)).unwrap();
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while done.len() < 2 && Instant::now() < deadline {
            done.extend(a.wait_cq(2, Duration::from_millis(100)));
        }
        let ids: Vec<_> = done.iter().map(|c| (c.wr_id, c.status)).collect();
        assert_eq!(
            ids,
            [
                (2, crate::vf::verbs::Status::Success),
                (3, crate::vf::verbs::Status::Success)
            ],
            "the lost request and the one after the gap complete within 2 s"
        );
        assert_eq!(expected(&b, qb), 4);
    }
}
