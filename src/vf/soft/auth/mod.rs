//! Authentication of the fabric: who may write into this VM's guest RAM.
//!
//! Each job has a secret (the job key) and each VM a static X25519 key pair; the cluster file
//! lists every VM's public key beside its address, and a VM's private key is in a 0600 file given
//! to its companion (and to its destination's companion when it migrates).
//!
//! A connection starts with a Noise handshake, `Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s`: the
//! dialler names the VM it speaks for in the clear, the listener looks that VM's public key up in
//! the cluster file, and the handshake then proves both sides' static keys and the job key (the
//! PSK). A party without the job key, or a member claiming another member's name, fails the
//! handshake and nothing it sends is read as a frame. Each side's epoch (random per companion
//! start) rides in the handshake's encrypted payloads, so a peer that restarted is recognised as
//! a new incarnation.
//!
//! Frames are not encrypted (the guest data crosses the data-centre network as it would on a
//! real RDMA fabric); each one carries a BLAKE3 MAC, keyed per direction with a key derived from
//! the Noise session's split, over the frame (its payload, then its length and fields) and a
//! per-direction sequence number, which makes a replayed, reordered or dropped frame a MAC
//! failure. The payload is hashed first, from a BLAKE3 chunk boundary, so that its chunks are
//! hashed many at once (SIMD); behind the fields they were hashed one at a time, 2.5 times
//! slower at 4 KiB (handshake version 1). Encrypting every byte would cost more still.

mod keys;

pub use keys::*;

use std::io::{self, BufReader, BufWriter, IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::wire::{self, Frame, FrameOf, FrameRef, WireError};

/// The Noise protocol of the handshake.
const NOISE: &str = "Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s";
/// The kind byte of the dialler's clear-text claim, the first frame of an authenticated link.
pub(super) const CLAIM: u8 = 6;
/// Version of the authenticated handshake, and of the frame MAC it sets up: 2 hashes the
/// payload first (1 hashed it after the fields); a companion of the other version is refused at
/// the claim, both versions named, before any frame.
const AUTH_VERSION: u16 = 2;
/// Longest VM name a claim carries.
const MAX_NAME: usize = 64;
/// Longest handshake message accepted.
const MAX_NOISE_MSG: usize = 256;
/// Bytes of a frame's MAC.
pub const TAG_LEN: usize = 32;
/// Context of the MAC keys' derivation (BLAKE3 `derive_key`).
const MAC_CONTEXT: &str = "vfmig 2026 fabric frame MAC v2";
/// A link's write buffer: smaller frames are gathered in it, larger ones go to the socket
/// straight from where they lie (one `writev` of header, payload and MAC, no copy).
const WRITE_BUFFER: usize = 32 << 10;
/// A link's read buffer: small frames (acks) are read many per `recv`; most of a larger
/// frame's body is read straight into the frame's buffer, not copied through this one.
const READ_BUFFER: usize = 32 << 10;

/// Why a link's handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The connection failed, closed or timed out.
    #[error("fabric handshake: the connection failed or timed out")]
    Io(#[from] io::Error),
    /// The dialler named a VM this cluster does not know.
    #[error("a fabric peer claims to be VM {0:?}, which has no key in the cluster file")]
    UnknownVm(String),
    /// The dialler did not follow the handshake.
    #[error("fabric handshake broken: {0}; is the peer a vfmig companion with keys?")]
    Protocol(String),
    /// The proof failed: wrong job key, or a static key that is not the claimed VM's.
    #[error(
        "fabric handshake refused: the peer does not hold the job key and the key of the VM it \
         claims; check that both companions were given this job's keys"
    )]
    Refused(#[source] snow::Error),
}

/// The outcome of a handshake: who the peer is, and its epoch.
pub(super) struct Session {
    pub(super) peer: String,
    pub(super) peer_epoch: u64,
    pub(super) send_key: Key,
    pub(super) recv_key: Key,
}

