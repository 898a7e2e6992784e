//! A fake companion fabric for tests: several "VMs" in one process, each a [`Device`] over a
//! socketpair, with RDMA WRITE / SEND / RECV carried out in process memory. Guest-physical
//! segments are translated back to the test's buffers through a table the test fills.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfmig_proto::{
    decode, encode, Completion, Event, Frame, Message, Opcode, Segment, SendOp, Sge, Status,
    COMPANION_MAC,
};

use crate::transport::{FdTransport, Transport};

/// A connected pair of SOCK_SEQPACKET sockets: one frame per message, as AF_PACKET gives.
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a writable array of two c_ints.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair failed");
    // SAFETY: both descriptors are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}
use crate::{Device, PinnedBuffer};

struct Region {
    key: u32,
    addr: u64,
    ptr: usize,
    len: u64,
    access: u8,
}

/// An incoming operation waiting for a receive: (sender VM, sender QP, wr_id, data, imm,
/// is a SEND).
type Waiting = (String, u32, u64, Vec<u8>, Option<u32>, bool);

#[derive(Default)]
struct Qp {
    peer: Option<(String, u32)>,
    recvs: VecDeque<(u64, Sge)>,
    waiting: VecDeque<Waiting>,
}

struct Vm {
    io: Arc<FdTransport>,
    mac: [u8; 6],
    regions: Vec<Region>,
    next_key: u32,
    qps: HashMap<u32, Qp>,
    next_qp: u32,
    suspended: bool,
}

/// What the fabric saw.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// POST_SENDs a VM made between its SUSPEND ack and the RESUME.
    pub sends_while_suspended: u64,
    /// SUSPEND acks received, by VM.
    pub suspend_acks: HashMap<String, u64>,
    /// WRITEs carried out.
    pub writes: u64,
    /// Failed deliveries (unknown peer and the like).
    pub failures: u64,
    /// SENDs that found no receive posted (an RNR on a real VF).
    pub sends_without_receive: u64,
}

#[derive(Default)]
struct State {
    vms: HashMap<String, Vm>,
    buffers: Vec<(Vec<Segment>, usize, u64)>,
    log: Log,
    /// Send SUSPEND to this VM after this many of its WRITEs.
    suspend_after: Option<(String, u64)>,
}

/// The fabric.
#[derive(Clone, Default)]
pub struct Fabric(Arc<Mutex<State>>);

fn completion(
    wr_id: u64,
    qp: u32,
    opcode: Opcode,
    status: Status,
    len: u32,
    imm: Option<u32>,
) -> Completion {
    Completion {
        wr_id,
        qp,
        opcode,
        status,
        byte_len: len,
        imm,
    }
}

impl Vm {
    fn send(&self, msg: Message) {
        let f = Frame {
            dst: self.mac,
            src: COMPANION_MAC,
            seq: 0,
            msg,
        };
        let _ = self.io.send(&encode(&f));
    }
    fn reply(&self, seq: u32, status: u32, value: u64, error: &str) {
        let f = Frame {
            dst: self.mac,
            src: COMPANION_MAC,
            seq,
            msg: Message::Reply {
                status,
                value,
                error: error.into(),
            },
        };
        let _ = self.io.send(&encode(&f));
    }
    fn complete(&self, c: Completion) {
        self.send(Message::Completions(vec![c]));
    }
    /// The host address of `len` bytes at `addr` of region `key`, if allowed.
    fn translate(&self, key: u32, addr: u64, len: u64, need: u8) -> Option<usize> {
        let r = self.regions.iter().find(|r| r.key == key)?;
        if r.access & need != need || addr < r.addr || addr + len > r.addr + r.len {
            return None;
        }
        Some(r.ptr + (addr - r.addr) as usize)
    }
    fn qp(&mut self, n: u32) -> Option<&mut Qp> {
        self.qps.get_mut(&n)
    }
}

