//! A migration that fails must leave the job running: cancel, the destination's QEMU killed,
//! the destination's companion killed, each during precopy. Two VMs run lu-lite on soft VFs;
//! after the failure, the job finishes on the source with the same result as a run without
//! migration, which proves its RDMA traffic went on.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use common::{image, init_logging, machine, RunDir};
use vfmig::lab::scenario::{self, Fault, ScenarioOptions, ScenarioReport, Workload};
use vfmig::orchestrator::migrate::Quiet;
use vfmig::orchestrator::StrategyKind as Strategy;

fn options(fault: Option<Fault>, dir: &RunDir) -> ScenarioOptions {
    ScenarioOptions {
        driver: Default::default(),
        workload: Workload::LuLite,
        vms: 2,
        strategy: fault.map(|_| Strategy::Transparent),
        mem_mib: 256,
        n: 128,
        iters: 1200,
        migrate_at: 100,
        // Slow precopy, so that the failure lands inside it.
        max_bandwidth: Some(8 << 20),
        run_dir: dir.path.clone(),
        accel: "tcg".into(),
        image: image(),
        vfmig_bin: PathBuf::from(env!("CARGO_BIN_EXE_vfmig")),
        timeout: Duration::from_secs(300),
        fault: fault.map(|f| (f, Duration::from_millis(1500))),
        trace: None,
    }
}

fn reference() -> &'static ScenarioReport {
    static REFERENCE: OnceLock<ScenarioReport> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = RunDir::new("failures-reference");
        scenario::run(&options(None, &dir), &mut Quiet).expect("reference run")
    })
}

fn survives(fault: Fault, expect_in_error: &str) -> ScenarioReport {
    survives_under(Strategy::Transparent, fault, expect_in_error)
}

fn survives_under(strategy: Strategy, fault: Fault, expect_in_error: &str) -> ScenarioReport {
    let _m = machine();
    init_logging();
    let reference = reference();
    let dir = RunDir::new("failure");
    let mut opts = options(Some(fault), &dir);
    opts.strategy = Some(strategy);
    let r = scenario::run(&opts, &mut Quiet).expect("the scenario ran");
    eprintln!(
        "{fault:?}: error {:?}; checksums {:?} (reference {:?})",
        r.migration_error, r.checksums, reference.checksums
    );
    assert!(
        r.migration.is_none(),
        "the migration should not have completed"
    );
    let error = r.migration_error.clone().expect("the migration failed");
    assert!(error.contains(expect_in_error), "{error}");
    assert!(error.contains("source VM keeps running"), "{error}");
    assert!(
        r.checksums.values().all(Option::is_some),
        "a rank did not finish: {r:?}"
    );
    assert_eq!(r.checksums, reference.checksums, "the job's result changed");
    assert_eq!(r.lost_ops, 0);
    assert_eq!(r.duplicate_ops, 0);
    r
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_cancelled_migration_leaves_the_job_running() {
    survives(Fault::Cancel, "cancelled");
}

/// passthrough-hotplug: the VF was unplugged and every rank suspended before precopy; after
/// the cancel, the source must have its VF back with the guest's driver up, and the ranks must
/// have been resumed (the job finishes with the reference result).
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_cancelled_passthrough_hotplug_migration_gives_the_source_its_vf_back() {
    let r = survives_under(Strategy::PassthroughHotplug, Fault::Cancel, "cancelled");
    assert_eq!(r.source_vf_restored, Some(true), "{r:?}");
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn the_destination_qemu_killed_during_precopy_leaves_the_job_running() {
    survives(Fault::KillDestinationQemu, "destination's QEMU died");
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn the_destination_companion_killed_during_precopy_leaves_the_job_running() {
    survives(
        Fault::KillDestinationCompanion,
        "destination's companion died",
    );
}
