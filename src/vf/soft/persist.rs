//! What of a soft VF moves from the source companion to the destination's at switchover: its
//! tables, the requests not yet acked, and the completions not yet taken ([`VfState`]). Guest
//! RAM moves by precopy; the state carries a version, and an importer refuses another one.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::link;
use super::state::{Pending, Qp, State, NOT_ON_A_LINK};
use super::{Inner, SoftVf};
use crate::vf::verbs::{Completion, MemoryRegion, RecvWr, SendWr};

/// Version of [`VfState`]: raised whenever its meaning changes, so that companions of two
/// releases refuse each other's state instead of misreading it.
/// Version 2 added the epoch (and the peers' epochs) and the QPs' `lost` flag.
pub const VF_STATE_VERSION: u32 = 2;

/// Bounds of a [`VfState`] an importer accepts: far above what a guest sets up, far below
/// what would exhaust the companion.
pub mod limits {
    /// Queue pairs, and registered regions.
    pub const MAX_QPS: usize = 65_536;
    /// Registered regions.
    pub const MAX_MRS: usize = 65_536;
    /// Guest-physical segments of one region.
    pub const MAX_SEGMENTS: usize = 65_536;
    /// Unacknowledged requests, and posted receives, of one QP.
    pub const MAX_QUEUE: usize = 65_536;
    /// Completions not yet taken.
    pub const MAX_COMPLETIONS: usize = 1 << 20;
    /// Bytes of a VM name.
    pub const MAX_NAME: usize = 256;
    /// Peers whose epoch the state carries.
    pub const MAX_PEERS: usize = 4096;
}

/// A QP as it moves from the source companion to the destination's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpState {
    /// QP number.
    pub num: u32,
    /// The connected peer VM and its QP.
    pub peer: Option<(String, u32)>,
    /// PSN of the next request this QP sends.
    pub next_psn: u64,
    /// PSN of the next request this QP expects.
    pub expected_psn: u64,
    /// Posted receives, in order.
    pub recvs: Vec<RecvWr>,
    /// Requests sent and not yet acknowledged, by PSN. Their data is read again from guest
    /// RAM at the destination: the buffer of a posted request is not the guest's to change
    /// until it completes, and guest RAM arrives identical.
    pub unacked: Vec<(u64, SendWr)>,
    /// Whether the QP is in the error state.
    pub error: bool,
    /// Whether it is in error because its peer's VF state is gone (posts on it fail with
    /// `RemoteLost`).
    #[serde(default)]
    pub lost: bool,
}

/// Everything of a soft VF that is not in guest RAM: what moves at switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfState {
    /// [`VF_STATE_VERSION`] of the exporter (0: a release before versions).
    #[serde(default)]
    pub version: u32,
    /// The VM.
    pub vm: String,
    /// The VF state's epoch (never 0): proved in every handshake. The destination speaks with
    /// it, so the VM's peers see the same VF state moved, not a restarted one.
    #[serde(default)]
    pub epoch: u64,
    /// Each peer's epoch as last proved to the source: the destination recognises a peer that
    /// restarted while the VM moved.
    #[serde(default)]
    pub peer_epochs: BTreeMap<String, u64>,
    /// Registered regions.
    pub mrs: Vec<MemoryRegion>,
    /// Next region key.
    pub next_key: u32,
    /// QPs.
    pub qps: Vec<QpState>,
    /// Next QP number.
    pub next_qp: u32,
    /// Completions not yet taken by the guest.
    pub cq: Vec<Completion>,
}

