//! vfmig: live migration of VMs whose MPI jobs use an SR-IOV RDMA VF, with a stock QEMU.
//!
//! The architecture, one module per concern:
//! - [`qmp`]: a hand-written QMP client (the orchestrator's line to QEMU);
//! - [`memory`]: the logged path into guest RAM: guest RAM as mapped from vhost-user
//!   `SET_MEM_TABLE`, QEMU's dirty log as its bitmap, the device-dirty bitmap, the DMA engine;
//! - [`vf`]: the VF backends behind one seam: the soft VF and the VFIO VF;
//! - [`companion`]: the per-VM process: vhost-user-net backend, control socket, traffic
//!   generator;
//! - [`orchestrator`]: launching VMs and the migration state machine;
//! - [`trace`]: migration timelines as Chrome trace-event JSON, and the report drawn from them;
//! - [`errors`]: an error and its causes as one line of text;
//! - [`libvirt`]: a vfmig VM as a libvirt domain, and the hook that ties the companion to it;
//! - [`lab`]: the demo, scenarios, benches and nested test, above the product;
//! - [`fuzz`]: one entry point per decoder and handler of untrusted input, for `cargo fuzz`
//!   and the stable fuzz driver.

pub mod companion;
pub mod errors;
pub mod fuzz;
pub mod lab;
pub mod libvirt;
pub mod memory;
pub mod orchestrator;
pub mod qmp;
pub mod trace;
pub mod vf;
