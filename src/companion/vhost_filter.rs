//! A message filter between QEMU and the vhost-user backend crate.
//!
//! QEMU 10.0 talks to a vhost-user-net backend in two ways the `vhost` crate (0.18) does not
//! accept, and the crate drops the connection on either:
//! - `SET_VRING_ENABLE` before `SET_FEATURES` has acked `VHOST_USER_F_PROTOCOL_FEATURES` (QEMU
//!   enables the rings when the NIC is set up, before the guest driver negotiates features, and
//!   repeats it on a migration destination before the rings exist);
//! - `SEND_RARP` at the end of a migration, on the destination.
//!
//! The filter sits on the socket QEMU connects to and forwards every message, with its file
//! descriptors, to the crate over a private socket, except that it:
//! - remembers an early `SET_VRING_ENABLE` and replays it right after the `SET_FEATURES` that
//!   makes it valid;
//! - answers `SEND_RARP` itself (counted; the guest's MAC is announced by the fabric later);
//! - calls a hook on `SET_VRING_ENABLE 0` before forwarding it, so the VF is quiesced there for
//!   device types that stop with it (net never sends it; it stops with `GET_VRING_BASE`).
//!
//! - checks every memory mapping QEMU hands over (`SET_MEM_TABLE`, `ADD_MEM_REG`) against the
//!   size of its file, and the dirty log of `SET_LOG_BASE` against its file and against the
//!   guest memory it must cover, before the crate maps anything: a mapping past the end of its
//!   file would kill the companion with SIGBUS on first access. A message that fails a check
//!   closes the connection, with a log line saying why; the companion then waits for the next
//!   one;
//! - starts every connection with a `RESET_OWNER` to the crate, so that a front-end that
//!   reconnects (QEMU's `reconnect-ms`) can claim the backend again.
//!
//! It also timestamps the messages that matter to migration, for the status and the trace.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use parking_lot::Mutex;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures, MAX_ATTACHED_FD_ENTRIES,
    MAX_MSG_SIZE,
};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// Most file descriptors one message carries.
const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;
/// Largest payload accepted: the crate's limit with some slack, so that the crate, not the
/// filter, is the one to refuse a message just over it.
const MAX_PAYLOAD: usize = MAX_MSG_SIZE + 0x100;

/// Flag bits of a message header: version 1 (the version field's only value), reply, and
/// "the sender waits for a reply".
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();

mod memory;

use memory::MemoryTable;
pub use memory::Refused;

/// A vhost-user message: header fields, payload and attached fds.
#[derive(Debug)]
pub struct Message {
    /// Request code.
    pub request: u32,
    /// Flags.
    pub flags: u32,
    /// Payload.
    pub payload: Vec<u8>,
    /// Attached file descriptors.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The request, when it is one the `vhost` crate knows.
    fn frontend_request(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    fn u64_at(&self, at: usize) -> Option<u64> {
        self.payload
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        self.payload
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
}

/// Reads one message from `sock`; `Ok(None)` on a clean end of stream.
pub fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; 12];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process for us via
                    // SCM_RIGHTS; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, fds)
    };
    if got == 0 {
        return Ok(None);
    }
    let mut reader = sock;
    if got < header.len() {
        reader.read_exact(&mut header[got..])?;
    }
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message {request} announces {size} bytes of payload, more than the protocol allows"),
        ));
    }
    let mut payload = vec![0u8; size];
    reader.read_exact(&mut payload)?;
    Ok(Some(Message {
        request,
        flags,
        payload,
        fds,
    }))
}

/// Writes one message, with its fds, to `sock`.
pub fn write_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let mut header = Vec::with_capacity(12);
    header.extend_from_slice(&m.request.to_le_bytes());
    header.extend_from_slice(&m.flags.to_le_bytes());
    header.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
    let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs: Vec<ControlMessage> = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let iov = [IoSlice::new(&header), IoSlice::new(&m.payload)];
    let total = header.len() + m.payload.len();
    let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)?;
    if sent < total {
        // The fds went with the first bytes; send the rest plainly.
        let mut all = header;
        all.extend_from_slice(&m.payload);
        let mut w = sock;
        w.write_all(&all[sent..])?;
    }
    Ok(())
}