/// Why the VF state could not move.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Export needs the device quiesced first.
    #[error("VM {0}: the VF must be quiesced (switchover) before its state is exported")]
    NotQuiesced(String),
    /// The state is of another VM.
    #[error("VF state of VM {got} offered to VM {want}")]
    WrongVm {
        /// The importing VM.
        want: String,
        /// The state's VM.
        got: String,
    },
    /// The state is of another version.
    #[error(
        "VF state of VM {vm} is version {got}, this companion reads version {want}; run the \
         same vfmig release on the source and the destination"
    )]
    Version {
        /// The VM.
        vm: String,
        /// The state's version.
        got: u32,
        /// The version this companion reads.
        want: u32,
    },
    /// The state is inconsistent or larger than any VF sets up: refused before any of it
    /// was applied.
    #[error(
        "VF state of VM {vm} refused, nothing of it applied: {what}; export it again from the \
         source companion"
    )]
    Invalid {
        /// The VM the state names.
        vm: String,
        /// What is wrong with it.
        what: String,
    },
    /// The VF keeps no state in the companion.
    #[error(
        "{device} keeps no VF state in the companion: its queues live in the device itself; \
         move it with the passthrough-hotplug strategy"
    )]
    NoState {
        /// The device.
        device: String,
    },
}

impl VfState {
    /// Checks the state before any of it is applied: its version, sizes, counts, numbering
    /// and PSNs. `vm` is the importing VM.
    pub fn validate(&self, vm: &str) -> Result<(), StateError> {
        use limits::*;
        if self.vm != vm {
            return Err(StateError::WrongVm {
                want: vm.to_string(),
                got: self.vm.chars().take(MAX_NAME).collect(),
            });
        }
        if self.version != VF_STATE_VERSION {
            return Err(StateError::Version {
                vm: self.vm.clone(),
                got: self.version,
                want: VF_STATE_VERSION,
            });
        }
        let invalid = |what: String| StateError::Invalid {
            vm: self.vm.clone(),
            what,
        };
        let at_most = |what: &str, n: usize, max: usize| {
            if n > max {
                Err(invalid(format!("{n} {what}, at most {max} are accepted")))
            } else {
                Ok(())
            }
        };
        if self.epoch == 0 {
            return Err(invalid("it has no epoch (0)".into()));
        }
        at_most("peers' epochs", self.peer_epochs.len(), MAX_PEERS)?;
        if self.peer_epochs.keys().any(|p| p.len() > MAX_NAME) {
            return Err(invalid("a peer's name is too long".into()));
        }
        at_most("queue pairs", self.qps.len(), MAX_QPS)?;
        at_most("memory regions", self.mrs.len(), MAX_MRS)?;
        at_most("completions", self.cq.len(), MAX_COMPLETIONS)?;
        let mut keys = std::collections::HashSet::new();
        for m in &self.mrs {
            at_most("segments in one region", m.segments.len(), MAX_SEGMENTS)?;
            if !keys.insert(m.key) || m.key >= self.next_key {
                return Err(invalid(format!(
                    "region key {} is repeated or not below next_key {}",
                    m.key, self.next_key
                )));
            }
            let total = m.segments.iter().try_fold(0u64, |t, g| {
                g.gpa.checked_add(g.len)?;
                t.checked_add(g.len)
            });
            if total.and_then(|t| m.addr.checked_add(t)).is_none() {
                return Err(invalid(format!(
                    "region {} overflows the address space",
                    m.key
                )));
            }
        }
        let mut nums = std::collections::HashSet::new();
        for q in &self.qps {
            // Numbers may lie above next_qp (CREATE_QP_AT, random ids): the counter skips
            // numbers in use.
            if q.num == 0 || !nums.insert(q.num) {
                return Err(invalid(format!("QP {} is 0 or repeated", q.num)));
            }
            if q.peer.as_ref().is_some_and(|(p, _)| p.len() > MAX_NAME) {
                return Err(invalid(format!("QP {}'s peer name is too long", q.num)));
            }
            at_most(
                "unacknowledged requests on one QP",
                q.unacked.len(),
                MAX_QUEUE,
            )?;
            at_most("posted receives on one QP", q.recvs.len(), MAX_QUEUE)?;
            if q.next_psn == 0 || q.expected_psn == 0 {
                return Err(invalid(format!("QP {} has a PSN of 0", q.num)));
            }
            let mut last = 0u64;
            for (psn, wr) in &q.unacked {
                if *psn <= last || *psn >= q.next_psn {
                    return Err(invalid(format!(
                        "QP {}'s pending PSN {psn} is out of order or not below next_psn {}",
                        q.num, q.next_psn
                    )));
                }
                last = *psn;
                if wr.sge.len as usize > super::wire::MAX_PAYLOAD {
                    return Err(invalid(format!(
                        "QP {}'s pending request of {} bytes is larger than a request carries",
                        q.num, wr.sge.len
                    )));
                }
            }
        }
        Ok(())
    }
}

