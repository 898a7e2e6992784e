//! The lab: everything that proves and measures vfmig, above the product. It imports the
//! product; the product never imports it.
//!
//! - [`demo`]: the main job on one machine;
//! - [`scenario`]: multi-VM MPI-style jobs on soft VFs, with fault injection;
//! - [`faults`]: faults injected at a phase of the migration, and the fault matrix;
//! - [`soak`]: one VM migrated back and forth many times under the job;
//! - [`bench`]: side-by-side measurements of whole migrations;
//! - [`converge_bench`]: a device faster than the link, migrated with and without the device
//!   throttle and with QEMU's auto-converge;
//! - [`plan_bench`]: several VMs migrated at once against what the bandwidth allows;
//! - [`fabric_bench`]: the soft VF against memcpy and loopback TCP;
//! - [`mpi`]: Debian's unmodified Open MPI, HPCC and NetPIPE across the MPI guest image's VMs;
//! - [`stats`]: statistics of repeated measurements (medians);
//! - [`hosts`]: network namespaces standing for cluster hosts;
//! - [`libvirt_hosts`]: a libvirtd in each of them, for migrations driven by `virsh`;
//! - [`libvirt_demo`]: the demo's no-lost-writes check across a `virsh migrate`;
//! - [`verify`]: checks that rely on nothing of vfmig's (`pmemsave` dumps);
//! - [`nested`]: the nested VFIO test (a real VF bound to vfio-pci inside an L1 guest);
//! - [`vfio_selftest`]: every step of the VFIO path run against a real VF, and the 82576 VF
//!   driver that makes it DMA.

pub mod bench;
pub mod converge_bench;
pub mod demo;
pub mod drivers_bench;
pub mod fabric_bench;
pub mod faults;
pub mod hosts;
pub mod libvirt_demo;
pub mod libvirt_hosts;
pub mod libvirt_job;
pub mod mpi;
pub mod nested;
pub mod netpipe_bench;
pub mod ops_bench;
pub mod plan_bench;
pub mod qmp_driver;
pub mod scenario;
pub mod soak;
pub mod stats;
pub mod verify;
pub mod vfio_selftest;
