//! The VF's handoff as the companion decides it: what goes to the destination at the
//! switchover quiesce, when the source takes it back, and when the destination takes it over.
//! The messages travel over the authenticated fabric ([`crate::vf::soft`]'s handoff); the
//! state is the one `vf_export` gives ([`Device::export`]).
//!
//! - **Source.** At the quiesce inside `GET_VRING_BASE`, while a migration runs and a
//!   destination companion waits for this VM's VF, the VF's state is exported and sent; the
//!   copy here stays frozen. If the VM runs here again (QEMU restarts the device: the
//!   migration failed or was cancelled, or a guest device reset stopped the rings during
//!   precopy), the state is taken back and the destination told. When the destination claims
//!   the state, the copy here is dropped, for good.
//! - **Destination** (`--incoming`). It seeks the source from its start. When QEMU starts the
//!   vhost device (the VM runs here, after `cont`), it waits for the state (at most
//!   [`STATE_WAIT`]), claims it, imports it and announces the VM's new place to its peers.
//!   Until then the guest's rings do not run, so the guest never sees a VF without its state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::control::protocol::required;
use super::control::{VfExportReply, VfReclaimReply};
use super::device::{Device, DeviceError, VmStart};
use super::guest_link::GuestLink;
use crate::trace::steps;
use crate::vf::soft::{ClaimAnswer, HandoffHooks};

/// How long the destination waits, once its VM runs, for a state still on its way.
pub const STATE_WAIT: Duration = Duration::from_secs(10);
/// How long the destination waits for the source's answer to its claim.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the handoff stands, at this companion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandoffPhase {
    /// No handoff: the VF is served here, or there is none.
    #[default]
    Idle,
    /// Destination: looking for the companion that runs the VM's VF.
    Seeking,
    /// Destination: the source's companion was found; the state comes at its switchover.
    Found,
    /// Source: the state went to the destination; the copy here is kept until it is claimed.
    Sent,
    /// Destination: the state arrived; it is taken over once the VM runs here.
    Received,
    /// Either side: the source took the state back (its VM runs there again).
    TakenBack,
    /// Source: the destination claimed the state; the copy here is dropped.
    Granted,
    /// Destination: the state was claimed, imported and announced: the VF is served here.
    TakenOver,
    /// Destination: no state was taken over (see `error`); the VM runs here without its VF.
    Failed,
}

/// What the handoff did, for `stats` (times in µs since the Unix epoch, or durations). Every
/// field is on the wire, `null` when not known: a field missing is an error, as in every
/// reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandoffReport {
    /// Where it stands.
    pub phase: HandoffPhase,
    /// This companion was started for an incoming VM (`--incoming`).
    pub incoming: bool,
    /// The other companion's fabric address (the source, or the destination).
    #[serde(deserialize_with = "required")]
    pub peer: Option<String>,
    /// The export's generation (one per switchover quiesce that sent a state).
    pub generation: u64,
    /// Bytes of the state sent or received.
    pub bytes: u64,
    /// QPs, requests held, and frames waiting for the guest, in the state.
    pub qps: usize,
    /// Requests the state holds for its peers.
    pub pending_requests: usize,
    /// Frames that wait for the guest.
    pub waiting_frames: usize,
    /// Source: when the export began, right after the quiesce.
    #[serde(deserialize_with = "required")]
    pub export_started_at_unix_us: Option<f64>,
    /// Source: when the state was queued for the destination.
    #[serde(deserialize_with = "required")]
    pub sent_at_unix_us: Option<f64>,
    /// Destination: when the state arrived.
    #[serde(deserialize_with = "required")]
    pub received_at_unix_us: Option<f64>,
    /// Destination: how long the VM's start waited for the state (0: it was there).
    #[serde(deserialize_with = "required")]
    pub waited_us: Option<f64>,
    /// Destination: the claim's round trip to the source.
    #[serde(deserialize_with = "required")]
    pub claim_us: Option<f64>,
    /// Destination: the import and the announce.
    #[serde(deserialize_with = "required")]
    pub import_us: Option<f64>,
    /// Destination: when the announce to the peers ended (the VF is served here from then).
    #[serde(deserialize_with = "required")]
    pub announced_at_unix_us: Option<f64>,
    /// Destination: the peers told of the VM's new place.
    pub announced_to: Vec<String>,
    /// What went wrong, if anything.
    #[serde(deserialize_with = "required")]
    pub error: Option<String>,
}