impl From<&QpState> for Qp {
    fn from(q: &QpState) -> Self {
        let now = Instant::now();
        Qp {
            peer: q.peer.clone(),
            next_psn: q.next_psn,
            expected_psn: q.expected_psn,
            recvs: q.recvs.iter().copied().collect(),
            unacked: q
                .unacked
                .iter()
                .map(|(psn, wr)| Pending {
                    psn: *psn,
                    wr: wr.clone(),
                    frame: None,
                    sent_on: NOT_ON_A_LINK,
                    since: now,
                    rnr_since: None,
                    retry_after: None,
                })
                .collect(),
            error: q.error || q.lost,
            lost: q.lost,
        }
    }
}

fn qp_state(num: u32, q: &Qp) -> QpState {
    QpState {
        num,
        peer: q.peer.clone(),
        next_psn: q.next_psn,
        expected_psn: q.expected_psn,
        recvs: q.recvs.iter().copied().collect(),
        unacked: q.unacked.iter().map(|p| (p.psn, p.wr.clone())).collect(),
        error: q.error,
        lost: q.lost,
    }
}

impl SoftVf {
    /// Takes the VF's state for the destination, at switchover. The device must be quiesced:
    /// from then on nothing is applied or acknowledged here, so the state is final. Links to
    /// peers are closed, so they hold what they send until the destination announces itself.
    pub fn export_state(&self) -> Result<VfState, StateError> {
        let inner = &self.inner;
        if !inner.dma.gate_state().quiesced {
            return Err(StateError::NotQuiesced(inner.vm.clone()));
        }
        // The VM is leaving: a late announce of this place stops.
        inner.announce_seq.fetch_add(1, Ordering::SeqCst);
        let links: Vec<_> = inner.links.lock().keys().cloned().collect();
        for vm in links {
            link::drop_link(inner, &vm);
        }
        // No request half-applied: its PSN and completion are in the state, or none of it is.
        let _applying = inner.applying.lock();
        let st = inner.state.lock();
        let mut qps: Vec<QpState> = st.qps.iter().map(|(&n, q)| qp_state(n, q)).collect();
        qps.sort_by_key(|q| q.num);
        let mut mrs: Vec<MemoryRegion> = st.mrs.values().cloned().collect();
        mrs.sort_by_key(|m| m.key);
        let peer_epochs = inner
            .peer_epochs
            .lock()
            .iter()
            .map(|(p, e)| (p.clone(), *e))
            .collect();
        Ok(VfState {
            version: VF_STATE_VERSION,
            vm: inner.vm.clone(),
            epoch: inner.epoch.load(Ordering::SeqCst),
            peer_epochs,
            mrs,
            next_key: st.next_key,
            qps,
            next_qp: st.next_qp,
            cq: st.cq.iter().copied().collect(),
        })
    }

    /// Takes over a migrated VM's VF state. Pending requests will be rebuilt from guest RAM
    /// (it arrives identical) once the device has it, and replayed; call
    /// [`SoftVf::announce`] next, before the VM resumes. The VF adopts the state's epoch (and
    /// its peers' epochs), so its peers see the VM's VF state moved, not restarted.
    pub fn import_state(&self, state: VfState) -> Result<(), StateError> {
        let inner = &self.inner;
        if let Err(e) = state.validate(&inner.vm) {
            tracing::warn!(error = %e, "VF state refused at import");
            return Err(e);
        }
        let fresh = State {
            mrs: state.mrs.into_iter().map(|m| (m.key, m)).collect(),
            next_key: state.next_key,
            qps: state
                .qps
                .iter()
                .map(|q| (q.num, Qp::from(q)))
                .collect::<HashMap<_, _>>(),
            next_qp: state.next_qp,
            cq: state.cq.into_iter().collect(),
            spare: Default::default(),
        };
        let own = inner.epoch.swap(state.epoch, Ordering::SeqCst);
        *inner.peer_epochs.lock() = state.peer_epochs.into_iter().collect();
        *inner.state.lock() = fresh;
        inner.moved.store(false, Ordering::SeqCst);
        inner.cq_ready.notify_all();
        tracing::info!(
            vm = %inner.vm,
            epoch = format!("{:016x}", state.epoch),
            replaced = format!("{own:016x}"),
            "VF state imported: this VF speaks with the VM's epoch from now on"
        );
        Ok(())
    }

