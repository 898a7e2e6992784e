//! Peers whose VF state is gone, and this VF retiring when its VM stops: a QP connected to a
//! VM that no longer has it must fail, with [`Status::RemoteLost`], instead of waiting forever
//! for requests that will never come or being acked into a dead guest's RAM.
//!
//! A peer's VF state is gone when
//! - its authenticated handshake proves a new epoch ([`note_epoch`]): its companion restarted
//!   and has none of the QPs and regions of the old one. A migrated VM keeps its epoch (it
//!   moves with [`super::VfState`]), so a move is never taken for a restart;
//! - it says so with [`Frame::Gone`](super::wire::Frame::Gone) ([`on_gone`]), sent by a VF
//!   that retires ([`SoftVf::retire`]) because its VM stopped.
//!
//! Either way every local QP connected to that VM goes to the error state: its posted receives
//! and its unacked or held sends complete with `RemoteLost`, later posts fail at once with it,
//! and the peer's requests to it are refused with [`AckStatus::Gone`](super::wire::AckStatus).
//!
//! The expected PSN is not reset to 1 for a restarted peer (as an earlier version did): a
//! restarted companion has no QPs, so none of its requests can continue a QP's sequence; a
//! reset would instead let a new incarnation's request that reuses a QP number land in the
//! buffers the old one's peer set up. A new QP pair is the only way back.
//!
//! A peer that only waits (it posted receives and sends nothing) has no reason to dial; the
//! probe ([`probe_loop`]) dials each peer that local QPs are connected to whenever no live link
//! to it exists, so a restarted peer's new epoch is seen within [`PROBE_INTERVAL`] of its
//! return.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::FabricAuth;
use super::link;
use super::state::{fail_qp, lose_qp};
use super::wire::Frame;
use super::{Inner, SoftVf};
use crate::vf::verbs::Status;

/// How often peers with connected QPs and no live link are dialled, to learn their epoch.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

fn hex(e: u64) -> String {
    format!("{e:016x}")
}

/// Fails every QP connected to `vm` that is not failed already; returns their numbers.
fn fail_peer_qps(inner: &Inner, vm: &str) -> Vec<u32> {
    let mut st = inner.state.lock();
    let mut connected: Vec<u32> = st
        .qps
        .iter()
        .filter(|(_, q)| q.peer.as_ref().is_some_and(|(p, _)| p == vm))
        .map(|(&n, _)| n)
        .collect();
    connected.sort_unstable();
    connected.retain(|&n| lose_qp(&mut st, inner, n));
    // Counted before the state is let go: whoever wakes on a completion sees the count.
    inner.stats.lock().qps_lost += connected.len() as u64;
    connected
}

/// The handshake's hook: `peer`'s VF state speaks with `epoch`, as its authenticated handshake
/// proved. A new epoch for a known peer means its VF state is gone (its companion restarted):
/// the QPs connected to it fail. Returns whether that happened.
pub(super) fn note_epoch(inner: &Inner, peer: &str, epoch: u64) -> bool {
    // Not under `applying`: an apply may wait there for guest RAM (a destination before its
    // VM runs) while this handshake belongs to the announce that lets it run. A request of the
    // old incarnation that finishes after its QP failed completes nothing (the receives were
    // flushed) and its ack goes to a peer that is gone.
    let before = inner.peer_epochs.lock().insert(peer.to_string(), epoch);
    match before {
        None => {
            tracing::debug!(%peer, epoch = hex(epoch), "fabric peer's epoch");
            false
        }
        Some(b) if b == epoch => false,
        Some(b) => {
            let qps = fail_peer_qps(inner, peer);
            tracing::warn!(
                %peer,
                old_epoch = hex(b),
                new_epoch = hex(epoch),
                ?qps,
                "the peer's VF state is gone (its companion restarted): the QPs connected to it \
                 fail with RemoteLost"
            );
            true
        }
    }
}

