//! vfmig: live migration of VMs whose MPI jobs use an SR-IOV RDMA VF, with a stock QEMU.
//!
//! The architecture, one module per concern:
//! - [`qmp`]: a hand-written QMP client (the orchestrator's line to QEMU);
//! - [`guest_ram`]: guest RAM as the companion maps it from vhost-user `SET_MEM_TABLE`;
//! - [`dirty`]: QEMU's dirty log as a guest-memory bitmap, and the companion's own
//!   device-dirty bitmap;
//! - [`vf`]: the device's path into guest RAM (the DMA engine);
//! - [`companion`]: the per-VM process: vhost-user-net backend, control socket, traffic
//!   generator;
//! - [`orchestrator`]: launching VMs, the migration state machine, the demo and the benches;
//! - [`trace`]: migration timelines as Chrome trace-event JSON, and the report drawn from them.

pub mod companion;
pub mod dirty;
pub mod guest_ram;
pub mod orchestrator;
pub mod qmp;
pub mod trace;
pub mod vf;
