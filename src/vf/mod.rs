//! The VF side of the companion: how the device reaches guest RAM.
//!
//! [`DmaEngine`] is the one path by which the companion's device writes guest RAM. It checks
//! every range against the memory table, writes through the logged guest memory so that QEMU
//! resends the page, records the page in the companion's own per-migration bitmap, holds writes
//! while a migration runs without a log, and stops them at switchover.

mod dma;
pub mod soft;
pub mod verbs;

pub use dma::{DmaEngine, DmaError, DmaStats, GateState};

use verbs::{Access, Completion, GpaRange, RecvWr, SendWr, VerbsError};

/// The VF backend seam: what the companion asks of a VF, whether the soft VF (a software RDMA
/// engine over TCP) or a real VF owned through VFIO. Failed transfers are completions with a
/// status; errors here are about bad handles.
pub trait Vf: Send + Sync {
    /// Registers guest memory: `segments` (guest-physical) appear at `addr` onwards.
    fn register_mr(
        &self,
        addr: u64,
        segments: Vec<GpaRange>,
        access: Access,
    ) -> Result<u32, VerbsError>;
    /// Drops a region.
    fn deregister_mr(&self, key: u32) -> Result<(), VerbsError>;
    /// A new reliable-connected QP, not yet connected.
    fn create_qp(&self) -> u32;
    /// Connects a QP to a peer VM's QP.
    fn connect_qp(&self, qp: u32, peer_vm: &str, peer_qp: u32) -> Result<(), VerbsError>;
    /// Posts a send work request (WRITE, WRITE_WITH_IMM, SEND).
    fn post_send(&self, qp: u32, wr: SendWr) -> Result<(), VerbsError>;
    /// Posts a receive work request.
    fn post_recv(&self, qp: u32, wr: RecvWr) -> Result<(), VerbsError>;
    /// Takes up to `max` completions.
    fn poll_cq(&self, max: usize) -> Vec<Completion>;
}
