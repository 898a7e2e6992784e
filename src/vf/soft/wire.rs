//! The soft VF's fabric protocol: length-prefixed binary frames over TCP between companions.
//!
//! Every frame is `u32 length` (of what follows), `u8 kind`, then the kind's fields in
//! little-endian order. A connection starts with `Hello` from the side that dialled, carrying
//! the fabric's [`FABRIC_VERSION`]; the listener refuses another version ([`WireError::Version`],
//! both versions named). Then the dialler sends requests (`Write`, `Send`) and the listener
//! answers each with an `Ack` carrying the request's packet sequence number (PSN) and status.

use std::io::{self, Read, Write};

use vfmig_proto::{ByteReader, Truncated};

/// Version of the fabric protocol, sent in every `Hello`. Companions of two releases that
/// frame requests differently refuse each other's connections instead of misreading them.
pub const FABRIC_VERSION: u16 = 1;

/// Largest payload one request carries.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or closed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The frame breaks the protocol.
    #[error("malformed fabric frame: {0}")]
    Malformed(String),
    /// The frame ends before its fields do.
    #[error(transparent)]
    Truncated(#[from] Truncated),
    /// The peer speaks another version of the fabric protocol.
    #[error(
        "the peer speaks fabric protocol version {theirs}, this companion speaks version {ours}; \
         run companions of one vfmig release on every VM of the cluster"
    )]
    Version {
        /// The peer's version (0: a release before versions were sent).
        theirs: u16,
        /// This companion's version.
        ours: u16,
    },
    /// A frame's MAC is not the link's: forged, replayed, reordered or corrupted.
    #[error(
        "fabric frame {seq} of an authenticated link fails its MAC: the link is closed; \
         a peer without this link's keys may be injecting frames"
    )]
    BadMac {
        /// The frame's sequence number on the link.
        seq: u64,
    },
}

impl WireError {
    /// Whether the peer broke the protocol (as opposed to the connection failing).
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            WireError::Malformed(_) | WireError::Truncated(_) | WireError::BadMac { .. }
        )
    }
}

/// Status of an acknowledged request, as the target saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AckStatus {
    /// Applied (or applied before: a duplicate).
    Ok = 0,
    /// Bad rkey, range outside the region, or no remote-write access.
    RemoteAccess = 1,
    /// Malformed request, or a SEND larger than the receive.
    RemoteInvalid = 2,
    /// No receive posted: try again later.
    ReceiverNotReady = 3,
    /// The target QP does not exist or is not connected to the sender.
    NoSuchQp = 4,
    /// NAK, sequence error: the request came after a gap (the target expects an earlier PSN)
    /// and was dropped; the sender goes back to its first unacknowledged request at once. Sent
    /// once per gap, as InfiniBand's NAK-sequence-error.
    SequenceGap = 5,
    /// The target's VF state for this QP is gone: the target VM stopped (its VF retired), or
    /// the target failed the QP because the sender's own state was lost before. The sender's
    /// QP fails with [`crate::vf::verbs::Status::RemoteLost`].
    Gone = 6,
}

impl AckStatus {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            0 => Self::Ok,
            1 => Self::RemoteAccess,
            2 => Self::RemoteInvalid,
            3 => Self::ReceiverNotReady,
            4 => Self::NoSuchQp,
            5 => Self::SequenceGap,
            6 => Self::Gone,
            _ => return Err(WireError::Malformed(format!("unknown ack status {v}"))),
        })
    }
}

/// A fabric frame, owning its payload.
pub type Frame = FrameOf<Vec<u8>>;

/// A fabric frame whose payload borrows the buffer it was read into (no copy).
pub type FrameRef<'a> = FrameOf<&'a [u8]>;