/// The companion's side of the handoff.
pub struct Handoff {
    device: Arc<Device>,
    guest: Arc<GuestLink>,
    /// Destination: the state is still expected.
    incoming: AtomicBool,
    /// Source: the last export's generation.
    generation: AtomicU64,
    /// Source: the export sent and neither claimed nor taken back. Held while either happens.
    exported: Mutex<Option<u64>>,
    /// Destination: the state that arrived, not yet taken over.
    pending: Mutex<Option<(u64, VfExportReply)>>,
    arrived: Condvar,
    /// How long the VM's start waits for the state ([`STATE_WAIT`]; shorter in tests).
    state_wait: Mutex<Duration>,
    report: Mutex<HandoffReport>,
}

impl Handoff {
    /// The handoff of the VF in `device`, whose waiting frames are in `guest`. Registers
    /// itself with the soft VF, if that is the backend.
    pub fn new(device: Arc<Device>, guest: Arc<GuestLink>) -> Arc<Self> {
        let me = Arc::new(Self {
            device,
            guest,
            incoming: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            exported: Mutex::new(None),
            pending: Mutex::new(None),
            arrived: Condvar::new(),
            state_wait: Mutex::new(STATE_WAIT),
            report: Mutex::new(HandoffReport::default()),
        });
        if let Some(vf) = me.device.fabric() {
            vf.set_handoff_hooks(Arc::new(Hooks(Arc::downgrade(&me))));
        }
        me
    }

    /// Destination: this companion serves a VM that migrates in. It looks for the source's
    /// companion from now on, and serves the VF only once the state is here.
    pub fn expect_incoming(&self) -> std::io::Result<()> {
        let Some(vf) = self.device.fabric() else {
            return Ok(());
        };
        self.incoming.store(true, Ordering::SeqCst);
        {
            let mut r = self.report.lock();
            r.incoming = true;
            r.phase = HandoffPhase::Seeking;
        }
        vf.seek_handoff()
    }

    /// Destination: whether the VF's state is still expected (the companion seeks its source).
    pub fn awaits_state(&self) -> bool {
        self.incoming.load(Ordering::SeqCst)
    }

    /// What the handoff did.
    pub fn report(&self) -> HandoffReport {
        let mut r = self.report.lock().clone();
        if let Some(vf) = self.device.fabric() {
            if r.phase == HandoffPhase::Seeking {
                if let Some(src) = vf.handoff_source() {
                    r.phase = HandoffPhase::Found;
                    r.peer = Some(src);
                }
            }
            if r.peer.is_none() {
                r.peer = vf.handoff_destination();
            }
        }
        r
    }