/// The handshake's builder, the same for both sides: our static key, the peer's, the job key
/// as the PSK, and the prologue that binds the claimed name.
fn builder<'a>(
    keys: &'a FabricKeys,
    their: &'a Key,
    prologue: &'a [u8],
) -> Result<snow::Builder<'a>, HandshakeError> {
    snow::Builder::new(NOISE.parse().map_err(HandshakeError::Refused)?)
        .local_private_key(&keys.private)
        .and_then(|b| b.remote_public_key(their))
        .and_then(|b| b.psk(0, &keys.job))
        .and_then(|b| b.prologue(prologue))
        .map_err(HandshakeError::Refused)
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "fabric handshake timed out",
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a message of at most `max` bytes with a `u16` length prefix.
fn read_msg(s: &mut TcpStream, max: usize, deadline: Instant) -> Result<Vec<u8>, HandshakeError> {
    let mut len = [0u8; 2];
    read_by(s, &mut len, deadline)?;
    let len = u16::from_le_bytes(len) as usize;
    if len == 0 || len > max {
        return Err(HandshakeError::Protocol(format!(
            "message of {len} bytes (at most {max})"
        )));
    }
    let mut b = vec![0u8; len];
    read_by(s, &mut b, deadline)?;
    Ok(b)
}

fn write_msg(s: &mut TcpStream, b: &[u8], deadline: Instant) -> io::Result<()> {
    s.set_write_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))?;
    let mut out = Vec::with_capacity(2 + b.len());
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
    s.write_all(&out)
}

fn claim(vm: &str) -> Vec<u8> {
    let mut c = vec![CLAIM];
    c.extend_from_slice(&AUTH_VERSION.to_le_bytes());
    c.extend_from_slice(vm.as_bytes());
    c
}

fn prologue(claim: &[u8]) -> Vec<u8> {
    let mut p = b"vfmig fabric".to_vec();
    p.extend_from_slice(claim);
    p
}

fn mac_keys(hs: &mut snow::HandshakeState) -> (Key, Key) {
    let (i2r, r2i) = hs.dangerously_get_raw_split();
    (
        blake3::derive_key(MAC_CONTEXT, &i2r),
        blake3::derive_key(MAC_CONTEXT, &r2i),
    )
}

fn epoch_of(payload: &[u8]) -> Result<u64, HandshakeError> {
    let b: [u8; 8] = payload
        .try_into()
        .map_err(|_| HandshakeError::Protocol("no epoch in the handshake".into()))?;
    Ok(u64::from_le_bytes(b))
}

/// The dialler's side: proves this VM to `peer` and `peer` to this VM, before `deadline`.
pub(super) fn initiate(
    keys: &FabricKeys,
    me: &str,
    epoch: u64,
    peer: &str,
    s: &mut TcpStream,
    deadline: Instant,
) -> Result<Session, HandshakeError> {
    let their = keys
        .peers
        .get(peer)
        .ok_or_else(|| HandshakeError::UnknownVm(peer.into()))?;
    let c = claim(me);
    let p = prologue(&c);
    let mut hs = builder(keys, their, &p)?
        .build_initiator()
        .map_err(HandshakeError::Refused)?;
    write_msg(s, &c, deadline)?;
    let mut buf = [0u8; MAX_NOISE_MSG];
    let n = hs
        .write_message(&epoch.to_le_bytes(), &mut buf)
        .map_err(HandshakeError::Refused)?;
    write_msg(s, &buf[..n], deadline)?;
    let reply = read_msg(s, MAX_NOISE_MSG, deadline)?;
    let mut payload = [0u8; MAX_NOISE_MSG];
    let n = hs
        .read_message(&reply, &mut payload)
        .map_err(HandshakeError::Refused)?;
    let peer_epoch = epoch_of(&payload[..n])?;
    let (send_key, recv_key) = mac_keys(&mut hs);
    Ok(Session {
        peer: peer.into(),
        peer_epoch,
        send_key,
        recv_key,
    })
}