/// A fabric frame; `P` holds a request's payload ([`Frame`] owns it, [`FrameRef`] borrows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameOf<P> {
    /// First frame of a connection: who dials (and, on the wire, [`FABRIC_VERSION`]).
    /// `announce` is set by a VM that has just migrated: the peer learns its new fabric
    /// address and replays what it holds for it.
    Hello {
        /// The dialling VM.
        vm: String,
        /// Its fabric listen address (`host:port`).
        listen: String,
        /// Whether this announces a migrated VM.
        announce: bool,
    },
    /// RDMA WRITE (with immediate when `imm` is set).
    Write {
        /// Sender's QP.
        src_qp: u32,
        /// Target's QP.
        dst_qp: u32,
        /// Packet sequence number on the QP.
        psn: u64,
        /// Target region.
        rkey: u32,
        /// Target address.
        addr: u64,
        /// Immediate data.
        imm: Option<u32>,
        /// The data.
        payload: P,
    },
    /// SEND.
    Send {
        /// Sender's QP.
        src_qp: u32,
        /// Target's QP.
        dst_qp: u32,
        /// Packet sequence number on the QP.
        psn: u64,
        /// Immediate data.
        imm: Option<u32>,
        /// The data.
        payload: P,
    },
    /// Acknowledgement of a request.
    Ack {
        /// The sender's QP the ack is for.
        qp: u32,
        /// The request's PSN.
        psn: u64,
        /// Outcome.
        status: AckStatus,
    },
    /// The dialling VM's VF retired: its VM stopped (QEMU's connection ended while the VF was
    /// live). Taken only from the VM it names, over an authenticated link, for the epoch that
    /// link's handshake proved; the listener then fails every QP connected to that VM and
    /// closes the connection (which tells the dialler it was taken).
    Gone {
        /// The VM whose VF retired.
        vm: String,
        /// Its epoch.
        epoch: u64,
    },
    /// A step of the VF's handoff between the source's companion and the destination's, which
    /// both speak for the same VM, on a link of its own (see `super::handoff`).
    Handoff {
        /// Which step.
        op: HandoffOp,
        /// The export it is about (0: none yet).
        generation: u64,
        /// What the step carries: the seeker's listen address, the state, a refusal's reason.
        body: P,
    },
}

/// The steps of a VF handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HandoffOp {
    /// Destination → any companion: "I am this VM's incoming companion (body: my listen
    /// address); if you run its VF, hand it to me when you quiesce".
    Seek = 1,
    /// Source → destination: "I run it; you will get its state at the switchover".
    Here = 2,
    /// Source → destination: the VF state of `generation`, exported at the quiesce (body:
    /// JSON of the state and the frames waiting for the guest).
    State = 3,
    /// Source → destination: the source took `generation` back (its VM runs there again).
    Revoke = 4,
    /// Destination → source: "the VM runs here: drop your copy of `generation`".
    Claim = 5,
    /// Source → destination: the source dropped its copy; the state is the destination's.
    Granted = 6,
    /// Source → destination: no (body: why).
    Refused = 7,
}

impl HandoffOp {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::Seek,
            2 => Self::Here,
            3 => Self::State,
            4 => Self::Revoke,
            5 => Self::Claim,
            6 => Self::Granted,
            7 => Self::Refused,
            _ => return Err(WireError::Malformed(format!("unknown handoff step {v}"))),
        })
    }
}

/// The hello of releases before [`FABRIC_VERSION`]: refused as version 0.
const UNVERSIONED_HELLO: u8 = 1;
const HELLO: u8 = 5;
const WRITE: u8 = 2;
const SEND: u8 = 3;
const ACK: u8 = 4;
/// 6 is the kind of the handshake's claim (`auth::CLAIM`); not a frame.
const GONE: u8 = 7;
const HANDOFF: u8 = 8;

fn put_imm(b: &mut Vec<u8>, imm: Option<u32>) {
    b.push(imm.is_some() as u8);
    b.extend_from_slice(&imm.unwrap_or(0).to_le_bytes());
}

impl<P: AsRef<[u8]>> FrameOf<P> {
    /// A request's payload (empty for other kinds).
    pub fn payload(&self) -> &[u8] {
        match self {
            FrameOf::Write { payload, .. }
            | FrameOf::Send { payload, .. }
            | FrameOf::Handoff { body: payload, .. } => payload.as_ref(),
            _ => &[],
        }
    }
}

