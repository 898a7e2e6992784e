//! The soft VF between two VMs in one process: real TCP on loopback, real guest-memory
//! mappings, the real DMA engine.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::memory::{DmaEngine, DmaError};
use crate::vf::verbs::{
    Access, Completion, GpaRange, Opcode, RecvWr, SendOp, SendWr, Sge, Status, VerbsError,
};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const RAM: usize = 16 << 20;
/// Buffers live at this GPA in both test VMs; the guest calls it address 0x7000_0000.
const BUF_GPA: u64 = 0x40_0000;
const BUF_VA: u64 = 0x7000_0000;

struct TestVm {
    vf: SoftVf,
    dma: Arc<DmaEngine>,
}

fn vm(name: &str) -> TestVm {
    vm_retrying_every(name, Duration::from_millis(5))
}

/// A test VM whose retry loop ticks every `retry_interval`.
fn vm_retrying_every(name: &str, retry_interval: Duration) -> TestVm {
    let ram = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).expect("guest RAM"),
    );
    let dma = Arc::new(DmaEngine::new(ram));
    dma.adopt_memory();
    let timing = FabricTiming {
        retry_interval,
        hold_timeout: Duration::from_secs(5),
        rnr_timeout: Duration::from_secs(5),
    };
    let vf = SoftVf::start(
        name,
        dma.clone(),
        "127.0.0.1:0",
        ClusterMap::default(),
        timing,
        test_auth(name),
    )
    .expect("soft VF");
    TestVm { vf, dma }
}

/// Two VMs that know each other, with a 64 KiB region each (their keys).
fn known_pair() -> (TestVm, TestVm, u32, u32) {
    let (a, b) = (vm("a"), vm("b"));
    a.vf.set_peer_address("b", b.vf.listen_addr());
    b.vf.set_peer_address("a", a.vf.listen_addr());
    let access = Access {
        local_write: true,
        remote_write: true,
    };
    let seg = vec![GpaRange {
        gpa: BUF_GPA,
        len: 64 << 10,
    }];
    let ka = a.vf.register_mr(BUF_VA, seg.clone(), access).unwrap();
    let kb = b.vf.register_mr(BUF_VA, seg, access).unwrap();
    (a, b, ka, kb)
}

/// Two VMs that know each other, with one connected QP each and a 64 KiB region each.
fn pair() -> (TestVm, TestVm, u32, u32, u32, u32) {
    let (a, b, ka, kb) = known_pair();
    let (qa, qb) = (a.vf.create_qp(), b.vf.create_qp());
    a.vf.connect_qp(qa, "b", qb).unwrap();
    b.vf.connect_qp(qb, "a", qa).unwrap();
    (a, b, qa, qb, ka, kb)
}

fn one(vf: &SoftVf) -> Completion {
    let c = vf.wait_cq(1, Duration::from_secs(10));
    assert_eq!(c.len(), 1, "no completion within 10 s");
    c[0]
}

fn write_wr(
    wr_id: u64,
    lkey: u32,
    rkey: u32,
    len: u32,
    remote_off: u64,
    imm: Option<u32>,
) -> SendWr {
    SendWr {
        wr_id,
        sge: Sge {
            addr: BUF_VA,
            len,
            lkey,
        },
        op: SendOp::Write {
            remote_addr: BUF_VA + remote_off,
            rkey,
            imm,
        },
    }
}

#[test]
fn a_write_lands_in_the_target_guest_ram_before_it_completes() {
    let (a, b, qa, _qb, ka, kb) = pair();
    a.dma.write(BUF_GPA, b"hello, fabric").unwrap();
    a.vf.post_send(qa, write_wr(7, ka, kb, 13, 0x100, None))
        .unwrap();
    let c = one(&a.vf);
    assert_eq!(
        (c.wr_id, c.status, c.opcode, c.byte_len),
        (7, Status::Success, Opcode::Write, 13)
    );
    assert_eq!(b.dma.read(BUF_GPA + 0x100, 13).unwrap(), b"hello, fabric");
    assert!(
        b.vf.poll_cq(8).is_empty(),
        "a plain WRITE completes nothing at the target"
    );
    assert_eq!(
        b.dma.stats().writes,
        1,
        "the write went through the target's DMA engine"
    );
}

#[test]
fn write_with_immediate_consumes_a_receive_at_the_target() {
    let (a, b, qa, qb, ka, kb) = pair();
    b.vf.post_recv(
        qb,
        RecvWr {
            wr_id: 99,
            sge: Sge {
                addr: BUF_VA,
                len: 0,
                lkey: kb,
            },
        },
    )
    .unwrap();
    a.vf.post_send(qa, write_wr(1, ka, kb, 64, 0x800, Some(0xfeed)))
        .unwrap();
    assert_eq!(one(&a.vf).status, Status::Success);
    let c = one(&b.vf);
    assert_eq!(
        (c.wr_id, c.opcode, c.imm, c.byte_len, c.status),
        (
            99,
            Opcode::RecvRdmaWithImm,
            Some(0xfeed),
            64,
            Status::Success
        )
    );
}

