//! The soft VF as the guest sees it: commands in frames to the companion, replies matched by
//! `seq`, completions queued into a CQ, events handed to a callback — all received by one
//! helper thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfmig_proto::{
    decode, encode, Completion, Event, Frame, Message, SendOp, Sge, COMPANION_MAC, MAX_FRAME,
    MAX_SEGMENTS,
};

use crate::pinned::PinnedBuffer;
use crate::transport::{FdTransport, Transport};

/// A callback for companion events; runs on the receiver thread.
pub type EventCallback = Box<dyn Fn(Event) + Send>;

/// How long [`Device::open`] waits for the companion's reply to OPEN, unless
/// `VFMIG_OPEN_TIMEOUT` (seconds) says otherwise.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long other commands wait for their reply (see [`Device::set_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

struct Reply {
    status: u32,
    value: u64,
    error: String,
}

/// Frame and message counters of a device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Frames that failed to decode (dropped).
    pub malformed: u64,
    /// Replies no caller waited for (late or duplicate).
    pub stray_replies: u64,
    /// Completions received.
    pub completions: u64,
    /// Events received.
    pub events: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shared {
    io: Box<dyn Transport>,
    mac: [u8; 6],
    /// This process's share of the `seq` space (its PID's low 16 bits, shifted): other
    /// processes of the guest see our replies too, and take only theirs.
    seq_base: u32,
    seq: AtomicU32,
    /// The QPs this device created or posted to: every process of the guest sees every
    /// completion, and keeps those of its own QPs.
    qps: Mutex<HashSet<u32>>,
    stop: AtomicBool,
    pending: Mutex<HashMap<u32, Option<Reply>>>,
    replied: Condvar,
    cq: Mutex<VecDeque<Completion>>,
    cq_ready: Condvar,
    on_event: Mutex<Option<EventCallback>>,
    malformed: AtomicU64,
    stray: AtomicU64,
    completions: AtomicU64,
    events: AtomicU64,
}

impl Shared {
    fn send(&self, seq: u32, msg: Message) -> io::Result<()> {
        let bytes = encode(&Frame {
            dst: COMPANION_MAC,
            src: self.mac,
            seq,
            msg,
        });
        self.io.send(&bytes)
    }

    fn next_seq(&self) -> u32 {
        self.seq_base | (self.seq.fetch_add(1, Ordering::Relaxed) & 0xffff)
    }

    fn own_qp(&self, qp: u32) {
        lock(&self.qps).insert(qp);
    }