impl FrameRef<'_> {
    /// The frame with its payload copied out of the buffer it was read into.
    pub fn into_owned(self) -> Frame {
        match self {
            FrameOf::Hello {
                vm,
                listen,
                announce,
            } => Frame::Hello {
                vm,
                listen,
                announce,
            },
            FrameOf::Write {
                src_qp,
                dst_qp,
                psn,
                rkey,
                addr,
                imm,
                payload,
            } => Frame::Write {
                src_qp,
                dst_qp,
                psn,
                rkey,
                addr,
                imm,
                payload: payload.to_vec(),
            },
            FrameOf::Send {
                src_qp,
                dst_qp,
                psn,
                imm,
                payload,
            } => Frame::Send {
                src_qp,
                dst_qp,
                psn,
                imm,
                payload: payload.to_vec(),
            },
            FrameOf::Ack { qp, psn, status } => Frame::Ack { qp, psn, status },
            FrameOf::Gone { vm, epoch } => Frame::Gone { vm, epoch },
            FrameOf::Handoff {
                op,
                generation,
                body,
            } => Frame::Handoff {
                op,
                generation,
                body: body.to_vec(),
            },
        }
    }
}

/// Bytes of a `Write` body before its payload: kind, QPs, PSN, rkey, address, immediate.
const WRITE_FIELDS: usize = 1 + 4 + 4 + 8 + 4 + 8 + 5;
/// Bytes of a `Send` body before its payload: kind, QPs, PSN, immediate.
const SEND_FIELDS: usize = 1 + 4 + 4 + 8 + 5;
/// Bytes of a `Handoff` body before what it carries: kind, step, generation.
const HANDOFF_FIELDS: usize = 1 + 1 + 8;

/// Where a frame body's payload starts (its length when the kind carries none), from the
/// kind byte alone, before anything is decoded: the frame MAC hashes the payload apart from
/// the fields. A body too short for its kind's fields is all fields (it fails to decode).
pub fn payload_offset(body: &[u8]) -> usize {
    let fields = match body.first() {
        Some(&WRITE) => WRITE_FIELDS,
        Some(&SEND) => SEND_FIELDS,
        Some(&HANDOFF) => HANDOFF_FIELDS,
        _ => body.len(),
    };
    fields.min(body.len())
}

/// Encodes a frame's header: the length prefix (which counts the payload too) and every field
/// but the payload, which follows it on the wire.
pub fn encode_header<P: AsRef<[u8]>>(frame: &FrameOf<P>) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&[0u8; 4]);
    match frame {
        FrameOf::Hello {
            vm,
            listen,
            announce,
        } => {
            b.push(HELLO);
            b.extend_from_slice(&FABRIC_VERSION.to_le_bytes());
            b.push(*announce as u8);
            for s in [vm, listen] {
                b.extend_from_slice(&(s.len() as u16).to_le_bytes());
                b.extend_from_slice(s.as_bytes());
            }
        }
        FrameOf::Write {
            src_qp,
            dst_qp,
            psn,
            rkey,
            addr,
            imm,
            ..
        } => {
            b.push(WRITE);
            b.extend_from_slice(&src_qp.to_le_bytes());
            b.extend_from_slice(&dst_qp.to_le_bytes());
            b.extend_from_slice(&psn.to_le_bytes());
            b.extend_from_slice(&rkey.to_le_bytes());
            b.extend_from_slice(&addr.to_le_bytes());
            put_imm(&mut b, *imm);
        }
        FrameOf::Send {
            src_qp,
            dst_qp,
            psn,
            imm,
            ..
        } => {
            b.push(SEND);
            b.extend_from_slice(&src_qp.to_le_bytes());
            b.extend_from_slice(&dst_qp.to_le_bytes());
            b.extend_from_slice(&psn.to_le_bytes());
            put_imm(&mut b, *imm);
        }
        FrameOf::Ack { qp, psn, status } => {
            b.push(ACK);
            b.extend_from_slice(&qp.to_le_bytes());
            b.extend_from_slice(&psn.to_le_bytes());
            b.push(*status as u8);
        }
        FrameOf::Gone { vm, epoch } => {
            b.push(GONE);
            b.extend_from_slice(&epoch.to_le_bytes());
            b.extend_from_slice(&(vm.len() as u16).to_le_bytes());
            b.extend_from_slice(vm.as_bytes());
        }
        FrameOf::Handoff { op, generation, .. } => {
            b.push(HANDOFF);
            b.push(*op as u8);
            b.extend_from_slice(&generation.to_le_bytes());
        }
    }
    let len = (b.len() - 4 + frame.payload().len()) as u32;
    b[..4].copy_from_slice(&len.to_le_bytes());
    b
}

