//! Recovery after QEMU's `completed`: the destination's companion is killed between the
//! completion and the VF takeover. The source companion takes its VF state back, the
//! destination QEMU is stopped and the source VM resumes from `postmigrate`; lu-lite on two VMs
//! finishes on the source with the reference run's checksums, nothing lost or applied twice.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{image, init_logging, machine, RunDir};
use vfmig::lab::scenario::{self, Fault, ScenarioOptions, ScenarioReport, Workload};
use vfmig::orchestrator::migrate::{Observer, Phase, Quiet};
use vfmig::orchestrator::StrategyKind as Strategy;

fn options(migrate: bool, dir: &RunDir) -> ScenarioOptions {
    ScenarioOptions {
        driver: Default::default(),
        workload: Workload::LuLite,
        vms: 2,
        strategy: migrate.then_some(Strategy::Transparent),
        mem_mib: 256,
        n: 128,
        iters: 1200,
        migrate_at: 100,
        max_bandwidth: Some(128 << 20),
        run_dir: dir.path.clone(),
        accel: "tcg".into(),
        image: image(),
        vfmig_bin: PathBuf::from(env!("CARGO_BIN_EXE_vfmig")),
        timeout: Duration::from_secs(300),
        // The scenario reports a failed migration only when a fault was injected; this one
        // (a cancel long after the migration is over) changes nothing: the fault of this test
        // is the companion killed by `KillAtTakeover`.
        fault: migrate.then_some((Fault::Cancel, Duration::from_secs(90))),
        trace: None,
    }
}

fn reference() -> &'static ScenarioReport {
    static REFERENCE: OnceLock<ScenarioReport> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = RunDir::new("recovery-reference");
        scenario::run(&options(false, &dir), &mut Quiet).expect("reference run")
    })
}

/// Kills the destination's companion when the state machine enters step 6 (QEMU has
/// reported `completed`; the VF takeover comes next).
struct KillAtTakeover {
    pid_file: PathBuf,
    killed: bool,
}

impl Observer for KillAtTakeover {
    fn phase(&mut self, phase: Phase) {
        if phase != Phase::DestinationUp || self.killed {
            return;
        }
        let pid: i32 = std::fs::read_to_string(&self.pid_file)
            .expect("the destination companion's pid file")
            .trim()
            .parse()
            .expect("a pid");
        tracing::warn!(
            pid,
            "killing the destination's companion between completed and takeover"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}/status")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| !s.contains("State:\tZ"))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.killed = true;
    }
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn the_destination_companion_killed_after_completed_resumes_the_source_and_loses_nothing() {
    let _m = machine();
    init_logging();
    let reference = reference();
    let dir = RunDir::new("recovery");
    let opts = options(true, &dir);
    let mut observer = KillAtTakeover {
        pid_file: dir.path.join("a-dest").join("companion.pid"),
        killed: false,
    };
    let r = scenario::run(&opts, &mut observer).expect("the scenario ran");
    eprintln!(
        "error {:?}; checksums {:?} (reference {:?}); lost {} duplicated {}",
        r.migration_error, r.checksums, reference.checksums, r.lost_ops, r.duplicate_ops
    );
    assert!(observer.killed, "the migration reached the takeover");
    let error = r.migration_error.clone().expect("the migration failed");
    assert!(error.contains("the VF could not move"), "{error}");
    assert!(error.contains("the source VM was resumed"), "{error}");
    assert!(r.checksums.values().all(Option::is_some), "{r:?}");
    assert_eq!(r.checksums, reference.checksums, "the job's result changed");
    assert_eq!(r.lost_ops, 0);
    assert_eq!(r.duplicate_ops, 0);
}
