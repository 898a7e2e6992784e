//! The guest ↔ companion protocol: Ethernet frames of EtherType 0x88B5 over the guest's
//! virtio-net NIC, whose backend is the companion. The format is documented in
//! `docs/guest-frames.md`; this crate is its one implementation, used by both sides.
//!
//! Every frame: Ethernet header (14 bytes), then a vfmig header
//! `magic u16 = 0x5646 ("VF") | version u8 = 1 | kind u8 | seq u32`, then the kind's body,
//! all little-endian. Commands flow guest → companion; replies, completions and events flow
//! companion → guest. Decoding never panics: a malformed frame is an error the receiver counts
//! and drops.

#![deny(missing_docs)]

/// The EtherType of vfmig frames (IEEE local experimental 2).
pub const ETHERTYPE: u16 = 0x88B5;
/// Magic at the start of the vfmig header.
pub const MAGIC: u16 = 0x5646;
/// Protocol version.
pub const VERSION: u8 = 1;
/// MAC address the companion sends from.
pub const COMPANION_MAC: [u8; 6] = [0x02, 0x76, 0x66, 0x6d, 0x69, 0x67];
/// Ethernet header + vfmig header.
pub const HEADER_LEN: usize = 14 + 8;
/// Largest frame either side sends (fits a 1500-byte MTU).
pub const MAX_FRAME: usize = 1514;
/// Most completions one frame carries.
pub const MAX_COMPLETIONS: usize = 32;
/// Most segments a REG_MR command carries.
pub const MAX_SEGMENTS: usize = 80;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not an 0x88B5 frame.
    NotVfmig,
    /// Shorter than its fields.
    Truncated,
    /// Wrong magic or version.
    BadHeader,
    /// Unknown kind or field value.
    Unknown(&'static str, u32),
    /// Bytes left over after the body.
    Trailing,
    /// A name is not UTF-8 or too long.
    BadName,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::NotVfmig => write!(f, "not a vfmig frame (EtherType is not 0x88B5)"),
            FrameError::Truncated => write!(f, "frame shorter than its fields"),
            FrameError::BadHeader => write!(f, "bad vfmig magic or version"),
            FrameError::Unknown(what, v) => write!(f, "unknown {what} {v}"),
            FrameError::Trailing => write!(f, "trailing bytes after the body"),
            FrameError::BadName => write!(f, "peer name is not UTF-8 or longer than 64 bytes"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A piece of local memory a work request names: `len` bytes at `addr` of the region `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Sge {
    /// Address, in the region's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The region.
    pub lkey: u32,
}

/// Access flags of a region.
pub mod access {
    /// The VF may write it for a local receive.
    pub const LOCAL_WRITE: u8 = 1;
    /// Peers may RDMA WRITE into it.
    pub const REMOTE_WRITE: u8 = 2;
}

/// What a send work request (POST_SEND) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "op", rename_all = "snake_case"))]
pub enum SendOp {
    /// One-sided write into the peer's region `rkey` at `remote_addr`; with `imm`, it also
    /// consumes a posted receive at the peer and completes there with the immediate.
    Write {
        /// Peer address, in the peer region's address space.
        remote_addr: u64,
        /// The peer's region.
        rkey: u32,
        /// Immediate data (WRITE_WITH_IMM).
        imm: Option<u32>,
    },
    /// Two-sided send into the peer's next posted receive.
    Send {
        /// Immediate data (SEND_WITH_IMM).
        imm: Option<u32>,
    },
}

/// What completed (as in the verbs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[repr(u8)]
pub enum Opcode {
    /// Our WRITE.
    Write = 0,
    /// Our SEND.
    Send = 1,
    /// A SEND landed in our receive.
    Recv = 2,
    /// A WRITE_WITH_IMM consumed our receive.
    RecvRdmaWithImm = 3,
}

/// Completion status codes (after `ibv_wc_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[repr(u8)]
pub enum Status {
    /// Success.
    Success = 0,
    /// Local buffer outside the poster's regions.
    LocalProtectionError = 1,
    /// Incoming SEND larger than the receive.
    LocalLengthError = 2,
    /// The peer refused (bad rkey, out of range, no access).
    RemoteAccessError = 3,
    /// The peer refused the request as malformed.
    RemoteInvalidRequest = 4,
    /// The peer had no receive posted for too long.
    RnrRetryExceeded = 5,
    /// The peer was unreachable for too long.
    RetryExceeded = 6,
    /// The QP's peer is unknown or not connected.
    UnknownPeer = 7,
    /// Flushed after an error on the QP.
    Flushed = 8,
    /// The peer's VF state is gone: its VM stopped or its companion restarted. The QP is in
    /// the error state; it never works again (connect a new QP once the peer is back).
    RemoteLost = 9,
}

impl Opcode {
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => Self::Write,
            1 => Self::Send,
            2 => Self::Recv,
            3 => Self::RecvRdmaWithImm,
            _ => return Err(FrameError::Unknown("opcode", v.into())),
        })
    }
}

