//! The VFIO VF at the seam of [`crate::vf`]. Its device side is [`VfDevice`] (in `device`);
//! here are the rest:
//! - its verbs are not the companion's to serve: they run in the HCA's own queues, driven by
//!   the provider library in the guest, so each is refused with
//!   [`VerbsError::ServedByDevice`];
//! - it keeps no VF state in the companion: [`VfPersist`]'s defaults refuse export and import.

use std::sync::Arc;
use std::time::Duration;

use super::VfioVf;
use crate::vf::verbs::{Access, Completion, GpaRange, RecvWr, SendWr, VerbsError};
use crate::vf::{BackendKind, Vf, VfBackend, VfDevice, VfPersist};

/// The verbs and state of a VFIO VF, as the companion sees them: none of its own.
#[derive(Debug, Clone)]
pub struct VfioVerbs {
    /// The VF's PCI address.
    bdf: String,
}

impl VfioVerbs {
    /// The verbs of the VF at `bdf`.
    pub fn new(bdf: impl Into<String>) -> Self {
        Self { bdf: bdf.into() }
    }

    fn refuse<T>(&self) -> Result<T, VerbsError> {
        Err(VerbsError::ServedByDevice {
            device: format!("VFIO VF {}", self.bdf),
        })
    }
}

impl Vf for VfioVerbs {
    fn register_mr(&self, _: u64, _: Vec<GpaRange>, _: Access) -> Result<u32, VerbsError> {
        self.refuse()
    }

    fn deregister_mr(&self, _: u32) -> Result<(), VerbsError> {
        self.refuse()
    }

    fn create_qp(&self) -> Result<u32, VerbsError> {
        self.refuse()
    }

    fn create_qp_at(&self, _: u32) -> Result<u32, VerbsError> {
        self.refuse()
    }

    fn destroy_qp(&self, _: u32) -> Result<(), VerbsError> {
        self.refuse()
    }

    fn connect_qp(&self, _: u32, _: &str, _: u32) -> Result<(), VerbsError> {
        self.refuse()
    }

    fn post_send(&self, _: u32, _: SendWr) -> Result<(), VerbsError> {
        self.refuse()
    }

    fn post_recv(&self, _: u32, _: RecvWr) -> Result<(), VerbsError> {
        self.refuse()
    }

    fn poll_cq(&self, _: usize) -> Result<Vec<Completion>, VerbsError> {
        self.refuse()
    }

    fn wait_cq(&self, _: usize, _: Duration) -> Result<Vec<Completion>, VerbsError> {
        self.refuse()
    }
}

impl VfPersist for VfioVerbs {
    fn device_name(&self) -> String {
        format!("VFIO VF {}", self.bdf)
    }
}

impl VfioVf {
    /// The VF as a backend of the seam: its device side is itself; its verbs and state are
    /// [`VfioVerbs`].
    pub fn into_backend(self) -> VfBackend {
        let verbs = Arc::new(VfioVerbs::new(VfDevice::name(&self)));
        VfBackend {
            kind: BackendKind::Vfio,
            verbs: verbs.clone(),
            device: Box::new(self),
            persist: verbs,
            fabric: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vf::soft::StateError;
    use crate::vf::verbs::Sge;

    #[test]
    fn every_verb_is_refused_with_the_reason_and_no_state_moves() {
        let v = VfioVerbs::new("0000:3b:02.1");
        let wr = RecvWr {
            wr_id: 1,
            sge: Sge {
                addr: 0,
                len: 1,
                lkey: 1,
            },
        };
        let errors = [
            v.register_mr(0, vec![], Access::default()).unwrap_err(),
            v.deregister_mr(1).unwrap_err(),
            v.create_qp().unwrap_err(),
            v.connect_qp(1, "b", 1).unwrap_err(),
            v.post_recv(1, wr).unwrap_err(),
            v.poll_cq(1).unwrap_err(),
            v.wait_cq(1, Duration::from_secs(1)).unwrap_err(),
        ];
        for e in errors {
            assert!(matches!(&e, VerbsError::ServedByDevice { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains("0000:3b:02.1") && msg.contains("HCA"), "{msg}");
        }
        assert!(matches!(v.export_state(), Err(StateError::NoState { .. })));
        assert!(v.announce().is_empty());
    }
}
