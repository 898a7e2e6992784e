//! libvirt drives the migration: two libvirt hosts (each a libvirtd in its own network, mount
//! and UTS namespaces), a vfmig domain whose companion vfmig's `qemu` hook starts and stops,
//! the companion's generator writing guest RAM as a device, and `virsh migrate --live --p2p`.
//! No vfmig command takes part in the migration: the device writes reach the destination only
//! because the companion logs them into QEMU's dirty log, whoever drives QEMU; and an RDMA job
//! keeps its QPs because the companions hand the VF over themselves.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{image, init_logging, machine, RunDir};
use vfmig::lab::libvirt_demo::{run, LibvirtDemoOptions};
use vfmig::lab::scenario::{self, ScenarioOptions, ScenarioReport, Workload};
use vfmig::orchestrator::migrate::Quiet;
use vfmig::orchestrator::StrategyKind as Strategy;

fn options(dir: &RunDir) -> LibvirtDemoOptions {
    LibvirtDemoOptions::new(
        dir.path.clone(),
        image(),
        env!("CARGO_BIN_EXE_vfmig").into(),
    )
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU and libvirt): `bash tools/test.sh` runs it"
)]
fn virsh_migrate_keeps_every_device_write_and_the_negative_control_loses_some() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("libvirt");
    let r = run(&options(&dir)).unwrap_or_else(|e| panic!("{}", vfmig::errors::chain(&e)));
    eprintln!("tracked: {r:?}");
    assert!(r.records_written > 100, "the generator hardly wrote: {r:?}");
    assert!(r.device_writes > 0, "{r:?}");
    assert_eq!(
        r.lost_writes, 0,
        "device writes lost across virsh migrate: {r:?}"
    );

    // The same with the companion not logging its writes: the check must see the loss.
    let dir = RunDir::new("libvirt-no-tracking");
    let mut opts = options(&dir);
    opts.tracking = false;
    let r = run(&opts).unwrap_or_else(|e| panic!("{}", vfmig::errors::chain(&e)));
    eprintln!("untracked: {r:?}");
    assert!(
        r.lost_writes > 0,
        "with tracking off the destination must miss writes, or the check proves nothing: {r:?}"
    );
}

/// lu-lite on three VMs, 256 MiB each: about 14 s of iterations, so that libvirt's migration
/// (its destination QEMU and companion start, then precopy: about 7 s) ends while the job runs.
fn job(strategy: Option<Strategy>, dir: &RunDir) -> ScenarioOptions {
    ScenarioOptions {
        driver: Default::default(),
        workload: Workload::LuLite,
        vms: 3,
        strategy,
        mem_mib: 256,
        n: 256,
        iters: 2000,
        migrate_at: 150,
        max_bandwidth: None,
        run_dir: dir.path.clone(),
        accel: "tcg".into(),
        image: image(),
        vfmig_bin: PathBuf::from(env!("CARGO_BIN_EXE_vfmig")),
        timeout: Duration::from_secs(300),
        fault: None,
        trace: None,
    }
}

/// The job with `a` a libvirt domain that `virsh migrate --live --p2p` moves midway, at
/// 128 MiB/s.
fn under_libvirt(strategy: Strategy, dir: &RunDir) -> ScenarioReport {
    vfmig::lab::libvirt_job::run(&job(Some(strategy), dir), 128)
        .unwrap_or_else(|e| panic!("{}", vfmig::errors::chain(&e)))
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU and libvirt): `bash tools/test.sh` runs it"
)]
fn lu_lite_keeps_its_result_when_virsh_migrates_a_and_untracked_it_does_not() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("libvirt-lu-lite-reference");
    let reference = scenario::run(&job(None, &dir), &mut Quiet).expect("reference run");
    assert!(reference.checksums.values().all(Option::is_some));

    let dir = RunDir::new("libvirt-lu-lite");
    let r = under_libvirt(Strategy::Transparent, &dir);
    let m = r.migration.as_ref().expect("a migrated");
    let takeover = m.vf_takeover.as_ref().expect("the VF handoff");
    eprintln!(
        "virsh: checksums {:?} (reference {:?}); lost {} duplicate {}; total {} ms, downtime {} \
         ms, blackout {:.1} ms; handoff {takeover:?}; errors {:?}",
        r.checksums,
        reference.checksums,
        r.lost_ops,
        r.duplicate_ops,
        m.total_ms,
        m.downtime_ms,
        r.blackout_ms,
        r.ranks
            .iter()
            .map(|(vm, k)| (vm, &k.errors))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        takeover.announced_to,
        vec!["b".to_string(), "c".to_string()],
        "the destination's companion took the VF over and told the peers"
    );
    assert!(
        r.iteration_ms.after > 0.0,
        "rank a iterated at the destination: the job outlived the migration"
    );
    assert_eq!(r.checksums, reference.checksums, "the job's result changed");
    assert_eq!(r.lost_ops, 0);
    assert_eq!(r.duplicate_ops, 0);

    // The same with `a`'s companions not logging the device's writes: the check must see it.
    let dir = RunDir::new("libvirt-lu-lite-no-tracking");
    let r = under_libvirt(Strategy::UnsafeNoTracking, &dir);
    assert_ne!(
        r.checksums, reference.checksums,
        "with tracking off, RDMA writes during precopy must be lost and the checksum must show it"
    );
}