/// Encodes a frame, length prefix included.
pub fn encode<P: AsRef<[u8]>>(frame: &FrameOf<P>) -> Vec<u8> {
    let mut b = encode_header(frame);
    b.extend_from_slice(frame.payload());
    b
}

/// Writes a frame.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), WireError> {
    w.write_all(&encode(frame))?;
    Ok(())
}

fn read_imm(c: &mut ByteReader<'_>) -> Result<Option<u32>, WireError> {
    let has = c.u8()?;
    let v = c.u32()?;
    Ok((has != 0).then_some(v))
}

fn read_string(c: &mut ByteReader<'_>) -> Result<String, WireError> {
    let n = c.u16()? as usize;
    String::from_utf8(c.bytes(n)?.to_vec())
        .map_err(|_| WireError::Malformed("a name is not UTF-8".into()))
}

/// Decodes a frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
    decode_ref(body).map(FrameRef::into_owned)
}

/// Decodes a frame body (without the length prefix); a request's payload borrows `body`.
pub fn decode_ref(body: &[u8]) -> Result<FrameRef<'_>, WireError> {
    let mut c = ByteReader::new(body);
    let frame = match c.u8()? {
        UNVERSIONED_HELLO => {
            return Err(WireError::Version {
                theirs: 0,
                ours: FABRIC_VERSION,
            })
        }
        HELLO => {
            let theirs = c.u16()?;
            if theirs != FABRIC_VERSION {
                return Err(WireError::Version {
                    theirs,
                    ours: FABRIC_VERSION,
                });
            }
            let announce = c.u8()? != 0;
            let vm = read_string(&mut c)?;
            let listen = read_string(&mut c)?;
            FrameOf::Hello {
                vm,
                listen,
                announce,
            }
        }
        WRITE => FrameOf::Write {
            src_qp: c.u32()?,
            dst_qp: c.u32()?,
            psn: c.u64()?,
            rkey: c.u32()?,
            addr: c.u64()?,
            imm: read_imm(&mut c)?,
            payload: c.rest(),
        },
        SEND => FrameOf::Send {
            src_qp: c.u32()?,
            dst_qp: c.u32()?,
            psn: c.u64()?,
            imm: read_imm(&mut c)?,
            payload: c.rest(),
        },
        ACK => FrameOf::Ack {
            qp: c.u32()?,
            psn: c.u64()?,
            status: AckStatus::from_u8(c.u8()?)?,
        },
        GONE => FrameOf::Gone {
            epoch: c.u64()?,
            vm: read_string(&mut c)?,
        },
        HANDOFF => FrameOf::Handoff {
            op: HandoffOp::from_u8(c.u8()?)?,
            generation: c.u64()?,
            body: c.rest(),
        },
        k => return Err(WireError::Malformed(format!("unknown frame kind {k}"))),
    };
    if c.remaining() != 0 {
        return Err(WireError::Malformed(
            "trailing bytes after the fields".into(),
        ));
    }
    Ok(frame)
}

/// Largest frame body accepted: a request of [`MAX_PAYLOAD`] and its header.
pub const MAX_FRAME: usize = MAX_PAYLOAD + 64;

/// The first chunk of a frame body read; larger bodies grow as their data arrives.
const FIRST_CHUNK: usize = 64 << 10;

/// A connection keeps its body buffer for the next frame up to this size (a 1 MiB request and
/// its header); a larger frame's buffer is given back before the next frame is awaited, so an
/// idle connection holds at most this much.
pub const KEEP_BODY: usize = (1 << 20) + 64;

