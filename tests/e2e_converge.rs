//! End to end: device auto-converge. A real QEMU 10 source and destination (512 MiB guests:
//! the generator's window is reserved at 384 MiB) whose source companion's generator dirties
//! guest RAM twice as fast as `max-bandwidth` lets precopy send it. With the device throttle off the migration never finishes (cancelled at
//! the bound, the source runs on); with `auto` it completes with every device write at the
//! destination and the downtime within the limit.

mod common;

use common::{image, init_logging, machine, RunDir};
use vfmig::lab::converge_bench::{self, Variant};
use vfmig::lab::demo::DemoOptions;

/// 512 MiB guests; 4000 records a second, each on its own page (16.4 MB/s of dirtied pages)
/// against an 8 MB/s link; a 300 ms downtime limit; give up after `bound_secs`.
fn options(dir: &RunDir, bound_secs: u64) -> DemoOptions {
    let base = DemoOptions {
        max_bandwidth: Some(8_000_000),
        ..DemoOptions::new(
            dir.path.clone(),
            image(),
            std::path::PathBuf::from(env!("CARGO_BIN_EXE_vfmig")),
        )
    };
    converge_bench::options(base, 4000, 300, bound_secs)
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_device_faster_than_the_link_converges_only_with_the_throttle() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("converge");

    // Negative control: nothing slows the device; precopy cannot finish.
    let off = converge_bench::run_once(&options(&dir, 25), Variant::ThrottleOff, 1)
        .expect("the throttle-off run");
    eprintln!("{}", serde_json::to_string(&off).unwrap());
    assert!(
        !off.completed,
        "with the throttle off the migration must not finish within the bound: {off:?}"
    );
    assert_eq!(
        off.source_running,
        Some(true),
        "the source runs on: {off:?}"
    );
    assert_eq!(off.throttle_delayed_ms, 0, "nothing was throttled: {off:?}");
    assert!(
        off.precopy_writes_per_s > 3000.0,
        "the device wrote at full speed during precopy: {off:?}"
    );

    let auto = converge_bench::run_once(&options(&dir, 60), Variant::ThrottleAuto, 1)
        .expect("the throttle-auto run");
    eprintln!("{}", serde_json::to_string(&auto).unwrap());
    assert!(
        auto.completed,
        "with `auto` the migration completes: {auto:?}"
    );
    assert_eq!(
        auto.lost_writes,
        Some(0),
        "every generator page equal: {auto:?}"
    );
    assert!(auto.records_written.unwrap_or(0) >= 4000, "{auto:?}");
    let downtime = auto.downtime_ms.unwrap_or(u64::MAX);
    assert!(
        downtime <= 300,
        "downtime {downtime} ms over the 300 ms limit"
    );
    assert!(
        auto.throttle_delayed_ms > 0,
        "the device was throttled: {auto:?}"
    );
}