/// When the messages that matter to migration arrived, in µs since the filter started.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct MessageLog {
    /// Message counts by name.
    pub counts: BTreeMap<String, u64>,
    /// Last arrival of each, µs since start.
    pub last_us: BTreeMap<String, u64>,
    /// `SET_VRING_ENABLE`s held until `SET_FEATURES` and then replayed.
    pub enables_replayed: u64,
    /// `SEND_RARP`s answered by the filter.
    pub rarp: u64,
}

fn name_of(request: FrontendReq) -> Option<&'static str> {
    Some(match request {
        FrontendReq::SET_FEATURES => "set_features",
        FrontendReq::SET_MEM_TABLE => "set_mem_table",
        FrontendReq::SET_LOG_BASE => "set_log_base",
        FrontendReq::GET_VRING_BASE => "get_vring_base",
        FrontendReq::SET_VRING_ENABLE => "set_vring_enable",
        FrontendReq::SEND_RARP => "send_rarp",
        _ => return None,
    })
}

/// Shared view of the filter's log.
pub type SharedMessageLog = Arc<Mutex<MessageLog>>;

/// Pumps messages between QEMU and the backend until either side closes.
pub fn run(
    qemu: UnixStream,
    backend: UnixStream,
    log: SharedMessageLog,
    on_vring_disable: impl Fn(u32),
) -> io::Result<()> {
    let start = Instant::now();
    let (qemu_r, backend_w) = (qemu.try_clone()?, backend.try_clone()?);
    // Backend → QEMU: replies, passed through untouched.
    let replies = std::thread::Builder::new()
        .name("vfmig-vhost-replies".into())
        .spawn(move || -> io::Result<()> {
            while let Some(m) = read_message(&backend)? {
                write_message(&qemu, &m)?;
            }
            let _ = qemu.shutdown(std::net::Shutdown::Both);
            Ok(())
        })?;

    let mut requests = Requests {
        qemu: &qemu_r,
        backend: &backend_w,
        log: &log,
        start,
        on_vring_disable: &on_vring_disable,
        acked_protocol_features: false,
        held_enables: BTreeMap::new(),
        memory: MemoryTable::default(),
    };
    let result = (|| -> io::Result<()> {
        // The crate keeps the backend claimed after a front-end goes away; release it so that
        // this connection's SET_OWNER succeeds (a no-op on the first connection).
        write_message(
            &backend_w,
            &Message {
                request: FrontendReq::RESET_OWNER.into(),
                flags: FLAG_VERSION_1,
                payload: vec![],
                fds: vec![],
            },
        )?;
        while let Some(m) = read_message(&qemu_r)? {
            requests.handle(m)?;
        }
        Ok(())
    })();
    let _ = backend_w.shutdown(std::net::Shutdown::Both);
    let _ = qemu_r.shutdown(std::net::Shutdown::Both);
    let _ = replies.join();
    result
}

/// The QEMU → backend direction: what the filter remembers between requests.
struct Requests<'a> {
    qemu: &'a UnixStream,
    backend: &'a UnixStream,
    log: &'a SharedMessageLog,
    start: Instant,
    on_vring_disable: &'a dyn Fn(u32),
    /// Whether the last `SET_FEATURES` acked `VHOST_USER_F_PROTOCOL_FEATURES`.
    acked_protocol_features: bool,
    /// Early `SET_VRING_ENABLE`s: ring index → enable.
    held_enables: BTreeMap<u32, u32>,
    /// The guest memory handed over on this connection.
    memory: MemoryTable,
}

