//! A real VF bound to vfio-pci, owned through vfmig's VFIO backend: inside an L1 guest under
//! TCG with an emulated IOMMU and SR-IOV NIC (`vfmig vf nested-test`, see
//! `src/orchestrator/nested.rs`). The host side needs the static vfmig from
//! `tools/build-static.sh` (the test command builds it).

mod common;

use std::process::Command;

use common::{machine, RunDir};

const VFMIG: &str = env!("CARGO_BIN_EXE_vfmig");

/// Every step, in order: L1's own, `vf check`, the self-test's (with `device_dma`: the VF
/// receives a frame into the mapped memfd), then the negative controls and the companion.
const STEPS: [&str; 16] = [
    "boot",
    "create_vfs",
    "bind_vfio_pci",
    "check",
    "open",
    "map_memfd",
    "read_config",
    "bus_master",
    "reset",
    "dirty_tracking",
    "device_dma",
    "unmap",
    "release",
    "dma_negative_control",
    "companion_owns_vf",
    "refuses_unbound_vf",
];

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn the_vfio_self_test_passes_on_an_emulated_sr_iov_vf_inside_l1() {
    let _m = machine();
    let dir = RunDir::new("vfio-nested");
    let out = Command::new(VFMIG)
        .args(["vf", "nested-test", "--work-dir"])
        .arg(&dir.path)
        .output()
        .expect("vfmig runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("some output");
    let v: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    let steps = v["steps"].as_object().expect("steps");
    let names: Vec<&str> = steps.keys().map(String::as_str).collect();
    assert_eq!(names, STEPS, "every step, named, in order");
    for (name, result) in steps {
        assert!(
            result.as_str().is_some_and(|r| r.starts_with("ok")),
            "{name}: {result}"
        );
        // each step was also printed as it finished
        assert!(
            stdout.contains(&format!("step {name}: ok")),
            "{name} not printed"
        );
    }
    // igb's VFs under plain vfio-pci cannot log their DMA: the fallback is announced.
    assert_eq!(v["dirty_tracking"], "all-writable-pages");
    assert_eq!(v["check"]["driver"], "vfio-pci");
    assert_eq!(v["check"]["dirty_tracking"], "all-writable-pages");
    // The device really wrote the mapped memory, at the GPA its descriptor named.
    assert!(
        stdout.contains("was written by the device at GPA 0x100801000 through the IOMMU"),
        "{stdout}"
    );
    assert_eq!(v["ok"], true);
    assert!(out.status.success());
}

/// The runner refuses a vfmig that could not run in L1's initramfs, before booting anything,
/// and says how to get the right one.
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_dynamically_linked_vfmig_is_refused_with_the_fix() {
    let dir = RunDir::new("vfio-nested-dynamic");
    let out = Command::new(VFMIG)
        .args(["vf", "nested-test", "--vfmig", VFMIG, "--work-dir"])
        .arg(&dir.path)
        .output()
        .expect("vfmig runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("dynamically linked"), "{stderr}");
    assert!(stderr.contains("tools/build-static.sh"), "{stderr}");
}
