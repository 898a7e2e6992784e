//! Connections between companions: the listener that serves peers' requests, the links this
//! VF dials to send its own, and the thread on each link that reads the peer's acks.
//!
//! Every input here is untrusted until the handshake ([`super::auth`]) has named the peer, and
//! bounded after: at most [`MAX_HANDSHAKING`] connections in handshake (the oldest is dropped for
//! a new one) with a [`HANDSHAKE_TIMEOUT`] each, at most [`MAX_PER_PEER`] established connections
//! per peer (the oldest is dropped for a new one), a read timeout on each, frame lengths checked
//! before any allocation, announces only from the VM they name and only to the cluster's fabric
//! addresses, and announces dialled in parallel within [`ANNOUNCE_DEADLINE`].

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::auth::{self, FabricAuth, FrameReader, FrameWriter};
use super::responder::{self, Outcome};
use super::wire::{AckStatus, Frame, FrameOf, HandoffOp, WireError};
use super::{handoff, lost, requester, Inner};
use crate::trace::steps;

/// Connections in handshake at once; a new one drops the oldest.
pub const MAX_HANDSHAKING: usize = 16;
/// Established connections from one peer at once; a new one drops the oldest.
pub const MAX_PER_PEER: usize = 4;
/// How long a dialler has for the handshake and its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an established connection may stay silent before it is closed (the peer redials
/// when it next sends).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a dial (connect and handshake) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long announcing a migrated VM to all its peers may take, all dialled in parallel.
pub const ANNOUNCE_DEADLINE: Duration = Duration::from_secs(2);

/// Timing of the transport.
#[derive(Debug, Clone, Copy)]
pub struct FabricTiming {
    /// How often held requests are retried.
    pub retry_interval: Duration,
    /// How long requests are held for an unreachable peer before they fail.
    pub hold_timeout: Duration,
    /// How long a peer may have no receive posted before the request fails.
    pub rnr_timeout: Duration,
}

impl Default for FabricTiming {
    fn default() -> Self {
        Self {
            retry_interval: Duration::from_millis(20),
            hold_timeout: Duration::from_secs(60),
            rnr_timeout: Duration::from_secs(30),
        }
    }
}

/// A connection this VF dialled to a peer: its requests go out on it, the peer's acks come
/// back on it.
pub(super) struct Link {
    pub(super) writer: Mutex<FrameWriter>,
    pub(super) generation: u64,
    pub(super) alive: AtomicBool,
    /// The address it was dialled at (the peer's place in the cluster map then).
    addr: String,
}

impl Link {
    /// Marks the link dead and shuts its socket, which ends its ack reader.
    pub(super) fn shut(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let _ = self
            .writer
            .lock()
            .stream()
            .shutdown(std::net::Shutdown::Both);
    }
}

/// The connections served, for the caps.
#[derive(Default)]
pub(super) struct Conns {
    next_id: u64,
    pub(super) handshaking: VecDeque<(u64, TcpStream)>,
    peers: HashMap<String, VecDeque<(u64, TcpStream)>>,
}

