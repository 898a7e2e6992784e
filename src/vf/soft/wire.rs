//! The soft VF's fabric protocol: length-prefixed binary frames over TCP between companions.
//!
//! Every frame is `u32 length` (of what follows), `u8 kind`, then the kind's fields in
//! little-endian order. A connection starts with `Hello` from the side that dialled; then the
//! dialler sends requests (`Write`, `Send`) and the listener answers each with an `Ack`
//! carrying the request's packet sequence number (PSN) and status.

use std::io::{self, Read, Write};

/// Largest payload one request carries.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or closed.
    #[error("fabric connection: {0}")]
    Io(#[from] io::Error),
    /// The frame breaks the protocol.
    #[error("malformed fabric frame: {0}")]
    Malformed(String),
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
}

impl AckStatus {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            0 => Self::Ok,
            1 => Self::RemoteAccess,
            2 => Self::RemoteInvalid,
            3 => Self::ReceiverNotReady,
            4 => Self::NoSuchQp,
            _ => return Err(WireError::Malformed(format!("unknown ack status {v}"))),
        })
    }
}

/// A fabric frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame of a connection: who dials. `announce` is set by a VM that has just
    /// migrated: the peer learns its new fabric address and replays what it holds for it.
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
        payload: Vec<u8>,
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
        payload: Vec<u8>,
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
}

const HELLO: u8 = 1;
const WRITE: u8 = 2;
const SEND: u8 = 3;
const ACK: u8 = 4;

fn put_imm(b: &mut Vec<u8>, imm: Option<u32>) {
    b.push(imm.is_some() as u8);
    b.extend_from_slice(&imm.unwrap_or(0).to_le_bytes());
}

/// Encodes a frame, length prefix included.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    match frame {
        Frame::Hello {
            vm,
            listen,
            announce,
        } => {
            b.push(HELLO);
            b.push(*announce as u8);
            for s in [vm, listen] {
                b.extend_from_slice(&(s.len() as u16).to_le_bytes());
                b.extend_from_slice(s.as_bytes());
            }
        }
        Frame::Write {
            src_qp,
            dst_qp,
            psn,
            rkey,
            addr,
            imm,
            payload,
        } => {
            b.push(WRITE);
            b.extend_from_slice(&src_qp.to_le_bytes());
            b.extend_from_slice(&dst_qp.to_le_bytes());
            b.extend_from_slice(&psn.to_le_bytes());
            b.extend_from_slice(&rkey.to_le_bytes());
            b.extend_from_slice(&addr.to_le_bytes());
            put_imm(&mut b, *imm);
            b.extend_from_slice(payload);
        }
        Frame::Send {
            src_qp,
            dst_qp,
            psn,
            imm,
            payload,
        } => {
            b.push(SEND);
            b.extend_from_slice(&src_qp.to_le_bytes());
            b.extend_from_slice(&dst_qp.to_le_bytes());
            b.extend_from_slice(&psn.to_le_bytes());
            put_imm(&mut b, *imm);
            b.extend_from_slice(payload);
        }
        Frame::Ack { qp, psn, status } => {
            b.push(ACK);
            b.extend_from_slice(&qp.to_le_bytes());
            b.extend_from_slice(&psn.to_le_bytes());
            b.push(*status as u8);
        }
    }
    let len = (b.len() - 4) as u32;
    b[..4].copy_from_slice(&len.to_le_bytes());
    b
}

/// Writes a frame.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), WireError> {
    w.write_all(&encode(frame))?;
    Ok(())
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| WireError::Malformed("frame shorter than its fields".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or([0; 2]),
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn imm(&mut self) -> Result<Option<u32>, WireError> {
        let has = self.u8()?;
        let v = self.u32()?;
        Ok((has != 0).then_some(v))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| WireError::Malformed("a name is not UTF-8".into()))
    }
    fn rest(&mut self) -> Vec<u8> {
        let s = self.b[self.at..].to_vec();
        self.at = self.b.len();
        s
    }
    fn done(&self) -> Result<(), WireError> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(WireError::Malformed(
                "trailing bytes after the fields".into(),
            ))
        }
    }
}

/// Decodes a frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
    let mut c = Cursor { b: body, at: 0 };
    let frame = match c.u8()? {
        HELLO => {
            let announce = c.u8()? != 0;
            let vm = c.string()?;
            let listen = c.string()?;
            Frame::Hello {
                vm,
                listen,
                announce,
            }
        }
        WRITE => Frame::Write {
            src_qp: c.u32()?,
            dst_qp: c.u32()?,
            psn: c.u64()?,
            rkey: c.u32()?,
            addr: c.u64()?,
            imm: c.imm()?,
            payload: c.rest(),
        },
        SEND => Frame::Send {
            src_qp: c.u32()?,
            dst_qp: c.u32()?,
            psn: c.u64()?,
            imm: c.imm()?,
            payload: c.rest(),
        },
        ACK => Frame::Ack {
            qp: c.u32()?,
            psn: c.u64()?,
            status: AckStatus::from_u8(c.u8()?)?,
        },
        k => return Err(WireError::Malformed(format!("unknown frame kind {k}"))),
    };
    c.done()?;
    Ok(frame)
}

/// Reads one frame; `Ok(None)` on a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_PAYLOAD + 64 {
        return Err(WireError::Malformed(format!(
            "frame length {len} out of bounds"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode(&body).map(Some)
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
        ] {
            let bytes = encode(&f);
            assert_eq!(read_frame(&mut &bytes[..]).unwrap().unwrap(), f);
        }
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

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&b);
        }
    }
}
