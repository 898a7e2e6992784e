//! Several VMs migrated at once, each to its own destination (`vfmig migrate --plan`).

mod common;

use common::{demo_options, init_logging, machine, RunDir};
use vfmig::lab::plan_bench as plan;
use vfmig::orchestrator::StrategyKind as Strategy;

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn two_vms_migrate_at_once() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("plan");
    let mut opts = demo_options(Strategy::Transparent, &dir);
    opts.mem_mib = 256;
    opts.rate = 0;
    let row = plan::bench_row(&opts, 2).expect("two migrations at once");
    eprintln!("{row:?}");
    assert_eq!(row.vms, 2);
    assert_eq!(row.failed, 0, "{row:?}");
    assert!(row.bytes_sent > 0);
    assert!(row.wall_ms >= row.max_total_ms);
}
