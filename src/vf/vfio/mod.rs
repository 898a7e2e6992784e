//! The VFIO VF: a real SR-IOV VF bound to vfio-pci, owned through `vfio-ioctls`.
//!
//! - [`VfioVf::open`] checks sysfs first ([`sysfs`]: the device exists, vfio-pci holds it, it
//!   has a viable IOMMU group), then opens the type1 container and the device.
//! - Guest RAM is mapped into the device's IOMMU domain at IOVA = GPA, and remapped when the
//!   memory table changes ([`mapping`]).
//! - Config space goes through the VFIO config region ([`config`]): IDs, bus master, and the
//!   quiesce (clear bus master, wait for Transactions Pending to clear).
//! - Dirty pages come from device DMA logging where the device's VFIO driver has it; otherwise
//!   every writable mapped page counts as dirty at every sync ([`dirty`]).
//! - [`check`] reports on a device without needing it to work. The self-test that exercises
//!   every step on a real VF is lab equipment: `crate::lab::vfio_selftest`.
//!
//! The modules form a tree, each importing only those below it:
//! - [`error`] at the bottom: every error of the backend;
//! - [`sysfs`], [`config`], [`mapping`] and [`dirty`] (which uses `mapping`'s region key): the
//!   parts, each testable without a device;
//! - `device`: [`VfioVf`], built on the parts, split by role (opening and the region table,
//!   IOMMU mappings, dirty tracking, lifecycle);
//! - [`check`] on top, built on the device.

pub mod check;
pub mod config;
pub(crate) mod device;
pub mod dirty;
pub mod error;
pub mod mapping;
mod seam;
pub mod sysfs;

pub use check::{check, check_with_root, CheckReport};
pub use device::{DeviceRegion, VfioVf};
pub use error::VfioVfError;
pub use mapping::RegionKey;
pub use sysfs::{Bdf, GroupMember, SysfsInfo, DEFAULT_SYSFS_ROOT};
