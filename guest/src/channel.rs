//! Messages of any length between endpoints over the soft VF, for a library that learns its
//! peers late and names them by string (the libfabric provider, under MPI).
//!
//! - **Names.** An endpoint is `<vm>/<port>`: the VM's name in the cluster map and a port
//!   unique in that guest (the provider uses its PID and an index).
//! - **QPs without an exchange.** The QP of endpoint `p` toward endpoint `q` of VM `v` is
//!   numbered [`qp_number`]`(p, v, q)` (`CREATE_QP_AT`), so each end computes the other's
//!   number and connects at once. A number already in use at the VF is an error that says so.
//! - **Eager segments with credits.** A message travels as SENDs of at most [`SLOT`] bytes,
//!   header included, into receive slots pre-posted per peer ([`RECV_SLOTS`]). A sender
//!   spends one credit per segment and learns of freed slots from the credits carried in the
//!   peer's headers, so it never meets an empty receive queue (no RNR storm). One credit is
//!   kept for a credit-only message, which returns credits when nothing else goes back.
//! - **SUSPEND and RESUME** (the `cooperative` strategy): after SUSPEND the channel posts no
//!   more sends, and acknowledges once its sends in flight have completed; receives go on.
//!   RESUME lets the queued messages go. One process per VM acknowledges for the VM.
//! - **Bounds.** Queued bytes per channel ([`MAX_QUEUED`]), message length ([`MAX_MESSAGE`]),
//!   peers ([`MAX_PEERS`]). A malformed segment from a peer breaks that peer only.
//!
//! A message to the endpoint itself is delivered in process, without the VF.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use vfmig_proto::{access, Event, Opcode, Sge, Status};

use crate::{Device, PinnedBuffer};

/// Bytes of one segment, header included (and of one receive or send slot).
pub const SLOT: usize = 64 << 10;
/// Receive slots posted per peer: the credits a sender starts with.
pub const RECV_SLOTS: u16 = 8;
/// Send slots of a channel: segments in flight at once, over all peers.
pub const SEND_SLOTS: usize = 16;
/// Longest message.
pub const MAX_MESSAGE: usize = 256 << 20;
/// Most bytes a channel queues for sending before [`ChannelError::Busy`].
pub const MAX_QUEUED: usize = 64 << 20;
/// Most peers a channel connects to.
pub const MAX_PEERS: usize = 1024;
/// The segment header's length.
pub const HEADER: usize = 32;

const CHUNK: usize = 2 << 20;
const SLOTS_PER_CHUNK: usize = CHUNK / SLOT;
const MAGIC: u16 = 0x4d43;
const FIRST: u8 = 1;
const LAST: u8 = 2;
const CREDIT_ONLY: u8 = 4;
const HAS_DATA: u8 = 8;
/// `wr_id` bit of a send slot (else: a receive slot).
const SEND_WR: u64 = 1 << 63;

/// The number of the QP that endpoint port `from_port` uses toward endpoint `to_port` of VM
/// `to_vm`: a hash of the three, with the top bit set (the VF counts its own numbers from 1).
pub fn qp_number(from_port: u32, to_vm: &str, to_port: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let bytes = from_port
        .to_le_bytes()
        .into_iter()
        .chain(to_vm.bytes())
        .chain([0])
        .chain(to_port.to_le_bytes());
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h | 0x8000_0000
}

/// An endpoint's address: `<vm>/<port>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Addr {
    /// The VM's name in the cluster map.
    pub vm: String,
    /// The endpoint's port in that guest.
    pub port: u32,
}

impl Addr {
    /// Parses `<vm>/<port>`.
    pub fn parse(name: &str) -> Option<Addr> {
        let (vm, port) = name.rsplit_once('/')?;
        let ok = !vm.is_empty() && vm.len() <= 64;
        ok.then(|| {
            Some(Addr {
                vm: vm.to_string(),
                port: port.parse().ok()?,
            })
        })?
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.vm, self.port)
    }
}

