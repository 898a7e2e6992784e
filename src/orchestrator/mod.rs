//! The orchestrator: launching VMs beside their companions, and migrating them.
//!
//! - [`launch`]: a VM's companion, then a stock QEMU wired to it, in one run directory;
//! - [`migrate`]: the migration state machine, in one file, top to bottom;
//! - [`options`], [`strategy`], [`summary`], [`migrate_error`], [`progress`]: what it is
//!   given (the operator's settings, the strategy with what it needs), what it returns (phases
//!   and summary, or an error that says how the source was left), and who watches it;
//! - [`plan`]: several migrations at once, each VM to its own destination;
//! - [`hotplug`]: unplugging and plugging a passthrough VF (`passthrough-hotplug`);
//! - `takeover`: the soft VF's state moved at switchover, and taken back if the destination
//!   cannot take over or start.
//!
//! The demo, the scenarios, the benches and the nested test are in [`crate::lab`].

pub mod hotplug;
pub mod launch;
pub mod migrate;
pub mod migrate_error;
pub mod options;
pub mod plan;
pub mod progress;
pub mod strategy;
pub mod summary;
pub mod takeover;

pub use strategy::{Strategy, StrategyKind};
