//! What of a soft VF moves from the source companion to the destination's at switchover: its
//! tables, the requests not yet acked, and the completions not yet taken ([`VfState`]). Guest
//! RAM moves by precopy; the state carries a version, and an importer refuses another one.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::link;
use super::state::{Pending, Qp, State, NOT_ON_A_LINK};
use super::SoftVf;
use crate::vf::verbs::{Completion, MemoryRegion, RecvWr, SendWr};

/// Version of [`VfState`]: raised whenever its meaning changes, so that companions of two
/// releases refuse each other's state instead of misreading it.
pub const VF_STATE_VERSION: u32 = 1;

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
}

/// Everything of a soft VF that is not in guest RAM: what moves at switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfState {
    /// [`VF_STATE_VERSION`] of the exporter (0: a release before versions).
    #[serde(default)]
    pub version: u32,
    /// The VM.
    pub vm: String,
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
            error: q.error,
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
        Ok(VfState {
            version: VF_STATE_VERSION,
            vm: inner.vm.clone(),
            mrs,
            next_key: st.next_key,
            qps,
            next_qp: st.next_qp,
            cq: st.cq.iter().copied().collect(),
        })
    }

    /// Takes over a migrated VM's VF state. Pending requests will be rebuilt from guest RAM
    /// (it arrives identical) once the device has it, and replayed; call
    /// [`SoftVf::announce`] next, before the VM resumes.
    pub fn import_state(&self, state: VfState) -> Result<(), StateError> {
        let inner = &self.inner;
        if state.vm != inner.vm {
            return Err(StateError::WrongVm {
                want: inner.vm.clone(),
                got: state.vm,
            });
        }
        if state.version != VF_STATE_VERSION {
            return Err(StateError::Version {
                vm: state.vm,
                got: state.version,
                want: VF_STATE_VERSION,
            });
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
        };
        *inner.state.lock() = fresh;
        inner.cq_ready.notify_all();
        Ok(())
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
        let mut reached = Vec::new();
        for vm in peers {
            link::drop_link(&self.inner, &vm);
            if link::dial(&self.inner, &vm, true).is_some() {
                reached.push(vm);
            } else {
                tracing::warn!(peer = %vm, "could not announce the migrated VM to a peer; it will learn on its next request");
            }
        }
        tracing::info!(vm = %self.inner.vm, ?reached, "announced the VM's new place on the fabric");
        reached
    }
}