/// A whole message, as sent and as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The user's kind byte (the provider: tagged or not).
    pub kind: u8,
    /// The tag.
    pub tag: u64,
    /// Remote CQ data, if any.
    pub data: Option<u64>,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// Why a channel could not take a message, or lost a peer.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Too much is queued: make progress, then send again.
    #[error("{queued} bytes are queued for sending (at most {MAX_QUEUED}): progress, then retry")]
    Busy {
        /// Bytes queued now.
        queued: usize,
    },
    /// The message is longer than [`MAX_MESSAGE`].
    #[error("a message of {0} bytes is longer than the {MAX_MESSAGE} bytes a channel carries")]
    TooLong(usize),
    /// The peer's name is not `<vm>/<port>`, or too many peers.
    #[error("peer {0:?}: {1}")]
    BadPeer(String, &'static str),
    /// The peer failed earlier (its QP is in error, or it sent a malformed segment).
    #[error("the link to {peer} failed: {why}")]
    PeerFailed {
        /// The peer.
        peer: Addr,
        /// Why.
        why: String,
    },
    /// The VF refused a command.
    #[error("{what}: {source}")]
    Device {
        /// What was asked.
        what: String,
        /// The VF's answer.
        #[source]
        source: io::Error,
    },
}

fn dev_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ChannelError {
    move |source| ChannelError::Device {
        what: what.into(),
        source,
    }
}

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    flags: u8,
    kind: u8,
    credits: u16,
    total: u32,
    len: u32,
    tag: u64,
    data: u64,
}