impl Status {
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => Self::Success,
            1 => Self::LocalProtectionError,
            2 => Self::LocalLengthError,
            3 => Self::RemoteAccessError,
            4 => Self::RemoteInvalidRequest,
            5 => Self::RnrRetryExceeded,
            6 => Self::RetryExceeded,
            7 => Self::UnknownPeer,
            8 => Self::Flushed,
            9 => Self::RemoteLost,
            _ => return Err(FrameError::Unknown("status", v.into())),
        })
    }
}

/// A completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Completion {
    /// The work request's id.
    pub wr_id: u64,
    /// QP number.
    pub qp: u32,
    /// What completed.
    pub opcode: Opcode,
    /// How.
    pub status: Status,
    /// Bytes moved.
    pub byte_len: u32,
    /// Immediate data.
    pub imm: Option<u32>,
}

/// Migration events the companion tells the guest runtime about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Event {
    /// Cooperative strategy: stop communicating and report ready.
    Suspend = 1,
    /// Cooperative strategy: communication may resume.
    Resume = 2,
    /// The VM now runs at its destination.
    Migrated = 3,
}

/// A frame's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Guest: open the device. Reply value: 0.
    Open,
    /// Guest: register memory at `addr` backed by `segments`. Reply value: the key.
    RegMr {
        /// Guest address of the first byte.
        addr: u64,
        /// [`access`] flags.
        access: u8,
        /// Guest-physical pages, in order.
        segments: Vec<Segment>,
    },
    /// Guest: drop a region. Reply value: 0.
    DeregMr {
        /// The key.
        key: u32,
    },
    /// Guest: a new QP. Reply value: its number.
    CreateQp,
    /// Guest: a new QP numbered `qp` (not 0, not in use), so that a peer can compute the
    /// number instead of being told it. Reply value: `qp`.
    CreateQpAt {
        /// The number asked for.
        qp: u32,
    },
    /// Guest: destroy a QP: its posted requests are dropped without completions, and a
    /// peer's requests to it are answered as for a QP never created. Reply value: 0.
    DestroyQp {
        /// The QP.
        qp: u32,
    },
    /// Guest: connect a QP to a peer VM's QP. Reply value: 0.
    ConnectQp {
        /// Local QP.
        qp: u32,
        /// Peer VM's name.
        peer: String,
        /// Peer's QP.
        peer_qp: u32,
    },
    /// Guest: post a send work request (no reply; the outcome is a completion).
    PostSend {
        /// QP.
        qp: u32,
        /// Caller's id.
        wr_id: u64,
        /// Local buffer.
        sge: Sge,
        /// What to do.
        op: SendOp,
    },
    /// Guest: post a receive (no reply).
    PostRecv {
        /// QP.
        qp: u32,
        /// Caller's id.
        wr_id: u64,
        /// Local buffer.
        sge: Sge,
    },
    /// Guest: the runtime acknowledges an event (e.g. ready after SUSPEND).
    EventAck {
        /// The event.
        event: Event,
    },
    /// Companion: reply to the command with the same `seq`; `status` 0 is success, else
    /// `value` is meaningless and `error` says why.
    Reply {
        /// 0 on success.
        status: u32,
        /// The result.
        value: u64,
        /// The reason, on failure.
        error: String,
    },
    /// Companion: completions.
    Completions(Vec<Completion>),
    /// Companion: a migration event.
    Event(Event),
}