    /// The receiver thread's loop.
    fn receive(&self) {
        let mut buf = vec![0u8; MAX_FRAME.max(2048)];
        let mut last_err: Option<String> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let n = match self.io.recv(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    eprintln!("vfmig: receiver stops: {e}");
                    return;
                }
                Err(e) => {
                    let s = e.to_string();
                    if last_err.as_deref() != Some(&s) {
                        eprintln!("vfmig: receive error: {s}");
                        last_err = Some(s);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let frame = match decode(&buf[..n]) {
                Ok(f) => f,
                Err(e) => {
                    let count = self.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                    eprintln!(
                        "vfmig: dropped a malformed frame of {n} bytes ({e}); {count} so far"
                    );
                    continue;
                }
            };
            self.dispatch(frame);
        }
    }

    fn dispatch(&self, frame: Frame) {
        match frame.msg {
            Message::Reply {
                status,
                value,
                error,
            } => {
                let mut p = lock(&self.pending);
                match p.get_mut(&frame.seq) {
                    Some(slot @ None) => {
                        *slot = Some(Reply {
                            status,
                            value,
                            error,
                        });
                        drop(p);
                        self.replied.notify_all();
                    }
                    _ => {
                        self.stray.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Message::Completions(mut cs) => {
                {
                    let qps = lock(&self.qps);
                    cs.retain(|c| qps.contains(&c.qp));
                }
                if cs.is_empty() {
                    return;
                }
                self.completions
                    .fetch_add(cs.len() as u64, Ordering::Relaxed);
                lock(&self.cq).extend(cs);
                self.cq_ready.notify_all();
            }
            Message::Event(ev) => {
                self.events.fetch_add(1, Ordering::Relaxed);
                match lock(&self.on_event).as_ref() {
                    Some(cb) => cb(ev),
                    None => eprintln!("vfmig: event {ev:?} and no handler; not acknowledged"),
                }
            }
            // Commands are ours (seen when the kernel echoes outgoing frames): ignore.
            _ => {}
        }
    }

    /// Sends a command and waits for its reply.
    fn call(&self, msg: Message, timeout: Duration) -> io::Result<u64> {
        let what = command_name(&msg);
        let seq = self.next_seq();
        lock(&self.pending).insert(seq, None);
        if let Err(e) = self.send(seq, msg) {
            lock(&self.pending).remove(&seq);
            return Err(io::Error::new(e.kind(), format!("sending {what}: {e}")));
        }
        let deadline = Instant::now() + timeout;
        let mut p = lock(&self.pending);
        loop {
            if let Some(Some(_)) = p.get(&seq) {
                let r = p.remove(&seq).flatten().expect("present");
                return if r.status == 0 {
                    Ok(r.value)
                } else {
                    Err(io::Error::other(format!(
                        "{what} failed (status {}): {}",
                        r.status, r.error
                    )))
                };
            }
            let now = Instant::now();
            if now >= deadline {
                p.remove(&seq);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no reply to {what} from the vfmig companion within {:.1} s",
                        timeout.as_secs_f64()
                    ),
                ));
            }
            p = self
                .replied
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn command_name(m: &Message) -> &'static str {
    match m {
        Message::Open => "OPEN",
        Message::RegMr { .. } => "REG_MR",
        Message::DeregMr { .. } => "DEREG_MR",
        Message::CreateQp => "CREATE_QP",
        Message::CreateQpAt { .. } => "CREATE_QP_AT",
        Message::DestroyQp { .. } => "DESTROY_QP",
        Message::ConnectQp { .. } => "CONNECT_QP",
        Message::PostSend { .. } => "POST_SEND",
        Message::PostRecv { .. } => "POST_RECV",
        Message::EventAck { .. } => "EVENT_ACK",
        _ => "a companion message",
    }
}

/// An open soft VF. All methods take `&self`; a `Device` can be shared between threads (for
/// example in an `Arc`). Dropping it stops the receiver thread.
pub struct Device {
    shared: Arc<Shared>,
    rx: Option<JoinHandle<()>>,
    timeout: Duration,
    ifname: String,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ifname", &self.ifname)
            .field("mac", &self.mac_string())
            .finish()
    }
}

/// The high 16 bits of this device's `seq`: from the PID and the device's index in the
/// process, so that the devices of the guest's processes (and of one process) tell their
/// replies apart.
fn seq_base() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let index = NEXT.fetch_add(1, Ordering::Relaxed);
    ((std::process::id() << 4) ^ index) << 16
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Device {
    /// Opens the soft VF behind `ifname` (normally `eth0`): an AF_PACKET socket for EtherType
    /// 0x88B5, the interface brought up if needed, then OPEN, resent every second until the
    /// companion replies or the open timeout ([`DEFAULT_OPEN_TIMEOUT`], or
    /// `VFMIG_OPEN_TIMEOUT` seconds) passes.
    pub fn open(ifname: &str) -> io::Result<Device> {
        let (t, mac) = FdTransport::open_packet(ifname)?;
        let timeout = std::env::var("VFMIG_OPEN_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64)
            .unwrap_or(DEFAULT_OPEN_TIMEOUT);
        Self::with_transport(Box::new(t), mac, ifname, timeout)
    }

    /// Opens the device over any [`Transport`] (tests use a socketpair), with `mac` as the
    /// source address, waiting up to `open_timeout` for the reply to OPEN.
    pub fn with_transport(
        io: Box<dyn Transport>,
        mac: [u8; 6],
        ifname: &str,
        open_timeout: Duration,
    ) -> io::Result<Device> {
        let shared = Arc::new(Shared {
            io,
            mac,
            seq_base: seq_base(),
            seq: AtomicU32::new(1),
            qps: Mutex::new(HashSet::new()),
            stop: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            replied: Condvar::new(),
            cq: Mutex::new(VecDeque::new()),
            cq_ready: Condvar::new(),
            on_event: Mutex::new(None),
            malformed: AtomicU64::new(0),
            stray: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            events: AtomicU64::new(0),
        });
        let s2 = shared.clone();
        let rx = std::thread::Builder::new()
            .name("vfmig-rx".into())
            .spawn(move || s2.receive())?;
        let dev = Device {
            shared,
            rx: Some(rx),
            timeout: DEFAULT_TIMEOUT,
            ifname: ifname.to_string(),
        };
        // OPEN, resent each second: the first frames after the NIC comes up may be lost.
        let start = Instant::now();
        loop {
            let left = open_timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no reply from the vfmig companion on {ifname} within {:.0} s: is the \
                         NIC's backend a vfmig companion?",
                        open_timeout.as_secs_f64()
                    ),
                ));
            }
            match dev
                .shared
                .call(Message::Open, left.min(Duration::from_secs(1)))
            {
                Ok(_) => return Ok(dev),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The interface's MAC address (the frames' source).
    pub fn mac(&self) -> [u8; 6] {
        self.shared.mac
    }

    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.shared.mac)
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Sets how long commands wait for their reply (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Frame counters.
    pub fn stats(&self) -> Stats {
        Stats {
            malformed: self.shared.malformed.load(Ordering::Relaxed),
            stray_replies: self.shared.stray.load(Ordering::Relaxed),
            completions: self.shared.completions.load(Ordering::Relaxed),
            events: self.shared.events.load(Ordering::Relaxed),
        }
    }

    /// Registers `buf` as a region whose address space starts at `addr` (workloads use 0, so
    /// addresses are offsets into the buffer). `access` is a set of
    /// [`vfmig_proto::access`] flags. Returns the region key (lkey and rkey).
    pub fn register(&self, buf: &PinnedBuffer, addr: u64, access: u8) -> io::Result<u32> {
        self.register_segments(addr, access, buf.segments().to_vec())
    }

    /// Registers guest-physical `segments` as a region starting at `addr` (what
    /// [`Device::register`] does with a buffer's pages; tools use it to name any memory,
    /// including memory the companion must refuse).
    pub fn register_segments(
        &self,
        addr: u64,
        access: u8,
        segments: Vec<vfmig_proto::Segment>,
    ) -> io::Result<u32> {
        if segments.len() > MAX_SEGMENTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "buffer has {} segments, more than {MAX_SEGMENTS}: use hugepages",
                    segments.len()
                ),
            ));
        }
        let v = self.shared.call(
            Message::RegMr {
                addr,
                access,
                segments,
            },
            self.timeout,
        )?;
        Ok(v as u32)
    }

    /// Transmits raw bytes as one frame (for testing how the companion treats bad frames).
    pub fn send_raw(&self, frame: &[u8]) -> io::Result<()> {
        self.shared.io.send(frame)
    }

    /// Drops a region.
    pub fn deregister(&self, key: u32) -> io::Result<()> {
        self.shared
            .call(Message::DeregMr { key }, self.timeout)
            .map(|_| ())
    }

    /// Creates a QP; returns its number.
    pub fn create_qp(&self) -> io::Result<u32> {
        let qp = self.shared.call(Message::CreateQp, self.timeout)? as u32;
        self.shared.own_qp(qp);
        Ok(qp)
    }

    /// Creates the QP numbered `qp` (not 0, not in use), a number its peer can compute.
    pub fn create_qp_at(&self, qp: u32) -> io::Result<u32> {
        self.shared.call(Message::CreateQpAt { qp }, self.timeout)?;
        self.shared.own_qp(qp);
        Ok(qp)
    }

    /// Destroys QP `qp`: its posted requests are dropped without completions.
    pub fn destroy_qp(&self, qp: u32) -> io::Result<()> {
        self.shared.call(Message::DestroyQp { qp }, self.timeout)?;
        lock(&self.shared.qps).remove(&qp);
        Ok(())
    }

    /// Connects local QP `qp` to QP `peer_qp` of the VM named `peer`.
    pub fn connect_qp(&self, qp: u32, peer: &str, peer_qp: u32) -> io::Result<()> {
        if peer.is_empty() || peer.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("peer name {peer:?} must be 1 to 64 bytes"),
            ));
        }
        self.shared
            .call(
                Message::ConnectQp {
                    qp,
                    peer: peer.to_string(),
                    peer_qp,
                },
                self.timeout,
            )
            .map(|_| ())
    }

    fn post(&self, msg: Message) -> io::Result<()> {
        // Its completion comes back to this process even for a QP it did not create (a
        // mistake the companion answers with an error completion).
        if let Message::PostSend { qp, .. } | Message::PostRecv { qp, .. } = &msg {
            self.shared.own_qp(*qp);
        }
        let seq = self.shared.next_seq();
        self.shared.send(seq, msg)
    }

    /// Posts an RDMA WRITE of `sge` to `remote_addr` in the peer's region `rkey`, with
    /// immediate data when `imm` is set (the peer then consumes a receive). The outcome is a
    /// completion with `wr_id`.
    pub fn post_write(
        &self,
        qp: u32,
        wr_id: u64,
        sge: Sge,
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> io::Result<()> {
        self.post(Message::PostSend {
            qp,
            wr_id,
            sge,
            op: SendOp::Write {
                remote_addr,
                rkey,
                imm,
            },
        })
    }

    /// Posts a SEND of `sge` (into the peer's next receive).
    pub fn post_send(&self, qp: u32, wr_id: u64, sge: Sge, imm: Option<u32>) -> io::Result<()> {
        self.post(Message::PostSend {
            qp,
            wr_id,
            sge,
            op: SendOp::Send { imm },
        })
    }

    /// Posts a receive into `sge`.
    pub fn post_recv(&self, qp: u32, wr_id: u64, sge: Sge) -> io::Result<()> {
        self.post(Message::PostRecv { qp, wr_id, sge })
    }

    /// Takes up to `max` completions without waiting.
    pub fn poll_cq(&self, max: usize) -> Vec<Completion> {
        let mut q = lock(&self.shared.cq);
        let n = max.min(q.len());
        q.drain(..n).collect()
    }

    /// Takes up to `max` completions, waiting up to `timeout` for the first one.
    pub fn wait_cq(&self, max: usize, timeout: Duration) -> Vec<Completion> {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.shared.cq);
        while q.is_empty() && max > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q = self
                .shared
                .cq_ready
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let n = max.min(q.len());
        q.drain(..n).collect()
    }

    /// Sets the callback for companion events (SUSPEND, RESUME, MIGRATED). It runs on the
    /// receiver thread, so it must be quick and must not call methods that wait for a reply
    /// (register, create/connect QP): those would wait for the thread that runs it.
    /// [`ack_event`](Self::ack_event) and posting are fine. Without a callback, events are
    /// logged on stderr and not acknowledged.
    pub fn on_event(&self, cb: EventCallback) {
        *lock(&self.shared.on_event) = Some(cb);
    }

    /// Acknowledges an event (for SUSPEND: this guest stopped communicating and is ready).
    pub fn ack_event(&self, event: Event) -> io::Result<()> {
        self.post(Message::EventAck { event })
    }

    /// A handle that can acknowledge events from inside the event callback without keeping
    /// the device alive.
    pub fn event_acker(&self) -> EventAcker {
        EventAcker(Arc::downgrade(&self.shared))
    }
}

