//! The VF's handoff, companion to companion, over the authenticated fabric: whatever drives
//! QEMU's migration (`vfmig migrate`, libvirt, Nova, a plain QMP `migrate`), the VF's state
//! moves with the VM.
//!
//! Both companions speak for the same VM: each holds the VM's fabric key, and the handshake
//! proves it, so only a companion given that key can ask for the VM's VF. The steps
//! ([`HandoffOp`]), on one link the destination dials:
//! 1. the destination's companion, started for an incoming VM, dials the VM's place in the
//!    cluster map (then the cluster's other fabric addresses) and says `Seek`, with its own
//!    listen address. A companion that runs the VM's VF answers `Here` and keeps the link (the
//!    newest seeker replaces an older one); any other closes it with `Refused`;
//! 2. at the switchover quiesce (inside `GET_VRING_BASE`), the source sends `State` with the
//!    export's generation. Its VF stays quiesced and keeps its copy;
//! 3. if the source's VM runs again (the migration failed or was cancelled, or a guest device
//!    reset stopped the rings during precopy), it takes the state back and sends `Revoke`;
//! 4. once the destination's VM runs (QEMU starts its vhost device, after `cont`), the
//!    destination sends `Claim`; the source drops its copy and answers `Granted`, or, if it
//!    took the state back, `Refused`. Only then does the destination import the state and
//!    announce the VM's new place to its peers: the VF is never live in two companions.
//!
//! This file moves the messages; what a state is and when it is taken back is the companion's
//! ([`HandoffHooks`], `crate::companion::handoff`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::auth::{FrameReader, FrameWriter};
use super::link::{self, HANDSHAKE_TIMEOUT};
use super::wire::{Frame, HandoffOp, WireError};
use super::{Inner, SoftVf};

/// Messages queued for the destination at once (states and revokes); more are dropped with a
/// warning. A handoff sends one or two.
const MAX_QUEUED: usize = 8;
/// How long a queued message may take to go out before the link is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a seeker waits between rounds over the candidate addresses.
const SEEK_PAUSE: Duration = Duration::from_millis(200);
/// How long a dialled companion has to answer `Seek`.
const SEEK_ANSWER: Duration = Duration::from_secs(2);

/// What the companion decides in a handoff.
pub trait HandoffHooks: Send + Sync {
    /// Source: whether this companion runs the VM's VF now (it answers a seeker `Here`).
    fn runs_here(&self) -> bool;
    /// Source: the destination claims export `generation` (its VM runs there). `Ok`: this
    /// companion dropped its copy. `Err`: why not (it took the state back, say).
    fn claim(&self, generation: u64) -> Result<(), String>;
    /// Destination: export `generation` arrived (`body`: the state, as the source encoded it).
    fn state(&self, generation: u64, body: Vec<u8>);
    /// Destination: the source took export `generation` back.
    fn revoke(&self, generation: u64);
}

/// The source's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// The source dropped its copy: the state is the destination's.
    Granted,
    /// The source refused: why.
    Refused(String),
    /// No link to the source, or no answer in time.
    NoAnswer,
}

/// A seeker the source keeps: where its queued messages go.
struct Destination {
    id: u64,
    listen: String,
    queue: crossbeam_channel::Sender<Frame>,
    stream: std::net::TcpStream,
}

/// The handoff's share of the soft VF.
#[derive(Default)]
pub(super) struct Handoff {
    hooks: Mutex<Option<Arc<dyn HandoffHooks>>>,
    /// Source: the newest destination that sought this VM's VF.
    destination: Mutex<Option<Destination>>,
    next_id: AtomicU64,
    /// Destination: while set, the seeker looks for the source and keeps its link.
    seeking: AtomicBool,
    /// Destination: the link to the source, for claims.
    source: Mutex<Option<(String, Arc<Mutex<FrameWriter>>)>>,
    /// Destination: the source's answer to the last claim (generation, answer).
    answer: Mutex<Option<(u64, ClaimAnswer)>>,
    answered: Condvar,
}

impl Handoff {
    fn hooks(&self) -> Option<Arc<dyn HandoffHooks>> {
        self.hooks.lock().clone()
    }
}

/// Why a handoff link ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandoffLinkError {
    /// A frame could not be read or broke the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer sent a step out of turn.
    #[error("VF handoff: unexpected step {0:?} from the other companion")]
    OutOfTurn(HandoffOp),
}

/// A `Seek`'s body: the VM sought and the seeker's listen address, a line each.
fn seek_body(vm: &str, listen: &str) -> Vec<u8> {
    format!("{vm}\n{listen}").into_bytes()
}