const K_OPEN: u8 = 1;
const K_REG_MR: u8 = 2;
const K_DEREG_MR: u8 = 3;
const K_CREATE_QP: u8 = 4;
const K_CONNECT_QP: u8 = 5;
const K_POST_SEND: u8 = 6;
const K_POST_RECV: u8 = 7;
const K_EVENT_ACK: u8 = 8;
const K_CREATE_QP_AT: u8 = 9;
const K_DESTROY_QP: u8 = 0x0a;
const K_REPLY: u8 = 0x81;
const K_COMPLETIONS: u8 = 0x82;
const K_EVENT: u8 = 0x83;

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// Request id (replies carry the command's).
    pub seq: u32,
    /// The body.
    pub msg: Message,
}

struct W(Vec<u8>);
impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn imm(&mut self, v: Option<u32>) {
        self.u8(v.is_some() as u8);
        self.u32(v.unwrap_or(0));
    }
    fn sge(&mut self, s: &Sge) {
        self.u64(s.addr);
        self.u32(s.len);
        self.u32(s.lkey);
    }
    fn str(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(255)];
        self.u8(b.len() as u8);
        self.0.extend_from_slice(b);
    }
}

/// Encodes a frame, Ethernet header included.
pub fn encode(f: &Frame) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(64));
    w.0.extend_from_slice(&f.dst);
    w.0.extend_from_slice(&f.src);
    w.0.extend_from_slice(&ETHERTYPE.to_be_bytes());
    w.u16(MAGIC);
    w.u8(VERSION);
    let kind_at = w.0.len();
    w.u8(0);
    w.u32(f.seq);
    let kind = match &f.msg {
        Message::Open => K_OPEN,
        Message::RegMr {
            addr,
            access,
            segments,
        } => {
            w.u64(*addr);
            w.u8(*access);
            w.u16(segments.len() as u16);
            for s in segments {
                w.u64(s.gpa);
                w.u64(s.len);
            }
            K_REG_MR
        }
        Message::DeregMr { key } => {
            w.u32(*key);
            K_DEREG_MR
        }
        Message::CreateQp => K_CREATE_QP,
        Message::CreateQpAt { qp } => {
            w.u32(*qp);
            K_CREATE_QP_AT
        }
        Message::DestroyQp { qp } => {
            w.u32(*qp);
            K_DESTROY_QP
        }
        Message::ConnectQp { qp, peer, peer_qp } => {
            w.u32(*qp);
            w.u32(*peer_qp);
            w.str(peer);
            K_CONNECT_QP
        }
        Message::PostSend { qp, wr_id, sge, op } => {
            w.u32(*qp);
            w.u64(*wr_id);
            w.sge(sge);
            match op {
                SendOp::Write {
                    remote_addr,
                    rkey,
                    imm,
                } => {
                    w.u8(0);
                    w.u64(*remote_addr);
                    w.u32(*rkey);
                    w.imm(*imm);
                }
                SendOp::Send { imm } => {
                    w.u8(1);
                    w.u64(0);
                    w.u32(0);
                    w.imm(*imm);
                }
            }
            K_POST_SEND
        }
        Message::PostRecv { qp, wr_id, sge } => {
            w.u32(*qp);
            w.u64(*wr_id);
            w.sge(sge);
            K_POST_RECV
        }
        Message::EventAck { event } => {
            w.u8(*event as u8);
            K_EVENT_ACK
        }
        Message::Reply {
            status,
            value,
            error,
        } => {
            w.u32(*status);
            w.u64(*value);
            w.str(error);
            K_REPLY
        }
        Message::Completions(cs) => {
            w.u16(cs.len() as u16);
            for c in cs {
                w.u64(c.wr_id);
                w.u32(c.qp);
                w.u8(c.opcode as u8);
                w.u8(c.status as u8);
                w.u32(c.byte_len);
                w.imm(c.imm);
            }
            K_COMPLETIONS
        }
        Message::Event(e) => {
            w.u8(*e as u8);
            K_EVENT
        }
    };
    w.0[kind_at] = kind;
    // Pad to Ethernet's minimum frame (60 bytes without the FCS).
    if w.0.len() < 60 {
        w.0.resize(60, 0);
    }
    w.0
}