/// A [`Frame::Gone`](super::wire::Frame::Gone) from the authenticated `peer`, naming `vm` and
/// `epoch`: taken only if `vm` is the peer itself and `epoch` the one its handshake proved
/// (so never over an unauthenticated link); then every QP connected to it fails.
pub(super) fn on_gone(inner: &Inner, peer: &str, vm: &str, epoch: u64) {
    let proved = inner.peer_epochs.lock().get(peer).copied();
    let refused = if vm != peer {
        Some("it names another VM than the one that sent it")
    } else if proved.is_none() {
        Some("no epoch was proved on this link (it is not authenticated)")
    } else if proved != Some(epoch) {
        Some("its epoch is not the one the peer's handshake proved (stale)")
    } else {
        None
    };
    if let Some(why) = refused {
        inner.stats.lock().gone_refused += 1;
        tracing::warn!(
            %peer,
            named = %vm,
            epoch = hex(epoch),
            proved = ?proved.map(hex),
            "a peer's Gone refused: {why}"
        );
        return;
    }
    let qps = fail_peer_qps(inner, vm);
    tracing::warn!(
        peer = %vm,
        epoch = hex(epoch),
        ?qps,
        "the peer's VF state is gone (its VM stopped): the QPs connected to it fail with \
         RemoteLost"
    );
}

impl SoftVf {
    /// The handshake's hook, for tests and tools: `vm`'s VF state speaks with `epoch`. A new
    /// epoch for a known peer fails every QP connected to it with `RemoteLost` (see the module
    /// header for why nothing is reset instead). Returns whether that happened.
    pub fn on_peer_epoch(&self, vm: &str, epoch: u64) -> bool {
        note_epoch(&self.inner, vm, epoch)
    }

    /// The VM stopped while this VF was live (its QEMU connection ended): every QP goes to the
    /// error state, every peer with a QP connected to this VM is told (a `Gone`, all dialled in
    /// parallel within one deadline), and later requests from peers are refused with
    /// [`AckStatus::Gone`](super::wire::AckStatus), which their requester turns into
    /// `RemoteLost`. Returns the peers that took the news, or `None` if the VF has no state
    /// (no QP, no region), so there is nothing to retire.
    pub fn retire(&self) -> Option<Vec<String>> {
        let inner = &self.inner;
        let (peers, qps) = {
            // Not under `applying` (see `note_epoch`): from the flag on, every apply is refused
            // at its start; one already past it lands in RAM nobody reads again.
            let mut st = inner.state.lock();
            if st.qps.is_empty() && st.mrs.is_empty() {
                return None;
            }
            if inner.retired.swap(true, Ordering::SeqCst) {
                return Some(Vec::new());
            }
            let peers: BTreeSet<String> = st
                .qps
                .values()
                .filter(|q| !q.lost)
                .filter_map(|q| q.peer.as_ref().map(|(p, _)| p.clone()))
                .collect();
            let mut qps: Vec<u32> = st.qps.keys().copied().collect();
            qps.sort_unstable();
            for &n in &qps {
                lose_qp(&mut st, inner, n);
            }
            (peers.into_iter().collect::<Vec<_>>(), qps)
        };
        let links: Vec<_> = inner.links.lock().keys().cloned().collect();
        for vm in links {
            link::drop_link(inner, &vm);
        }
        let told = tell_gone(inner, &peers);
        tracing::warn!(
            vm = %inner.vm,
            epoch = hex(inner.epoch.load(Ordering::SeqCst)),
            ?qps,
            ?peers,
            ?told,
            "the VM is gone (its QEMU connection ended): the VF retired; its peers were told to \
             fail their QPs connected to it"
        );
        Some(told)
    }

    /// Whether the VF retired ([`SoftVf::retire`]).
    pub fn is_retired(&self) -> bool {
        self.inner.retired.load(Ordering::SeqCst)
    }
}