    /// Drops this VF's state (the destination runs the VM now, or a takeover here was rolled
    /// back): the links close and the tables are emptied, so nothing is applied or sent for
    /// the VM from here again. Call it with the device quiesced.
    pub fn discard_state(&self) {
        let inner = &self.inner;
        inner.announce_seq.fetch_add(1, Ordering::SeqCst);
        let links: Vec<_> = inner.links.lock().keys().cloned().collect();
        for vm in links {
            link::drop_link(inner, &vm);
        }
        let _applying = inner.applying.lock();
        inner.moved.store(true, Ordering::SeqCst);
        *inner.state.lock() = State::default();
        *inner.rx.lock() = Default::default();
        inner.cq_ready.notify_all();
        tracing::info!(vm = %inner.vm, "VF state dropped: the VM's VF lives elsewhere");
    }

    /// Tells every peer in the cluster map that this VM now lives here: they point their
    /// links at this VF and replay what they hold for it. Returns the peers reached.
    pub fn announce(&self) -> Vec<String> {
        let peers: Vec<String> = self
            .inner
            .book
            .lock()
            .keys()
            .filter(|vm| **vm != self.inner.vm)
            .cloned()
            .collect();
        let seq = self.inner.announce_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut reached = Vec::new();
        let mut missed = Vec::new();
        for vm in peers {
            link::drop_link(&self.inner, &vm);
            if link::dial(&self.inner, &vm, true).is_some() {
                reached.push(vm);
            } else {
                tracing::warn!(peer = %vm, retry_secs = ANNOUNCE_RETRY_FOR.as_secs(), "could not announce the migrated VM to a peer: retrying in the background");
                missed.push(vm);
            }
        }
        tracing::info!(vm = %self.inner.vm, ?reached, "announced the VM's new place on the fabric");
        if !missed.is_empty() {
            let inner = self.inner.clone();
            let spawned = std::thread::Builder::new()
                .name("vfmig-announce-retry".into())
                .spawn(move || retry_announce(&inner, seq, missed));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the announce retry: peers that missed the announce keep the VM's old place");
            }
        }
        reached
    }
}

/// How long a peer that missed an announce (its link was down, for instance) is dialled again.
/// Its requests to the VM's old place are held meanwhile; the peer fails them only after its
/// own hold timeout.
pub const ANNOUNCE_RETRY_FOR: Duration = Duration::from_secs(60);

/// How often a missed peer is dialled again.
const ANNOUNCE_RETRY_EVERY: Duration = Duration::from_millis(250);