/// Acknowledges events on behalf of a [`Device`] (see [`Device::event_acker`]).
#[derive(Clone)]
pub struct EventAcker(Weak<Shared>);

impl std::fmt::Debug for EventAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventAcker")
    }
}

impl EventAcker {
    /// Sends EVENT_ACK; fails if the device is closed.
    pub fn ack(&self, event: Event) -> io::Result<()> {
        let s = self
            .0
            .upgrade()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "device closed"))?;
        let seq = s.next_seq();
        s.send(seq, Message::EventAck { event })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Break a possible cycle callback → acker is weak, but drop the callback anyway.
        if let Some(h) = self.rx.take() {
            let _ = h.join();
        }
        lock(&self.shared.on_event).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use vfmig_proto::{Opcode, Status};

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A fake companion: answers commands, turns POST_SEND/RECV into completions, and on
    /// CREATE_QP also sends a malformed frame, a stray reply and an event first.
    fn fake_companion(fd: OwnedFd) -> std::thread::JoinHandle<Vec<Message>> {
        std::thread::spawn(move || {
            let t = FdTransport::from_socket(fd).unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            let mut next_key = 1u64;
            let mut next_qp = 1u64;
            let reply = |t: &FdTransport, seq, status, value, error: &str| {
                let f = Frame {
                    dst: GUEST_MAC,
                    src: COMPANION_MAC,
                    seq,
                    msg: Message::Reply {
                        status,
                        value,
                        error: error.into(),
                    },
                };
                t.send(&encode(&f)).unwrap();
            };
            let send = |t: &FdTransport, msg| {
                let f = Frame {
                    dst: GUEST_MAC,
                    src: COMPANION_MAC,
                    seq: 0,
                    msg,
                };
                t.send(&encode(&f)).unwrap();
            };
            let mut opens = 0;
            loop {
                let n = match t.recv(&mut buf) {
                    Ok(Some(n)) => n,
                    Ok(None) => continue,
                    Err(_) => return seen,
                };
                let f = decode(&buf[..n]).expect("guest frames decode");
                assert_eq!(f.dst, COMPANION_MAC);
                assert_eq!(f.src, GUEST_MAC);
                seen.push(f.msg.clone());
                match f.msg {
                    Message::Open => {
                        opens += 1;
                        // Ignore the first OPEN: the guest must resend it.
                        if opens > 1 {
                            reply(&t, f.seq, 0, 0, "");
                        }
                    }
                    Message::RegMr { segments, .. } => {
                        assert!(!segments.is_empty());
                        reply(&t, f.seq, 0, next_key, "");
                        next_key += 1;
                    }
                    Message::DeregMr { key } => reply(&t, f.seq, 1, 0, &format!("no region {key}")),
                    Message::CreateQp => {
                        t.send(&[0xff; 30]).unwrap(); // malformed
                        let mut bad = encode(&Frame {
                            dst: GUEST_MAC,
                            src: COMPANION_MAC,
                            seq: 1,
                            msg: Message::Event(Event::Resume),
                        });
                        bad[22] = 9; // bad event number
                        t.send(&bad).unwrap();
                        reply(&t, 999_999, 0, 5, ""); // stray
                        send(&t, Message::Event(Event::Suspend));
                        reply(&t, f.seq, 0, next_qp, "");
                        next_qp += 1;
                    }
                    Message::CreateQpAt { qp } => {
                        // Another process's completion: every process of the guest sees it.
                        send(
                            &t,
                            Message::Completions(vec![Completion {
                                wr_id: 1,
                                qp: 4242,
                                opcode: Opcode::Send,
                                status: Status::Success,
                                byte_len: 1,
                                imm: None,
                            }]),
                        );
                        reply(&t, f.seq, 0, qp.into(), "");
                    }
                    Message::ConnectQp { .. } => reply(&t, f.seq, 0, 0, ""),
                    Message::PostSend { qp, wr_id, sge, op } => {
                        let opcode = match op {
                            SendOp::Write { .. } => Opcode::Write,
                            SendOp::Send { .. } => Opcode::Send,
                        };
                        send(
                            &t,
                            Message::Completions(vec![Completion {
                                wr_id,
                                qp,
                                opcode,
                                status: Status::Success,
                                byte_len: sge.len,
                                imm: None,
                            }]),
                        );
                    }
                    Message::PostRecv { qp, wr_id, .. } => send(
                        &t,
                        Message::Completions(vec![Completion {
                            wr_id,
                            qp,
                            opcode: Opcode::RecvRdmaWithImm,
                            status: Status::Success,
                            byte_len: 64,
                            imm: Some(wr_id as u32),
                        }]),
                    ),
                    Message::EventAck { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        })
    }

    #[test]
    fn receiver_routes_replies_completions_and_events() {
        let (a, b) = crate::fake::seqpacket_pair();
        let comp = fake_companion(b);
        let t = FdTransport::from_socket(a).unwrap();
        let dev = Device::with_transport(Box::new(t), GUEST_MAC, "test0", Duration::from_secs(5))
            .unwrap();
        let (etx, erx) = std::sync::mpsc::channel();
        let acker = dev.event_acker();
        dev.on_event(Box::new(move |e| {
            acker.ack(e).unwrap();
            etx.send(e).unwrap();
        }));

        let buf = PinnedBuffer::new(8192);
        if let Ok(buf) = buf {
            assert_eq!(dev.register(&buf, 0, 3).unwrap(), 1);
            assert_eq!(dev.register(&buf, 0, 3).unwrap(), 2);
        }
        let err = dev.deregister(7).unwrap_err();
        assert!(err.to_string().contains("no region 7"), "{err}");
        assert_eq!(dev.create_qp().unwrap(), 1);
        assert_eq!(
            erx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Event::Suspend
        );
        assert_eq!(dev.create_qp().unwrap(), 2);
        dev.connect_qp(1, "b", 1).unwrap();
        assert!(dev.connect_qp(1, "", 1).is_err());

        assert!(dev.poll_cq(16).is_empty());
        let sge = Sge {
            addr: 0,
            len: 100,
            lkey: 1,
        };
        for i in 0..50 {
            dev.post_write(1, i, sge, 0, 1, Some(i as u32)).unwrap();
        }
        dev.post_recv(2, 77, sge).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 51 && Instant::now() < deadline {
            got.extend(dev.wait_cq(16, Duration::from_millis(200)));
        }
        assert_eq!(got.len(), 51);
        assert!(got[..50]
            .iter()
            .enumerate()
            .all(|(i, c)| c.wr_id == i as u64 && c.opcode == Opcode::Write && c.byte_len == 100));
        assert_eq!(got[50].imm, Some(77));
        // A QP at a number asked for; another process's completion is not ours.
        assert_eq!(dev.create_qp_at(0x8000_0001).unwrap(), 0x8000_0001);
        assert!(dev.wait_cq(4, Duration::from_millis(100)).is_empty());
        let st = dev.stats();
        assert_eq!(st.completions, 51, "{st:?}");
        assert_eq!(st.malformed, 4, "{st:?}"); // two CREATE_QPs, two bad frames each
        assert_eq!(st.stray_replies, 2);
        assert_eq!(st.events, 2);
        assert!(dev.wait_cq(4, Duration::from_millis(50)).is_empty());
        drop(dev);
        let seen = comp.join().unwrap();
        assert!(matches!(seen[0], Message::Open) && matches!(seen[1], Message::Open));
        assert!(seen.iter().any(|m| matches!(
            m,
            Message::EventAck {
                event: Event::Suspend
            }
        )));
    }

    #[test]
    fn open_times_out_with_a_clear_message() {
        let (a, _b) = crate::fake::seqpacket_pair();
        let t = FdTransport::from_socket(a).unwrap();
        let e = Device::with_transport(Box::new(t), GUEST_MAC, "eth9", Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            e.to_string()
                .contains("no reply from the vfmig companion on eth9"),
            "{e}"
        );
    }
}