/// The listener's side: learns who dials and checks that it is, before `deadline`.
pub(super) fn respond(
    keys: &FabricKeys,
    epoch: u64,
    s: &mut TcpStream,
    deadline: Instant,
) -> Result<Session, HandshakeError> {
    let c = read_msg(s, 3 + MAX_NAME, deadline)?;
    if c[0] != CLAIM || c.len() < 3 {
        return Err(HandshakeError::Protocol(format!(
            "expected a claim of identity first, got kind {}",
            c[0]
        )));
    }
    let version = u16::from_le_bytes([c[1], c[2]]);
    if version != AUTH_VERSION {
        return Err(HandshakeError::Protocol(format!(
            "handshake version {version}, this companion speaks {AUTH_VERSION}; run companions \
             of one vfmig release on every VM of the cluster"
        )));
    }
    let peer = String::from_utf8(c[3..].to_vec())
        .map_err(|_| HandshakeError::Protocol("a VM name that is not UTF-8".into()))?;
    let their = keys
        .peers
        .get(&peer)
        .ok_or_else(|| HandshakeError::UnknownVm(peer.clone()))?;
    let p = prologue(&c);
    let mut hs = builder(keys, their, &p)?
        .build_responder()
        .map_err(HandshakeError::Refused)?;
    let m1 = read_msg(s, MAX_NOISE_MSG, deadline)?;
    let mut payload = [0u8; MAX_NOISE_MSG];
    let n = hs
        .read_message(&m1, &mut payload)
        .map_err(HandshakeError::Refused)?;
    let peer_epoch = epoch_of(&payload[..n])?;
    let mut buf = [0u8; MAX_NOISE_MSG];
    let n = hs
        .write_message(&epoch.to_le_bytes(), &mut buf)
        .map_err(HandshakeError::Refused)?;
    write_msg(s, &buf[..n], deadline)?;
    let (recv_key, send_key) = mac_keys(&mut hs);
    Ok(Session {
        peer,
        peer_epoch,
        send_key,
        recv_key,
    })
}

/// MAC inputs up to this many bytes are hashed in one call from a stack buffer: setting up
/// BLAKE3's incremental hasher costs more than hashing such a frame (acks, small requests).
const SMALL_MAC_INPUT: usize = 1024;