/// Announces this VM to the peers that missed announce number `seq`, until each is reached,
/// [`ANNOUNCE_RETRY_FOR`] passes, or the VF moves on (another announce, an export, a discard,
/// a retirement, or the VF's end).
fn retry_announce(inner: &Arc<Inner>, seq: u64, mut missed: Vec<String>) {
    let start = Instant::now();
    let current = || {
        inner.announce_seq.load(Ordering::SeqCst) == seq
            && !inner.closed.load(Ordering::SeqCst)
            && !inner.retired.load(Ordering::SeqCst)
    };
    while !missed.is_empty() && start.elapsed() < ANNOUNCE_RETRY_FOR && current() {
        std::thread::sleep(ANNOUNCE_RETRY_EVERY);
        missed.retain(|vm| {
            if !current() {
                return true;
            }
            match link::announce_to(inner, vm) {
                Some(_) => {
                    tracing::info!(peer = %vm, after_ms = start.elapsed().as_millis() as u64, "announced the VM's new place to a peer that had missed it");
                    false
                }
                None => true,
            }
        });
    }
    if !missed.is_empty() && current() {
        tracing::error!(
            ?missed,
            secs = ANNOUNCE_RETRY_FOR.as_secs(),
            "peers never learnt the VM's new place: their requests to it will fail (RetryExceeded)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vf::verbs::{GpaRange, SendOp, Sge};

    fn wr(len: u32) -> SendWr {
        SendWr {
            wr_id: 1,
            sge: Sge {
                addr: 0x1000,
                len,
                lkey: 1,
            },
            op: SendOp::Send { imm: None },
        }
    }

    fn good() -> VfState {
        VfState {
            version: VF_STATE_VERSION,
            vm: "a".into(),
            epoch: 0x5eed,
            peer_epochs: [("b".to_string(), 7)].into(),
            mrs: vec![MemoryRegion {
                key: 1,
                addr: 0x1000,
                segments: vec![GpaRange {
                    gpa: 0x40_0000,
                    len: 4096,
                }],
                access: Default::default(),
            }],
            next_key: 2,
            qps: vec![QpState {
                num: 1,
                peer: Some(("b".into(), 1)),
                next_psn: 3,
                expected_psn: 1,
                recvs: vec![],
                unacked: vec![(1, wr(8)), (2, wr(8))],
                error: false,
                lost: false,
            }],
            next_qp: 2,
            cq: vec![],
        }
    }

    #[test]
    fn an_inconsistent_or_oversized_state_is_refused_before_any_of_it_is_applied() {
        assert!(good().validate("a").is_ok());
        // A QP created at a number of the guest's (CREATE_QP_AT) lies above the counter.
        let mut numbered = good();
        numbered.qps[0].num = 0x8000_0001;
        assert!(numbered.validate("a").is_ok());
        type Spoil = Box<dyn Fn(&mut VfState)>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "pending PSNs out of order",
                Box::new(|s| s.qps[0].unacked.swap(0, 1)),
            ),
            (
                "a pending PSN not sent",
                Box::new(|s| s.qps[0].next_psn = 2),
            ),
            ("PSN 0", Box::new(|s| s.qps[0].expected_psn = 0)),
            ("no epoch", Box::new(|s| s.epoch = 0)),
            (
                "a peer's name too long",
                Box::new(|s| {
                    s.peer_epochs.insert("p".repeat(limits::MAX_NAME + 1), 1);
                }),
            ),
            ("a repeated QP", Box::new(|s| s.qps.push(s.qps[0].clone()))),
            ("a QP numbered 0", Box::new(|s| s.qps[0].num = 0)),
            ("a region above next_key", Box::new(|s| s.next_key = 1)),
            (
                "a huge request",
                Box::new(|s| s.qps[0].unacked[1].1.sge.len = u32::MAX),
            ),
            (
                "a region past the address space",
                Box::new(|s| s.mrs[0].segments[0].gpa = u64::MAX - 1),
            ),
            (
                "too many QPs",
                Box::new(|s| {
                    s.next_qp = u32::MAX;
                    s.qps = (1..=limits::MAX_QPS as u32 + 1)
                        .map(|num| QpState {
                            num,
                            unacked: vec![],
                            ..s.qps[0].clone()
                        })
                        .collect();
                }),
            ),
        ];
        for (what, spoil) in cases {
            let mut s = good();
            spoil(&mut s);
            let e = s.validate("a").unwrap_err();
            assert!(matches!(e, StateError::Invalid { .. }), "{what}: {e:?}");
            assert!(e.to_string().contains("nothing of it applied"), "{e}");
        }
    }

    #[test]
    fn an_import_refuses_an_invalid_state_and_keeps_its_own() {
        let vf = super::super::responder::tests::vm("a");
        let qp = vf.create_qp();
        let mut bad = good();
        bad.qps[0].unacked.swap(0, 1);
        assert!(matches!(
            vf.import_state(bad),
            Err(StateError::Invalid { .. })
        ));
        assert!(
            vf.inner.state.lock().qps.contains_key(&qp),
            "its own state is untouched"
        );
        vf.import_state(good()).unwrap();
        assert_eq!(vf.inner.state.lock().qps[&1].next_psn, 3);
    }
}