/// Longest `Seek` body taken: a VM name and a `host:port`.
const MAX_SEEK: usize = 512;

/// Reads a `Seek`'s body: (VM, listen address).
pub(super) fn parse_seek(body: &[u8]) -> Result<(String, String), WireError> {
    if body.len() > MAX_SEEK {
        return Err(WireError::Malformed(format!(
            "a VF handoff seek of {} bytes (at most {MAX_SEEK})",
            body.len()
        )));
    }
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.split_once('\n'))
        .map(|(vm, listen)| (vm.to_string(), listen.to_string()))
        .ok_or_else(|| WireError::Malformed("a VF handoff seek without \"VM\\nADDRESS\"".into()))
}

fn handoff(op: HandoffOp, generation: u64, body: Vec<u8>) -> Frame {
    Frame::Handoff {
        op,
        generation,
        body,
    }
}

/// Source side: serves a companion that said `Seek` (the handshake proved it holds this VM's
/// key). Answers `Here` and keeps it as the destination if this companion runs the VM's VF;
/// then takes its claims until the link closes.
pub(super) fn serve_seeker(
    inner: &Arc<Inner>,
    listen: String,
    mut reader: FrameReader,
    mut writer: FrameWriter,
) -> Result<(), HandoffLinkError> {
    let hooks = inner.handoff.hooks();
    if !hooks.as_ref().is_some_and(|h| h.runs_here()) {
        tracing::info!(seeker = %listen, "a companion seeks this VM's VF, which does not run here");
        writer.frame(&handoff(
            HandoffOp::Refused,
            0,
            b"this companion does not run the VM's VF".to_vec(),
        ))?;
        writer.flush().map_err(WireError::from)?;
        return Ok(());
    }
    writer.frame(&handoff(HandoffOp::Here, 0, Vec::new()))?;
    writer.flush().map_err(WireError::from)?;
    let _ = writer.stream().set_write_timeout(Some(SEND_TIMEOUT));
    // The precopy may take long: the link waits for the switchover without a read timeout
    // (the handshake's deadline was set on it).
    let _ = writer.stream().set_read_timeout(None);
    let stream = writer.stream().try_clone().map_err(WireError::from)?;
    let writer = Arc::new(Mutex::new(writer));
    let (queue, queued) = crossbeam_channel::bounded::<Frame>(MAX_QUEUED);
    let id = inner.handoff.next_id.fetch_add(1, Ordering::SeqCst) + 1;
    {
        let writer = writer.clone();
        let sent = std::thread::Builder::new()
            .name("vfmig-handoff-send".into())
            .spawn(move || {
                for f in queued {
                    let mut w = writer.lock();
                    if let Err(e) = w.frame(&f).and_then(|()| Ok(w.flush()?)) {
                        tracing::warn!(error = %e, "VF handoff: the destination's link failed");
                        let _ = w.stream().shutdown(std::net::Shutdown::Both);
                        break;
                    }
                }
            });
        if let Err(e) = sent {
            tracing::warn!(error = %e, "VF handoff: no thread to send to the destination");
            return Ok(());
        }
    }
    let old = inner.handoff.destination.lock().replace(Destination {
        id,
        listen: listen.clone(),
        queue,
        stream,
    });
    if let Some(old) = old {
        tracing::info!(old = %old.listen, new = %listen, "VF handoff: a newer destination replaces the last one");
        let _ = old.stream.shutdown(std::net::Shutdown::Both);
    }
    tracing::info!(destination = %listen, "VF handoff: the destination's companion waits for this VM's VF");
    let result = (|| loop {
        match reader.frame()? {
            None => return Ok(()),
            Some(Frame::Handoff {
                op: HandoffOp::Claim,
                generation,
                ..
            }) => {
                let answer = match hooks.as_ref().map(|h| h.claim(generation)) {
                    Some(Ok(())) => handoff(HandoffOp::Granted, generation, Vec::new()),
                    Some(Err(why)) => handoff(HandoffOp::Refused, generation, why.into_bytes()),
                    None => handoff(HandoffOp::Refused, generation, b"no VF".to_vec()),
                };
                let mut w = writer.lock();
                w.frame(&answer)?;
                w.flush().map_err(WireError::from)?;
            }
            Some(Frame::Handoff { op, .. }) => return Err(HandoffLinkError::OutOfTurn(op)),
            Some(other) => {
                return Err(WireError::Malformed(format!(
                    "expected a VF handoff step, got {other:?}"
                ))
                .into())
            }
        }
    })();
    let mut d = inner.handoff.destination.lock();
    if d.as_ref().is_some_and(|d| d.id == id) {
        *d = None;
    }
    result
}

