//! The hardest case of the rule "never write guest RAM untracked while a migration runs": the
//! guest's driver starts the device *during* precopy. QEMU then acks LOG_ALL and sends the
//! memory table and the rings before SET_LOG_BASE, so the device's writes must be held until
//! the log is mapped. With real QEMU and a guest that boots while it migrates.

mod common;

use std::time::{Duration, Instant};

use common::{demo_options, init_logging, machine, RunDir};
use vfmig::companion::control::Request;
use vfmig::companion::generator::{compare, GeneratorConfig, SlotContent};
use vfmig::lab::demo::{self, free_port, window};
use vfmig::orchestrator::launch::Role;
use vfmig::orchestrator::migrate::{migrate, MigrateOptions, Quiet};
use vfmig::orchestrator::StrategyKind as Strategy;

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_device_started_during_precopy_loses_no_write() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("bind-during-precopy");
    let opts = demo_options(Strategy::Transparent, &dir);
    let src = demo::start_vm(&opts, "source", Role::Source).expect("source");
    let mut dst = demo::start_vm(&opts, "destination", Role::Destination).expect("destination");
    let mut ctl = src.control().unwrap();
    // The generator waits for guest RAM; it is armed before the guest has a driver. 1000
    // writes a second, so that precopy converges at 16 MiB/s.
    let window = window(256);
    ctl.call(&Request::GeneratorStart(GeneratorConfig {
        window,
        rate: 1000,
    }))
    .unwrap();
    let (src_qmp, dst_qmp) = (src.qmp().unwrap(), dst.qmp().unwrap());
    let started = Instant::now();
    let migration = std::thread::scope(|s| {
        let m = s.spawn(|| {
            migrate(
                &src_qmp,
                &dst_qmp,
                &MigrateOptions {
                    uri: format!("tcp:127.0.0.1:{}", free_port()),
                    // Slow enough that the guest boots and binds its NIC inside precopy, fast
                    // enough to converge with the device rewriting 1000 pages a second.
                    max_bandwidth: Some(16 << 20),
                    downtime_limit_ms: Some(500),
                    timeout: Duration::from_secs(180),
                    ..Default::default()
                },
                &mut Quiet,
            )
        });
        // Watch the source companion: guest RAM must arrive while QEMU is migrating.
        let mut saw_memory_while_migrating = false;
        let mut mem_before_migration = None;
        while !m.is_finished() {
            let st = ctl.call(&Request::Stats).unwrap();
            let status = ctl.call(&Request::Status).unwrap();
            let has_mem = status["regions"].as_array().is_some_and(|r| !r.is_empty());
            if mem_before_migration.is_none() {
                mem_before_migration = Some(has_mem);
            }
            if has_mem && st["log_requested"] == true {
                saw_memory_while_migrating = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (
            m.join().unwrap(),
            mem_before_migration,
            saw_memory_while_migrating,
        )
    });
    let (summary, mem_before, saw) = migration;
    let summary = summary.expect("migration");
    eprintln!(
        "migration {} ms after launch: {}",
        started.elapsed().as_millis(),
        serde_json::to_string(&summary).unwrap()
    );
    assert_eq!(
        mem_before,
        Some(false),
        "the guest bound its NIC before the migration began; the test did not test the case"
    );
    assert!(saw, "the device never ran while QEMU was logging");

    let stats = ctl.call(&Request::Stats).unwrap();
    ctl.call(&Request::GeneratorStop).unwrap();
    let ledger = ctl.call(&Request::Ledger).unwrap();
    let versions: Vec<u64> = serde_json::from_value(ledger["versions"].clone()).unwrap();
    eprintln!("source stats: {stats}");
    dst.wait_guest_up(Duration::from_secs(60)).unwrap();
    let mut dctl = dst.control().unwrap();
    let found: Vec<SlotContent> =
        serde_json::from_value(dctl.call(&Request::Scan { window }).unwrap()["slots"].clone())
            .unwrap();
    let verdict = compare(&versions, &found);
    assert!(verdict.records_written >= 1000, "{verdict:?}");
    assert_eq!(verdict.lost_writes, 0, "{verdict:?}");
    assert_eq!(stats["dma"]["untracked_writes"], 0);
}