    /// Source, right after the switchover quiesce: if a migration runs and a destination
    /// waits, exports the VF's state and sends it. Never blocks on the destination.
    pub fn on_quiesce(&self) {
        let Some(vf) = self.device.fabric() else {
            return;
        };
        if !self.device.migrating() || self.incoming.load(Ordering::SeqCst) {
            return;
        }
        let Some(destination) = vf.handoff_destination() else {
            return;
        };
        let mut exported = self.exported.lock();
        if !self.device.owns_vf_state() {
            return;
        }
        let started = Instant::now();
        let reply = match self.device.export(&self.guest) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "VF handoff: the VF state could not be exported: the destination will not get it");
                self.report.lock().error = Some(format!("export: {e}"));
                return;
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (qps, pending_requests) = (
            reply.vf.qps.len(),
            reply.vf.qps.iter().map(|q| q.unacked.len()).sum::<usize>(),
        );
        let waiting_frames = reply.rx_frames.len();
        let body = match serde_json::to_vec(&reply) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "VF handoff: the VF state could not be encoded");
                return;
            }
        };
        let bytes = body.len() as u64;
        if !vf.handoff_send_state(generation, body) {
            tracing::warn!(%destination, "VF handoff: the destination went away before the state could go: keeping it here");
            drop(exported);
            let _ = self.take_back();
            return;
        }
        *exported = Some(generation);
        steps::span(
            "handoff-send",
            started,
            format!("generation {generation}, {bytes} bytes, {qps} QPs, to {destination}"),
        );
        tracing::info!(generation, bytes, qps, %destination, "VF handoff: state sent to the destination's companion");
        *self.report.lock() = HandoffReport {
            phase: HandoffPhase::Sent,
            peer: Some(destination),
            generation,
            bytes,
            qps,
            pending_requests,
            waiting_frames,
            export_started_at_unix_us: Some(steps::unix_us(started)),
            sent_at_unix_us: Some(steps::unix_us(Instant::now())),
            ..Default::default()
        };
    }

    /// Source: QEMU restarted the device after a quiesce (the VM runs here again): a state
    /// sent to a destination is taken back.
    pub fn on_resume(&self) {
        if self.exported.lock().is_some() {
            if let Err(e) = self.take_back() {
                tracing::error!(error = %e, "VF handoff: the VM runs here again but its VF state was claimed by the destination");
            }
        }
    }

    /// Source: takes back the state exported to a destination (`vf_reclaim`, or the VM runs
    /// here again), and tells the destination, so that it can never claim it.
    pub fn take_back(&self) -> Result<VfReclaimReply, DeviceError> {
        let mut exported = self.exported.lock();
        let reply = self.device.reclaim()?;
        if let Some(generation) = exported.take() {
            if let Some(vf) = self.device.fabric() {
                vf.handoff_revoke(generation);
            }
            let mut r = self.report.lock();
            r.phase = HandoffPhase::TakenBack;
            steps::instant("handoff-taken-back", format!("generation {generation}"));
        }
        Ok(reply)
    }

    /// Source: the destination claims export `generation`.
    fn claim(&self, generation: u64) -> Result<(), String> {
        let mut exported = self.exported.lock();
        match *exported {
            Some(g) if g == generation => {}
            Some(g) => return Err(format!("export {generation} was replaced by export {g}")),
            None => {
                return Err(format!(
                    "export {generation} was taken back: the VM runs at the source again"
                ))
            }
        }
        self.device
            .drop_state(&self.guest)
            .map_err(|e| format!("the source could not drop its copy: {e}"))?;
        *exported = None;
        self.report.lock().phase = HandoffPhase::Granted;
        steps::instant("handoff-granted", format!("generation {generation}"));
        tracing::info!(
            generation,
            "VF handoff: the destination runs the VM; the copy here is dropped"
        );
        Ok(())
    }

    /// Destination: a state arrived.
    fn state(&self, generation: u64, body: Vec<u8>) {
        if !self.incoming.load(Ordering::SeqCst) {
            tracing::warn!(
                generation,
                "VF handoff: a state arrived after the handoff ended: dropped"
            );
            return;
        }
        let reply: VfExportReply = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(generation, error = %e, "VF handoff: the state that arrived is malformed: dropped");
                self.report.lock().error = Some(format!("state {generation} malformed: {e}"));
                return;
            }
        };
        steps::instant(
            "handoff-received",
            format!("generation {generation}, {} bytes", body.len()),
        );
        {
            let mut r = self.report.lock();
            r.phase = HandoffPhase::Received;
            r.generation = generation;
            r.bytes = body.len() as u64;
            r.qps = reply.vf.qps.len();
            r.pending_requests = reply.vf.qps.iter().map(|q| q.unacked.len()).sum();
            r.waiting_frames = reply.rx_frames.len();
            r.received_at_unix_us = Some(steps::unix_us(Instant::now()));
        }
        *self.pending.lock() = Some((generation, reply));
        self.arrived.notify_all();
    }

    /// Destination: the source took export `generation` back.
    fn revoke(&self, generation: u64) {
        let mut pending = self.pending.lock();
        if pending.as_ref().is_some_and(|(g, _)| *g == generation) {
            *pending = None;
            self.report.lock().phase = HandoffPhase::TakenBack;
            steps::instant("handoff-revoked", format!("generation {generation}"));
        }
    }

    /// Destination: the handoff ends without a takeover (`vf_release`: the migration was
    /// rolled back). A state that arrived is dropped and none is claimed.
    pub fn drop_incoming(&self) {
        if self.end_incoming() {
            self.report.lock().phase = HandoffPhase::Idle;
        }
    }

    /// Destination: a handoff ended by `vf_import` over the control socket (the orchestrator
    /// moved the state itself).
    pub fn imported_over_control(&self) {
        self.end_incoming();
    }

    /// Destination: the state is no longer expected; what arrived is dropped, a start waiting
    /// for it stops waiting, and the link to the source closes. Whether it was expected.
    fn end_incoming(&self) -> bool {
        let was = self.incoming.swap(false, Ordering::SeqCst);
        if was {
            *self.pending.lock() = None;
            self.arrived.notify_all();
            if let Some(vf) = self.device.fabric() {
                vf.end_handoff();
            }
        }
        was
    }

    /// Destination, when QEMU starts the vhost device (the VM runs here): takes the state over
    /// (waiting up to [`STATE_WAIT`] for it), before the guest's rings run.
    pub fn on_device_start(&self) {
        if !self.incoming.load(Ordering::SeqCst) {
            return;
        }
        let Some(vf) = self.device.fabric() else {
            return;
        };
        // Its vCPUs run from here on; its rings wait for the VF state to be taken over.
        tracing::info!("the VM runs here: taking over its VF state");
        steps::instant(
            "vm-runs-here",
            "first memory table: the VF state is claimed next",
        );
        let started = Instant::now();
        let taken = {
            let mut pending = self.pending.lock();
            let deadline = started + *self.state_wait.lock();
            while pending.is_none() && self.incoming.load(Ordering::SeqCst) {
                if self.arrived.wait_until(&mut pending, deadline).timed_out() {
                    break;
                }
            }
            pending.take()
        };
        let waited = started.elapsed();
        // Ended meanwhile (rolled back, or imported over the control socket): not a failure.
        if taken.is_none() && !self.end_incoming() {
            return;
        }
        let outcome = match taken {
            None => Err(format!(
                "no VF state came from the source's companion within {:.1} s of the VM's start \
                 here: the VM runs without its VF (its QPs and memory regions are gone); check \
                 that the source's companion runs, that it can reach this one, and that both \
                 were given the VM's fabric key",
                waited.as_secs_f64()
            )),
            Some((generation, reply)) => self.take_over(vf, generation, reply, waited),
        };
        self.end_incoming();
        if let Err(e) = outcome {
            tracing::error!("VF handoff failed: {e}");
            let mut r = self.report.lock();
            r.phase = HandoffPhase::Failed;
            r.error = Some(e);
        }
    }

    fn take_over(
        &self,
        vf: &crate::vf::soft::SoftVf,
        generation: u64,
        reply: VfExportReply,
        waited: Duration,
    ) -> Result<(), String> {
        let started = Instant::now();
        match vf.handoff_claim(generation, CLAIM_TIMEOUT) {
            ClaimAnswer::Granted => {}
            ClaimAnswer::Refused(why) => {
                return Err(format!(
                    "the source's companion refused the claim of its VF state ({why}): the VM \
                     runs here without its VF; the source VM must not run beside it"
                ))
            }
            ClaimAnswer::NoAnswer => tracing::warn!(
                generation,
                "VF handoff: the source's companion did not answer the claim: taking over the \
                 state it sent (the source VM completed its migration, so it does not run)"
            ),
        }
        let claim_us = started.elapsed().as_secs_f64() * 1e6;
        steps::span("handoff-claim", started, format!("generation {generation}"));
        let started = Instant::now();
        let imported = self
            .device
            .import(&self.guest, reply.vf, &reply.rx_frames, VmStart::Runs)
            .map_err(|e| format!("the VF state from the source could not be imported: {e}"))?;
        let mut r = self.report.lock();
        r.phase = HandoffPhase::TakenOver;
        r.waited_us = Some(waited.as_secs_f64() * 1e6);
        r.claim_us = Some(claim_us);
        r.import_us = Some(started.elapsed().as_secs_f64() * 1e6);
        r.announced_at_unix_us = Some(steps::unix_us(Instant::now()));
        r.announced_to = imported.announced_to;
        tracing::info!(generation, announced_to = ?r.announced_to, "VF handoff: the VF state is taken over; the VF is served here");
        Ok(())
    }
}