/// Takes a new connection into handshake, dropping the oldest one in handshake past the cap.
fn admit(inner: &Inner, stream: &TcpStream, from: SocketAddr) -> Option<u64> {
    let clone = stream.try_clone().ok()?;
    let mut c = inner.conns.lock();
    c.next_id += 1;
    let id = c.next_id;
    if c.handshaking.len() >= MAX_HANDSHAKING {
        if let Some((_, old)) = c.handshaking.pop_front() {
            tracing::warn!(%from, cap = MAX_HANDSHAKING, "too many fabric connections in handshake: dropping the oldest");
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
    }
    c.handshaking.push_back((id, clone));
    Some(id)
}

/// Moves connection `id` from handshake to `peer`'s connections, dropping `peer`'s oldest past
/// the cap.
fn established(inner: &Inner, id: u64, peer: &str, stream: &TcpStream) {
    let mut c = inner.conns.lock();
    c.handshaking.retain(|(i, _)| *i != id);
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let list = c.peers.entry(peer.to_string()).or_default();
    if list.len() >= MAX_PER_PEER {
        if let Some((_, old)) = list.pop_front() {
            tracing::warn!(%peer, cap = MAX_PER_PEER, "too many fabric connections from one peer: dropping its oldest");
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
    }
    list.push_back((id, clone));
}

/// Forgets connection `id`.
fn gone(inner: &Inner, id: u64) {
    let mut c = inner.conns.lock();
    c.handshaking.retain(|(i, _)| *i != id);
    for list in c.peers.values_mut() {
        list.retain(|(i, _)| *i != id);
    }
    c.peers.retain(|_, l| !l.is_empty());
}

/// The live link to `vm`, if any.
fn live_link(inner: &Inner, vm: &str) -> Option<Arc<Link>> {
    inner
        .links
        .lock()
        .get(vm)
        .filter(|l| l.alive.load(Ordering::SeqCst))
        .cloned()
}

/// The link to `vm`, dialling it if there is none. One dial per peer at a time (the sender and
/// the probe may both want one): a second link dialled at once would replace the first, and
/// what the first carried would go again on the second.
pub(super) fn link_to(inner: &Arc<Inner>, vm: &str) -> Option<Arc<Link>> {
    if let Some(l) = live_link(inner, vm) {
        return Some(l);
    }
    let one = inner
        .dialing
        .lock()
        .entry(vm.to_string())
        .or_default()
        .clone();
    let _one = one.lock();
    if let Some(l) = live_link(inner, vm) {
        return Some(l);
    }
    // A dial that landed at the peer's old place because it moved meanwhile (its announce
    // came during the dial) is dropped; the new place is dialled at once, not a retry tick
    // later.
    let addr = inner.book.lock().get(vm).cloned();
    let link = dial(inner, vm, false);
    let moved = inner.book.lock().get(vm).cloned() != addr;
    if link.is_none() && moved {
        steps::instant("redial-after-move", vm);
        return dial(inner, vm, false);
    }
    link
}

/// Dials `vm` and says Hello (announcing a migration when `announce`).
///
/// Announcing, all peers are dialled at once (see [`announce_round`]) so that a peer that does
/// not answer costs at most [`ANNOUNCE_DEADLINE`] for all of them.
pub(super) fn dial(inner: &Arc<Inner>, vm: &str, announce: bool) -> Option<Arc<Link>> {
    if announce {
        return announce_round(inner, vm);
    }
    let link = connect(inner, vm, false, Instant::now() + DIAL_TIMEOUT)?;
    install(inner, vm, link)
}

/// Announces this VM to `vm` alone, within [`DIAL_TIMEOUT`] (a peer that missed the
/// parallel round); the link is put in use.
pub(super) fn announce_to(inner: &Arc<Inner>, vm: &str) -> Option<Arc<Link>> {
    let link = connect(inner, vm, true, Instant::now() + DIAL_TIMEOUT)?;
    install(inner, vm, link)
}

/// Puts a dialled link in use, unless the peer moved while it was dialled (an announce
/// changed its place): a link to the old place is shut, and must not replace the link to
/// the new one.
fn install(inner: &Arc<Inner>, vm: &str, link: Arc<Link>) -> Option<Arc<Link>> {
    if inner.book.lock().get(vm) != Some(&link.addr) {
        tracing::info!(peer = vm, addr = %link.addr, "the peer moved while it was dialled: link to its old place dropped");
        link.shut();
        return None;
    }
    if let Some(old) = inner.links.lock().insert(vm.into(), link.clone()) {
        if !Arc::ptr_eq(&old, &link) {
            old.shut();
        }
    }
    Some(link)
}

/// The results of the last parallel announce.
#[derive(Default)]
pub(super) struct Round {
    started: Option<Instant>,
    results: HashMap<String, Option<Arc<Link>>>,
}

/// Announcing this VM to `vm`: the first peer of a round dials every peer in the cluster in
/// parallel, within one deadline; each peer's result is then taken by its own call.
fn announce_round(inner: &Arc<Inner>, vm: &str) -> Option<Arc<Link>> {
    let mut round = inner.announce_round.lock();
    let fresh = round
        .started
        .is_some_and(|t| t.elapsed() < ANNOUNCE_DEADLINE * 2);
    if !fresh || !round.results.contains_key(vm) {
        let peers: Vec<String> = inner
            .book
            .lock()
            .keys()
            .filter(|p| **p != inner.vm)
            .cloned()
            .collect();
        let deadline = Instant::now() + ANNOUNCE_DEADLINE;
        let results: HashMap<String, Option<Arc<Link>>> = std::thread::scope(|s| {
            let handles: Vec<_> = peers
                .iter()
                .map(|p| (p.clone(), s.spawn(|| connect(inner, p, true, deadline))))
                .collect();
            handles
                .into_iter()
                .map(|(p, h)| (p, h.join().ok().flatten()))
                .collect()
        });
        *round = Round {
            started: Some(Instant::now()),
            results,
        };
    }
    let link = round.results.remove(vm).flatten()?;
    install(inner, vm, link)
}

/// What a dialler's handshake gives: the link's MAC keys and the peer's epoch (all `None` on
/// an insecure fabric).
#[derive(Default)]
pub(super) struct Dialled {
    pub(super) send_key: Option<auth::Key>,
    pub(super) recv_key: Option<auth::Key>,
    pub(super) peer_epoch: Option<u64>,
}

/// The dialler's handshake with the companion that speaks for `peer`, if the fabric
/// authenticates.
pub(super) fn initiate(
    inner: &Inner,
    peer: &str,
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<Dialled, auth::HandshakeError> {
    match &inner.auth {
        FabricAuth::Keys(keys) => {
            let epoch = inner.epoch.load(Ordering::SeqCst);
            let s = auth::initiate(keys, &inner.vm, epoch, peer, stream, deadline)?;
            Ok(Dialled {
                send_key: Some(s.send_key),
                recv_key: Some(s.recv_key),
                peer_epoch: Some(s.peer_epoch),
            })
        }
        FabricAuth::Insecure => Ok(Dialled::default()),
    }
}

/// Connects to `vm`, authenticates, and says Hello, before `deadline`; starts the link's ack
/// reader. The link is not yet in use.
pub(super) fn connect(
    inner: &Arc<Inner>,
    vm: &str,
    announce: bool,
    deadline: Instant,
) -> Option<Arc<Link>> {
    let addr = inner.book.lock().get(vm).cloned()?;
    let sock: SocketAddr = addr.to_socket_addrs().ok()?.next()?;
    let left = deadline.saturating_duration_since(Instant::now());
    let mut stream = TcpStream::connect_timeout(&sock, left.min(Duration::from_millis(500)))
        .map_err(|e| tracing::debug!(peer = vm, %addr, error = %e, "fabric dial failed"))
        .ok()?;
    let _ = stream.set_nodelay(true);
    let Dialled {
        send_key,
        recv_key,
        peer_epoch,
    } = match initiate(inner, vm, &mut stream, deadline) {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!(peer = vm, %addr, error = %e, "fabric handshake with peer failed");
            return None;
        }
    };
    if let Some(e) = peer_epoch {
        lost::note_epoch(inner, vm, e);
    }
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    let reader = stream.try_clone().ok()?;
    let mut writer = FrameWriter::new(stream, send_key);
    writer
        .frame(&Frame::Hello {
            vm: inner.vm.clone(),
            listen: inner.listen.clone(),
            announce,
        })
        .ok()?;
    writer.flush().ok()?;
    let generation = inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
    let link = Arc::new(Link {
        writer: Mutex::new(writer),
        generation,
        alive: AtomicBool::new(true),
        addr: addr.clone(),
    });
    {
        let (inner, link, vm) = (inner.clone(), link.clone(), vm.to_string());
        let reader = FrameReader::new(reader, recv_key);
        let _ = std::thread::Builder::new()
            .name(format!("vfmig-fabric-acks-{vm}"))
            .spawn(move || {
                read_acks(&inner, &vm, reader);
                link.alive.store(false, Ordering::SeqCst);
            });
    }
    tracing::debug!(peer = vm, %addr, generation, "fabric link up");
    Some(link)
}

/// Reads a link's acks until it closes. Acks already read from the socket are taken together
/// ([`requester::handle_acks`]), once no whole next frame is buffered.
fn read_acks(inner: &Arc<Inner>, vm: &str, mut r: FrameReader) {
    let mut acks = Vec::new();
    loop {
        let frame = r.frame();
        if let Ok(Some(Frame::Ack { qp, psn, status })) = frame {
            acks.push((qp, psn, status));
            if r.next_frame_buffered() {
                continue;
            }
        }
        // Nothing more buffered, or another frame: the acks gathered are taken first.
        if !acks.is_empty() {
            requester::handle_acks(inner, &acks);
            acks.clear();
        }
        match frame {
            Ok(Some(Frame::Ack { .. })) => {}
            Ok(Some(other)) => {
                tracing::warn!(peer = %vm, ?other, "unexpected frame on a request link");
                inner.stats.lock().malformed_frames += 1;
            }
            Ok(None) => break,
            Err(e) => {
                if e.is_malformed() {
                    inner.stats.lock().malformed_frames += 1;
                    tracing::warn!(peer = %vm, error = %e, "fabric link to peer broke the protocol: closed");
                } else {
                    tracing::info!(peer = %vm, error = %e, "fabric link to peer lost");
                }
                break;
            }
        }
    }
}

/// Closes the link to `vm`, if any: what it carried and was not acked goes again on the next.
pub(super) fn drop_link(inner: &Inner, vm: &str) {
    let link = inner.links.lock().remove(vm);
    if let Some(l) = link {
        l.shut();
    }
}

/// Accepts peers' connections until the VF closes.
pub(super) fn accept_loop(inner: &Arc<Inner>, listener: TcpListener) {
    while !inner.closed.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, from)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                let Some(id) = admit(inner, &stream, from) else {
                    continue;
                };
                let inner2 = inner.clone();
                let spawned = std::thread::Builder::new()
                    .name("vfmig-fabric-peer".into())
                    .spawn(move || {
                        if let Err(e) = serve_peer(&inner2, id, stream) {
                            if e.is_malformed() {
                                tracing::warn!(%from, error = %e, "fabric peer broke the protocol: connection closed");
                            } else {
                                tracing::info!(%from, error = %e, "fabric peer connection ended");
                            }
                        }
                        gone(&inner2, id);
                    });
                if let Err(e) = spawned {
                    tracing::warn!(%from, error = %e, "cannot serve a fabric peer: no thread");
                    gone(inner, id);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Until a peer connects (an announce or a redial must not wait for a tick), or
                // a while, to see whether the VF closed.
                wait_readable(&listener, Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(error = %e, "fabric accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Waits until `listener` has a connection to accept, or `timeout`.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        listener.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).is_err() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Why a peer's connection was refused at its start.
#[derive(Debug, thiserror::Error)]
pub(super) enum ServeError {
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] auth::HandshakeError),
    /// A frame could not be read or broke the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The hello names another VM than the one authenticated, or one outside the cluster.
    #[error("a fabric peer authenticated as {authenticated:?} says it is {claimed:?}: refused")]
    NotItself {
        /// Whom the handshake proved.
        authenticated: String,
        /// Whom the hello names.
        claimed: String,
    },
    /// An announce points at an address outside the cluster file.
    #[error(
        "peer {peer} announces it moved to {addr}, which is no fabric address of the cluster \
         file: refused; list the destination's address under \"hosts\" in the cluster file"
    )]
    ForeignAddress {
        /// The VM.
        peer: String,
        /// The address.
        addr: String,
    },
    /// A VF handoff link failed.
    #[error(transparent)]
    Handoff(#[from] handoff::HandoffLinkError),
    /// The hello names a VM this cluster does not have.
    #[error("a fabric peer says it is VM {0:?}, which is not in the cluster file: refused")]
    UnknownVm(String),
}

impl ServeError {
    fn is_malformed(&self) -> bool {
        match self {
            ServeError::Wire(e) => e.is_malformed(),
            ServeError::Handshake(auth::HandshakeError::Io(_)) => false,
            _ => true,
        }
    }
}

/// What a dialler's first frame says it wants.
enum First {
    /// A peer VM's link: its requests follow.
    Peer(String),
    /// This VM's incoming companion seeks its VF (see [`handoff`]); its listen address.
    Seeker(String),
}

/// Reads the dialler's first frame: a Hello (who it is, and, announcing a migration, where it
/// now lives) or a VF handoff's `Seek`. `authenticated`: whom the handshake proved, if the
/// fabric authenticates. `Ok(None)`: it closed before saying anything.
fn hello(
    inner: &Inner,
    reader: &mut FrameReader,
    authenticated: Option<&str>,
) -> Result<Option<First>, ServeError> {
    match reader.frame() {
        Ok(Some(Frame::Hello {
            vm,
            listen,
            announce,
        })) => {
            if let Some(who) = authenticated {
                if who != vm {
                    return Err(ServeError::NotItself {
                        authenticated: who.into(),
                        claimed: vm,
                    });
                }
            }
            if !inner.book.lock().contains_key(&vm) {
                return Err(ServeError::UnknownVm(vm));
            }
            if announce {
                if !inner.allowed.lock().contains(&listen) {
                    return Err(ServeError::ForeignAddress {
                        peer: vm,
                        addr: listen,
                    });
                }
                tracing::info!(peer = %vm, %listen, "peer announces its new place: replaying held requests");
                inner.book.lock().insert(vm.clone(), listen);
                inner.heard.lock().moved(&vm);
                drop_link(inner, &vm);
                steps::rearm();
                steps::instant("announce-received", vm.as_str());
                requester::kick(inner);
            }
            Ok(Some(First::Peer(vm)))
        }
        Ok(Some(Frame::Handoff {
            op: HandoffOp::Seek,
            body,
            ..
        })) => {
            // Only this VM's own companions may ask for its VF: the seeker names the VM, and
            // the handshake proved that it holds that VM's key.
            let (vm, listen) = handoff::parse_seek(&body)?;
            for who in [Some(vm.as_str()), authenticated].into_iter().flatten() {
                if who != inner.vm {
                    return Err(ServeError::NotItself {
                        authenticated: who.into(),
                        claimed: inner.vm.clone(),
                    });
                }
            }
            Ok(Some(First::Seeker(listen)))
        }
        Ok(Some(other)) => {
            inner.stats.lock().malformed_frames += 1;
            Err(WireError::Malformed(format!("expected Hello first, got {other:?}")).into())
        }
        Ok(None) => Ok(None),
        Err(e) => {
            if let WireError::Version { .. } = e {
                tracing::warn!(error = %e, "fabric peer refused");
            }
            Err(e.into())
        }
    }
}

/// Serves one peer's connection: authenticates it, then applies its requests in order and
/// acks each.
fn serve_peer(inner: &Arc<Inner>, id: u64, mut stream: TcpStream) -> Result<(), ServeError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let (proved, send_key, recv_key, epoch) = match &inner.auth {
        FabricAuth::Keys(keys) => {
            let s = auth::respond(
                keys,
                inner.epoch.load(Ordering::SeqCst),
                &mut stream,
                deadline,
            )?;
            (
                Some(s.peer),
                Some(s.send_key),
                Some(s.recv_key),
                Some(s.peer_epoch),
            )
        }
        FabricAuth::Insecure => (None, None, None, None),
    };
    stream
        .set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .map_err(WireError::from)?;
    let mut reader = FrameReader::new(stream.try_clone().map_err(WireError::from)?, recv_key);
    let peer = match hello(inner, &mut reader, proved.as_deref())? {
        None => return Ok(()),
        Some(First::Peer(peer)) => peer,
        Some(First::Seeker(listen)) => {
            established(inner, id, &inner.vm, &stream);
            let writer = FrameWriter::new(stream, send_key);
            return Ok(handoff::serve_seeker(inner, listen, reader, writer)?);
        }
    };
    // The epoch was proved in the handshake; it counts once the hello's MAC holds.
    if let Some(e) = epoch {
        lost::note_epoch(inner, &peer, e);
    }
    established(inner, id, &peer, &stream);
    stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(WireError::from)?;
    let mut writer = FrameWriter::new(stream, send_key);
    loop {
        let frame = match reader.frame_ref() {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                if e.is_malformed() {
                    inner.stats.lock().malformed_frames += 1;
                }
                return Err(e.into());
            }
        };
        let (qp, psn) = match &frame {
            FrameOf::Write { src_qp, psn, .. } | FrameOf::Send { src_qp, psn, .. } => {
                (*src_qp, *psn)
            }
            FrameOf::Gone { vm, epoch } => {
                // Taken or refused, the connection closes: that tells the dialler it was read.
                lost::on_gone(inner, &peer, vm, *epoch);
                return Ok(());
            }
            other => {
                inner.stats.lock().malformed_frames += 1;
                tracing::warn!(%peer, ?other, "unexpected frame from a peer: dropped");
                continue;
            }
        };
        let status = match responder::apply(inner, &peer, frame) {
            Outcome::Ack(status) => status,
            // From the future (after a gap): the sender goes back and resends from the gap.
            Outcome::Drop => continue,
            // Quiesced for switchover, or the VM moved on: close, so the peer holds what it
            // sends and replays it to wherever this VM comes up.
            Outcome::Close => {
                tracing::info!(%peer, "VF quiesced or moved away: closing the peer's link");
                steps::first("peer-link-closed", &peer);
                return Ok(());
            }
        };
        if status == AckStatus::Ok {
            steps::first("request-applied", &peer);
            inner.heard.lock().request(&peer, Instant::now());
        }
        #[cfg(test)]
        if inner
            .swallow_acks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            continue;
        }
        writer.frame(&Frame::Ack { qp, psn, status })?;
        // Acks of frames already read go out together, after the last of them: a request
        // whose whole frame is buffered is taken without waiting on the peer.
        if !reader.next_frame_buffered() {
            writer.flush().map_err(WireError::from)?;
        }
    }
}