impl Fabric {
    /// Makes the buffer's guest-physical segments known, so REG_MR can find its memory.
    pub fn add_buffer(&self, b: &PinnedBuffer) {
        self.0.lock().unwrap().buffers.push((
            b.segments().to_vec(),
            b.as_ptr() as usize,
            b.len() as u64,
        ));
    }

    /// Sends SUSPEND to `vm` after its `n`th WRITE, and RESUME 50 ms after its ack.
    pub fn suspend_after(&self, vm: &str, n: u64) {
        self.0.lock().unwrap().suspend_after = Some((vm.to_string(), n));
    }

    /// The QPs `vm` holds now.
    pub fn qps(&self, vm: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .vms
            .get(vm)
            .map_or(0, |v| v.qps.len())
    }

    /// What happened.
    pub fn log(&self) -> Log {
        self.0.lock().unwrap().log.clone()
    }

    /// Adds a VM and returns its opened device.
    pub fn attach(&self, name: &str, index: u8) -> Device {
        let (a, b) = seqpacket_pair();
        let mac = [0x52, 0x54, 0, 0, 0, index];
        let io = Arc::new(FdTransport::from_socket(b).unwrap());
        self.0.lock().unwrap().vms.insert(
            name.to_string(),
            Vm {
                io: io.clone(),
                mac,
                regions: Vec::new(),
                next_key: 1,
                qps: HashMap::new(),
                next_qp: 1,
                suspended: false,
            },
        );
        let fabric = self.clone();
        let me = name.to_string();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match io.recv(&mut buf) {
                    Ok(Some(n)) => {
                        let f = decode(&buf[..n]).expect("guest frames decode");
                        fabric.handle(&me, f);
                    }
                    Ok(None) => {}
                    Err(_) => return,
                }
            }
        });
        let t = FdTransport::from_socket(a).unwrap();
        Device::with_transport(Box::new(t), mac, name, Duration::from_secs(5)).unwrap()
    }

    fn handle(&self, me: &str, f: Frame) {
        let mut guard = self.0.lock().unwrap();
        let st = &mut *guard;
        let seq = f.seq;
        match f.msg {
            Message::Open => st.vms[me].reply(seq, 0, 0, ""),
            Message::RegMr {
                addr,
                access,
                segments,
            } => {
                let found = st
                    .buffers
                    .iter()
                    .find(|(s, _, _)| *s == segments)
                    .map(|(_, p, l)| (*p, *l));
                let vm = st.vms.get_mut(me).unwrap();
                match found {
                    Some((ptr, len)) => {
                        let key = vm.next_key;
                        vm.next_key += 1;
                        vm.regions.push(Region {
                            key,
                            addr,
                            ptr,
                            len,
                            access,
                        });
                        vm.reply(seq, 0, key as u64, "");
                    }
                    None => vm.reply(seq, 1, 0, "unknown memory"),
                }
            }
            Message::DeregMr { key } => {
                let vm = st.vms.get_mut(me).unwrap();
                vm.regions.retain(|r| r.key != key);
                vm.reply(seq, 0, 0, "");
            }
            Message::CreateQp => {
                let vm = st.vms.get_mut(me).unwrap();
                while vm.qps.contains_key(&vm.next_qp) {
                    vm.next_qp += 1;
                }
                let n = vm.next_qp;
                vm.qps.insert(n, Qp::default());
                vm.reply(seq, 0, n.into(), "");
            }
            Message::CreateQpAt { qp } => {
                let vm = st.vms.get_mut(me).unwrap();
                if qp == 0 || vm.qps.contains_key(&qp) {
                    vm.reply(seq, 1, 0, "QP number in use");
                } else {
                    vm.qps.insert(qp, Qp::default());
                    vm.reply(seq, 0, qp.into(), "");
                }
            }
            Message::DestroyQp { qp } => {
                let vm = st.vms.get_mut(me).unwrap();
                if vm.qps.remove(&qp).is_some() {
                    vm.reply(seq, 0, 0, "");
                } else {
                    vm.reply(seq, 1, 0, "no such QP");
                }
            }
            Message::ConnectQp { qp, peer, peer_qp } => {
                let vm = st.vms.get_mut(me).unwrap();
                match vm.qp(qp) {
                    Some(q) => {
                        q.peer = Some((peer, peer_qp));
                        vm.reply(seq, 0, 0, "");
                    }
                    None => vm.reply(seq, 1, 0, "no such QP"),
                }
            }
            Message::PostRecv { qp, wr_id, sge } => {
                let vm = st.vms.get_mut(me).unwrap();
                if let Some(q) = vm.qp(qp) {
                    q.recvs.push_back((wr_id, sge));
                }
                Self::drain_waiting(st, me, qp);
            }
            Message::PostSend { qp, wr_id, sge, op } => {
                if st.vms[me].suspended {
                    st.log.sends_while_suspended += 1;
                }
                Self::post_send(st, me, qp, wr_id, sge, op);
                if let Some((vm, n)) = st.suspend_after.clone() {
                    if vm == me && st.log.writes >= n {
                        st.suspend_after = None;
                        st.vms[me].send(Message::Event(Event::Suspend));
                    }
                }
            }
            Message::EventAck { event } => {
                if event == Event::Suspend {
                    *st.log.suspend_acks.entry(me.to_string()).or_default() += 1;
                    st.vms.get_mut(me).unwrap().suspended = true;
                    let fabric = self.clone();
                    let me = me.to_string();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(50));
                        let mut st = fabric.0.lock().unwrap();
                        let vm = st.vms.get_mut(&me).unwrap();
                        vm.suspended = false;
                        vm.send(Message::Event(Event::Resume));
                    });
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn post_send(st: &mut State, me: &str, qp: u32, wr_id: u64, sge: Sge, op: SendOp) {
        let (opcode, imm, target) = match op {
            SendOp::Write {
                remote_addr,
                rkey,
                imm,
            } => (Opcode::Write, imm, Some((remote_addr, rkey))),
            SendOp::Send { imm } => (Opcode::Send, imm, None),
        };
        let src = st.vms[me].translate(sge.lkey, sge.addr, sge.len as u64, 0);
        let peer = st
            .vms
            .get_mut(me)
            .unwrap()
            .qp(qp)
            .and_then(|q| q.peer.clone());
        let fail = |st: &mut State, status| {
            st.log.failures += 1;
            st.vms[me].complete(completion(wr_id, qp, opcode, status, 0, None));
        };
        let Some(src) = src else {
            return fail(st, Status::LocalProtectionError);
        };
        let Some((pname, pqp)) = peer else {
            return fail(st, Status::UnknownPeer);
        };
        // The peer must exist and have connected its QP back to us.
        let ok = st
            .vms
            .get_mut(&pname)
            .and_then(|p| p.qp(pqp))
            .and_then(|q| q.peer.clone())
            .is_some_and(|(n, q)| n == me && q == qp);
        if !ok {
            return fail(st, Status::UnknownPeer);
        }
        // SAFETY: src..src+len lies inside a live test buffer (translate checked the range).
        let data =
            unsafe { std::slice::from_raw_parts(src as *const u8, sge.len as usize) }.to_vec();
        if let Some((raddr, rkey)) = target {
            let dst = st.vms[&pname].translate(rkey, raddr, sge.len as u64, 2);
            let Some(dst) = dst else {
                return fail(st, Status::RemoteAccessError);
            };
            // SAFETY: dst..dst+len lies inside a live test buffer (translate checked it).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len()) };
            st.log.writes += 1;
            if imm.is_none() {
                st.vms[me].complete(completion(
                    wr_id,
                    qp,
                    opcode,
                    Status::Success,
                    sge.len,
                    None,
                ));
                return;
            }
        }
        let q = st.vms.get_mut(&pname).unwrap().qp(pqp).unwrap();
        if target.is_none() && q.recvs.len() <= q.waiting.len() {
            st.log.sends_without_receive += 1;
        }
        let q = st.vms.get_mut(&pname).unwrap().qp(pqp).unwrap();
        q.waiting
            .push_back((me.to_string(), qp, wr_id, data, imm, target.is_none()));
        Self::drain_waiting(st, &pname, pqp);
    }

    /// Delivers operations waiting for receives on `vm`'s QP `qp`.
    fn drain_waiting(st: &mut State, vm: &str, qp: u32) {
        loop {
            let v = st.vms.get_mut(vm).unwrap();
            let Some(q) = v.qp(qp) else { return };
            if q.waiting.is_empty() || q.recvs.is_empty() {
                return;
            }
            let (sender, sqp, swr, data, imm, is_send) = q.waiting.pop_front().unwrap();
            let (rwr, rsge) = q.recvs.pop_front().unwrap();
            let len = data.len() as u32;
            if is_send {
                let dst = v.translate(rsge.lkey, rsge.addr, data.len() as u64, 1);
                match dst {
                    Some(dst) if data.len() <= rsge.len as usize => {
                        // SAFETY: dst..dst+len lies inside a live test buffer.
                        unsafe {
                            std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len())
                        };
                    }
                    _ => panic!("bad receive buffer"),
                }
            }
            let opcode = if is_send {
                Opcode::Recv
            } else {
                Opcode::RecvRdmaWithImm
            };
            v.complete(completion(rwr, qp, opcode, Status::Success, len, imm));
            let sop = if is_send { Opcode::Send } else { Opcode::Write };
            st.vms[&sender].complete(completion(swr, sqp, sop, Status::Success, len, None));
        }
    }
}

