//! Connections between companions: the listener that serves peers' requests, the links this
//! VF dials to send its own, and the thread on each link that reads the peer's acks.

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::responder::{self, Outcome};
use super::wire::{self, Frame, WireError};
use super::{requester, Inner};

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
            hold_timeout: Duration::from_secs(120),
            rnr_timeout: Duration::from_secs(30),
        }
    }
}

/// A connection this VF dialled to a peer: its requests go out on it, the peer's acks come
/// back on it.
pub(super) struct Link {
    pub(super) writer: Mutex<BufWriter<TcpStream>>,
    pub(super) generation: u64,
    pub(super) alive: AtomicBool,
}

impl Link {
    /// Marks the link dead and shuts its socket, which ends its ack reader.
    pub(super) fn shut(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let _ = self
            .writer
            .lock()
            .get_ref()
            .shutdown(std::net::Shutdown::Both);
    }
}

/// The link to `vm`, dialling it if there is none.
pub(super) fn link_to(inner: &Arc<Inner>, vm: &str) -> Option<Arc<Link>> {
    if let Some(l) = inner.links.lock().get(vm) {
        if l.alive.load(Ordering::SeqCst) {
            return Some(l.clone());
        }
    }
    dial(inner, vm, false)
}

/// Dials `vm` and says Hello (announcing a migration when `announce`).
pub(super) fn dial(inner: &Arc<Inner>, vm: &str, announce: bool) -> Option<Arc<Link>> {
    let addr = inner.book.lock().get(vm).cloned()?;
    let sock: SocketAddr = addr.to_socket_addrs().ok()?.next()?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_millis(500)).ok()?;
    let _ = stream.set_nodelay(true);
    let reader = stream.try_clone().ok()?;
    let mut writer = BufWriter::new(stream);
    wire::write_frame(
        &mut writer,
        &Frame::Hello {
            vm: inner.vm.clone(),
            listen: inner.listen.clone(),
            announce,
        },
    )
    .ok()?;
    writer.flush().ok()?;
    let generation = inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
    let link = Arc::new(Link {
        writer: Mutex::new(writer),
        generation,
        alive: AtomicBool::new(true),
    });
    inner.links.lock().insert(vm.into(), link.clone());
    {
        let (inner, link, vm) = (inner.clone(), link.clone(), vm.to_string());
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

/// Reads a link's acks until it closes.
fn read_acks(inner: &Arc<Inner>, vm: &str, stream: TcpStream) {
    let mut r = BufReader::new(stream);
    loop {
        match wire::read_frame(&mut r) {
            Ok(Some(Frame::Ack { qp, psn, status })) => {
                requester::handle_ack(inner, qp, psn, status)
            }
            Ok(Some(other)) => {
                tracing::warn!(peer = %vm, ?other, "unexpected frame on a request link");
                inner.stats.lock().malformed_frames += 1;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::info!(peer = %vm, error = %e, "fabric link to peer lost");
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
                let inner = inner.clone();
                let _ = std::thread::Builder::new()
                    .name("vfmig-fabric-peer".into())
                    .spawn(move || {
                        if let Err(e) = serve_peer(&inner, stream) {
                            tracing::info!(%from, error = %e, "fabric peer connection ended");
                        }
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "fabric accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads the dialler's Hello: who it is, and (announcing a migration) where it now lives.
/// `Ok(None)`: it closed before saying anything.
fn hello(inner: &Inner, reader: &mut impl std::io::Read) -> Result<Option<String>, WireError> {
    match wire::read_frame(reader) {
        Ok(Some(Frame::Hello {
            vm,
            listen,
            announce,
        })) => {
            if announce {
                tracing::info!(peer = %vm, %listen, "peer announces its new place: replaying held requests");
                inner.book.lock().insert(vm.clone(), listen);
                drop_link(inner, &vm);
            }
            Ok(Some(vm))
        }
        Ok(Some(other)) => {
            inner.stats.lock().malformed_frames += 1;
            Err(WireError::Malformed(format!(
                "expected Hello first, got {other:?}"
            )))
        }
        Ok(None) => Ok(None),
        Err(e) => {
            if let WireError::Version { .. } = e {
                tracing::warn!(error = %e, "fabric peer refused");
            }
            Err(e)
        }
    }
}

/// Serves one peer's connection: applies its requests in order and acks each.
fn serve_peer(inner: &Arc<Inner>, stream: TcpStream) -> Result<(), WireError> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let Some(peer) = hello(inner, &mut reader)? else {
        return Ok(());
    };
    loop {
        let frame = match wire::read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                if e.is_malformed() {
                    inner.stats.lock().malformed_frames += 1;
                }
                return Err(e);
            }
        };
        let (qp, psn) = match &frame {
            Frame::Write { src_qp, psn, .. } | Frame::Send { src_qp, psn, .. } => (*src_qp, *psn),
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
            // Quiesced for switchover: close, so the peer holds what it sends and replays it
            // to wherever this VM comes up.
            Outcome::Close => {
                tracing::info!(%peer, "VF quiesced: closing the peer's link");
                return Ok(());
            }
        };
        #[cfg(test)]
        if inner
            .swallow_acks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            continue;
        }
        wire::write_frame(&mut writer, &Frame::Ack { qp, psn, status })?;
        writer.flush()?;
    }
}