#[test]
fn send_lands_in_the_posted_receive_and_waits_for_one() {
    let (a, b, qa, qb, ka, kb) = pair();
    a.dma.write(BUF_GPA, &[0xab; 100]).unwrap();
    // No receive posted yet: the sender is told "not ready" and retries.
    a.vf.post_send(
        qa,
        SendWr {
            wr_id: 5,
            sge: Sge {
                addr: BUF_VA,
                len: 100,
                lkey: ka,
            },
            op: SendOp::Send { imm: None },
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        a.vf.poll_cq(1).is_empty(),
        "completed before a receive was posted"
    );
    b.vf.post_recv(
        qb,
        RecvWr {
            wr_id: 6,
            sge: Sge {
                addr: BUF_VA + 0x1000,
                len: 4096,
                lkey: kb,
            },
        },
    )
    .unwrap();
    let c = one(&a.vf);
    assert_eq!(
        (c.wr_id, c.status, c.opcode),
        (5, Status::Success, Opcode::Send)
    );
    let r = one(&b.vf);
    assert_eq!((r.wr_id, r.opcode, r.byte_len), (6, Opcode::Recv, 100));
    assert_eq!(b.dma.read(BUF_GPA + 0x1000, 100).unwrap(), vec![0xab; 100]);
    // When the SEND came off the fabric is kept for the companion's latency, once.
    let arrived = b.vf.arrival(qb, 6).expect("the receive's arrival is kept");
    assert!(arrived.elapsed() < Duration::from_secs(10));
    assert!(b.vf.arrival(qb, 6).is_none(), "taken once");
    assert!(
        a.vf.arrival(qa, 5).is_none(),
        "a send's completion has none"
    );
}

#[test]
fn writes_on_a_qp_apply_in_order() {
    let (a, b, qa, _qb, ka, kb) = pair();
    for i in 0..200u32 {
        // Each write carries its own number from a distinct local slot.
        a.dma
            .write(BUF_GPA + u64::from(i) * 8, &u64::from(i).to_le_bytes())
            .unwrap();
        let mut wr = write_wr(u64::from(i), ka, kb, 8, 0x8000, None);
        wr.sge.addr = BUF_VA + u64::from(i) * 8;
        a.vf.post_send(qa, wr).unwrap();
    }
    let mut ids = vec![];
    while ids.len() < 200 {
        for c in a.vf.wait_cq(64, Duration::from_secs(10)) {
            assert_eq!(c.status, Status::Success);
            ids.push(c.wr_id);
        }
    }
    assert_eq!(
        ids,
        (0..200).collect::<Vec<_>>(),
        "completions in posting order"
    );
    assert_eq!(
        b.dma.read(BUF_GPA + 0x8000, 8).unwrap(),
        199u64.to_le_bytes()
    );
}

#[test]
fn bad_requests_complete_with_errors_and_write_nothing() {
    let (a, b, qa, _qb, ka, kb) = pair();
    let before = b.dma.read(BUF_GPA, 64 << 10).unwrap();
    // Local buffer outside the sender's regions.
    let mut wr = write_wr(1, ka, kb, 16, 0, None);
    wr.sge.addr = BUF_VA + (64 << 10) - 8;
    a.vf.post_send(qa, wr).unwrap();
    assert_eq!(one(&a.vf).status, Status::LocalProtectionError);
    let mut wr = write_wr(2, 999, kb, 16, 0, None);
    wr.sge.lkey = 999;
    a.vf.post_send(qa, wr).unwrap();
    assert_eq!(one(&a.vf).status, Status::LocalProtectionError);
    // A bad rkey: remote access error; the QP then flushes, as in InfiniBand RC.
    a.vf.post_send(qa, write_wr(3, ka, kb + 77, 16, 0, None))
        .unwrap();
    assert_eq!(one(&a.vf).status, Status::RemoteAccessError);
    a.vf.post_send(qa, write_wr(4, ka, kb, 16, 0, None))
        .unwrap();
    assert_eq!(one(&a.vf).status, Status::Flushed);
    // A write past the region's end, on a fresh QP pair.
    let (qa2, qb2) = (a.vf.create_qp(), b.vf.create_qp());
    a.vf.connect_qp(qa2, "b", qb2).unwrap();
    b.vf.connect_qp(qb2, "a", qa2).unwrap();
    a.vf.post_send(qa2, write_wr(5, ka, kb, 16, (64 << 10) - 8, None))
        .unwrap();
    assert_eq!(one(&a.vf).status, Status::RemoteAccessError);
    assert_eq!(
        b.dma.read(BUF_GPA, 64 << 10).unwrap(),
        before,
        "nothing was written"
    );
    assert_eq!(b.dma.stats().writes, 0);
    // An unknown peer, and a QP never connected.
    assert_eq!(
        a.vf.connect_qp(qa2, "nobody", 1),
        Err(VerbsError::UnknownPeer("nobody".into()))
    );
    let q = a.vf.create_qp();
    a.vf.post_send(q, write_wr(6, ka, kb, 8, 0, None)).unwrap();
    assert_eq!(one(&a.vf).status, Status::UnknownPeer);
    // A region outside guest RAM.
    assert!(matches!(
        a.vf.register_mr(
            0,
            vec![GpaRange {
                gpa: 1 << 40,
                len: 4096
            }],
            Access::default()
        ),
        Err(VerbsError::SegmentOutsideRam { .. })
    ));
}

#[test]
fn a_broken_link_is_replayed_and_nothing_is_applied_twice() {
    let (a, b, qa, qb, ka, kb) = pair();
    const N: u64 = 300;
    for i in 0..N {
        b.vf.post_recv(
            qb,
            RecvWr {
                wr_id: i,
                sge: Sge {
                    addr: BUF_VA + 0x1000,
                    len: 64,
                    lkey: kb,
                },
            },
        )
        .unwrap();
    }
    let addr = b.vf.listen_addr().to_string();
    for i in 0..N {
        a.vf.post_send(
            qa,
            SendWr {
                wr_id: i,
                sge: Sge {
                    addr: BUF_VA,
                    len: 64,
                    lkey: ka,
                },
                op: SendOp::Send {
                    imm: Some(i as u32),
                },
            },
        )
        .unwrap();
        if i % 37 == 0 {
            // Break the link mid-stream: what was sent and not yet acked goes again.
            a.vf.set_peer_address("b", &addr);
        }
    }
    let mut sent = vec![];
    while sent.len() < N as usize {
        for c in a.vf.wait_cq(64, Duration::from_secs(10)) {
            assert_eq!(c.status, Status::Success, "{c:?}");
            sent.push(c.wr_id);
        }
    }
    let mut got = vec![];
    while got.len() < N as usize {
        let cs = b.vf.wait_cq(64, Duration::from_secs(10));
        assert!(!cs.is_empty(), "receives missing: {} of {N}", got.len());
        got.extend(cs.iter().map(|c| c.imm.unwrap()));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(b.vf.poll_cq(8).is_empty(), "a request was applied twice");
    assert_eq!(
        got,
        (0..N as u32).collect::<Vec<_>>(),
        "each applied once, in order"
    );
    assert_eq!(sent, (0..N).collect::<Vec<_>>());
    let (sa, sb) = (a.vf.stats(), b.vf.stats());
    eprintln!("sender: {sa:?}\nreceiver: {sb:?}");
    assert!(
        sa.requests_replayed > 0,
        "the link breaks did not force any replay"
    );
}

#[test]
fn requests_to_an_unreachable_peer_are_held_then_delivered() {
    let (a, b, qa, _qb, ka, kb) = pair();
    let real = b.vf.listen_addr().to_string();
    // Point "b" at a port nobody listens on: the peer is away (migrating).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    a.vf.set_peer_address("b", &dead_addr);
    a.dma.write(BUF_GPA, b"held").unwrap();
    a.vf.post_send(qa, write_wr(1, ka, kb, 4, 0x40, None))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(a.vf.poll_cq(1).is_empty(), "must be held, not failed");
    assert_eq!(a.vf.stats().held, 1);
    a.vf.set_peer_address("b", &real);
    assert_eq!(one(&a.vf).status, Status::Success);
    assert_eq!(b.dma.read(BUF_GPA + 0x40, 4).unwrap(), b"held");
}

#[test]
fn a_quiesced_target_applies_nothing_and_the_sender_holds() {
    let (a, b, qa, _qb, ka, kb) = pair();
    b.dma.quiesce();
    a.vf.post_send(qa, write_wr(1, ka, kb, 8, 0, None)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(a.vf.poll_cq(1).is_empty());
    assert_eq!(b.dma.stats().writes, 0);
    b.dma.resume();
    assert_eq!(one(&a.vf).status, Status::Success);
    assert_eq!(b.dma.stats().writes, 1);
}

fn recv_wr(wr_id: u64, key: u32) -> RecvWr {
    RecvWr {
        wr_id,
        sge: Sge {
            addr: BUF_VA + 0x2000,
            len: 64,
            lkey: key,
        },
    }
}

fn send_wr(wr_id: u64, key: u32, imm: u32) -> SendWr {
    SendWr {
        wr_id,
        sge: Sge {
            addr: BUF_VA,
            len: 64,
            lkey: key,
        },
        op: SendOp::Send { imm: Some(imm) },
    }
}

/// Copies all of one test VM's guest RAM into another's: what precopy does.
fn copy_ram(from: &TestVm, to: &TestVm) {
    for off in (0..RAM as u64).step_by(1 << 20) {
        let bytes = from.dma.read(off, 1 << 20).unwrap();
        to.dma.write(off, &bytes).unwrap();
    }
}

#[test]
fn a_vm_migrates_mid_stream_and_every_operation_happens_exactly_once() {
    let (a, b, qa, qb, ka, kb) = pair();
    const N: u64 = 600; // a → b
    const M: u64 = 200; // b → a
    for i in 0..N {
        b.vf.post_recv(qb, recv_wr(i, kb)).unwrap();
    }
    for i in 0..M {
        a.vf.post_recv(qa, recv_wr(i, ka)).unwrap();
    }
    // The destination companion of "b", on its own port, not yet known to "a".
    let b2 = vm("b");
    b2.vf.set_peer_address("a", a.vf.listen_addr());
    // The destination's address is in the cluster file (its `hosts`), so "a" takes its announce.
    a.vf.allow_address(b2.vf.listen_addr());

    let a_vf = a.vf.clone();
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            a_vf.post_send(qa, send_wr(i, ka, i as u32)).unwrap();
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    for i in 0..M {
        b.vf.post_send(qb, send_wr(1_000_000 + i, kb, i as u32))
            .unwrap();
    }
    // Let some of the stream land, as the guest's driver would take completions from "b".
    let mut b_got: Vec<Completion> = vec![];
    while b_got.iter().filter(|c| c.opcode == Opcode::Recv).count() < (N / 3) as usize {
        b_got.extend(b.vf.wait_cq(64, Duration::from_secs(10)));
    }
    // Requests that "b" applies but whose acks never reach "a" (lost with the link): "a"
    // replays them to the destination, which must recognise them as done. (Acks are
    // cumulative, so every ack from here to the quiesce is lost.)
    b.vf.inner.swallow_acks.store(u64::MAX, Ordering::SeqCst);
    let applied = b.vf.stats().requests_applied;
    while b.vf.stats().requests_applied < applied + 20 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Switchover: quiesce, take the state, stop the source; RAM arrives by precopy.
    b.dma.quiesce();
    let state = b.vf.export_state().expect("export");
    assert_eq!(state.epoch, b.vf.epoch(), "the epoch moves with the state");
    b.vf.close();
    copy_ram(&b, &b2);
    assert_ne!(b2.vf.epoch(), b.vf.epoch());
    b2.vf.import_state(state).expect("import");
    assert_eq!(
        b2.vf.epoch(),
        b.vf.epoch(),
        "the destination speaks with b's epoch"
    );
    assert_eq!(b2.vf.announce(), vec!["a".to_string()]);
    sender.join().unwrap();

    // Everything b's guest sees, before and after the move.
    let deadline = Instant::now() + Duration::from_secs(20);
    let count = |cs: &[Completion], op| cs.iter().filter(|c| c.opcode == op).count() as u64;
    while (count(&b_got, Opcode::Recv) < N || count(&b_got, Opcode::Send) < M)
        && Instant::now() < deadline
    {
        b_got.extend(b2.vf.wait_cq(64, Duration::from_millis(200)));
    }
    let mut a_got: Vec<Completion> = vec![];
    while (count(&a_got, Opcode::Recv) < M || count(&a_got, Opcode::Send) < N)
        && Instant::now() < deadline
    {
        a_got.extend(a.vf.wait_cq(64, Duration::from_millis(200)));
    }
    std::thread::sleep(Duration::from_millis(100));
    b_got.extend(b2.vf.poll_cq(1024));
    a_got.extend(a.vf.poll_cq(1024));
    for c in a_got.iter().chain(&b_got) {
        assert_eq!(c.status, Status::Success, "{c:?}");
    }
    let imms = |cs: &[Completion], op| {
        let mut v: Vec<u32> = cs
            .iter()
            .filter(|c| c.opcode == op)
            .map(|c| c.imm.unwrap())
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(
        imms(&b_got, Opcode::Recv),
        (0..N as u32).collect::<Vec<_>>(),
        "a → b: each once"
    );
    assert_eq!(
        imms(&a_got, Opcode::Recv),
        (0..M as u32).collect::<Vec<_>>(),
        "b → a: each once"
    );
    assert_eq!(
        count(&a_got, Opcode::Send),
        N,
        "a's sends each completed once"
    );
    assert_eq!(
        count(&b_got, Opcode::Send),
        M,
        "b's sends each completed once"
    );
    let (sa, sb2) = (a.vf.stats(), b2.vf.stats());
    eprintln!("a: {sa:?}\nb2: {sb2:?}");
    assert!(
        sb2.duplicates >= 20,
        "the destination saw the replayed, already applied requests"
    );
    assert_eq!(sa.qps_lost, 0, "a took b's move for a restart");
    assert!(sa.requests_replayed >= 20);
}

#[test]
fn a_peer_replays_its_held_requests_as_soon_as_the_vm_announces_its_new_place() {
    // Retry ticks far apart: only the announce itself can make "a" replay in time.
    let tick = Duration::from_secs(30);
    let (a, b) = (vm_retrying_every("a", tick), vm_retrying_every("b", tick));
    a.vf.set_peer_address("b", b.vf.listen_addr());
    b.vf.set_peer_address("a", a.vf.listen_addr());
    let access = Access {
        local_write: true,
        remote_write: true,
    };
    let seg = vec![GpaRange {
        gpa: BUF_GPA,
        len: 64 << 10,
    }];
    let ka = a.vf.register_mr(BUF_VA, seg.clone(), access).unwrap();
    let kb = b.vf.register_mr(BUF_VA, seg, access).unwrap();
    let (qa, qb) = (a.vf.create_qp(), b.vf.create_qp());
    a.vf.connect_qp(qa, "b", qb).unwrap();
    b.vf.connect_qp(qb, "a", qa).unwrap();
    b.vf.post_recv(qb, recv_wr(1, kb)).unwrap();

    // "b" stops for its switchover: what "a" sends now is held.
    b.dma.quiesce();
    a.vf.post_send(qa, send_wr(7, ka, 7)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.vf.poll_cq(1).is_empty(), "nothing lands at a quiesced VM");
    let state = b.vf.export_state().unwrap();
    b.vf.close();
    let b2 = vm_retrying_every("b", tick);
    copy_ram(&b, &b2);
    b2.vf.set_peer_address("a", a.vf.listen_addr());
    a.vf.allow_address(b2.vf.listen_addr());
    b2.vf.import_state(state).unwrap();
    let announced = Instant::now();
    assert_eq!(b2.vf.announce(), vec!["a".to_string()]);

    let c = a.vf.wait_cq(1, Duration::from_secs(5));
    assert_eq!(c.len(), 1, "the held request waited for the retry tick");
    assert_eq!((c[0].wr_id, c[0].status), (7, Status::Success));
    assert!(announced.elapsed() < Duration::from_secs(5));
    assert_eq!(b2.vf.wait_cq(1, Duration::from_secs(5))[0].imm, Some(7));
}

#[test]
fn a_quiesce_ends_a_wait_for_completions_at_once() {
    use crate::vf::VfDevice;
    let t = vm("a");
    let vf = t.vf.clone();
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        let got = vf.wait_cq(1, Duration::from_secs(30));
        (got.len(), started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut dev = t.vf.clone();
    dev.quiesce().unwrap();
    let (got, waited) = waiter.join().unwrap();
    assert_eq!(got, 0);
    assert!(
        waited < Duration::from_secs(5),
        "the waiter (the guest link's pump, which an export waits for) held on for {waited:?}"
    );
    // Quiesced, a wait does not even begin.
    assert!(t.vf.wait_cq(1, Duration::from_secs(30)).is_empty());
}

#[test]
fn export_needs_a_quiesced_device() {
    let (_a, b, ..) = pair();
    assert!(matches!(
        b.vf.export_state(),
        Err(StateError::NotQuiesced(_))
    ));
    let other = vm("c");
    b.dma.quiesce();
    let st = b.vf.export_state().unwrap();
    assert!(matches!(
        other.vf.import_state(st),
        Err(StateError::WrongVm { .. })
    ));
}

#[test]
fn state_of_another_version_is_refused_with_both_versions_named() {
    let (_a, b, ..) = pair();
    b.dma.quiesce();
    let mut st = b.vf.export_state().unwrap();
    assert_eq!(st.version, VF_STATE_VERSION);
    let b2 = vm("b");
    st.version = VF_STATE_VERSION + 1;
    let e = b2.vf.import_state(st.clone()).unwrap_err();
    assert!(
        matches!(e, StateError::Version { got, want, .. } if got == VF_STATE_VERSION + 1 && want == VF_STATE_VERSION),
        "{e:?}"
    );
    let msg = e.to_string();
    let (theirs, ours) = (
        format!("version {}", VF_STATE_VERSION + 1),
        format!("version {VF_STATE_VERSION}"),
    );
    assert!(msg.contains(&theirs) && msg.contains(&ours), "{msg}");
    // A state from before versions has none: it reads as version 0 and is refused too.
    let mut json = serde_json::to_value(&st).unwrap();
    json.as_object_mut().unwrap().remove("version");
    let old: VfState = serde_json::from_value(json).unwrap();
    assert!(matches!(
        b2.vf.import_state(old),
        Err(StateError::Version { got: 0, .. })
    ));
    st.version = VF_STATE_VERSION;
    b2.vf.import_state(st).expect("the same version is taken");
}

#[test]
fn a_peer_that_has_not_set_up_its_qp_yet_is_waited_for() {
    let (a, b) = (vm("a"), vm("b"));
    a.vf.set_peer_address("b", b.vf.listen_addr());
    b.vf.set_peer_address("a", a.vf.listen_addr());
    let access = Access {
        local_write: true,
        remote_write: true,
    };
    let seg = vec![GpaRange {
        gpa: BUF_GPA,
        len: 64 << 10,
    }];
    let ka = a.vf.register_mr(BUF_VA, seg.clone(), access).unwrap();
    let qa = a.vf.create_qp();
    // The number b's next QP gets (random, not yet drawn for a QP): it does not exist yet.
    let qb_next = b.vf.inner.state.lock().next_qp;
    a.vf.connect_qp(qa, "b", qb_next).unwrap();
    a.vf.post_send(
        qa,
        SendWr {
            wr_id: 1,
            sge: Sge {
                addr: BUF_VA,
                len: 8,
                lkey: ka,
            },
            op: SendOp::Send { imm: Some(7) },
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        a.vf.poll_cq(1).is_empty(),
        "must wait for the peer, not fail"
    );
    let kb = b.vf.register_mr(BUF_VA, seg, access).unwrap();
    let qb = b.vf.create_qp();
    b.vf.connect_qp(qb, "a", qa).unwrap();
    b.vf.post_recv(qb, recv_wr(5, kb)).unwrap();
    assert_eq!(one(&a.vf).status, Status::Success);
    assert_eq!(one(&b.vf).imm, Some(7));
}

#[test]
fn the_device_side_syncs_engine_writes_and_quiesces_the_engine() {
    use crate::vf::{DirtyTracking, VfDevice};
    let t = vm("dev");
    let mut dev = t.vf.clone();
    assert_eq!(dev.dirty_tracking(), DirtyTracking::DmaEngine);
    assert_eq!(dev.name(), "dev");
    t.dma.write(0x3000, &[1; 10]).unwrap();
    t.dma.write(0x5ff0, &[1; 32]).unwrap(); // pages 5 and 6
    let mut got = vec![];
    assert_eq!(dev.sync_dirty(&mut |g, l| got.push((g, l))).unwrap(), 3);
    assert_eq!(got, vec![(0x3000, 4096), (0x5000, 4096), (0x6000, 4096)]);
    assert_eq!(dev.sync_dirty(&mut |_, _| {}).unwrap(), 0, "nothing new");
    t.dma.write(0x9000, &[1]).unwrap();
    got.clear();
    assert_eq!(dev.sync_dirty(&mut |g, l| got.push((g, l))).unwrap(), 1);
    assert_eq!(got, vec![(0x9000, 4096)]);
    assert_eq!(
        t.dma.device_dirty_bitmap().count(),
        4,
        "statistics untouched"
    );
    // A new epoch starts from its own bitmap.
    t.dma.set_log_requested(true);
    assert_eq!(dev.sync_dirty(&mut |_, _| {}).unwrap(), 0);

    let q = dev.quiesce().unwrap();
    assert!(q.was_bus_master);
    assert!(dev.status().quiesced);
    assert_eq!(t.dma.write(0, &[1]).unwrap_err(), DmaError::Quiesced);
    dev.resume().unwrap();
    assert!(!dev.status().quiesced);
    assert_eq!(dev.status().mapped_bytes, RAM as u64);
    assert!(!dev.reset().unwrap().performed);
    dev.release().unwrap();
    dev.release().unwrap();
    assert!(dev.status().released);
}

// ---- The fabric's front door: authentication and bounds (issue 10). ----

fn vm_insecure(name: &str) -> TestVm {
    let ram = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).expect("guest RAM"),
    );
    let dma = Arc::new(DmaEngine::new(ram));
    dma.adopt_memory();
    let vf = SoftVf::start(
        name,
        dma.clone(),
        "127.0.0.1:0",
        ClusterMap::default(),
        FabricTiming::default(),
        FabricAuth::Insecure,
    )
    .expect("soft VF");
    TestVm { vf, dma }
}

/// A WRITE of "forged" into a's buffer, as if from b's QP.
fn forged_write(qb: u32, qa: u32, ka: u32) -> wire::Frame {
    wire::Frame::Write {
        src_qp: qb,
        dst_qp: qa,
        psn: 1,
        rkey: ka,
        addr: BUF_VA,
        imm: None,
        payload: b"forged".to_vec(),
    }
}

/// Whether anything arrives on `s` within a moment (an ack would).
fn answered(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(n) if n > 0)
}

#[test]
fn a_bare_tcp_client_claiming_to_be_a_peer_gets_nothing_applied() {
    use std::io::Write;
    let (a, b, qa, qb, ka, _) = pair();
    let mut s = std::net::TcpStream::connect(a.vf.listen_addr()).unwrap();
    let mut bytes = wire::encode(&wire::Frame::Hello {
        vm: "b".into(),
        listen: b.vf.listen_addr().into(),
        announce: false,
    });
    bytes.extend(wire::encode(&forged_write(qb, qa, ka)));
    let _ = s.write_all(&bytes);
    assert!(!answered(&mut s), "a stranger's write was acknowledged");
    assert_eq!(a.vf.stats().requests_applied, 0);
    assert_eq!(a.dma.read(BUF_GPA, 6).unwrap(), vec![0; 6]);
}

#[test]
fn a_member_cannot_speak_for_another_member() {
    use std::io::Write;
    let (a, _b, qa, qb, ka, _) = pair();
    let FabricAuth::Keys(km) = test_auth("m") else {
        unreachable!()
    };
    let deadline = || Instant::now() + Duration::from_secs(5);
    // m holds the job key and its own key, and claims to be b: the handshake fails.
    let mut s = std::net::TcpStream::connect(a.vf.listen_addr()).unwrap();
    let r = auth::initiate(&km, "b", 1, "a", &mut s, deadline());
    assert!(r.is_err(), "m passed the handshake as b");
    // m, as itself, says hello as b: refused after the handshake.
    let mut s = std::net::TcpStream::connect(a.vf.listen_addr()).unwrap();
    let sess = auth::initiate(&km, "m", 1, "a", &mut s, deadline()).expect("m is a member");
    let mut w = auth::FrameWriter::new(s.try_clone().unwrap(), Some(sess.send_key));
    let _ = w.frame(&wire::Frame::Hello {
        vm: "b".into(),
        listen: "127.0.0.1:1".into(),
        announce: false,
    });
    let _ = w.frame(&forged_write(qb, qa, ka));
    let _ = w.flush();
    assert!(!answered(&mut s), "m's write as b was acknowledged");
    assert_eq!(a.vf.stats().requests_applied, 0);
    assert_eq!(a.dma.read(BUF_GPA, 6).unwrap(), vec![0; 6]);
}

#[test]
fn a_forged_announce_does_not_repoint_the_link() {
    use std::io::Write;
    let (a, b, _, _, _, _) = pair();
    let attacker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let evil = attacker.local_addr().unwrap().to_string();
    // A stranger, without keys.
    let mut s = std::net::TcpStream::connect(a.vf.listen_addr()).unwrap();
    let _ = s.write_all(&wire::encode(&wire::Frame::Hello {
        vm: "b".into(),
        listen: evil.clone(),
        announce: true,
    }));
    assert!(!answered(&mut s));
    // b itself, authenticated, announcing an address outside the cluster: refused too.
    let FabricAuth::Keys(kb) = test_auth("b") else {
        unreachable!()
    };
    let mut s = std::net::TcpStream::connect(a.vf.listen_addr()).unwrap();
    let sess = auth::initiate(
        &kb,
        "b",
        1,
        "a",
        &mut s,
        Instant::now() + Duration::from_secs(5),
    )
    .expect("b is b");
    let mut w = auth::FrameWriter::new(s.try_clone().unwrap(), Some(sess.send_key));
    let _ = w.frame(&wire::Frame::Hello {
        vm: "b".into(),
        listen: evil.clone(),
        announce: true,
    });
    let _ = w.flush();
    assert!(!answered(&mut s));
    // And an announce for a VM outside the cluster adds no peer.
    let mut s = std::net::TcpStream::connect(a.vf.listen_addr()).unwrap();
    let _ = s.write_all(&wire::encode(&wire::Frame::Hello {
        vm: "intruder".into(),
        listen: evil.clone(),
        announce: true,
    }));
    assert!(!answered(&mut s));
    let book = a.vf.inner.book.lock().clone();
    assert_eq!(
        book["b"],
        b.vf.listen_addr(),
        "the link to b was re-pointed"
    );
    assert!(!book.contains_key("intruder"));
    attacker.set_nonblocking(true).unwrap();
    assert!(
        attacker.accept().is_err(),
        "a dialled the attacker's address"
    );
}

#[test]
fn many_connections_that_send_a_length_prefix_leave_the_vf_serving() {
    use std::io::Write;
    let (a, b, qa, _qb, ka, kb) = pair();
    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut s = std::net::TcpStream::connect(b.vf.listen_addr()).unwrap();
        let _ = s.write_all(&((wire::MAX_PAYLOAD + 64) as u32).to_le_bytes());
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(b.vf.inner.conns.lock().handshaking.len() <= link::MAX_HANDSHAKING);
    a.dma.write(BUF_GPA, b"still here").unwrap();
    a.vf.post_send(qa, write_wr(1, ka, kb, 10, 0x100, None))
        .unwrap();
    assert_eq!(one(&a.vf).status, Status::Success);
    assert_eq!(b.dma.read(BUF_GPA + 0x100, 10).unwrap(), b"still here");
}

/// A listening address whose accept queue is full: a connect to it hangs (a black hole).
fn black_hole() -> (std::os::fd::OwnedFd, String, Vec<std::net::TcpStream>) {
    use nix::sys::socket::{
        bind, getsockname, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let local: SockaddrIn = getsockname(fd.as_raw_fd()).unwrap();
    let addr = format!("127.0.0.1:{}", local.port());
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    let mut fill = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(100)) {
            Ok(s) => fill.push(s),
            Err(_) => break,
        }
    }
    (fd, addr, fill)
}

#[test]
fn black_holed_peers_do_not_stall_an_announce_past_its_deadline() {
    let a = vm_insecure("a");
    let (_fd, hole, _fill) = black_hole();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = silent.local_addr().unwrap().to_string();
    for i in 0..20 {
        let addr = if i % 2 == 0 { &hole } else { &silent };
        a.vf.set_peer_address(&format!("x{i}"), addr);
    }
    let t = Instant::now();
    let reached = a.vf.announce();
    let took = t.elapsed();
    assert!(
        took < ANNOUNCE_DEADLINE * 2,
        "announce took {took:?} with 20 unresponsive peers"
    );
    assert!(reached.len() <= 10, "{reached:?}");
}

#[test]
fn memory_keys_and_qp_numbers_are_not_predictable() {
    let t = vm("x");
    t.vf.randomize_ids();
    let access = Access {
        local_write: true,
        remote_write: true,
    };
    let seg = vec![GpaRange {
        gpa: BUF_GPA,
        len: 4096,
    }];
    let keys: Vec<u32> = (0..8)
        .map(|_| t.vf.register_mr(BUF_VA, seg.clone(), access).unwrap())
        .collect();
    let qps: Vec<u32> = (0..8).map(|_| t.vf.create_qp()).collect();
    for ids in [&keys, &qps] {
        let sequential = ids
            .windows(2)
            .filter(|w| w[1] == w[0].wrapping_add(1))
            .count();
        assert_eq!(sequential, 0, "{ids:?}");
        assert!(ids.iter().all(|&i| i != 0 && i > 64), "{ids:?}");
        let mut u = ids.to_vec();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), ids.len(), "{ids:?}");
    }
    // Another VF draws others.
    let other = vm("y");
    other.vf.randomize_ids();
    assert_ne!(other.vf.create_qp(), qps[0]);
}

