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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use vfmig_proto as proto;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::DmaEngine;
use crate::vf::verbs::{Access, GpaRange, RecvWr, SendWr, VerbsError};
use crate::vf::Vf;

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

/// The guest's end of the VF.
pub struct GuestLink {
    vf: Option<Arc<dyn Vf>>,
    dma: Arc<DmaEngine>,
    rx: Mutex<VecDeque<Vec<u8>>>,
    /// Written when frames are queued; the vring worker then fills the receive queue.
    pub rx_event: EventFd,
    guest_mac: Mutex<[u8; 6]>,
    counters: Counters,
    /// Held while completions move from the VF's queue to the RX queue, so an export sees
    /// each completion in exactly one of them.
    pump: Mutex<()>,
}

impl GuestLink {
    /// A guest link to the verbs of `vf` (none: the companion has no VF; commands get an
    /// error reply).
    pub fn new(vf: Option<Arc<dyn Vf>>, dma: Arc<DmaEngine>) -> std::io::Result<Arc<Self>> {
        let link = Arc::new(Self {
            vf,
            dma,
            rx: Mutex::new(VecDeque::new()),
            rx_event: EventFd::new(EFD_NONBLOCK)?,
            guest_mac: Mutex::new([0xff; 6]),
            counters: Counters::default(),
            pump: Mutex::new(()),
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
        }
    }

    fn pump_completions(&self) {
        let Some(vf) = &self.vf else { return };
        loop {
            if self.dma.gate_state().quiesced {
                // Completions stay in the VF's queue and move with its state.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let _pump = self.pump.lock();
            let cs = match vf.wait_cq(proto::MAX_COMPLETIONS, Duration::from_millis(50)) {
                Ok(cs) => cs,
                Err(e) => {
                    // A VF whose completions are not the companion's (a VFIO VF's are in the
                    // HCA's queues): nothing to pump.
                    tracing::info!(reason = %e, "no completions to forward to the guest");
                    return;
                }
            };
            if cs.is_empty() {
                continue;
            }
            let msg = proto::Message::Completions(cs);
            self.queue(0, msg);
        }
    }

    /// Queues a frame for the guest.
    pub fn queue(&self, seq: u32, msg: proto::Message) {
        let frame = proto::encode(&proto::Frame {
            dst: *self.guest_mac.lock(),
            src: proto::COMPANION_MAC,
            seq,
            msg,
        });
        self.rx.lock().push_back(frame);
        let _ = self.rx_event.write(1);
    }

    /// Takes the next frame for the guest, unless the device is quiesced.
    pub fn next_for_guest(&self) -> Option<Vec<u8>> {
        if self.dma.gate_state().quiesced {
            return None;
        }
        self.rx.lock().pop_front()
    }

    /// Puts back a frame that found no receive buffer.
    pub fn put_back(&self, frame: Vec<u8>) {
        self.rx.lock().push_front(frame);
    }

    /// Counts a frame written into the guest's receive queue.
    pub fn delivered(&self) {
        self.counters.to_guest.fetch_add(1, Ordering::Relaxed);
    }

    /// Frames waiting for the guest, taken for a migration (with the pump stopped).
    pub fn take_waiting(&self) -> Vec<Vec<u8>> {
        let _pump = self.pump.lock();
        self.rx.lock().drain(..).collect()
    }

    /// Queues frames that waited at the source.
    pub fn restore_waiting(&self, frames: Vec<Vec<u8>>) {
        let mut rx = self.rx.lock();
        for f in frames.into_iter().rev() {
            rx.push_front(f);
        }
        drop(rx);
        let _ = self.rx_event.write(1);
    }

    /// Handles one frame the guest transmitted (without the virtio-net header).
    pub fn on_frame(&self, bytes: &[u8]) {
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
            proto::Message::ConnectQp { qp, peer, peer_qp } => {
                Some(vf.connect_qp(qp, &peer, peer_qp).map(|_| 0))
            }
            proto::Message::PostSend {
                qp,
                wr_id,
                sge: s,
                op,
            } => {
                if let Err(err) = vf.post_send(qp, SendWr { wr_id, sge: s, op }) {
                    tracing::warn!(error = %err, "POST_SEND refused");
                }
                None
            }
            proto::Message::PostRecv { qp, wr_id, sge: s } => {
                if let Err(err) = vf.post_recv(qp, RecvWr { wr_id, sge: s }) {
                    tracing::warn!(error = %err, "POST_RECV refused");
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
}
