//! The soft VF: a software RDMA engine standing in for an InfiniBand HCA.
//!
//! It gives the guest the semantics of RC verbs ([`crate::vf::verbs`]) and the same hazard as
//! real RDMA: peers write this VM's guest RAM behind QEMU's back. Every such write goes through
//! the [`DmaEngine`], so it is range-checked, logged into QEMU's dirty log while a migration
//! runs, and refused after the switchover quiesce.
//!
//! The fabric is TCP between companions ([`wire`]); endpoints are named by VM, and a
//! [`ClusterMap`] maps VM names to fabric addresses. Each VM dials the peers it sends to; a
//! connection carries the dialler's requests and the listener's acks.
//!
//! Reliability, as InfiniBand RC, go-back-N:
//! - each QP numbers its requests with a PSN; the target applies them strictly in order,
//!   acknowledges duplicates without applying them again, and drops requests from the future;
//! - a completion at the sender is posted only on the target's ack, i.e. once the data is in
//!   the target's guest RAM;
//! - requests not yet acked are kept; when the link to the peer breaks (the peer migrates),
//!   they are held and replayed, in order, once the peer can be reached again, so the guest
//!   sees a delay, never an error, and nothing is applied twice.
//!
//! The files, by role:
//! - `cluster`: the cluster file;
//! - `state`: the tables (regions, QPs, completion queue);
//! - `device`: the verbs and the device side, the soft VF at the seam of [`crate::vf`];
//! - `requester`: the send half of go-back-N (post, resend, acks, the retry thread);
//! - `responder`: the receive half (apply a peer's request in order, once);
//! - `lost`: peers whose VF state is gone (a new epoch, or their `Gone`), and this VF retiring
//!   when its VM stops;
//! - `link`: connections to peers and their threads, and the bounds on them;
//! - `auth`: the fabric's authentication (a Noise handshake, then a MAC on every frame);
//! - `persist`: the state that moves at switchover ([`VfState`], versioned);
//! - `handoff`: how it moves, companion to companion, whatever drives the migration;
//! - `metrics`: counters; [`wire`]: the fabric's frames.

mod auth;
mod cluster;
mod device;
mod handoff;
mod link;
mod lost;
mod metrics;
mod persist;
mod requester;
mod responder;
mod state;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::memory::DmaEngine;

#[cfg(test)]
pub(crate) use auth::test_auth;
pub use auth::{
    ephemeral_job, frame_mac, generate as generate_keys, FabricAuth, FabricKeys, Generated,
    KeyError,
};
pub use cluster::{ClusterFileError, ClusterMap};
pub use handoff::{ClaimAnswer, HandoffHooks};
pub use link::{FabricTiming, ANNOUNCE_DEADLINE, MAX_HANDSHAKING, MAX_PER_PEER};
pub use metrics::{PeerMove, SoftVfStats};
pub use persist::{QpState, StateError, VfState, VF_STATE_VERSION};

use link::Link;
use state::State;