/// Runs `lu-lite` on `size` ranks over the fake fabric; returns rank 0's outcome and the log.
pub fn run_lu(size: usize, n: usize, iters: u64, suspend: bool) -> (crate::lulite::Outcome, Log) {
    let fabric = Fabric::default();
    if suspend && size > 1 {
        fabric.suspend_after("r1", 7);
    }
    let names: Vec<String> = (0..size).map(|r| format!("r{r}")).collect();
    let mut handles = Vec::new();
    for r in 0..size {
        let job = crate::workload::Job {
            me: names[r].clone(),
            peers: names.clone(),
            rank: r,
        };
        let dev = fabric.attach(&names[r], r as u8);
        let mut buf = PinnedBuffer::new(crate::lulite::buffer_len(n, iters)).unwrap();
        fabric.add_buffer(&buf);
        // Stagger the starts so early hellos find no peer and are retried.
        std::thread::sleep(Duration::from_millis(30));
        handles.push(std::thread::spawn(move || {
            crate::lulite::run_rank(&dev, &mut buf, job, n, iters, Duration::from_secs(20))
        }));
    }
    let outs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("rank ran"))
        .collect();
    (outs[0].clone(), fabric.log())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn lu_lite_over_the_fake_fabric_matches_the_simulation() {
        if !root() {
            eprintln!("skipped: needs root for pagemap");
            return;
        }
        let (n, iters) = (40, 30);
        let (sim, _) = crate::lu::simulate(n, 1, iters);
        for size in [1, 2, 3, 4] {
            let (out, log) = run_lu(size, n, iters as u64, false);
            assert_eq!(out.global, Some(sim), "{size} ranks");
            assert_eq!(out.errors, 0);
            assert_eq!(out.iters, iters as u64);
            if size > 1 {
                assert!(log.writes > 0);
            }
        }
    }

    #[test]
    fn lu_lite_stops_sending_between_suspend_ack_and_resume() {
        if !root() {
            eprintln!("skipped: needs root for pagemap");
            return;
        }
        let (sim, _) = crate::lu::simulate(30, 1, 20);
        let (out, log) = run_lu(3, 30, 20, true);
        assert_eq!(out.global, Some(sim));
        assert_eq!(log.suspend_acks.get("r1"), Some(&1), "{log:?}");
        assert_eq!(log.sends_while_suspended, 0, "{log:?}");
    }
}