impl Header {
    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        out[2] = self.flags;
        out[3] = self.kind;
        out[4..6].copy_from_slice(&self.credits.to_le_bytes());
        out[6..8].fill(0);
        out[8..12].copy_from_slice(&self.total.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.tag.to_le_bytes());
        out[24..32].copy_from_slice(&self.data.to_le_bytes());
    }

    fn read(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER {
            return Err(format!("a segment of {} bytes has no header", b.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u16::from_le_bytes([b[0], b[1]]) != MAGIC {
            return Err("a segment without the channel's magic".into());
        }
        let h = Header {
            flags: b[2],
            kind: b[3],
            credits: u16::from_le_bytes([b[4], b[5]]),
            total: u32_at(8),
            len: u32_at(12),
            tag: u64_at(16),
            data: u64_at(24),
        };
        if h.len as usize != b.len() - HEADER {
            return Err(format!(
                "a segment says {} bytes and carries {}",
                h.len,
                b.len() - HEADER
            ));
        }
        if h.credits > RECV_SLOTS {
            return Err(format!(
                "{} credits returned (at most {RECV_SLOTS})",
                h.credits
            ));
        }
        Ok(h)
    }
}

/// A message being sent: what is left of it.
struct Outgoing {
    msg: Message,
    sent: usize,
}

/// A message being received.
struct Incoming {
    msg: Message,
    total: usize,
}

struct Peer {
    addr: Addr,
    qp: u32,
    /// Segments this end may still send (one kept for a credit-only message).
    credits: u16,
    /// Receive slots freed since the last credits went back.
    owed: u16,
    queue: VecDeque<Outgoing>,
    incoming: Option<Incoming>,
    failed: Option<String>,
}

/// Pinned memory in 2 MiB chunks of [`SLOT`]-byte slots, each chunk one region.
struct Pool {
    chunks: Vec<(PinnedBuffer, u32)>,
    free: Vec<u32>,
}

impl Pool {
    fn slot_sge(&self, slot: u32, len: usize) -> Sge {
        let (chunk, index) = (
            slot as usize / SLOTS_PER_CHUNK,
            slot as usize % SLOTS_PER_CHUNK,
        );
        Sge {
            addr: (index * SLOT) as u64,
            len: len as u32,
            lkey: self.chunks[chunk].1,
        }
    }

    fn slot(&mut self, slot: u32) -> &mut [u8] {
        let (chunk, index) = (
            slot as usize / SLOTS_PER_CHUNK,
            slot as usize % SLOTS_PER_CHUNK,
        );
        &mut self.chunks[chunk].0.as_mut_slice()[index * SLOT..(index + 1) * SLOT]
    }
}

/// A channel: one endpoint's messages to and from its peers.
pub struct Channel {
    dev: Arc<Device>,
    me: Addr,
    pool: Pool,
    send_free: Vec<u32>,
    peers: Vec<Peer>,
    by_addr: HashMap<Addr, usize>,
    by_qp: HashMap<u32, usize>,
    queued: usize,
    to_self: VecDeque<Message>,
    /// Peers that failed since the last [`Channel::progress`], with why.
    failed: Vec<(Addr, String)>,
    /// Called with every new chunk before it is registered (the fake fabric's tests).
    on_chunk: Option<ChunkHook>,
    /// SUSPEND: requested by the companion, and acknowledged.
    suspend: Arc<Mutex<Suspend>>,
}

/// Where a cooperative migration's SUSPEND stands.
#[derive(Debug, Default, Clone, Copy)]
struct Suspend {
    requested: bool,
    acked: bool,
}

type ChunkHook = Box<dyn Fn(&PinnedBuffer) + Send>;

impl Channel {
    /// A channel for endpoint `me` over the open VF `dev`.
    pub fn open(dev: Arc<Device>, me: Addr) -> Result<Channel, ChannelError> {
        Self::build(dev, me, None)
    }

    /// [`Channel::open`], with a hook for every chunk (tests over the fake fabric).
    #[cfg(test)]
    pub(crate) fn open_with(
        dev: Arc<Device>,
        me: Addr,
        on_chunk: Box<dyn Fn(&PinnedBuffer) + Send>,
    ) -> Result<Channel, ChannelError> {
        Self::build(dev, me, Some(on_chunk))
    }

    fn build(
        dev: Arc<Device>,
        me: Addr,
        on_chunk: Option<ChunkHook>,
    ) -> Result<Channel, ChannelError> {
        let mut ch = Channel {
            dev,
            me,
            pool: Pool {
                chunks: Vec::new(),
                free: Vec::new(),
            },
            send_free: Vec::new(),
            peers: Vec::new(),
            by_addr: HashMap::new(),
            by_qp: HashMap::new(),
            queued: 0,
            to_self: VecDeque::new(),
            failed: Vec::new(),
            on_chunk,
            suspend: Arc::default(),
        };
        ch.send_free = ch.take_slots(SEND_SLOTS)?;
        let suspend = ch.suspend.clone();
        let acker = ch.dev.event_acker();
        ch.dev.on_event(Box::new(move |e| {
            let mut s = suspend.lock().unwrap_or_else(|p| p.into_inner());
            match e {
                // Acknowledged by `progress` once no send is in flight.
                Event::Suspend => s.requested = true,
                Event::Resume => {
                    *s = Suspend::default();
                    let _ = acker.ack(e);
                }
                Event::Migrated => {
                    let _ = acker.ack(e);
                }
            }
        }));
        Ok(ch)
    }

    /// This endpoint's address.
    pub fn addr(&self) -> &Addr {
        &self.me
    }

    /// Bytes waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queued
    }

    fn take_slots(&mut self, n: usize) -> Result<Vec<u32>, ChannelError> {
        while self.pool.free.len() < n {
            let buf = PinnedBuffer::new(CHUNK).map_err(dev_err("pinning a 2 MiB chunk"))?;
            if let Some(hook) = &self.on_chunk {
                hook(&buf);
            }
            let key = self
                .dev
                .register(&buf, 0, access::LOCAL_WRITE)
                .map_err(dev_err("registering a 2 MiB chunk"))?;
            let first = (self.pool.chunks.len() * SLOTS_PER_CHUNK) as u32;
            self.pool.chunks.push((buf, key));
            self.pool
                .free
                .extend((first..first + SLOTS_PER_CHUNK as u32).rev());
        }
        let at = self.pool.free.len() - n;
        Ok(self.pool.free.split_off(at))
    }

    /// Creates, connects and fills the QP toward `peer` (once; later calls find it).
    pub fn connect(&mut self, peer: &Addr) -> Result<(), ChannelError> {
        if *peer == self.me || self.by_addr.contains_key(peer) {
            return Ok(());
        }
        if self.peers.len() >= MAX_PEERS {
            return Err(ChannelError::BadPeer(peer.to_string(), "too many peers"));
        }
        let qp = qp_number(self.me.port, &peer.vm, peer.port);
        let peer_qp = qp_number(peer.port, &self.me.vm, self.me.port);
        self.dev.create_qp_at(qp).map_err(dev_err(format!(
            "creating QP {qp:#x} toward {peer} (a hash of the two names; another endpoint of \
             this guest may hold the number)"
        )))?;
        self.dev
            .connect_qp(qp, &peer.vm, peer_qp)
            .map_err(dev_err(format!("connecting QP {qp:#x} to {peer}")))?;
        let slots = self.take_slots(RECV_SLOTS.into())?;
        for &s in &slots {
            let sge = self.pool.slot_sge(s, SLOT);
            self.dev
                .post_recv(qp, s.into(), sge)
                .map_err(dev_err(format!("posting a receive toward {peer}")))?;
        }
        let index = self.peers.len();
        self.peers.push(Peer {
            addr: peer.clone(),
            qp,
            credits: RECV_SLOTS,
            owed: 0,
            queue: VecDeque::new(),
            incoming: None,
            failed: None,
        });
        self.by_addr.insert(peer.clone(), index);
        self.by_qp.insert(qp, index);
        Ok(())
    }

    /// Queues `msg` for `peer` and sends what credits allow; the rest goes during
    /// [`Channel::progress`].
    pub fn send(&mut self, peer: &Addr, msg: Message) -> Result<(), ChannelError> {
        if msg.payload.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLong(msg.payload.len()));
        }
        if *peer == self.me {
            self.to_self.push_back(msg);
            return Ok(());
        }
        if self.queued + msg.payload.len() > MAX_QUEUED && self.queued > 0 {
            return Err(ChannelError::Busy {
                queued: self.queued,
            });
        }
        self.connect(peer)?;
        let i = self.by_addr[peer];
        if let Some(why) = &self.peers[i].failed {
            return Err(ChannelError::PeerFailed {
                peer: peer.clone(),
                why: why.clone(),
            });
        }
        self.queued += msg.payload.len();
        self.peers[i].queue.push_back(Outgoing { msg, sent: 0 });
        self.pump(i);
        Ok(())
    }

    /// Takes completions, reassembles what arrived into `out` (with the senders), returns
    /// credits and sends what waits. Returns the peers that failed meanwhile, with why.
    pub fn progress(&mut self, out: &mut Vec<(Addr, Message)>) -> Vec<(Addr, String)> {
        let me = self.me.clone();
        out.extend(self.to_self.drain(..).map(|m| (me.clone(), m)));
        loop {
            let cs = self.dev.poll_cq(64);
            if cs.is_empty() {
                break;
            }
            for c in cs {
                let Some(&i) = self.by_qp.get(&c.qp) else {
                    continue;
                };
                if c.wr_id & SEND_WR != 0 {
                    self.send_free.push(c.wr_id as u32);
                } else if c.status == Status::Success && c.opcode == Opcode::Recv {
                    self.on_segment(i, c.wr_id as u32, c.byte_len as usize, out);
                }
                if c.status != Status::Success {
                    let why = format!("{:?} on QP {:#x}", c.status, c.qp);
                    self.fail(i, why);
                }
            }
        }
        for i in 0..self.peers.len() {
            self.pump(i);
        }
        self.acknowledge_suspend();
        std::mem::take(&mut self.failed)
    }

    /// Whether a SUSPEND holds the sends.
    pub fn suspended(&self) -> bool {
        self.suspend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requested
    }

    /// Acknowledges a SUSPEND once no send is in flight.
    fn acknowledge_suspend(&mut self) {
        let mut s = self.suspend.lock().unwrap_or_else(|p| p.into_inner());
        if s.requested && !s.acked && self.send_free.len() == SEND_SLOTS {
            match self.dev.ack_event(Event::Suspend) {
                Ok(()) => s.acked = true,
                Err(e) => eprintln!("vfmig: acknowledging SUSPEND: {e}"),
            }
        }
    }

    fn fail(&mut self, i: usize, why: String) {
        let p = &mut self.peers[i];
        if p.failed.is_some() {
            return;
        }
        let dropped: usize = p
            .queue
            .drain(..)
            .map(|o| o.msg.payload.len() - o.sent)
            .sum();
        self.queued -= dropped;
        p.incoming = None;
        p.failed = Some(why.clone());
        self.failed.push((p.addr.clone(), why));
    }

    fn on_segment(&mut self, i: usize, slot: u32, len: usize, out: &mut Vec<(Addr, Message)>) {
        let len = len.min(SLOT);
        let parsed = Header::read(&self.pool.slot(slot)[..len]);
        let p = &mut self.peers[i];
        if p.failed.is_some() {
            return;
        }
        let result = parsed.and_then(|h| {
            p.credits = (p.credits + h.credits).min(RECV_SLOTS);
            if h.flags & CREDIT_ONLY != 0 {
                return Ok(None);
            }
            if h.flags & FIRST != 0 {
                if p.incoming.is_some() {
                    return Err("a new message began before the last one ended".to_string());
                }
                if h.total as usize > MAX_MESSAGE {
                    return Err(format!("a message of {} bytes is too long", h.total));
                }
                p.incoming = Some(Incoming {
                    msg: Message {
                        kind: h.kind,
                        tag: h.tag,
                        data: (h.flags & HAS_DATA != 0).then_some(h.data),
                        payload: Vec::with_capacity(h.total as usize),
                    },
                    total: h.total as usize,
                });
            }
            let Some(m) = p.incoming.as_mut() else {
                return Err("a segment came outside any message".to_string());
            };
            if m.msg.payload.len() + h.len as usize > m.total {
                return Err("a message's segments exceed its length".to_string());
            }
            Ok(Some((h.flags & LAST != 0, h.len as usize)))
        });
        match result {
            Ok(None) => {}
            Ok(Some((last, n))) => {
                let bytes = self.pool.slot(slot)[HEADER..HEADER + n].to_vec();
                let p = &mut self.peers[i];
                let m = p.incoming.as_mut().expect("checked above");
                m.msg.payload.extend_from_slice(&bytes);
                if last {
                    let m = p.incoming.take().expect("checked above");
                    if m.msg.payload.len() != m.total {
                        let why = "a message ended short of its length".to_string();
                        self.fail(i, why);
                        return;
                    }
                    out.push((p.addr.clone(), m.msg));
                }
            }
            Err(why) => {
                self.fail(i, format!("malformed segment: {why}"));
                return;
            }
        }
        // The slot goes back to the receive queue; its credit goes back to the sender.
        let p = &mut self.peers[i];
        let sge = self.pool.slot_sge(slot, SLOT);
        match self.dev.post_recv(p.qp, slot.into(), sge) {
            Ok(()) => p.owed += 1,
            Err(e) => {
                let why = format!("reposting a receive: {e}");
                self.fail(i, why);
            }
        }
    }

    /// Sends what peer `i`'s credits and the free send slots allow.
    fn pump(&mut self, i: usize) {
        loop {
            let p = &self.peers[i];
            if p.failed.is_some() || self.send_free.is_empty() || self.suspended() {
                return;
            }
            let data_ok = p.credits >= 2 && !p.queue.is_empty();
            let credit_only = !data_ok && p.credits >= 1 && p.owed >= RECV_SLOTS / 2;
            if !data_ok && !credit_only {
                return;
            }
            let slot = self.send_free.pop().expect("checked");
            let p = &mut self.peers[i];
            let mut h = Header {
                flags: CREDIT_ONLY,
                kind: 0,
                credits: std::mem::take(&mut p.owed),
                total: 0,
                len: 0,
                tag: 0,
                data: 0,
            };
            let mut chunk: &[u8] = &[];
            let mut done = false;
            if data_ok {
                let o = p.queue.front().expect("checked");
                let n = (o.msg.payload.len() - o.sent).min(SLOT - HEADER);
                h.flags = if o.sent == 0 { FIRST } else { 0 };
                if o.sent + n == o.msg.payload.len() {
                    h.flags |= LAST;
                    done = true;
                }
                if o.msg.data.is_some() {
                    h.flags |= HAS_DATA;
                }
                h.kind = o.msg.kind;
                h.total = o.msg.payload.len() as u32;
                h.len = n as u32;
                h.tag = o.msg.tag;
                h.data = o.msg.data.unwrap_or(0);
                chunk = &o.msg.payload[o.sent..o.sent + n];
            }
            let n = chunk.len();
            let buf = self.pool.slot(slot);
            h.write(&mut buf[..HEADER]);
            buf[HEADER..HEADER + n].copy_from_slice(chunk);
            let p = &mut self.peers[i];
            p.credits -= 1;
            if data_ok {
                let o = p.queue.front_mut().expect("checked");
                o.sent += n;
                if done {
                    p.queue.pop_front();
                }
                self.queued -= n;
            }
            let sge = self.pool.slot_sge(slot, HEADER + n);
            if let Err(e) = self
                .dev
                .post_send(p.qp, SEND_WR | u64::from(slot), sge, None)
            {
                self.send_free.push(slot);
                let why = format!("posting a send: {e}");
                self.fail(i, why);
                return;
            }
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // The QPs go first, with the receives they hold in the slots: the VF keeps a QP
        // until it is destroyed (and carries it through every migration), so an endpoint
        // that closes gives its QPs back. A companion that does not answer is not asked
        // again for the next one.
        for p in &self.peers {
            if let Err(e) = self.dev.destroy_qp(p.qp) {
                eprintln!(
                    "vfmig: QP {:#x} toward {} was not destroyed: {e}; the VF keeps it",
                    p.qp, p.addr
                );
                if e.kind() == std::io::ErrorKind::TimedOut {
                    break;
                }
            }
        }
        // A region goes after the QPs whose receives pointed into it: a receive left on a
        // QP that stayed finds no region, and a region that stays keeps its chunk pinned, so
        // nothing lands in freed memory.
        for (buf, key) in self.pool.chunks.drain(..) {
            if self.dev.deregister(key).is_ok() {
                drop(buf);
            } else {
                std::mem::forget(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Fabric;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn qp_numbers_are_what_the_other_end_computes_and_never_in_the_counters_range() {
        let a = qp_number(7, "b", 9);
        assert_eq!(a, qp_number(7, "b", 9));
        assert_ne!(a, qp_number(9, "b", 7));
        assert_ne!(a, qp_number(7, "c", 9));
        assert!(a & 0x8000_0000 != 0);
        assert_eq!(
            Addr::parse("vm-a/42"),
            Some(Addr {
                vm: "vm-a".into(),
                port: 42
            })
        );
        for bad in ["", "a", "/1", "a/", "a/x", &format!("{}/1", "v".repeat(65))] {
            assert_eq!(Addr::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_header_that_lies_is_refused() {
        let h = Header {
            flags: FIRST | LAST,
            kind: 1,
            credits: 3,
            total: 4,
            len: 4,
            tag: 9,
            data: 0,
        };
        let mut b = vec![0u8; HEADER + 4];
        h.write(&mut b);
        assert_eq!(Header::read(&b), Ok(h));
        assert!(Header::read(&b[..HEADER + 3])
            .unwrap_err()
            .contains("says 4"));
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(Header::read(&bad).unwrap_err().contains("magic"));
        let mut bad = b.clone();
        bad[4] = RECV_SLOTS as u8 + 1;
        assert!(Header::read(&bad).unwrap_err().contains("credits"));
        assert!(Header::read(&b[..8]).is_err());
    }

    fn channels(fabric: &Fabric, names: &[&str]) -> Vec<Channel> {
        names
            .iter()
            .enumerate()
            .map(|(i, vm)| {
                let dev = Arc::new(fabric.attach(vm, i as u8 + 1));
                let f = fabric.clone();
                let me = Addr {
                    vm: vm.to_string(),
                    port: 100 + i as u32,
                };
                Channel::open_with(dev, me, Box::new(move |b| f.add_buffer(b))).unwrap()
            })
            .collect()
    }

    /// Channels of VMs a and b over a fake fabric, unless pinned buffers cannot be made here.
    fn two() -> Option<(Fabric, Vec<Channel>)> {
        if !root() {
            eprintln!("skipped: needs root for pagemap");
            return None;
        }
        let fabric = Fabric::default();
        let chs = channels(&fabric, &["a", "b"]);
        Some((fabric, chs))
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Progresses every channel until `want` messages arrived at `at`.
    fn until(chs: &mut [Channel], at: usize, want: usize) -> Vec<(Addr, Message)> {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while got.len() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {want}",
                got.len()
            );
            for (i, c) in chs.iter_mut().enumerate() {
                let mut out = Vec::new();
                let failed = c.progress(&mut out);
                assert!(failed.is_empty(), "{failed:?}");
                if i == at {
                    got.extend(out);
                } else {
                    assert!(out.is_empty());
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        got
    }

    #[test]
    fn messages_of_every_size_arrive_whole_and_in_order_with_credits_flowing_back() {
        let Some((fabric, mut chs)) = two() else {
            return;
        };
        let b = chs[1].addr().clone();
        let a = chs[0].addr().clone();
        chs[1].connect(&a).unwrap();
        // POST_RECV has no reply: let b's receives reach the fabric before a sends.
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Far more segments than credits: they must come back for the rest to go.
        let sizes = [
            0,
            1,
            SLOT - HEADER,
            SLOT - HEADER + 1,
            3 * SLOT + 5,
            1 << 20,
        ];
        for (i, &n) in sizes.iter().enumerate() {
            let msg = Message {
                kind: 1,
                tag: i as u64,
                data: (i % 2 == 0).then_some(i as u64 * 7),
                payload: pattern(n, i as u8),
            };
            chs[0].send(&b, msg).unwrap();
        }
        let got = until(&mut chs, 1, sizes.len());
        for (i, (from, m)) in got.iter().enumerate() {
            assert_eq!(*from, a);
            assert_eq!(m.tag, i as u64);
            assert_eq!(m.data, (i % 2 == 0).then_some(i as u64 * 7));
            assert_eq!(m.payload, pattern(sizes[i], i as u8), "message {i}");
        }
        assert_eq!(chs[0].queued(), 0);
        // And back the other way, with credits still right after all that.
        chs[1]
            .send(
                &a,
                Message {
                    kind: 0,
                    tag: 99,
                    data: None,
                    payload: pattern(200_000, 3),
                },
            )
            .unwrap();
        let back = until(&mut chs, 0, 1);
        assert_eq!(back[0].1.payload, pattern(200_000, 3));
        // To itself: in process.
        chs[0]
            .send(
                &a,
                Message {
                    kind: 0,
                    tag: 5,
                    data: None,
                    payload: vec![1],
                },
            )
            .unwrap();
        assert_eq!(until(&mut chs, 0, 1)[0].0, a);
        let log = fabric.log();
        assert_eq!(log.failures, 0);
        assert_eq!(
            log.sends_without_receive, 0,
            "credits keep a receive ready for every send"
        );
    }

    #[test]
    fn a_closed_channel_gives_its_qps_back_to_the_vf() {
        let Some((fabric, mut chs)) = two() else {
            return;
        };
        let b = chs[1].addr().clone();
        let a = chs[0].addr().clone();
        chs[0].connect(&b).unwrap();
        chs[1].connect(&a).unwrap();
        assert_eq!((fabric.qps("a"), fabric.qps("b")), (1, 1));
        drop(chs.remove(0));
        assert_eq!((fabric.qps("a"), fabric.qps("b")), (0, 1));
        drop(chs);
        assert_eq!(fabric.qps("b"), 0);
    }

    #[test]
    fn after_suspend_nothing_is_sent_until_resume_and_everything_arrives() {
        let Some((fabric, mut chs)) = two() else {
            return;
        };
        // SUSPEND to a at its first send; RESUME 50 ms after its acknowledgement.
        fabric.suspend_after("a", 0);
        let (a, b) = (chs[0].addr().clone(), chs[1].addr().clone());
        chs[1].connect(&a).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        for i in 0..20 {
            let msg = Message {
                kind: 1,
                tag: i,
                data: None,
                payload: pattern(100_000, i as u8),
            };
            chs[0].send(&b, msg).unwrap();
        }
        let got = until(&mut chs, 1, 20);
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, (_, m))| m.payload == pattern(100_000, i as u8)));
        let log = fabric.log();
        assert_eq!(log.suspend_acks.get("a"), Some(&1), "{log:?}");
        assert_eq!(log.sends_while_suspended, 0, "{log:?}");
        assert!(!chs[0].suspended());
    }

    #[test]
    fn too_long_too_much_and_a_taken_qp_number_are_errors_that_say_so() {
        let Some((_fabric, mut chs)) = two() else {
            return;
        };
        let b = chs[1].addr().clone();
        let long = Message {
            kind: 0,
            tag: 0,
            data: None,
            payload: vec![0; MAX_MESSAGE + 1],
        };
        assert!(matches!(
            chs[0].send(&b, long),
            Err(ChannelError::TooLong(_))
        ));
        // b never connects back: the first segments go nowhere (the fake fails them), and
        // the link to b is reported failed, once.
        let big = |tag| Message {
            kind: 0,
            tag,
            data: None,
            payload: vec![0; 40 << 20],
        };
        chs[0].send(&b, big(1)).unwrap();
        let e = chs[0].send(&b, big(2));
        assert!(
            matches!(
                e,
                Err(ChannelError::Busy { .. }) | Err(ChannelError::PeerFailed { .. })
            ),
            "{e:?}"
        );
        let mut failed = Vec::new();
        for _ in 0..200 {
            failed.extend(chs[0].progress(&mut Vec::new()));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(failed.len(), 1, "reported once: {failed:?}");
        assert!(failed[0].1.contains("UnknownPeer"), "{failed:?}");
        assert_eq!(
            chs[0].queued(),
            0,
            "what was queued for a failed peer is dropped"
        );
        // Another endpoint of guest a that computes the same number is refused.
        let again = chs[0].dev.create_qp_at(qp_number(100, "b", 101));
        assert!(again.is_err(), "the number is taken: {again:?}");
    }
}
