//! Guest side of vfmig: the soft VF library.
//!
//! The guest drives an RDMA-like VF through Ethernet frames of EtherType 0x88B5 on its
//! virtio-net NIC, whose backend is the vfmig companion (`docs/guest-frames.md`). Data never
//! travels in frames: the companion reads and writes guest RAM at the guest-physical pages of
//! registered [`PinnedBuffer`]s.
//!
//! - [`PinnedBuffer`]: locked memory with known guest-physical segments.
//! - [`Device`]: the open VF — register memory, create and connect QPs, post work requests,
//!   poll completions, receive migration events.
//! - [`ffi`]: the same as a C API (`include/vfmig.h`), built into the static library.
//! - [`lu`] and [`workload`]: what the workload binaries (`rdma-bw`, `rdma-lat`, `lu-lite`)
//!   are made of.

#![deny(missing_docs)]

pub mod channel;
pub mod device;
#[cfg(test)]
mod fake;
pub mod ffi;
pub mod lu;
pub mod lulite;
pub mod pinned;
pub mod transport;
pub mod workload;

pub use device::{Device, EventAcker, EventCallback, Stats};
pub use pinned::{Backing, PinnedBuffer};
pub use transport::{FdTransport, Transport};
pub use vfmig_proto::{access, Completion, Event, Opcode, Segment, Sge, Status};
