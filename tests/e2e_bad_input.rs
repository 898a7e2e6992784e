//! Bad input against a real companion serving a real guest: it refuses with a clear error,
//! writes nothing, and keeps serving.

mod common;

use std::time::Duration;

use common::{demo_options, init_logging, machine, RunDir};
use vfmig::companion::control::{to_hex, ControlError, Request};
use vfmig::companion::generator::{GeneratorConfig, Window};
use vfmig::lab::demo;
use vfmig::orchestrator::launch::Role;
use vfmig::orchestrator::StrategyKind as Strategy;

fn refused(r: Result<serde_json::Value, ControlError>) -> String {
    match r {
        Err(ControlError::Refused { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_running_companion_refuses_bad_input_and_keeps_serving() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("bad-input");
    let opts = demo_options(Strategy::Transparent, &dir);
    let mut vm = demo::start_vm(&opts, "vm", Role::Source).expect("launch");
    vm.wait_guest_up(Duration::from_secs(120))
        .expect("guest up");
    let mut ctl = vm.control().expect("control socket");

    let status = ctl.call(&Request::Status).unwrap();
    let regions = status["regions"].as_array().unwrap().clone();
    let end = regions
        .iter()
        .map(|r| r["gpa"].as_u64().unwrap() + r["size"].as_u64().unwrap())
        .max()
        .unwrap();

    // A write far outside guest RAM, and one that straddles its end.
    let before = ctl
        .call(&Request::Read {
            gpa: end - 8,
            len: 8,
        })
        .unwrap()["hex"]
        .clone();
    for gpa in [64u64 << 30, end - 8] {
        let msg = refused(ctl.call(&Request::Write {
            gpa,
            hex: to_hex(&[0xEE; 16]),
        }));
        assert!(msg.contains("outside guest RAM"), "{msg}");
        assert!(msg.contains("nothing was written"), "{msg}");
    }
    let after = ctl
        .call(&Request::Read {
            gpa: end - 8,
            len: 8,
        })
        .unwrap()["hex"]
        .clone();
    assert_eq!(before, after, "a refused write changed guest RAM");
    let stats = ctl.call(&Request::Stats).unwrap();
    assert_eq!(stats["dma"]["writes"], 0);
    assert_eq!(stats["dma"]["refused_out_of_range"], 2);

    // Malformed requests get error replies on the same connection.
    for bad in [
        "this is not json",
        r#"{"cmd":"self_destruct"}"#,
        r#"{"cmd":"read","gpa":"zero","len":1}"#,
        r#"{"cmd":"write","gpa":4096,"hex":"zz"}"#,
    ] {
        let msg = refused(ctl.call_raw(bad, "?"));
        assert!(!msg.is_empty());
    }
    // A generator aimed outside guest RAM stops with the reason, not a crash.
    ctl.call(&Request::GeneratorStart(GeneratorConfig {
        window: Window {
            gpa: 64 << 30,
            slots: 4,
            stride: 4096,
            record_size: 64,
        },
        rate: 100,
    }))
    .unwrap();
    let mut error = None;
    for _ in 0..100 {
        let s = ctl.call(&Request::Stats).unwrap();
        if let Some(e) = s["generator"]["error"].as_str() {
            error = Some(e.to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(error
        .expect("generator error")
        .contains("outside guest RAM"));

    // Still serving: a valid write lands and reads back; QEMU and the guest still run.
    ctl.call(&Request::Write {
        gpa: 0x1800_0000,
        hex: to_hex(b"vfmig"),
    })
    .unwrap();
    let back = ctl
        .call(&Request::Read {
            gpa: 0x1800_0000,
            len: 5,
        })
        .unwrap();
    assert_eq!(back["hex"], to_hex(b"vfmig"));
    assert!(vm.qemu_running());
    let status = vm.qmp().unwrap().query_status().unwrap();
    assert!(status.running, "the guest stopped: {status:?}");
}