/// The soft VF's view of the handoff (weak: the soft VF lives as long as the companion).
struct Hooks(Weak<Handoff>);

impl HandoffHooks for Hooks {
    fn runs_here(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|h| !h.incoming.load(Ordering::SeqCst) && h.device.owns_vf_state())
    }

    fn claim(&self, generation: u64) -> Result<(), String> {
        match self.0.upgrade() {
            Some(h) => h.claim(generation),
            None => Err("the companion is shutting down".into()),
        }
    }

    fn state(&self, generation: u64, body: Vec<u8>) {
        if let Some(h) = self.0.upgrade() {
            h.state(generation, body);
        }
    }

    fn revoke(&self, generation: u64) {
        if let Some(h) = self.0.upgrade() {
            h.revoke(generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::companion::device::tests::soft_handle;

    struct Side {
        device: Arc<Device>,
        dma: Arc<crate::memory::DmaEngine>,
        handoff: Arc<Handoff>,
    }

    fn side() -> Side {
        let (device, dma, guest) = soft_handle("a");
        let handoff = Handoff::new(device.clone(), guest);
        *handoff.state_wait.lock() = Duration::from_millis(300);
        Side {
            device,
            dma,
            handoff,
        }
    }

    /// A source running VM a's VF with one QP, and its incoming destination, linked.
    fn source_and_destination() -> (Side, Side) {
        let (src, dst) = (side(), side());
        src.device.verbs().unwrap().create_qp().unwrap();
        let vf = dst.device.fabric().unwrap();
        vf.set_peer_address("a", src.device.fabric().unwrap().listen_addr());
        dst.handoff.expect_incoming().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while src.device.fabric().unwrap().handoff_destination().is_none() {
            assert!(
                Instant::now() < deadline,
                "the destination never found the source"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(dst.handoff.report().phase, HandoffPhase::Found);
        (src, dst)
    }

    /// The source's switchover quiesce, inside a migration.
    fn switchover(src: &Side) {
        src.dma.set_log_requested(true);
        src.device.quiesce("GET_VRING_BASE");
        src.handoff.on_quiesce();
    }

    fn until_phase(s: &Side, phase: HandoffPhase) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.handoff.report().phase != phase {
            assert!(
                Instant::now() < deadline,
                "phase stays {:?}, not {phase:?}",
                s.handoff.report().phase
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_state_moves_at_the_quiesce_and_is_taken_over_when_the_vm_runs() {
        let (src, dst) = source_and_destination();
        switchover(&src);
        assert_eq!(src.handoff.report().phase, HandoffPhase::Sent);
        until_phase(&dst, HandoffPhase::Received);
        assert_eq!(dst.handoff.report().qps, 1);
        dst.handoff.on_device_start();
        let r = dst.handoff.report();
        assert_eq!(r.phase, HandoffPhase::TakenOver, "{r:?}");
        assert!(r.claim_us.is_some() && r.import_us.is_some());
        assert_eq!(src.handoff.report().phase, HandoffPhase::Granted);
        assert!(!src.device.owns_vf_state(), "the source dropped its copy");
        assert!(dst.device.owns_vf_state());
        // The source VM cannot take it back now.
        assert!(src.handoff.take_back().is_err());
    }

    #[test]
    fn a_source_that_runs_again_takes_the_state_back_and_the_destination_gets_none() {
        let (src, dst) = source_and_destination();
        switchover(&src);
        until_phase(&dst, HandoffPhase::Received);
        // The migration failed: QEMU restarts the source's device.
        src.device.resume();
        src.handoff.on_resume();
        assert!(src.device.owns_vf_state());
        until_phase(&dst, HandoffPhase::TakenBack);
        dst.handoff.on_device_start();
        let r = dst.handoff.report();
        assert_eq!(r.phase, HandoffPhase::Failed);
        assert!(r.error.unwrap().contains("no VF state came"));
        assert!(src.device.owns_vf_state(), "the source keeps its VF");
    }

    #[test]
    fn a_claim_after_the_source_took_the_state_back_is_refused() {
        let (src, dst) = source_and_destination();
        switchover(&src);
        until_phase(&dst, HandoffPhase::Received);
        // The revoke is lost on the way: the destination claims what the source took back.
        *src.handoff.exported.lock() = None;
        src.device.reclaim().unwrap();
        dst.handoff.on_device_start();
        let r = dst.handoff.report();
        assert_eq!(r.phase, HandoffPhase::Failed, "{r:?}");
        assert!(r.error.unwrap().contains("was taken back"));
        assert!(src.device.owns_vf_state());
    }

    #[test]
    fn a_quiesce_outside_a_migration_sends_nothing() {
        let (src, dst) = source_and_destination();
        // A guest device reset stops the rings without a migration: no log asked for.
        src.device.quiesce("GET_VRING_BASE");
        src.handoff.on_quiesce();
        assert_eq!(src.handoff.report().phase, HandoffPhase::Idle);
        assert!(src.device.owns_vf_state());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(dst.handoff.report().phase, HandoffPhase::Found);
    }

    #[test]
    fn a_rolled_back_destination_drops_the_state_and_claims_nothing() {
        let (src, dst) = source_and_destination();
        switchover(&src);
        until_phase(&dst, HandoffPhase::Received);
        dst.handoff.drop_incoming();
        dst.handoff.on_device_start();
        assert_eq!(
            src.handoff.report().phase,
            HandoffPhase::Sent,
            "never claimed"
        );
        src.handoff.take_back().unwrap();
        assert!(src.device.owns_vf_state());
    }

    #[test]
    fn a_start_waiting_for_the_state_stops_when_the_handoff_is_ended_and_is_no_failure() {
        let (_src, dst) = source_and_destination();
        *dst.handoff.state_wait.lock() = Duration::from_secs(10);
        let waiting = {
            let h = dst.handoff.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                h.on_device_start();
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        dst.handoff.drop_incoming();
        let waited = waiting.join().unwrap();
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
        let r = dst.handoff.report();
        assert_eq!(r.phase, HandoffPhase::Idle, "{r:?}");
        assert!(r.error.is_none(), "{r:?}");
    }
}