/// A read past the end of a byte buffer: the frame is shorter than its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// Offset of the field that did not fit.
    pub at: usize,
    /// Bytes the field needs.
    pub wanted: usize,
    /// Bytes that were left.
    pub left: usize,
}

impl std::fmt::Display for Truncated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "frame shorter than its fields: {} bytes wanted at offset {}, {} left",
            self.wanted, self.at, self.left
        )
    }
}

impl std::error::Error for Truncated {}

impl From<Truncated> for FrameError {
    fn from(_: Truncated) -> Self {
        FrameError::Truncated
    }
}

/// A cursor over received bytes: little-endian integers and byte runs, each read either whole
/// or refused with [`Truncated`]; it never panics. The one reader of both the guest frames and
/// the companions' fabric frames.
#[derive(Debug, Clone)]
pub struct ByteReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> ByteReader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// A reader at `offset` into `bytes` (past a header read otherwise).
    pub fn at(bytes: &'a [u8], offset: usize) -> Self {
        Self { bytes, at: offset }
    }

    /// The offset of the next byte to read.
    pub fn position(&self) -> usize {
        self.at
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        let short = Truncated {
            at: self.at,
            wanted: n,
            left: self.remaining(),
        };
        let end = self.at.checked_add(n).ok_or(short)?;
        let s = self.bytes.get(self.at..end).ok_or(short)?;
        self.at = end;
        Ok(s)
    }

    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = self.bytes.get(self.at..).unwrap_or(&[]);
        self.at = self.at.max(self.bytes.len());
        s
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.array::<1>()?[0])
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, Truncated> {
        self.array().map(u16::from_le_bytes)
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        self.array().map(u32::from_le_bytes)
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        self.array().map(u64::from_le_bytes)
    }
}

fn read_imm(r: &mut ByteReader<'_>) -> Result<Option<u32>, FrameError> {
    let has = r.u8()?;
    let v = r.u32()?;
    match has {
        0 => Ok(None),
        1 => Ok(Some(v)),
        x => Err(FrameError::Unknown("immediate flag", x.into())),
    }
}

fn read_sge(r: &mut ByteReader<'_>) -> Result<Sge, FrameError> {
    Ok(Sge {
        addr: r.u64()?,
        len: r.u32()?,
        lkey: r.u32()?,
    })
}

fn read_str(r: &mut ByteReader<'_>, max: usize) -> Result<String, FrameError> {
    let n = r.u8()? as usize;
    if n > max {
        return Err(FrameError::BadName);
    }
    String::from_utf8(r.bytes(n)?.to_vec()).map_err(|_| FrameError::BadName)
}

fn read_event(r: &mut ByteReader<'_>) -> Result<Event, FrameError> {
    Ok(match r.u8()? {
        1 => Event::Suspend,
        2 => Event::Resume,
        3 => Event::Migrated,
        x => return Err(FrameError::Unknown("event", x.into())),
    })
}