/// What the soft VF's threads and handles share.
struct Inner {
    vm: String,
    listen: String,
    dma: Arc<DmaEngine>,
    state: Mutex<State>,
    cq_ready: Condvar,
    book: Mutex<BTreeMap<String, String>>,
    /// The fabric addresses a peer's link may point at (the cluster file's, and those set here).
    allowed: Mutex<HashSet<String>>,
    /// Whether and how links authenticate.
    auth: FabricAuth,
    /// This VF state's incarnation, proved in every handshake: random at a fresh start, the
    /// source's after an import (it moves with the state, see [`VfState::epoch`]).
    epoch: AtomicU64,
    /// Each peer's epoch, as its last authenticated handshake proved it.
    peer_epochs: Mutex<HashMap<String, u64>>,
    /// The VM stopped while the VF was live: its QPs are in error, its peers were told, and
    /// their requests are refused with [`wire::AckStatus::Gone`].
    retired: AtomicBool,
    /// The VM's VF state was dropped here because it lives in another companion now: requests
    /// for the VM are not refused as "not ready" (which would keep a peer on a stale link until
    /// its RNR timeout) but closed, so the peer holds them and dials the VM's new place.
    moved: AtomicBool,
    /// Memory keys and QP numbers drawn at random (see [`SoftVf::randomize_ids`]).
    random_ids: AtomicBool,
    /// When the requests behind the latest receive completions came off the fabric:
    /// `(qp, wr_id, when)`, oldest first, at most [`MAX_ARRIVALS`] (see [`SoftVf::arrival`]).
    arrivals: Mutex<std::collections::VecDeque<(u32, u64, std::time::Instant)>>,
    /// Connections served, for the caps.
    conns: Mutex<link::Conns>,
    /// The last parallel announce.
    announce_round: Mutex<link::Round>,
    /// Moves on at every announce, export, discard and retirement: a late announce still
    /// being retried stops once it has (see `persist::retry_announce`).
    announce_seq: AtomicU64,
    links: Mutex<HashMap<String, Arc<Link>>>,
    /// Per peer, held while a link to it is dialled (see `link::link_to`).
    dialing: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    generation: AtomicU64,
    timing: FabricTiming,
    /// Set and notified to make the retry loop turn at once (a peer announced its new place,
    /// or guest RAM arrived for requests that moved here), instead of at its next tick.
    retry_kick: Mutex<bool>,
    retry_wake: Condvar,
    closed: AtomicBool,
    stats: Mutex<SoftVfStats>,
    /// When each peer VM was last heard from, for the blackout of its moves.
    heard: Mutex<metrics::Heard>,
    /// The VF's handoff between this VM's companions (see [`handoff`]).
    handoff: handoff::Handoff,
    /// Held while a peer's request is applied (see `responder::apply`).
    applying: Mutex<()>,
    /// The responder's own table: which stream applies to each QP, NAKs sent, peers' epochs.
    rx: Mutex<responder::Receive>,
    /// What `sync_dirty` reported so far of the current epoch's device-dirty bitmap.
    dirty_seen: Mutex<device::DirtySeen>,
    /// Tests only: apply the next N requests but send no ack for them, as if the acks were
    /// lost on a link that broke.
    #[cfg(test)]
    swallow_acks: AtomicU64,
}

/// The soft VF of one VM. Cheap to clone; clones share the VF.
#[derive(Clone)]
pub struct SoftVf {
    inner: Arc<Inner>,
}

/// Receive completions whose arrival time is kept for the companion's latency figures.
const MAX_ARRIVALS: usize = 4096;