/// Reads one frame's length prefix and body into `buf`, reused from frame to frame; returns
/// the length prefix as sent and the body's length (the body is `buf[..len]`), or `Ok(None)`
/// on a clean end of stream.
///
/// The length is checked before anything is allocated, and the buffer grows only as data
/// arrives (doubling from [`FIRST_CHUNK`]), so a peer that announces a large frame and sends
/// nothing costs no memory. Bytes of `buf` past its length are zeroed only when it grows, so a
/// connection's frames up to [`KEEP_BODY`] cost no allocation and no zeroing after its first.
pub fn read_frame_body_into(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<Option<(u32, usize)>, WireError> {
    if buf.len() > KEEP_BODY {
        buf.truncate(KEEP_BODY);
        buf.shrink_to(KEEP_BODY);
    }
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let raw = u32::from_le_bytes(len);
    let len = raw as usize;
    if len == 0 || len > MAX_FRAME {
        tracing::warn!(
            len,
            max = MAX_FRAME,
            "fabric frame length out of bounds: refused"
        );
        return Err(WireError::Malformed(format!(
            "frame length {len} out of bounds (at most {MAX_FRAME})"
        )));
    }
    let mut have = 0;
    while have < len {
        let end = have + (len - have).min(have.max(FIRST_CHUNK));
        if buf.len() < end {
            buf.reserve_exact(end - buf.len());
            buf.resize(end, 0);
        }
        r.read_exact(&mut buf[have..end])?;
        have = end;
    }
    Ok(Some((raw, len)))
}

/// Reads one frame; `Ok(None)` on a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, WireError> {
    let mut buf = Vec::new();
    match read_frame_body_into(r, &mut buf)? {
        Some((_, len)) => decode(&buf[..len]).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_kind_round_trips() {
        for f in [
            Frame::Hello {
                vm: "a".into(),
                listen: "10.0.0.1:7000".into(),
                announce: true,
            },
            Frame::Write {
                src_qp: 1,
                dst_qp: 2,
                psn: 3,
                rkey: 4,
                addr: 5,
                imm: Some(6),
                payload: vec![7; 100],
            },
            Frame::Send {
                src_qp: 1,
                dst_qp: 2,
                psn: 3,
                imm: None,
                payload: vec![],
            },
            Frame::Ack {
                qp: 9,
                psn: 10,
                status: AckStatus::ReceiverNotReady,
            },
            Frame::Ack {
                qp: 9,
                psn: 11,
                status: AckStatus::Gone,
            },
            Frame::Gone {
                vm: "b".into(),
                epoch: 0x1234_5678_9abc_def0,
            },
            Frame::Handoff {
                op: HandoffOp::State,
                generation: 7,
                body: b"{}".to_vec(),
            },
            Frame::Handoff {
                op: HandoffOp::Claim,
                generation: 7,
                body: vec![],
            },
        ] {
            let bytes = encode(&f);
            assert_eq!(read_frame(&mut &bytes[..]).unwrap().unwrap(), f);
        }
    }

    #[test]
    fn the_payload_offset_of_every_kind_is_where_its_encoding_puts_the_payload() {
        let frames = [
            Frame::Hello {
                vm: "a".into(),
                listen: "10.0.0.1:7000".into(),
                announce: false,
            },
            Frame::Write {
                src_qp: 1,
                dst_qp: 2,
                psn: 3,
                rkey: 4,
                addr: 5,
                imm: Some(6),
                payload: vec![7; 100],
            },
            Frame::Send {
                src_qp: 1,
                dst_qp: 2,
                psn: 3,
                imm: None,
                payload: vec![8; 3],
            },
            Frame::Ack {
                qp: 9,
                psn: 10,
                status: AckStatus::Ok,
            },
            Frame::Gone {
                vm: "b".into(),
                epoch: 1,
            },
            Frame::Handoff {
                op: HandoffOp::Refused,
                generation: 2,
                body: b"taken back".to_vec(),
            },
        ];
        for f in frames {
            let bytes = encode(&f);
            assert_eq!(
                4 + payload_offset(&bytes[4..]),
                encode_header(&f).len(),
                "{f:?}"
            );
        }
        assert_eq!(
            payload_offset(&[WRITE, 1, 2]),
            3,
            "a short body is all fields"
        );
        assert_eq!(payload_offset(&[]), 0);
    }

    #[test]
    fn an_unknown_handoff_step_is_malformed() {
        let mut bytes = encode(&Frame::Handoff {
            op: HandoffOp::Seek,
            generation: 0,
            body: vec![],
        });
        bytes[5] = 99;
        let e = read_frame(&mut &bytes[..]).unwrap_err();
        assert!(e.is_malformed(), "{e}");
        assert!(e.to_string().contains("handoff step 99"), "{e}");
    }

    #[test]
    fn a_sequence_gap_nak_round_trips_and_the_next_status_is_refused() {
        let nak = Frame::Ack {
            qp: 3,
            psn: 9,
            status: AckStatus::SequenceGap,
        };
        let bytes = encode(&nak);
        assert_eq!(decode(&bytes[4..]).unwrap(), nak);
        let mut unknown = bytes.clone();
        *unknown.last_mut().unwrap() = 7;
        assert!(decode(&unknown[4..]).unwrap_err().is_malformed());
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(decode(&[99]).is_err());
        assert!(decode(&[ACK, 1, 2]).is_err());
        assert!(decode(&[ACK, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]).is_err());
        let mut ack = encode(&Frame::Ack {
            qp: 1,
            psn: 1,
            status: AckStatus::Ok,
        });
        ack.push(0);
        assert!(decode(&ack[4..]).is_err(), "trailing byte");
        let huge = (u32::MAX).to_le_bytes();
        assert!(read_frame(&mut &huge[..]).is_err());
    }

    #[test]
    fn a_hello_of_another_version_is_refused_with_both_versions_named() {
        let mut hello = encode(&Frame::Hello {
            vm: "a".into(),
            listen: "10.0.0.1:7000".into(),
            announce: false,
        });
        hello[5..7].copy_from_slice(&(FABRIC_VERSION + 1).to_le_bytes());
        let e = decode(&hello[4..]).unwrap_err();
        assert!(
            matches!(e, WireError::Version { theirs, ours } if theirs == FABRIC_VERSION + 1 && ours == FABRIC_VERSION),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("version 2") && msg.contains("version 1"),
            "{msg}"
        );
        // A release before versions: its hello (kind 1, no version) is version 0.
        let old = [1u8, 0, 1, 0, b'a', 1, 0, b'b'];
        assert!(matches!(
            decode(&old),
            Err(WireError::Version { theirs: 0, .. })
        ));
    }

    /// A reader that hands out a few bytes, then ends, and records the largest buffer it was
    /// asked to fill.
    struct Stingy {
        data: Vec<u8>,
        largest: usize,
    }

    impl Read for Stingy {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            let n = self.data.len().min(buf.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn a_large_length_prefix_without_data_allocates_nothing_big() {
        let mut data = (MAX_PAYLOAD as u32).to_le_bytes().to_vec();
        data.extend_from_slice(&[WRITE; 10]);
        let mut r = Stingy { data, largest: 0 };
        assert!(read_frame(&mut r).is_err(), "the stream ends early");
        assert!(
            r.largest <= 1 << 20,
            "a 16 MiB length prefix made the reader fill {} bytes at once",
            r.largest
        );
    }

    #[test]
    fn a_connection_reuses_its_body_buffer_and_gives_back_a_large_one() {
        let write = |n: usize| Frame::Write {
            src_qp: 1,
            dst_qp: 2,
            psn: 3,
            rkey: 4,
            addr: 5,
            imm: None,
            payload: vec![9; n],
        };
        let (big, small) = (write(2 << 20), write(100));
        let mut bytes = encode(&small);
        bytes.extend(encode(&big));
        bytes.extend(encode(&small));
        let mut r = &bytes[..];
        let mut buf = Vec::new();
        let (_, n) = read_frame_body_into(&mut r, &mut buf).unwrap().unwrap();
        assert_eq!(decode_ref(&buf[..n]).unwrap().into_owned(), small);
        let (_, n) = read_frame_body_into(&mut r, &mut buf).unwrap().unwrap();
        assert_eq!(decode(&buf[..n]).unwrap(), big);
        let (_, n) = read_frame_body_into(&mut r, &mut buf).unwrap().unwrap();
        assert_eq!(decode(&buf[..n]).unwrap(), small);
        assert!(
            buf.capacity() <= KEEP_BODY,
            "a connection keeps {} bytes after a large frame",
            buf.capacity()
        );
        assert!(read_frame_body_into(&mut r, &mut buf).unwrap().is_none());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&b);
        }
    }
}