impl SoftVf {
    /// Sets what the companion decides in a handoff.
    pub fn set_handoff_hooks(&self, hooks: Arc<dyn HandoffHooks>) {
        *self.inner.handoff.hooks.lock() = Some(hooks);
    }

    /// Source: the listen address of the destination companion that waits for this VM's VF.
    pub fn handoff_destination(&self) -> Option<String> {
        self.inner
            .handoff
            .destination
            .lock()
            .as_ref()
            .map(|d| d.listen.clone())
    }

    /// Source: queues export `generation` for the waiting destination. Returns whether one
    /// waits; it never blocks (the quiesce calls it before QEMU's reply).
    pub fn handoff_send_state(&self, generation: u64, body: Vec<u8>) -> bool {
        self.queue_for_destination(handoff(HandoffOp::State, generation, body))
    }

    /// Source: tells the destination that export `generation` was taken back.
    pub fn handoff_revoke(&self, generation: u64) -> bool {
        self.queue_for_destination(handoff(HandoffOp::Revoke, generation, Vec::new()))
    }

    fn queue_for_destination(&self, frame: Frame) -> bool {
        let d = self.inner.handoff.destination.lock();
        let Some(d) = d.as_ref() else { return false };
        match d.queue.try_send(frame) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(destination = %d.listen, error = %e, "VF handoff: cannot queue for the destination");
                false
            }
        }
    }

    /// Destination: looks for the companion that runs this VM's VF, in the background, and
    /// keeps its link (states and revokes go to the hooks) until [`SoftVf::end_handoff`].
    pub fn seek_handoff(&self) -> std::io::Result<()> {
        if self.inner.handoff.seeking.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("vfmig-handoff-seek".into())
            .spawn(move || seek_loop(&inner))?;
        Ok(())
    }

    /// Destination: whether the source's companion was found and its link is up.
    pub fn handoff_source(&self) -> Option<String> {
        self.inner
            .handoff
            .source
            .lock()
            .as_ref()
            .map(|(a, _)| a.clone())
    }

    /// Destination: claims export `generation` from the source, waiting up to `timeout`.
    pub fn handoff_claim(&self, generation: u64, timeout: Duration) -> ClaimAnswer {
        let h = &self.inner.handoff;
        let Some(writer) = h.source.lock().as_ref().map(|(_, w)| w.clone()) else {
            return ClaimAnswer::NoAnswer;
        };
        *h.answer.lock() = None;
        {
            let mut w = writer.lock();
            let sent = w
                .frame(&handoff(HandoffOp::Claim, generation, Vec::new()))
                .and_then(|()| Ok(w.flush()?));
            if let Err(e) = sent {
                tracing::warn!(error = %e, "VF handoff: the claim could not be sent");
                return ClaimAnswer::NoAnswer;
            }
        }
        let deadline = Instant::now() + timeout;
        let mut answer = h.answer.lock();
        loop {
            if let Some((g, a)) = answer.as_ref() {
                if *g == generation {
                    return a.clone();
                }
            }
            if h.answered.wait_until(&mut answer, deadline).timed_out() {
                return ClaimAnswer::NoAnswer;
            }
        }
    }

    /// Destination: stops seeking and closes the link to the source (the handoff is over:
    /// the state was imported, or dropped).
    pub fn end_handoff(&self) {
        let h = &self.inner.handoff;
        h.seeking.store(false, Ordering::SeqCst);
        if let Some((_, w)) = h.source.lock().take() {
            let _ = w.lock().stream().shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The addresses where the VM's VF may run: its place in the cluster map first, then the
/// cluster's other fabric addresses; never this companion's own.
fn candidates(inner: &Inner) -> Vec<String> {
    let first = inner.book.lock().get(&inner.vm).cloned();
    let mut all: Vec<String> = first.into_iter().collect();
    let mut others: Vec<String> = inner.allowed.lock().iter().cloned().collect();
    others.sort();
    for a in others {
        if !all.contains(&a) {
            all.push(a);
        }
    }
    all.retain(|a| *a != inner.listen);
    all
}

fn seek_loop(inner: &Arc<Inner>) {
    let started = Instant::now();
    let mut rounds = 0u64;
    while inner.handoff.seeking.load(Ordering::SeqCst) && !inner.closed.load(Ordering::SeqCst) {
        for addr in candidates(inner) {
            if !inner.handoff.seeking.load(Ordering::SeqCst) {
                break;
            }
            let Some((reader, writer)) = dial_source(inner, &addr) else {
                continue;
            };
            tracing::info!(source = %addr, after_ms = started.elapsed().as_millis() as u64, "VF handoff: the companion running this VM's VF was found");
            crate::trace::steps::instant("handoff-source-found", addr.as_str());
            let writer = Arc::new(Mutex::new(writer));
            *inner.handoff.source.lock() = Some((addr.clone(), writer));
            if let Err(e) = follow_source(inner, reader) {
                tracing::warn!(source = %addr, error = %e, "VF handoff: the link to the source broke");
            }
            let mut s = inner.handoff.source.lock();
            if s.as_ref().is_some_and(|(a, _)| *a == addr) {
                *s = None;
            }
            break;
        }
        rounds += 1;
        if rounds == 50 {
            tracing::warn!("VF handoff: no companion runs this VM's VF yet (10 s); still looking");
        }
        std::thread::sleep(SEEK_PAUSE);
    }
}

/// Dials `addr` as this VM and says `Seek`: the link, if the companion there runs the VF.
fn dial_source(inner: &Arc<Inner>, addr: &str) -> Option<(FrameReader, FrameWriter)> {
    use std::net::ToSocketAddrs;
    let sock = addr.to_socket_addrs().ok()?.next()?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut stream =
        std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(500)).ok()?;
    let _ = stream.set_nodelay(true);
    // Both ends are this VM: the one key proves either to the other. Its epoch is this VM's
    // own, not a peer's: it is not noted.
    let link::Dialled {
        send_key, recv_key, ..
    } = link::initiate(inner, &inner.vm, &mut stream, deadline)
        .map_err(|e| tracing::debug!(%addr, error = %e, "VF handoff: handshake failed"))
        .ok()?;
    let _ = stream.set_read_timeout(Some(SEEK_ANSWER));
    let mut reader = FrameReader::new(stream.try_clone().ok()?, recv_key);
    let mut writer = FrameWriter::new(stream, send_key);
    writer
        .frame(&handoff(
            HandoffOp::Seek,
            0,
            seek_body(&inner.vm, &inner.listen),
        ))
        .ok()?;
    writer.flush().ok()?;
    match reader.frame() {
        Ok(Some(Frame::Handoff {
            op: HandoffOp::Here,
            ..
        })) => {
            let _ = writer.stream().set_read_timeout(None);
            Some((reader, writer))
        }
        other => {
            tracing::debug!(%addr, answer = ?other.map(|f| f.map(|f| format!("{f:?}"))), "VF handoff: not the VM's VF there");
            None
        }
    }
}

/// Destination: takes the source's messages until the link closes or the handoff ends.
fn follow_source(inner: &Arc<Inner>, mut reader: FrameReader) -> Result<(), HandoffLinkError> {
    loop {
        let frame = match reader.frame() {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) if !inner.handoff.seeking.load(Ordering::SeqCst) => {
                tracing::debug!(error = %e, "VF handoff link closed after the handoff");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let Frame::Handoff {
            op,
            generation,
            body,
        } = frame
        else {
            return Err(
                WireError::Malformed(format!("expected a VF handoff step, got {frame:?}")).into(),
            );
        };
        let hooks = inner.handoff.hooks();
        match op {
            HandoffOp::State => {
                tracing::info!(
                    generation,
                    bytes = body.len(),
                    "VF handoff: the VF state arrived"
                );
                if let Some(h) = hooks {
                    h.state(generation, body);
                }
            }
            HandoffOp::Revoke => {
                tracing::info!(generation, "VF handoff: the source took the VF state back");
                if let Some(h) = hooks {
                    h.revoke(generation);
                }
            }
            HandoffOp::Granted | HandoffOp::Refused => {
                let answer = if op == HandoffOp::Granted {
                    ClaimAnswer::Granted
                } else {
                    ClaimAnswer::Refused(String::from_utf8_lossy(&body).into_owned())
                };
                *inner.handoff.answer.lock() = Some((generation, answer));
                inner.handoff.answered.notify_all();
            }
            op => return Err(HandoffLinkError::OutOfTurn(op)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seek_names_the_vm_and_its_address_in_few_bytes() {
        let (vm, listen) = parse_seek(&seek_body("a", "10.0.0.2:7000")).unwrap();
        assert_eq!((vm.as_str(), listen.as_str()), ("a", "10.0.0.2:7000"));
        assert!(parse_seek(b"no newline").unwrap_err().is_malformed());
        let mut huge = seek_body("a", "10.0.0.2:7000");
        huge.resize(MAX_SEEK + 1, b'x');
        let e = parse_seek(&huge).unwrap_err();
        assert!(
            e.is_malformed() && e.to_string().contains("at most 512"),
            "{e}"
        );
    }
}