/// The MAC of the frame `head` (length prefix and fields, in pieces) then `payload`: keyed
/// BLAKE3 over the payload, the head, `seq` and the head's length, which makes the split
/// unambiguous. The payload goes first so that it starts on a BLAKE3 chunk boundary.
fn tag(key: &Key, seq: u64, head: &[&[u8]], payload: &[u8]) -> blake3::Hash {
    let head_len: usize = head.iter().map(|p| p.len()).sum();
    let (seq, head_len_le) = (seq.to_le_bytes(), (head_len as u32).to_le_bytes());
    let parts = std::iter::once(payload)
        .chain(head.iter().copied())
        .chain([&seq[..], &head_len_le[..]]);
    let n = payload.len() + head_len + seq.len() + head_len_le.len();
    if n <= SMALL_MAC_INPUT {
        let mut b = [0u8; SMALL_MAC_INPUT];
        let mut at = 0;
        for part in parts {
            b[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        return blake3::keyed_hash(key, &b[..n]);
    }
    let mut h = blake3::Hasher::new_keyed(key);
    for part in parts {
        h.update(part);
    }
    h.finalize()
}

/// The MAC of an encoded frame (length prefix first) sealed as a link's `seq`-th frame in one
/// direction; also what `vfmig bench fabric` times as authentication's cost.
pub fn frame_mac(key: &Key, seq: u64, frame: &[u8]) -> [u8; TAG_LEN] {
    let split = frame
        .get(4..)
        .map_or(frame.len(), |body| 4 + wire::payload_offset(body));
    *tag(key, seq, &[&frame[..split]], &frame[split..]).as_bytes()
}

/// Writes a link's frames, each followed by its MAC when the link is authenticated.
///
/// It takes whole encoded frames (length prefix first), as [`wire::encode`] makes them, in one
/// or several writes.
pub(super) struct FrameWriter {
    w: BufWriter<TcpStream>,
    mac: Option<(Key, u64)>,
    partial: Vec<u8>,
}

impl FrameWriter {
    pub(super) fn new(stream: TcpStream, key: Option<Key>) -> Self {
        Self {
            w: BufWriter::with_capacity(WRITE_BUFFER, stream),
            mac: key.map(|k| (k, 0)),
            partial: Vec::new(),
        }
    }

    /// The socket.
    pub(super) fn stream(&self) -> &TcpStream {
        self.w.get_ref()
    }

    /// Writes whole frames from `b`; returns how many bytes they took.
    fn seal(&mut self, b: &[u8]) -> io::Result<usize> {
        let Some((key, seq)) = &mut self.mac else {
            unreachable!("seal only on an authenticated link")
        };
        let mut at = 0;
        while b.len() - at >= 4 {
            let len = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
            let Some(frame) = b.get(at..at + 4 + len) else {
                break;
            };
            let t = frame_mac(key, *seq, frame);
            *seq += 1;
            self.w.write_all(frame)?;
            self.w.write_all(&t)?;
            at += 4 + len;
        }
        Ok(at)
    }

    /// Writes a frame, and its MAC on an authenticated link; the payload is not copied into
    /// an encoding first.
    pub(super) fn frame<P: AsRef<[u8]>>(&mut self, f: &FrameOf<P>) -> Result<(), WireError> {
        if !self.partial.is_empty() {
            // Behind a partial frame written as bytes: it must go first, as bytes.
            self.write_all(&wire::encode(f))?;
            return Ok(());
        }
        let head = wire::encode_header(f);
        let payload = f.payload();
        let t = self.mac.as_mut().map(|(key, seq)| {
            let t = tag(key, *seq, &[&head], payload);
            *seq += 1;
            t
        });
        let t: &[u8] = t.as_ref().map_or(&[], |t| t.as_bytes());
        write_all_vectored(
            &mut self.w,
            &mut [IoSlice::new(&head), IoSlice::new(payload), IoSlice::new(t)],
        )?;
        Ok(())
    }
}

/// Writes all of `bufs`, in as few writes as the writer takes.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Write for FrameWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.mac.is_none() {
            return self.w.write(buf);
        }
        if self.partial.is_empty() {
            let used = self.seal(buf)?;
            self.partial.extend_from_slice(&buf[used..]);
        } else {
            self.partial.extend_from_slice(buf);
            let pending = std::mem::take(&mut self.partial);
            let used = self.seal(&pending)?;
            self.partial = pending[used..].to_vec();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Reads a link's frames, checking each one's MAC when the link is authenticated.
pub(super) struct FrameReader {
    r: BufReader<TcpStream>,
    mac: Option<(Key, u64)>,
    /// The frame bodies' buffer, reused (bounded by [`wire::KEEP_BODY`] between frames).
    body: Vec<u8>,
}

impl FrameReader {
    pub(super) fn new(stream: TcpStream, key: Option<Key>) -> Self {
        Self {
            r: BufReader::with_capacity(READ_BUFFER, stream),
            mac: key.map(|k| (k, 0)),
            body: Vec::new(),
        }
    }

    /// The next frame; `Ok(None)` on a clean end of stream.
    pub(super) fn frame(&mut self) -> Result<Option<Frame>, WireError> {
        Ok(self.frame_ref()?.map(FrameRef::into_owned))
    }

    /// The next frame, its payload borrowed from this reader's buffer until the next call;
    /// `Ok(None)` on a clean end of stream. Its MAC is checked before it is decoded.
    pub(super) fn frame_ref(&mut self) -> Result<Option<FrameRef<'_>>, WireError> {
        let Some((len, n)) = wire::read_frame_body_into(&mut self.r, &mut self.body)? else {
            return Ok(None);
        };
        let body = &self.body[..n];
        if let Some((key, seq)) = &mut self.mac {
            let mut got = [0u8; TAG_LEN];
            self.r.read_exact(&mut got)?;
            let (fields, payload) = body.split_at(wire::payload_offset(body));
            let want = tag(key, *seq, &[&len.to_le_bytes(), fields], payload);
            // blake3::Hash compares in constant time.
            if want != blake3::Hash::from(got) {
                return Err(WireError::BadMac { seq: *seq });
            }
            *seq += 1;
        }
        wire::decode_ref(body).map(Some)
    }

    /// Whether a whole next frame (and its MAC) is already read from the socket, so that
    /// taking it needs no wait on the peer.
    pub(super) fn next_frame_buffered(&self) -> bool {
        let b = self.r.buffer();
        let Some(len) = b.get(..4) else {
            return false;
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let mac = if self.mac.is_some() { TAG_LEN } else { 0 };
        b.len() >= len.saturating_add(4 + mac)
    }
}

#[cfg(test)]
mod tests {
    use super::super::cluster::ClusterMap;
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn cluster(names: &[(&str, Key)]) -> ClusterMap {
        let mut c = ClusterMap::default();
        for (n, k) in names {
            c.vms.insert((*n).into(), "127.0.0.1:1".into());
            c.keys.insert((*n).into(), hex(k));
        }
        c
    }

    #[test]
    fn key_files_readable_by_others_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.key");
        write_key_file(&f, &random_key()).unwrap();
        assert!(read_key_file(&f).is_ok());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_key_file(&f).unwrap_err();
        assert!(
            matches!(e, KeyError::Permissions { mode: 0o640, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn generate_writes_keys_that_load() {
        let dir = tempfile::tempdir().unwrap();
        let cf = dir.path().join("cluster.json");
        std::fs::write(&cf, r#"{"vms": {"a": "127.0.0.1:1", "b": "127.0.0.1:2"}}"#).unwrap();
        let g = generate(&cf, &dir.path().join("keys")).unwrap();
        let mode = std::fs::metadata(&g.job_key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let c = ClusterMap::load(&cf).unwrap();
        let ka = FabricKeys::load(&c, "a", &g.private_keys["a"]).unwrap();
        assert!(ka.knows("b"));
        // a's key is not b's.
        assert!(matches!(
            FabricKeys::load(&c, "b", &g.private_keys["a"]),
            Err(KeyError::WrongKey { .. })
        ));
    }

    #[test]
    fn a_frame_with_a_wrong_mac_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let key = random_key();
        let mut w = FrameWriter::new(c.try_clone().unwrap(), Some(key));
        let ack = Frame::Ack {
            qp: 1,
            psn: 2,
            status: wire::AckStatus::Ok,
        };
        w.frame(&ack).unwrap();
        // Written in two pieces: still one frame, one MAC.
        let bytes = wire::encode(&ack);
        w.write_all(&bytes[..3]).unwrap();
        w.write_all(&bytes[3..]).unwrap();
        w.flush().unwrap();
        let mut r = FrameReader::new(s.try_clone().unwrap(), Some(key));
        assert_eq!(r.frame().unwrap().unwrap(), ack);
        assert_eq!(r.frame().unwrap().unwrap(), ack);
        // Another key: refused.
        w.frame(&ack).unwrap();
        w.flush().unwrap();
        let mut r2 = FrameReader::new(s, Some(random_key()));
        assert!(matches!(r2.frame(), Err(WireError::BadMac { .. })));
    }

    #[test]
    fn a_request_s_payload_and_fields_are_both_under_its_mac() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let key = random_key();
        let mut w = FrameWriter::new(c.try_clone().unwrap(), Some(key));
        let mut r = FrameReader::new(s, Some(key));
        for n in [0, 10, SMALL_MAC_INPUT, 5000] {
            let f = Frame::Write {
                src_qp: 1,
                dst_qp: 2,
                psn: 3,
                rkey: 4,
                addr: 5,
                imm: None,
                payload: (0..n).map(|i| i as u8).collect(),
            };
            // As a frame, then as bytes: one MAC.
            w.frame(&f).unwrap();
            w.write_all(&wire::encode(&f)).unwrap();
            w.flush().unwrap();
            assert_eq!(r.frame().unwrap().unwrap(), f, "{n} B as a frame");
            assert_eq!(r.frame().unwrap().unwrap(), f, "{n} B as bytes");
        }
        // One bit of the payload, or of a field, changed on the way: refused.
        let f = Frame::Write {
            src_qp: 1,
            dst_qp: 2,
            psn: 3,
            rkey: 4,
            addr: 5,
            imm: None,
            payload: vec![1; 5000],
        };
        let good = wire::encode(&f);
        let t = frame_mac(&key, 0, &good);
        for at in [None, Some(good.len() - 1), Some(10)] {
            let mut sealed = good.clone();
            if let Some(at) = at {
                sealed[at] ^= 1;
            }
            sealed.extend_from_slice(&t);
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            raw.write_all(&sealed).unwrap();
            let mut r = FrameReader::new(l.accept().unwrap().0, Some(key));
            match at {
                None => assert_eq!(r.frame().unwrap().unwrap(), f),
                Some(at) => assert!(
                    matches!(r.frame(), Err(WireError::BadMac { seq: 0 })),
                    "byte {at} changed"
                ),
            }
        }
    }

    #[test]
    fn a_claim_of_another_handshake_version_is_refused_with_both_versions_named() {
        let (pa, ua) = generate_keypair().unwrap();
        let c = cluster(&[("a", ua)]);
        let ka = FabricKeys::new(random_key(), pa, &c, "a").unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut d = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut old = vec![CLAIM];
        old.extend_from_slice(&1u16.to_le_bytes());
        old.extend_from_slice(b"a");
        write_msg(&mut d, &old, deadline).unwrap();
        let e = respond(&ka, 7, &mut s, deadline).err().unwrap();
        let msg = e.to_string();
        assert!(
            matches!(e, HandshakeError::Protocol(_))
                && msg.contains("version 1")
                && msg.contains(&format!("speaks {AUTH_VERSION}")),
            "{msg}"
        );
    }

    #[test]
    fn the_handshake_binds_the_name_to_its_key() {
        let (pa, ua) = generate_keypair().unwrap();
        let (pb, ub) = generate_keypair().unwrap();
        let (pm, um) = generate_keypair().unwrap();
        let job = random_key();
        let c = cluster(&[("a", ua), ("b", ub), ("m", um)]);
        let ka = FabricKeys::new(job, pa, &c, "a").unwrap();
        let kb = FabricKeys::new(job, pb, &c, "b").unwrap();
        // m is a member, but claims to be b with its own key.
        let mut km = FabricKeys::new(job, pm, &c, "m").unwrap();
        km.peers.insert("b".into(), ub);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = || Instant::now() + Duration::from_secs(5);
        // b, honestly.
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let ok =
                respond(&ka, 7, &mut s, deadline()).map(|s| (s.peer, s.peer_epoch, s.recv_key));
            let (mut s, _) = l.accept().unwrap();
            let forged = respond(&ka, 7, &mut s, deadline()).map(|s| s.peer);
            (ok, forged)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let sb = initiate(&kb, "b", 9, "a", &mut s, deadline()).unwrap();
        assert_eq!(sb.peer_epoch, 7);
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = initiate(&km, "b", 9, "a", &mut s, deadline());
        let (ok, forged) = t.join().unwrap();
        let (peer, epoch, recv) = ok.unwrap();
        assert_eq!((peer.as_str(), epoch), ("b", 9));
        assert_eq!(
            recv, sb.send_key,
            "both sides derive one MAC key per direction"
        );
        assert!(
            matches!(forged, Err(HandshakeError::Refused(_))),
            "{:?}",
            forged.err()
        );
    }
}