/// Decodes a frame (Ethernet header included). Padding after the body is allowed only up to
/// Ethernet's 60-byte minimum.
pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    if bytes.len() < 14 || u16::from_be_bytes([bytes[12], bytes[13]]) != ETHERTYPE {
        return Err(FrameError::NotVfmig);
    }
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&bytes[0..6]);
    src.copy_from_slice(&bytes[6..12]);
    let mut r = ByteReader::at(bytes, 14);
    if r.u16()? != MAGIC || r.u8()? != VERSION {
        return Err(FrameError::BadHeader);
    }
    let kind = r.u8()?;
    let seq = r.u32()?;
    let msg = match kind {
        K_OPEN => Message::Open,
        K_REG_MR => {
            let addr = r.u64()?;
            let access = r.u8()?;
            let n = r.u16()? as usize;
            if n > MAX_SEGMENTS {
                return Err(FrameError::Unknown("segment count", n as u32));
            }
            let mut segments = Vec::with_capacity(n);
            for _ in 0..n {
                segments.push(Segment {
                    gpa: r.u64()?,
                    len: r.u64()?,
                });
            }
            Message::RegMr {
                addr,
                access,
                segments,
            }
        }
        K_DEREG_MR => Message::DeregMr { key: r.u32()? },
        K_CREATE_QP => Message::CreateQp,
        K_CREATE_QP_AT => Message::CreateQpAt { qp: r.u32()? },
        K_DESTROY_QP => Message::DestroyQp { qp: r.u32()? },
        K_CONNECT_QP => {
            let qp = r.u32()?;
            let peer_qp = r.u32()?;
            let peer = read_str(&mut r, 64)?;
            Message::ConnectQp { qp, peer, peer_qp }
        }
        K_POST_SEND => {
            let qp = r.u32()?;
            let wr_id = r.u64()?;
            let sge = read_sge(&mut r)?;
            let op = r.u8()?;
            let remote_addr = r.u64()?;
            let rkey = r.u32()?;
            let imm = read_imm(&mut r)?;
            let op = match op {
                0 => SendOp::Write {
                    remote_addr,
                    rkey,
                    imm,
                },
                1 => SendOp::Send { imm },
                x => return Err(FrameError::Unknown("send op", x.into())),
            };
            Message::PostSend { qp, wr_id, sge, op }
        }
        K_POST_RECV => Message::PostRecv {
            qp: r.u32()?,
            wr_id: r.u64()?,
            sge: read_sge(&mut r)?,
        },
        K_EVENT_ACK => Message::EventAck {
            event: read_event(&mut r)?,
        },
        K_REPLY => Message::Reply {
            status: r.u32()?,
            value: r.u64()?,
            error: read_str(&mut r, 255)?,
        },
        K_COMPLETIONS => {
            let n = r.u16()? as usize;
            if n > MAX_COMPLETIONS {
                return Err(FrameError::Unknown("completion count", n as u32));
            }
            let mut cs = Vec::with_capacity(n);
            for _ in 0..n {
                cs.push(Completion {
                    wr_id: r.u64()?,
                    qp: r.u32()?,
                    opcode: Opcode::from_u8(r.u8()?)?,
                    status: Status::from_u8(r.u8()?)?,
                    byte_len: r.u32()?,
                    imm: read_imm(&mut r)?,
                });
            }
            Message::Completions(cs)
        }
        K_EVENT => Message::Event(read_event(&mut r)?),
        k => return Err(FrameError::Unknown("kind", k.into())),
    };
    // Anything after the body must be Ethernet padding: zeros, up to 60 bytes in all.
    let at = r.position();
    if at < bytes.len() && (bytes.len() > 60 || bytes[at..].iter().any(|&b| b != 0)) {
        return Err(FrameError::Trailing);
    }
    Ok(Frame { dst, src, seq, msg })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: Message) -> Frame {
        Frame {
            dst: COMPANION_MAC,
            src: [0x52, 0x54, 0, 1, 2, 3],
            seq: 77,
            msg,
        }
    }

    #[test]
    fn every_message_round_trips_and_fits_a_frame() {
        let sge = Sge {
            addr: 0x7000,
            len: 64,
            lkey: 3,
        };
        let c = Completion {
            wr_id: 9,
            qp: 2,
            opcode: Opcode::RecvRdmaWithImm,
            status: Status::Success,
            byte_len: 64,
            imm: Some(5),
        };
        for m in [
            Message::Open,
            Message::RegMr {
                addr: 1,
                access: access::REMOTE_WRITE,
                segments: vec![
                    Segment {
                        gpa: 4096,
                        len: 8192
                    };
                    MAX_SEGMENTS
                ],
            },
            Message::DeregMr { key: 4 },
            Message::CreateQp,
            Message::CreateQpAt { qp: 0x8000_0007 },
            Message::DestroyQp { qp: 0x8000_0007 },
            Message::ConnectQp {
                qp: 1,
                peer: "rank-2".into(),
                peer_qp: 7,
            },
            Message::PostSend {
                qp: 1,
                wr_id: 2,
                sge,
                op: SendOp::Write {
                    remote_addr: 3,
                    rkey: 4,
                    imm: Some(5),
                },
            },
            Message::PostSend {
                qp: 1,
                wr_id: 2,
                sge,
                op: SendOp::Send { imm: None },
            },
            Message::PostRecv {
                qp: 1,
                wr_id: 2,
                sge,
            },
            Message::EventAck {
                event: Event::Suspend,
            },
            Message::Reply {
                status: 1,
                value: 0,
                error: "no such QP".into(),
            },
            Message::Completions(vec![c; MAX_COMPLETIONS]),
            Message::Event(Event::Migrated),
        ] {
            let f = frame(m);
            let bytes = encode(&f);
            assert!(bytes.len() <= MAX_FRAME, "{} bytes", bytes.len());
            assert!(bytes.len() >= 60);
            assert_eq!(decode(&bytes).unwrap(), f);
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let good = encode(&frame(Message::DeregMr { key: 1 }));
        assert_eq!(decode(&good[..10]), Err(FrameError::NotVfmig));
        let mut bad = good.clone();
        bad[14] ^= 1;
        assert_eq!(decode(&bad), Err(FrameError::BadHeader));
        let mut bad = good.clone();
        bad[17] = 0x55;
        assert!(matches!(decode(&bad), Err(FrameError::Unknown("kind", _))));
        let mut bad = good.clone();
        bad.push(1);
        assert_eq!(decode(&bad), Err(FrameError::Trailing));
        let reg = encode(&frame(Message::RegMr {
            addr: 0,
            access: 0,
            segments: vec![Segment { gpa: 0, len: 1 }; 3],
        }));
        assert_eq!(decode(&reg[..reg.len() - 3]), Err(FrameError::Truncated));
        // Every truncation and every single-byte corruption decodes or errs, never panics.
        for cut in 0..reg.len() {
            let _ = decode(&reg[..cut]);
        }
        for i in 0..reg.len() {
            let mut b = reg.clone();
            b[i] = b[i].wrapping_add(0x41);
            let _ = decode(&b);
        }
    }

    #[test]
    fn the_byte_reader_reads_little_endian_and_refuses_short_reads() {
        let b = [1u8, 2, 0, 3, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 9, 9];
        let mut r = ByteReader::new(&b);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(2));
        assert_eq!(r.u32(), Ok(3));
        assert_eq!(r.u64(), Ok(4));
        assert_eq!(r.remaining(), 2);
        assert_eq!(
            r.u32(),
            Err(Truncated {
                at: 15,
                wanted: 4,
                left: 2
            })
        );
        assert_eq!(r.position(), 15, "a refused read consumes nothing");
        assert_eq!(r.bytes(usize::MAX).unwrap_err().left, 2);
        assert_eq!(r.rest(), &[9, 9]);
        assert_eq!(r.rest(), &[] as &[u8]);
        assert_eq!(ByteReader::at(&b, 99).u8().unwrap_err().left, 0);
        assert_eq!(FrameError::from(r.u8().unwrap_err()), FrameError::Truncated);
    }
}
