//! The passthrough VF's unplug and plug, against a real QEMU and a real guest, where they go
//! wrong: a guest that does not release the VF, and a destination with no slot for it. An
//! emulated PCIe NIC stands in for the vfio-pci VF: the QMP commands are the same.

mod common;

use std::time::Duration;

use common::{demo_options, init_logging, machine, RunDir};
use vfmig::lab::demo::free_port;
use vfmig::orchestrator::hotplug::{self, Hotplug, HotplugError};
use vfmig::orchestrator::launch::{
    mac_for, stand_in_vf_device, PassthroughSlot, Role, RunningVm, PASSTHROUGH_DEVICE,
};
use vfmig::orchestrator::migrate::{migrate, MigrateError, MigrateOptions, Quiet};
use vfmig::orchestrator::StrategyKind as Strategy;
use vfmig::qmp::QmpClient;

fn vm(dir: &RunDir, name: &str, role: Role) -> RunningVm {
    let opts = demo_options(Strategy::PassthroughHotplug, dir);
    let mut spec = vfmig::lab::demo::vm_spec(&opts, name, role);
    spec.passthrough = Some(PassthroughSlot {
        device: (role == Role::Source).then(|| stand_in_vf_device(&mac_for("vf"))),
    });
    RunningVm::launch(spec).expect("VM started")
}

/// A source VM whose guest is up with its driver on the stand-in VF, and its QMP.
fn source_with_vf_up(dir: &RunDir) -> (RunningVm, QmpClient) {
    let mut src = vm(dir, "source", Role::Source);
    src.wait_guest_up(Duration::from_secs(120))
        .expect("guest up");
    let sq = src.qmp().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !hotplug::driver_up(&sq, PASSTHROUGH_DEVICE) {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never enabled the VF"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (src, sq)
}

fn hotplug_to(bus: &str) -> Hotplug {
    let mut device = hotplug::device_args(&stand_in_vf_device(&mac_for("vf"))).unwrap();
    device.insert("bus".into(), bus.into());
    Hotplug {
        device_id: PASSTHROUGH_DEVICE.into(),
        destination_device: device,
        source_device: None,
        detach_timeout: Duration::from_secs(3),
        attach_timeout: Duration::from_secs(10),
    }
}

/// A guest that cannot answer the unplug (here: paused) keeps the VF: the migration must not
/// start, the error must say why, and once the guest runs again the VF is still usable
/// (the pending unplug then completes, as QEMU does it).
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_guest_that_does_not_release_the_vf_stops_the_migration_before_precopy() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("hotplug-not-released");
    let (mut src, sq) = source_with_vf_up(&dir);
    let dst = vm(&dir, "destination", Role::Destination);
    let dq = dst.qmp().unwrap();
    sq.execute("stop", None).unwrap();
    let err = migrate(
        &sq,
        &dq,
        &MigrateOptions {
            uri: format!("tcp:127.0.0.1:{}", free_port()),
            strategy: vfmig::orchestrator::Strategy::PassthroughHotplug {
                ranks: vec![],
                hotplug: hotplug_to(vfmig::orchestrator::launch::PASSTHROUGH_PORT),
            },
            timeout: Duration::from_secs(60),
            ..Default::default()
        },
        &mut Quiet,
    )
    .expect_err("the guest cannot release the VF while paused");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, MigrateError::Detach(_)), "{err:?}");
    assert!(msg.contains("did not release device `vfmig-vf`"), "{msg}");
    assert!(msg.contains("Nothing was migrated"), "{msg}");
    // Nothing was migrated: the source never started a migration.
    let info = sq.query_migrate().unwrap();
    assert!(info.status.is_none(), "{info:?}");
    sq.execute("cont", None).unwrap();
    assert!(src.qemu_running());
}

/// A destination without a slot for the VF: the migration completes (the VM runs there), and
/// the error says the plug failed and what to do.
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_destination_without_a_vf_slot_reports_the_failed_plug_after_the_migration() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("hotplug-no-slot");
    let (_src, sq) = source_with_vf_up(&dir);
    let dst = vm(&dir, "destination", Role::Destination);
    let dq = dst.qmp().unwrap();
    let err = migrate(
        &sq,
        &dq,
        &MigrateOptions {
            uri: format!("tcp:127.0.0.1:{}", free_port()),
            strategy: vfmig::orchestrator::Strategy::PassthroughHotplug {
                ranks: vec![],
                hotplug: hotplug_to("no-such-port"),
            },
            timeout: Duration::from_secs(120),
            ..Default::default()
        },
        &mut Quiet,
    )
    .expect_err("there is no bus no-such-port at the destination");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, MigrateError::Attach(_)), "{err:?}");
    assert!(msg.contains("the VM runs at the destination"), "{msg}");
    assert!(msg.contains("device_add"), "{msg}");
    assert!(dq.query_status().unwrap().running, "the destination runs");
    // The source's copy of the VF was unplugged before precopy.
    assert!(!hotplug::driver_up(&sq, PASSTHROUGH_DEVICE));
}

/// The detach half alone, against a running guest: it releases the VF, QEMU says so, and the
/// plug brings it back with its driver up.
#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn a_running_guest_releases_and_takes_back_the_vf() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("hotplug-roundtrip");
    let (_src, sq) = source_with_vf_up(&dir);
    let took = hotplug::detach(&sq, PASSTHROUGH_DEVICE, Duration::from_secs(30)).expect("detach");
    assert!(!hotplug::driver_up(&sq, PASSTHROUGH_DEVICE));
    let device = hotplug::device_args(&stand_in_vf_device(&mac_for("vf"))).unwrap();
    let (back, addr) = hotplug::attach(&sq, &device, Duration::from_secs(30)).expect("attach");
    eprintln!("detach {took:?}, attach {back:?} at {addr:?}");
    assert!(hotplug::driver_up(&sq, PASSTHROUGH_DEVICE));
    // A second plug of the same id is refused by QEMU with a clear error.
    match hotplug::attach(&sq, &device, Duration::from_secs(5)) {
        Err(HotplugError::Qmp { command, source }) => {
            assert_eq!(command, "device_add");
            assert!(source.to_string().contains("vfmig-vf"), "{source}");
        }
        other => panic!("a duplicate id must be refused: {other:?}"),
    }
}
