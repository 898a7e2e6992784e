//! libvirt drives the migration: two libvirt hosts (each a libvirtd in its own network, mount
//! and UTS namespaces), a vfmig domain whose companion vfmig's `qemu` hook starts and stops,
//! the companion's generator writing guest RAM as a device, and `virsh migrate --live --p2p`.
//! No vfmig command takes part in the migration: the device writes reach the destination only
//! because the companion logs them into QEMU's dirty log, whoever drives QEMU.

mod common;

use common::{image, init_logging, machine, RunDir};
use vfmig::lab::libvirt_demo::{run, LibvirtDemoOptions};

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