impl Requests<'_> {
    /// Logs `m`, then forwards, holds or answers it.
    fn handle(&mut self, m: Message) -> io::Result<()> {
        let request = m.frontend_request();
        if let Some(name) = request.and_then(name_of) {
            let mut l = self.log.lock();
            *l.counts.entry(name.to_owned()).or_default() += 1;
            l.last_us
                .insert(name.to_owned(), self.start.elapsed().as_micros() as u64);
        }
        match request {
            Some(FrontendReq::SET_VRING_ENABLE) if !self.acked_protocol_features => {
                let (index, num) = (m.u32_at(0).unwrap_or(0), m.u32_at(4).unwrap_or(0));
                tracing::debug!(index, num, "SET_VRING_ENABLE before SET_FEATURES: held");
                self.held_enables.insert(index, num);
                ack_if_asked(self.qemu, &m)
            }
            Some(FrontendReq::SET_VRING_ENABLE) if m.u32_at(4) == Some(0) => {
                (self.on_vring_disable)(m.u32_at(0).unwrap_or(0));
                write_message(self.backend, &m)
            }
            Some(FrontendReq::SEND_RARP) => {
                tracing::info!("SEND_RARP: the VM runs here now");
                self.log.lock().rarp += 1;
                ack_if_asked(self.qemu, &m)
            }
            Some(FrontendReq::SET_FEATURES) => {
                self.acked_protocol_features = m.u64_at(0).unwrap_or(0) & PROTOCOL_FEATURES != 0;
                write_message(self.backend, &m)?;
                if self.acked_protocol_features {
                    self.replay_held_enables()?;
                }
                Ok(())
            }
            Some(FrontendReq::SET_MEM_TABLE) => self.checked(&m, MemoryTable::set),
            Some(FrontendReq::ADD_MEM_REG) => self.checked(&m, MemoryTable::add),
            Some(FrontendReq::SET_LOG_BASE) => self.checked(&m, |t, m| t.check_log(m)),
            Some(FrontendReq::REM_MEM_REG) => {
                self.memory.remove(&m);
                write_message(self.backend, &m)
            }
            _ => write_message(self.backend, &m),
        }
    }

    /// Forwards `m` if `check` passes; otherwise logs why and ends the connection.
    fn checked(
        &mut self,
        m: &Message,
        check: impl FnOnce(&mut MemoryTable, &Message) -> Result<(), Refused>,
    ) -> io::Result<()> {
        if let Err(refused) = check(&mut self.memory, m) {
            tracing::warn!(
                error = %refused,
                "vhost-user message refused before anything was mapped: closing the connection; \
                 the companion waits for the front-end to reconnect"
            );
            return Err(refused.into());
        }
        write_message(self.backend, m)
    }

    /// Sends the held `SET_VRING_ENABLE`s to the backend, now that they are valid.
    fn replay_held_enables(&mut self) -> io::Result<()> {
        for (index, num) in std::mem::take(&mut self.held_enables) {
            let mut payload = index.to_le_bytes().to_vec();
            payload.extend_from_slice(&num.to_le_bytes());
            write_message(
                self.backend,
                &Message {
                    request: FrontendReq::SET_VRING_ENABLE.into(),
                    flags: FLAG_VERSION_1,
                    payload,
                    fds: vec![],
                },
            )?;
            self.log.lock().enables_replayed += 1;
        }
        Ok(())
    }
}

