//! A short soak: VM `a` migrates back and forth between two test hosts three times under
//! lu-lite on three VMs, each time into a fresh QEMU and companion; the job's checksum must
//! equal a run without migration's, with nothing lost or duplicated (`vfmig bench soak` runs
//! the long one).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{image, init_logging, machine, RunDir};
use vfmig::lab::scenario::{ScenarioOptions, Workload};
use vfmig::lab::soak::{self, SoakOptions};
use vfmig::orchestrator::migrate::Quiet;

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_migrates_back_and_forth_three_times_and_the_job_keeps_its_result() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("soak");
    let migrations = 3;
    let opts = SoakOptions {
        base: ScenarioOptions {
            driver: Default::default(),
            workload: Workload::LuLite,
            vms: 3,
            strategy: None,
            mem_mib: 256,
            n: 256,
            iters: 150 + 1200 * migrations,
            migrate_at: 150,
            max_bandwidth: Some(128 << 20),
            run_dir: dir.path.clone(),
            accel: "tcg".into(),
            image: image(),
            vfmig_bin: PathBuf::from(env!("CARGO_BIN_EXE_vfmig")),
            timeout: Duration::from_secs(400),
            fault: None,
            trace: None,
        },
        migrations,
        dwell: Duration::from_secs(1),
        stall: Duration::from_secs(60),
    };
    let r = soak::run(&opts, &mut Quiet, |m| eprintln!("{m:?}")).expect("the soak ran");
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r.error, None);
    assert_eq!(r.migrations_done, migrations);
    assert_eq!(
        r.migrations_under_load, migrations,
        "the job ended before the soak did"
    );
    // `a` went to the far host and back, twice over.
    let hosts: Vec<(usize, usize)> = r.runs.iter().map(|m| (m.from_host, m.to_host)).collect();
    assert_eq!(hosts, [(0, 3), (3, 0), (0, 3)]);
    assert!(r.checksum_match, "{:?} vs {:?}", r.checksums, r.reference);
    assert_eq!(r.lost_ops, 0);
    assert_eq!(r.duplicate_ops, 0);
    assert!(soak::passed(&r));
}
