//! End to end: a real QEMU 10 source and destination, a real Linux guest, the companion as
//! their vhost-user-net backend, device writes during precopy, a real migration over TCP.

mod common;

use common::{demo_options, init_logging, machine, RunDir};
use vfmig::lab::demo;
use vfmig::orchestrator::migrate::Quiet;
use vfmig::orchestrator::StrategyKind as Strategy;

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn tracking_on_no_device_write_is_lost() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("tracking-on");
    let r = demo::run(&demo_options(Strategy::Transparent, &dir), &mut Quiet).expect("demo run");
    eprintln!("{}", serde_json::to_string(&r).unwrap());
    assert!(
        r.device_dirty_pages >= 1000,
        "the device must dirty at least 1000 pages during the migration, got {}",
        r.device_dirty_pages
    );
    assert_eq!(r.lost_writes, 0, "lost device writes: {r:?}");
    assert_eq!(r.records_intact, r.records_written);
    assert!(r.records_written >= 1000);
    assert!(
        r.quiesced_at_switchover,
        "the VF was not quiesced at switchover"
    );
    assert_eq!(r.verified_through, "companion");
    assert!(r.migration.destination_resumed);
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn negative_control_without_tracking_detects_lost_writes() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("no-tracking");
    let r =
        demo::run(&demo_options(Strategy::UnsafeNoTracking, &dir), &mut Quiet).expect("demo run");
    eprintln!("{}", serde_json::to_string(&r).unwrap());
    assert!(r.device_dirty_pages >= 1000);
    assert!(
        r.lost_writes > 0,
        "with the dirty log off, writes made during precopy must be lost and detected: {r:?}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn keep_paused_destination_ram_equals_the_source_page_by_page() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("keep-paused");
    let mut opts = demo_options(Strategy::Transparent, &dir);
    opts.keep_paused = true;
    let r = demo::run(&opts, &mut Quiet).expect("demo run");
    let cmp = r.ram_comparison.clone().expect("a RAM comparison");
    eprintln!("{}", serde_json::to_string(&r).unwrap());
    assert_eq!(cmp.pages, 512 * 256, "every page of 512 MiB compared");
    assert_eq!(cmp.differing, 0, "pages differ: {:?}", cmp.examples);
    assert!(!r.migration.destination_resumed);
    assert_eq!(r.verified_through, "pmemsave");
    assert_eq!(r.lost_writes, 0);
    assert!(r.device_dirty_pages >= 1000);
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn keep_paused_comparison_catches_untracked_device_writes() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("keep-paused-no-tracking");
    let mut opts = demo_options(Strategy::UnsafeNoTracking, &dir);
    opts.keep_paused = true;
    let r = demo::run(&opts, &mut Quiet).expect("demo run");
    let cmp = r.ram_comparison.clone().expect("a RAM comparison");
    assert!(
        cmp.differing > 0,
        "untracked device writes must leave the two RAM images different"
    );
    assert!(r.lost_writes > 0);
}