// ---- Peers whose VF state is gone: a new epoch, `Gone`, a retired VF. ----

/// Posts a receive on `qp` and checks that nothing completes yet.
fn waiting_recv(t: &TestVm, qp: u32, key: u32, wr_id: u64) {
    t.vf.post_recv(qp, recv_wr(wr_id, key)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(t.vf.poll_cq(8).is_empty(), "a receive completed by itself");
}

/// Checks that `qp` is failed with RemoteLost: later posts complete at once with it.
fn posts_fail_with_remote_lost(t: &TestVm, qp: u32, key: u32) {
    t.vf.post_send(qp, write_wr(90, key, key, 8, 0, None))
        .unwrap();
    let c = one(&t.vf);
    assert_eq!((c.wr_id, c.status), (90, Status::RemoteLost), "{c:?}");
    t.vf.post_recv(qp, recv_wr(91, key)).unwrap();
    let c = one(&t.vf);
    assert_eq!((c.wr_id, c.status), (91, Status::RemoteLost), "{c:?}");
}

#[test]
fn a_restarted_peer_fails_the_qps_connected_to_it_even_where_only_a_receive_waits() {
    let (a, b, qa, qb, ka, kb) = pair();
    // a and b know each other's epochs: one write each way.
    a.vf.post_send(qa, write_wr(1, ka, kb, 8, 0, None)).unwrap();
    b.vf.post_send(qb, write_wr(2, kb, ka, 8, 0, None)).unwrap();
    assert_eq!(one(&a.vf).status, Status::Success);
    assert_eq!(one(&b.vf).status, Status::Success);
    // a waits for b's next message, and sends nothing.
    waiting_recv(&a, qa, ka, 7);
    // b's companion restarts: a new process, none of b's QPs or regions, a new epoch.
    b.vf.close();
    let b_new = vm("b");
    assert_ne!(b_new.vf.epoch(), b.vf.epoch());
    a.vf.set_peer_address("b", b_new.vf.listen_addr());
    let c = one(&a.vf);
    assert_eq!(
        (c.wr_id, c.qp, c.opcode, c.status),
        (7, qa, Opcode::Recv, Status::RemoteLost),
        "the waiting receive wakes with the reason"
    );
    assert_eq!(a.vf.stats().qps_lost, 1);
    posts_fail_with_remote_lost(&a, qa, ka);
}

/// A link to `to` authenticated as `from` (with `epoch`), its hello said: what a peer's
/// companion opens.
fn speak_as(from: &str, epoch: u64, to: &TestVm) -> (auth::FrameWriter, std::net::TcpStream) {
    let FabricAuth::Keys(keys) = test_auth(from) else {
        unreachable!()
    };
    let mut s = std::net::TcpStream::connect(to.vf.listen_addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let sess = auth::initiate(&keys, from, epoch, &to.vf.inner.vm, &mut s, deadline).unwrap();
    let mut w = auth::FrameWriter::new(s.try_clone().unwrap(), Some(sess.send_key));
    w.frame(&wire::Frame::Hello {
        vm: from.into(),
        listen: "127.0.0.1:1".into(),
        announce: false,
    })
    .unwrap();
    (w, s)
}

/// Sends `frame` on `w` and waits for the listener to close the connection.
fn send_and_wait_close(mut w: auth::FrameWriter, mut s: std::net::TcpStream, frame: wire::Frame) {
    use std::io::{Read, Write};
    w.frame(&frame).unwrap();
    w.flush().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    assert!(
        matches!(s.read(&mut b), Ok(0)),
        "the listener did not close"
    );
}

#[test]
fn gone_from_the_named_vm_fails_its_qps_and_a_forged_or_stale_one_is_ignored() {
    let (a, b, qa, _qb, ka, kb) = pair();
    let c = vm("c");
    // A QP of a connected to c, which must not be touched by b's news.
    let qc = a.vf.create_qp();
    a.vf.set_peer_address("c", c.vf.listen_addr());
    a.vf.connect_qp(qc, "c", 1).unwrap();
    a.vf.post_send(qa, write_wr(1, ka, kb, 8, 0, None)).unwrap();
    assert_eq!(one(&a.vf).status, Status::Success);
    waiting_recv(&a, qa, ka, 7);
    waiting_recv(&a, qc, ka, 8);
    let epoch = b.vf.epoch();
    // a knows c's epoch (its probe dials c), as b may.
    let t = Instant::now();
    while a.vf.peer_epoch("c") != Some(c.vf.epoch()) {
        assert!(t.elapsed() < Duration::from_secs(5), "a never dialled c");
        std::thread::sleep(Duration::from_millis(10));
    }
    // b (authenticated, its real epoch) claims that c is gone, with c's epoch: refused.
    let (w, s) = speak_as("b", epoch, &a);
    let claim = wire::Frame::Gone {
        vm: "c".into(),
        epoch: c.vf.epoch(),
    };
    send_and_wait_close(w, s, claim);
    // b, with an epoch its handshake did not prove: refused.
    let (w, s) = speak_as("b", epoch, &a);
    let stale = wire::Frame::Gone {
        vm: "b".into(),
        epoch: epoch ^ 1,
    };
    send_and_wait_close(w, s, stale);
    assert_eq!(a.vf.stats().gone_refused, 2);
    assert_eq!(a.vf.stats().qps_lost, 0);
    assert!(a.vf.poll_cq(8).is_empty(), "a refused Gone failed a QP");
    // b's VM stops: its VF retires and tells a, which fails the QP connected to b only.
    assert_eq!(b.vf.retire(), Some(vec!["a".to_string()]));
    let done = one(&a.vf);
    assert_eq!(
        (done.wr_id, done.qp, done.status),
        (7, qa, Status::RemoteLost)
    );
    posts_fail_with_remote_lost(&a, qa, ka);
    assert!(
        a.vf.poll_cq(8).is_empty(),
        "the QP connected to c failed too"
    );
    assert_eq!(a.vf.stats().qps_lost, 1);
}

#[test]
fn a_retired_vf_naks_later_requests_and_the_requester_completes_them_with_remote_lost() {
    let (a, b, qa, _qb, ka, kb) = pair();
    // b cannot reach a when it retires: a learns only from the NAK of its next request.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    b.vf.set_peer_address("a", &dead_addr);
    assert_eq!(b.vf.retire(), Some(vec![]), "nobody told");
    assert!(b.vf.is_retired());
    let before = b.dma.stats().writes;
    a.dma.write(BUF_GPA, b"too late").unwrap();
    a.vf.post_send(qa, write_wr(3, ka, kb, 8, 0x100, None))
        .unwrap();
    a.vf.post_send(qa, write_wr(4, ka, kb, 8, 0x200, None))
        .unwrap();
    let got: Vec<_> = (0..2)
        .map(|_| one(&a.vf))
        .map(|c| (c.wr_id, c.status))
        .collect();
    assert_eq!(
        got,
        [(3, Status::RemoteLost), (4, Status::RemoteLost)],
        "each request completes with the reason"
    );
    assert_eq!(
        b.dma.stats().writes,
        before,
        "nothing landed in the retired VM"
    );
    posts_fail_with_remote_lost(&a, qa, ka);
    // A QP the retired VF never had is refused the same way, not left to "not ready".
    let qa2 = a.vf.create_qp();
    a.vf.connect_qp(qa2, "b", 999).unwrap();
    a.vf.post_send(qa2, write_wr(5, ka, kb, 8, 0, None))
        .unwrap();
    let c = one(&a.vf);
    assert_eq!((c.wr_id, c.status), (5, Status::RemoteLost), "{c:?}");
}

#[test]
fn a_vf_without_state_has_nothing_to_retire() {
    let t = vm("x");
    assert_eq!(t.vf.retire(), None);
    assert!(!t.vf.is_retired());
}

#[test]
fn a_peer_that_missed_the_announce_learns_the_new_place_once_it_can_be_reached() {
    let (a, b, qa, qb, ka, kb) = pair();
    for i in 0..2 {
        b.vf.post_recv(qb, recv_wr(i, kb)).unwrap();
    }
    a.vf.post_send(qa, send_wr(1, ka, 1)).unwrap();
    assert_eq!(one(&a.vf).status, Status::Success);
    assert_eq!(one(&b.vf).status, Status::Success);

    // b moves while the link between its new place and a is down: the announce misses a.
    let b2 = vm("b");
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    b2.vf.set_peer_address("a", &down);
    a.vf.allow_address(b2.vf.listen_addr());
    b.dma.quiesce();
    let state = b.vf.export_state().expect("export");
    b.vf.close();
    copy_ram(&b, &b2);
    b2.vf.import_state(state).expect("import");
    assert!(b2.vf.announce().is_empty(), "the announce cannot reach a");

    // a's next request is held for b's old place; then the link comes back.
    a.vf.post_send(qa, send_wr(2, ka, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    b2.vf.set_peer_address("a", a.vf.listen_addr());
    let c = one(&a.vf);
    assert_eq!(
        (c.wr_id, c.status),
        (2, Status::Success),
        "a learnt b's new place from the retried announce and its request landed there"
    );
    let r = one(&b2.vf);
    assert_eq!((r.opcode, r.imm), (Opcode::Recv, Some(2)));
}

#[test]
fn a_peer_unreachable_past_the_hold_timeout_fails_a_qp_that_only_waits_for_it() {
    let (a, b, qa, _qb, ka, _kb) = pair();
    a.vf.post_recv(qa, recv_wr(7, ka)).unwrap();
    a.vf.post_recv(qa, recv_wr(8, ka)).unwrap();
    // b's companion dies: nothing listens at its address any more.
    b.vf.close();
    drop(b);
    let start = Instant::now();
    let c = a.vf.wait_cq(1, Duration::from_secs(15));
    let c = c.first().expect("the waiting receive came back");
    assert_eq!(
        (c.wr_id, c.opcode, c.status),
        (7, Opcode::Recv, Status::RetryExceeded),
        "the first receive carries the cause"
    );
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "not before the hold timeout"
    );
    let c = one(&a.vf);
    assert_eq!((c.wr_id, c.status), (8, Status::Flushed));
    // The QP is in error: a new receive comes back at once.
    a.vf.post_recv(qa, recv_wr(9, ka)).unwrap();
    assert_eq!(one(&a.vf).status, Status::Flushed);
}

/// What a companion decides in a handoff, as a test sets it, and what it was told.
#[derive(Default)]
struct FakeHooks {
    runs: std::sync::atomic::AtomicBool,
    refuse: std::sync::atomic::AtomicBool,
    claims: parking_lot::Mutex<Vec<u64>>,
    states: parking_lot::Mutex<Vec<(u64, Vec<u8>)>>,
    revokes: parking_lot::Mutex<Vec<u64>>,
}

impl HandoffHooks for FakeHooks {
    fn runs_here(&self) -> bool {
        self.runs.load(Ordering::SeqCst)
    }
    fn claim(&self, generation: u64) -> Result<(), String> {
        self.claims.lock().push(generation);
        if self.refuse.load(Ordering::SeqCst) {
            Err("taken back".into())
        } else {
            Ok(())
        }
    }
    fn state(&self, generation: u64, body: Vec<u8>) {
        self.states.lock().push((generation, body));
    }
    fn revoke(&self, generation: u64) {
        self.revokes.lock().push(generation);
    }
}

fn hooked(t: &TestVm, runs: bool) -> Arc<FakeHooks> {
    let h = Arc::new(FakeHooks::default());
    h.runs.store(runs, Ordering::SeqCst);
    t.vf.set_handoff_hooks(h.clone());
    h
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_destination_finds_the_source_gets_its_state_and_claims_it() {
    let (src, dst, b) = (vm("a"), vm("a"), vm("b"));
    let (hs, hd) = (hooked(&src, true), hooked(&dst, false));
    hooked(&b, true);
    // The cluster map says "a" lives at b's address (stale): b, another VM, refuses the
    // seeker, which goes on to the cluster's other addresses and finds the source.
    dst.vf.set_peer_address("x", src.vf.listen_addr());
    dst.vf.set_peer_address("a", b.vf.listen_addr());
    dst.vf.seek_handoff().unwrap();
    until("the source knows its destination", || {
        src.vf.handoff_destination().as_deref() == Some(dst.vf.listen_addr())
    });
    assert_eq!(
        dst.vf.handoff_source().as_deref(),
        Some(src.vf.listen_addr())
    );
    assert!(b.vf.handoff_destination().is_none());

    assert!(src.vf.handoff_send_state(1, b"one".to_vec()));
    assert!(src.vf.handoff_revoke(1));
    until("the revoke", || *hd.revokes.lock() == [1]);
    assert_eq!(*hd.states.lock(), [(1, b"one".to_vec())]);
    assert!(src.vf.handoff_send_state(2, b"two".to_vec()));
    until("the second state", || hd.states.lock().len() == 2);
    assert_eq!(
        dst.vf.handoff_claim(2, Duration::from_secs(5)),
        ClaimAnswer::Granted
    );
    assert_eq!(*hs.claims.lock(), [2]);
    // A source that took its state back refuses, with its reason.
    hs.refuse.store(true, Ordering::SeqCst);
    assert_eq!(
        dst.vf.handoff_claim(2, Duration::from_secs(5)),
        ClaimAnswer::Refused("taken back".into())
    );
    dst.vf.end_handoff();
    until("the source forgets its destination", || {
        src.vf.handoff_destination().is_none()
    });
    assert_eq!(
        dst.vf.handoff_claim(2, Duration::from_secs(1)),
        ClaimAnswer::NoAnswer
    );
}

#[test]
fn a_seeker_finds_nothing_where_the_vf_does_not_run() {
    let (src, dst) = (vm("a"), vm("a"));
    let hs = hooked(&src, false);
    hooked(&dst, false);
    dst.vf.set_peer_address("a", src.vf.listen_addr());
    dst.vf.seek_handoff().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(src.vf.handoff_destination().is_none());
    assert!(dst.vf.handoff_source().is_none());
    assert!(!src.vf.handoff_send_state(1, vec![]), "nobody to send to");
    // Once the VF runs there, the seeker's next round finds it.
    hs.runs.store(true, Ordering::SeqCst);
    until("found", || src.vf.handoff_destination().is_some());
    dst.vf.end_handoff();
}

#[test]
fn another_vm_cannot_seek_this_vms_vf() {
    let src = vm("a");
    hooked(&src, true);
    // b, a member of the job with its own key, asks for a's VF.
    let FabricAuth::Keys(keys) = test_auth("b") else {
        unreachable!()
    };
    let mut s = std::net::TcpStream::connect(src.vf.listen_addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let sess = auth::initiate(&keys, "b", 1, "a", &mut s, deadline).unwrap();
    let w = auth::FrameWriter::new(s.try_clone().unwrap(), Some(sess.send_key));
    send_and_wait_close(
        w,
        s,
        wire::Frame::Handoff {
            op: wire::HandoffOp::Seek,
            generation: 0,
            body: b"a\n127.0.0.1:1".to_vec(),
        },
    );
    assert!(src.vf.handoff_destination().is_none());
    assert!(!src.vf.handoff_send_state(1, b"secret".to_vec()));
}

#[test]
fn qps_at_numbers_both_ends_compute_carry_a_write_and_taken_numbers_are_refused() {
    let (a, b, ka, kb) = known_pair();
    // Each end computes the other's number; nothing is exchanged.
    let (qa, qb) = (0x8000_00a1, 0x8000_00b2);
    assert_eq!(a.vf.create_qp_at(qa).unwrap(), qa);
    assert_eq!(b.vf.create_qp_at(qb).unwrap(), qb);
    a.vf.connect_qp(qa, "b", qb).unwrap();
    b.vf.connect_qp(qb, "a", qa).unwrap();
    a.dma.write(BUF_GPA, b"numbered").unwrap();
    a.vf.post_send(qa, write_wr(1, ka, kb, 8, 0x40, None))
        .unwrap();
    assert_eq!(one(&a.vf).status, Status::Success);
    assert_eq!(b.dma.read(BUF_GPA + 0x40, 8).unwrap(), b"numbered");
    // Taken, or 0: refused, and the QP there is untouched.
    assert!(matches!(a.vf.create_qp_at(qa), Err(VerbsError::QpInUse(n)) if n == qa));
    assert!(matches!(a.vf.create_qp_at(0), Err(VerbsError::QpInUse(0))));
    // The counter skips a number asked for ahead of it.
    let next = a.vf.create_qp();
    assert!(a.vf.create_qp_at(next + 1).is_ok());
    assert_eq!(a.vf.create_qp(), next + 2);
}

#[test]
fn the_guest_adds_no_qp_beyond_what_a_state_carries_through_a_migration() {
    use crate::vf::Vf;
    let a = vm("a");
    {
        let mut st = a.vf.inner.state.lock();
        for n in 1..=super::persist::limits::MAX_QPS as u32 {
            st.qps.insert(n, super::state::Qp::new());
        }
    }
    let full = super::persist::limits::MAX_QPS;
    assert!(matches!(Vf::create_qp(&a.vf), Err(VerbsError::TooManyQps(n)) if n == full));
    assert!(matches!(
        Vf::create_qp_at(&a.vf, 0x8000_0001),
        Err(VerbsError::TooManyQps(_))
    ));
    a.vf.inner.state.lock().qps.remove(&1);
    assert!(Vf::create_qp_at(&a.vf, 0x8000_0001).is_ok());
}

#[test]
fn a_destroyed_qp_leaves_nothing_behind_and_both_numbers_can_be_used_again() {
    let (a, b, qa, qb, ka, kb) = pair();
    b.vf.post_recv(
        qb,
        RecvWr {
            wr_id: 7,
            sge: Sge {
                addr: BUF_VA,
                len: 64,
                lkey: kb,
            },
        },
    )
    .unwrap();
    b.vf.destroy_qp(qb).unwrap();
    a.vf.destroy_qp(qa).unwrap();
    for (vf, q) in [(&a.vf, qa), (&b.vf, qb)] {
        assert!(!vf.inner.state.lock().qps.contains_key(&q));
        assert!(matches!(vf.destroy_qp(q), Err(VerbsError::NoSuchQp(n)) if n == q));
        assert!(matches!(
            vf.post_send(q, write_wr(1, ka, kb, 8, 0, None)),
            Err(VerbsError::NoSuchQp(_))
        ));
    }
    // The dropped receive completes nothing.
    assert!(b.vf.wait_cq(1, Duration::from_millis(100)).is_empty());
    // Both ends create the same numbers again: fresh QPs, fresh sequence numbers.
    assert_eq!(a.vf.create_qp_at(qa).unwrap(), qa);
    assert_eq!(b.vf.create_qp_at(qb).unwrap(), qb);
    a.vf.connect_qp(qa, "b", qb).unwrap();
    b.vf.connect_qp(qb, "a", qa).unwrap();
    a.dma.write(BUF_GPA, b"again").unwrap();
    a.vf.post_send(qa, write_wr(2, ka, kb, 5, 0x80, None))
        .unwrap();
    let c = one(&a.vf);
    assert_eq!((c.wr_id, c.status), (2, Status::Success));
    assert_eq!(b.dma.read(BUF_GPA + 0x80, 5).unwrap(), b"again");
}
