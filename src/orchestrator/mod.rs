//! The orchestrator: launching VMs beside their companions, and migrating them.
//!
//! - [`launch`]: a VM's companion, then a stock QEMU wired to it, in one run directory;
//! - [`migrate`]: the migration state machine, in one file, top to bottom;
//! - [`verify`]: checks that rely on nothing of vfmig's (`pmemsave` dumps);
//! - [`demo`]: the main job on one machine;
//! - [`bench`]: side-by-side measurements of whole migrations;
//! - [`fabric_bench`]: the soft VF against memcpy and loopback TCP;
//! - [`hosts`]: network namespaces standing for cluster hosts;
//! - [`hotplug`]: unplugging and plugging a passthrough VF (`passthrough-hotplug`);
//! - [`nested`]: the nested VFIO test (a real VF bound to vfio-pci inside an L1 guest).

pub mod bench;
pub mod demo;
pub mod fabric_bench;
pub mod hosts;
pub mod hotplug;
pub mod launch;
pub mod migrate;
pub mod nested;
pub mod plan;
pub mod scenario;
pub mod verify;