/// Tells each of `peers` that this VM's VF retired (a [`Frame::Gone`] with this VF's epoch),
/// all dialled in parallel within [`link::ANNOUNCE_DEADLINE`]; returns the peers that took it
/// (they closed the connection after reading it).
pub(super) fn tell_gone(inner: &Arc<Inner>, peers: &[String]) -> Vec<String> {
    let deadline = Instant::now() + link::ANNOUNCE_DEADLINE;
    let gone = Frame::Gone {
        vm: inner.vm.clone(),
        epoch: inner.epoch.load(Ordering::SeqCst),
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = peers
            .iter()
            .map(|p| {
                let gone = &gone;
                (p, s.spawn(move || tell_one(inner, p, gone, deadline)))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|(p, h)| h.join().ok().filter(|told| *told).map(|_| p.clone()))
            .collect()
    })
}

/// Sends `gone` to `vm` on a fresh link and waits (until `deadline`) for the peer to close it.
fn tell_one(inner: &Arc<Inner>, vm: &str, gone: &Frame, deadline: Instant) -> bool {
    let Some(link) = link::connect(inner, vm, false, deadline) else {
        tracing::warn!(
            peer = vm,
            "could not tell a peer that this VM is gone: unreachable"
        );
        return false;
    };
    let sent = {
        let mut w = link.writer.lock();
        w.frame(gone).is_ok() && w.flush().is_ok()
    };
    while sent && link.alive.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let taken = sent && !link.alive.load(Ordering::SeqCst);
    link.shut();
    if !taken {
        tracing::warn!(
            peer = vm,
            "a peer did not confirm that it read this VM's Gone in time"
        );
    }
    taken
}

/// Dials, every [`PROBE_INTERVAL`], each peer that a working local QP is connected to and to
/// which no live link exists: the handshake proves its epoch, so a restarted peer is seen even
/// by a VF that only waits for it. Only an authenticated fabric proves epochs.
///
/// A peer that no dial reaches for longer than the hold timeout is dead to this VF (its
/// companion died, or its host): the QPs connected to it fail with `RetryExceeded`, their
/// posted receives flushed, so a guest that only waits for it wakes with an error too.
pub(super) fn probe_loop(inner: &Arc<Inner>) {
    if !matches!(inner.auth, FabricAuth::Keys(_)) {
        return;
    }
    let mut unreachable: HashMap<String, Instant> = HashMap::new();
    while !inner.closed.load(Ordering::SeqCst) {
        std::thread::sleep(PROBE_INTERVAL);
        if inner.dma.gate_state().quiesced || inner.retired.load(Ordering::SeqCst) {
            continue;
        }
        let peers: BTreeSet<String> = inner
            .state
            .lock()
            .qps
            .values()
            .filter(|q| !q.error)
            .filter_map(|q| q.peer.as_ref().map(|(p, _)| p.clone()))
            .collect();
        for vm in peers {
            let alive = inner
                .links
                .lock()
                .get(&vm)
                .is_some_and(|l| l.alive.load(Ordering::SeqCst));
            if alive || inner.closed.load(Ordering::SeqCst) {
                unreachable.remove(&vm);
                continue;
            }
            if link::link_to(inner, &vm).is_some() {
                unreachable.remove(&vm);
                continue;
            }
            let since = *unreachable.entry(vm.clone()).or_insert_with(Instant::now);
            if since.elapsed() > inner.timing.hold_timeout {
                unreachable.remove(&vm);
                fail_unreachable(inner, &vm, since.elapsed());
            }
        }
        unreachable.retain(|vm, _| inner.book.lock().contains_key(vm));
    }
}

/// Fails every working QP connected to `vm`, which no dial has reached for `for_`.
fn fail_unreachable(inner: &Inner, vm: &str, for_: Duration) {
    let mut st = inner.state.lock();
    let qps: Vec<u32> = st
        .qps
        .iter()
        .filter(|(_, q)| !q.error && q.peer.as_ref().is_some_and(|(p, _)| p == vm))
        .map(|(&n, _)| n)
        .collect();
    for &n in &qps {
        fail_qp(&mut st, inner, n, Status::RetryExceeded);
    }
    drop(st);
    if !qps.is_empty() {
        tracing::error!(
            peer = vm,
            secs = for_.as_secs(),
            ?qps,
            "the peer has been unreachable past the hold timeout: the QPs connected to it \
             fail with RetryExceeded (its companion or its host is down)"
        );
    }
}