/// Sends the success reply a `NEED_REPLY` message asks for.
fn ack_if_asked(qemu: &UnixStream, m: &Message) -> io::Result<()> {
    if m.flags & FLAG_NEED_REPLY == 0 {
        return Ok(());
    }
    write_message(
        qemu,
        &Message {
            request: m.request,
            flags: FLAG_VERSION_1 | FLAG_REPLY,
            payload: 0u64.to_le_bytes().to_vec(),
            fds: vec![],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request codes as they travel on the wire.
    mod code {
        use super::FrontendReq;

        pub const SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
        pub const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
        pub const GET_VRING_BASE: u32 = FrontendReq::GET_VRING_BASE as u32;
        pub const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
        pub const SEND_RARP: u32 = FrontendReq::SEND_RARP as u32;
        pub const SET_LOG_BASE: u32 = FrontendReq::SET_LOG_BASE as u32;
        pub const ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
        pub const RESET_OWNER: u32 = FrontendReq::RESET_OWNER as u32;
    }

    /// A memfd of `len` bytes.
    fn memfd(len: u64) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"guest", nix::sys::memfd::MemFdCreateFlag::empty())
            .unwrap();
        nix::unistd::ftruncate(&fd, len as i64).unwrap();
        fd
    }

    fn region(gpa: u64, size: u64, offset: u64) -> Vec<u8> {
        [gpa, size, 0x7f00_0000_0000, offset]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Message {
        let mut payload = (regions.len() as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_le_bytes());
        let mut fds = vec![];
        for &(gpa, size, offset, file) in regions {
            payload.extend(region(gpa, size, offset));
            fds.push(memfd(file));
        }
        Message {
            request: code::SET_MEM_TABLE,
            flags: FLAG_VERSION_1,
            payload,
            fds,
        }
    }

    fn log_base(size: u64, offset: u64, file: u64) -> Message {
        let mut payload = size.to_le_bytes().to_vec();
        payload.extend_from_slice(&offset.to_le_bytes());
        Message {
            request: code::SET_LOG_BASE,
            flags: FLAG_VERSION_1 | FLAG_NEED_REPLY,
            payload,
            fds: vec![memfd(file)],
        }
    }

    /// Runs the filter on `messages` from the front-end; returns the requests the backend
    /// saw (after the opening RESET_OWNER) and the filter's result.
    fn filter(messages: Vec<Message>) -> (Vec<u32>, io::Result<()>) {
        let (qemu, qemu_side) = UnixStream::pair().unwrap();
        let (backend_side, backend) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            run(qemu_side, backend_side, SharedMessageLog::default(), |_| {})
        });
        for m in &messages {
            if write_message(&qemu, m).is_err() {
                break;
            }
        }
        let _ = qemu.shutdown(std::net::Shutdown::Write);
        let result = t.join().unwrap();
        let mut seen = vec![];
        while let Ok(Some(m)) = read_message(&backend) {
            seen.push(m.request);
        }
        assert_eq!(seen.first(), Some(&code::RESET_OWNER));
        (seen[1..].to_vec(), result)
    }

    fn refusal(result: io::Result<()>) -> String {
        let e = result.expect_err("the message should have been refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        e.to_string()
    }

    #[test]
    fn memory_that_fits_its_files_passes_with_a_log_that_covers_it() {
        let (seen, result) = filter(vec![
            mem_table(&[
                (0, 2 << 20, 0, 2 << 20),
                (4 << 20, 1 << 20, 1 << 20, 2 << 20),
            ]),
            // 5 MiB of guest memory: 1280 pages, 160 bytes of log.
            log_base(160, 4096, 8192),
        ]);
        result.unwrap();
        assert_eq!(seen, vec![code::SET_MEM_TABLE, code::SET_LOG_BASE]);
    }

    #[test]
    fn a_region_past_the_end_of_its_memfd_is_refused_before_the_backend_maps_it() {
        let (seen, result) = filter(vec![mem_table(&[(0, 2 << 20, 0, 1 << 20)])]);
        let m = refusal(result);
        assert!(m.contains("SET_MEM_TABLE") && m.contains("crash"), "{m}");
        assert!(seen.is_empty(), "the backend saw {seen:?}");
        // The offset counts too, and an offset + size that wraps around.
        let (_, result) = filter(vec![mem_table(&[(0, 1 << 20, 4096, 1 << 20)])]);
        assert!(refusal(result).contains("of only 0x100000 bytes"));
        let (_, result) = filter(vec![mem_table(&[(0, 1 << 20, u64::MAX - 10, 1 << 20)])]);
        refusal(result);
    }

    #[test]
    fn malformed_memory_tables_are_refused() {
        let mut no_fd = mem_table(&[(0, 4096, 0, 4096)]);
        no_fd.fds.clear();
        let mut short = mem_table(&[(0, 4096, 0, 4096)]);
        short.payload.truncate(20);
        let wraps = mem_table(&[(u64::MAX - 4095, 8192, 0, 8192)]);
        let empty = mem_table(&[(0, 0, 0, 4096)]);
        for (m, says) in [
            (no_fd, "file descriptors"),
            (short, "does not hold"),
            (wraps, "not a usable range"),
            (empty, "not a usable range"),
        ] {
            let (seen, result) = filter(vec![m]);
            let text = refusal(result);
            assert!(text.contains(says), "{text}");
            assert!(seen.is_empty());
        }
    }

    #[test]
    fn add_mem_reg_is_checked_like_a_table() {
        let mut payload = 0u64.to_le_bytes().to_vec();
        payload.extend(region(8 << 20, 2 << 20, 0));
        let m = Message {
            request: code::ADD_MEM_REG,
            flags: FLAG_VERSION_1,
            payload,
            fds: vec![memfd(1 << 20)],
        };
        let (seen, result) = filter(vec![m]);
        assert!(refusal(result).contains("ADD_MEM_REG"));
        assert!(seen.is_empty());
    }

    #[test]
    fn a_log_past_its_file_or_smaller_than_guest_memory_is_refused() {
        let (seen, result) = filter(vec![log_base(1 << 20, 0, 4096)]);
        assert!(refusal(result).contains("SET_LOG_BASE"));
        assert!(seen.is_empty());
        // 8 MiB of guest memory needs 256 bytes of log.
        let (seen, result) = filter(vec![
            mem_table(&[(0, 8 << 20, 0, 8 << 20)]),
            log_base(255, 0, 4096),
        ]);
        let m = refusal(result);
        assert!(m.contains("256 bytes of log needed"), "{m}");
        assert_eq!(seen, vec![code::SET_MEM_TABLE]);
    }

    fn msg(request: u32, payload: Vec<u8>) -> Message {
        Message {
            request,
            flags: FLAG_VERSION_1,
            payload,
            fds: vec![],
        }
    }

    fn enable(index: u32, num: u32) -> Vec<u8> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        p
    }

    #[test]
    fn messages_and_fds_cross_intact() {
        let (a, b) = UnixStream::pair().unwrap();
        let memfd =
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::empty()).unwrap();
        let mut m = msg(code::SET_MEM_TABLE, vec![1, 2, 3]);
        m.fds.push(memfd);
        write_message(&a, &m).unwrap();
        let got = read_message(&b).unwrap().unwrap();
        assert_eq!(
            (got.request, got.payload.clone(), got.fds.len()),
            (5, vec![1, 2, 3], 1)
        );
        drop(a);
        assert!(read_message(&b).unwrap().is_none());
    }

    #[test]
    fn an_oversized_payload_is_an_error_not_an_allocation() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut hdr = 1u32.to_le_bytes().to_vec();
        hdr.extend_from_slice(&1u32.to_le_bytes());
        hdr.extend_from_slice(&u32::MAX.to_le_bytes());
        (&a).write_all(&hdr).unwrap();
        assert!(read_message(&b).is_err());
    }

    #[test]
    fn early_enables_are_held_and_replayed_after_set_features_and_rarp_is_answered() {
        let (qemu, qemu_side) = UnixStream::pair().unwrap();
        let (backend_side, backend) = UnixStream::pair().unwrap();
        let log = SharedMessageLog::default();
        let l2 = log.clone();
        let disabled = Arc::new(Mutex::new(vec![]));
        let d2 = disabled.clone();
        let t = std::thread::spawn(move || {
            run(qemu_side, backend_side, l2, move |i| d2.lock().push(i))
        });
        write_message(&qemu, &msg(code::SET_VRING_ENABLE, enable(0, 1))).unwrap();
        write_message(&qemu, &msg(code::SET_VRING_ENABLE, enable(1, 1))).unwrap();
        let mut rarp = msg(code::SEND_RARP, vec![0; 8]);
        rarp.flags |= FLAG_NEED_REPLY;
        write_message(&qemu, &rarp).unwrap();
        let reply = read_message(&qemu).unwrap().unwrap();
        assert_eq!(reply.request, code::SEND_RARP);
        assert_ne!(reply.flags & FLAG_REPLY, 0);
        write_message(
            &qemu,
            &msg(code::SET_FEATURES, PROTOCOL_FEATURES.to_le_bytes().to_vec()),
        )
        .unwrap();
        // The connection starts by releasing the backend for this front-end.
        assert_eq!(
            read_message(&backend).unwrap().unwrap().request,
            FrontendReq::RESET_OWNER as u32
        );
        // The backend sees SET_FEATURES first, then both enables; never SEND_RARP.
        let seen: Vec<(u32, Vec<u8>)> = (0..3)
            .map(|_| {
                let m = read_message(&backend).unwrap().unwrap();
                (m.request, m.payload)
            })
            .collect();
        assert_eq!(seen[0].0, code::SET_FEATURES);
        assert_eq!(seen[1], (code::SET_VRING_ENABLE, enable(0, 1)));
        assert_eq!(seen[2], (code::SET_VRING_ENABLE, enable(1, 1)));
        // After the features, enables pass straight through.
        write_message(&qemu, &msg(code::SET_VRING_ENABLE, enable(1, 0))).unwrap();
        let m = read_message(&backend).unwrap().unwrap();
        assert_eq!(
            (m.request, m.payload),
            (code::SET_VRING_ENABLE, enable(1, 0))
        );
        // Replies flow back.
        write_message(&backend, &msg(code::GET_VRING_BASE, vec![9; 8])).unwrap();
        assert_eq!(read_message(&qemu).unwrap().unwrap().payload, vec![9; 8]);
        drop(qemu);
        t.join().unwrap().unwrap();
        let l = log.lock();
        assert_eq!(l.enables_replayed, 2);
        assert_eq!(l.rarp, 1);
        assert_eq!(l.counts["set_vring_enable"], 3);
        assert_eq!(
            *disabled.lock(),
            vec![1],
            "the hook saw the disable of ring 1"
        );
    }
}