impl SoftVf {
    /// A soft VF for `vm`, writing guest RAM through `dma`, listening for peers on `listen`
    /// (e.g. `0.0.0.0:7000`; port 0 picks one), knowing peers from `cluster`, authenticating
    /// links as `auth` says.
    pub fn start(
        vm: &str,
        dma: Arc<DmaEngine>,
        listen: &str,
        cluster: ClusterMap,
        timing: FabricTiming,
        auth: FabricAuth,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let local = listener.local_addr()?;
        if matches!(auth, FabricAuth::Insecure) {
            tracing::warn!(vm, listen = %local, "soft VF fabric WITHOUT authentication: anyone who reaches this port can write the guest's RAM; for benchmarks only");
        }
        let mut epoch = [0u8; 8];
        getrandom::fill(&mut epoch).map_err(|e| std::io::Error::other(e.to_string()))?;
        // Never 0: a state's epoch of 0 is refused at import.
        let epoch = u64::from_le_bytes(epoch).max(1);
        let allowed = cluster
            .vms
            .values()
            .chain(cluster.hosts.iter())
            .cloned()
            .collect();
        let inner = Arc::new(Inner {
            vm: vm.into(),
            listen: local.to_string(),
            dma,
            state: Mutex::new(State::default()),
            cq_ready: Condvar::new(),
            book: Mutex::new(cluster.vms),
            allowed: Mutex::new(allowed),
            auth,
            epoch: AtomicU64::new(epoch),
            peer_epochs: Mutex::new(HashMap::new()),
            retired: AtomicBool::new(false),
            moved: AtomicBool::new(false),
            random_ids: AtomicBool::new(false),
            arrivals: Mutex::new(std::collections::VecDeque::new()),
            conns: Mutex::new(link::Conns::default()),
            announce_round: Mutex::new(link::Round::default()),
            announce_seq: AtomicU64::new(0),
            links: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            timing,
            retry_kick: Mutex::new(false),
            retry_wake: Condvar::new(),
            closed: AtomicBool::new(false),
            stats: Mutex::new(SoftVfStats::default()),
            heard: Mutex::new(metrics::Heard::default()),
            handoff: handoff::Handoff::default(),
            applying: Mutex::new(()),
            rx: Mutex::new(responder::Receive::default()),
            dirty_seen: Mutex::new(device::DirtySeen::default()),
            #[cfg(test)]
            swallow_acks: AtomicU64::new(0),
        });
        listener.set_nonblocking(true)?;
        {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("vfmig-fabric-listen-{vm}"))
                .spawn(move || link::accept_loop(&inner, listener))?;
        }
        {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("vfmig-fabric-retry-{vm}"))
                .spawn(move || requester::retry_loop(&inner))?;
        }
        {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("vfmig-fabric-probe-{vm}"))
                .spawn(move || lost::probe_loop(&inner))?;
        }
        tracing::info!(vm, listen = %local, epoch = format!("{epoch:016x}"), "soft VF fabric listening");
        Ok(Self { inner })
    }

    /// The fabric address peers reach this VF at.
    pub fn listen_addr(&self) -> &str {
        &self.inner.listen
    }

    /// Adds or changes a peer's address (trusted: the address may then also be announced).
    pub fn set_peer_address(&self, vm: &str, addr: &str) {
        self.inner.allowed.lock().insert(addr.into());
        self.inner.book.lock().insert(vm.into(), addr.into());
        link::drop_link(&self.inner, vm);
    }

    /// Acts on one fabric frame from `peer` as a connection's thread does once the connection
    /// is set up: a request is applied (the ack to send is returned), an ack is taken by the
    /// requester. The frame layer's entry for fuzzing ([`crate::fuzz`]).
    #[doc(hidden)]
    pub fn on_peer_frame(&self, peer: &str, frame: wire::Frame) -> Option<wire::AckStatus> {
        match frame {
            wire::Frame::Ack { qp, psn, status } => {
                requester::handle_ack(&self.inner, qp, psn, status);
                None
            }
            wire::Frame::Hello { .. } => None,
            wire::Frame::Gone { vm, epoch } => {
                lost::on_gone(&self.inner, peer, &vm, epoch);
                None
            }
            request => match responder::apply(&self.inner, peer, request) {
                responder::Outcome::Ack(status) => Some(status),
                responder::Outcome::Drop | responder::Outcome::Close => None,
            },
        }
    }

    /// Lets peers announce that they moved to `addr` (a destination's fabric address).
    pub fn allow_address(&self, addr: &str) {
        self.inner.allowed.lock().insert(addr.into());
    }

    /// When the request behind receive completion `(qp, wr_id)` came off the fabric, if it is
    /// among the latest kept; marks older than it are dropped (completions are taken in
    /// order).
    pub fn arrival(&self, qp: u32, wr_id: u64) -> Option<std::time::Instant> {
        let mut a = self.inner.arrivals.lock();
        let at = a.iter().position(|&(q, w, _)| q == qp && w == wr_id)?;
        let (_, _, when) = a[at];
        a.drain(..=at);
        Some(when)
    }

    /// From now on, memory keys and QP numbers are drawn at random (unused, never 0), not
    /// 1, 2, 3…: a member of the job cannot guess another VM's keys. Off by default because
    /// the guest programs (lu-lite, rdma-bw) still expect their first key and QP to be 1
    /// instead of exchanging them.
    pub fn randomize_ids(&self) {
        self.inner.random_ids.store(true, Ordering::SeqCst);
        let mut st = self.inner.state.lock();
        st.advance_key(true);
        st.advance_qp(true);
    }

    /// This VF state's epoch, proved in every handshake: random at a fresh start, adopted from
    /// the source at an import.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::SeqCst)
    }

    /// A peer's epoch, as its last authenticated handshake proved it; a new value means the
    /// peer's VF state is gone (its companion restarted), see [`SoftVf::on_peer_epoch`].
    pub fn peer_epoch(&self, vm: &str) -> Option<u64> {
        self.inner.peer_epochs.lock().get(vm).copied()
    }

    /// Stops the VF's threads.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let links: Vec<_> = self.inner.links.lock().drain().collect();
        for (_, l) in links {
            l.shut();
        }
    }
}

#[cfg(test)]
mod tests;
