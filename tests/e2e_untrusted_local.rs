//! Local input against a real companion serving a real guest: its sockets are private, and when
//! its vhost-user connection breaks, QEMU (`reconnect-ms`) gets a backend again and the guest's
//! NIC works again.
//!
//! The other local bounds (a SET_MEM_TABLE or SET_LOG_BASE larger than its memfd, a second
//! front-end connection to the same companion, the control socket's line and connection caps,
//! the generator's window, the guest's queues) are driven without QEMU by the unit tests of
//! `companion::{vhost_filter, control, generator, guest_link, vhost_net}` and `companion`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{demo_options, init_logging, machine, RunDir};
use vfmig::companion::control::{ControlClient, GuestEvent, Request};
use vfmig::lab::demo;
use vfmig::orchestrator::launch::{Role, RunningVm};
use vfmig::orchestrator::StrategyKind as Strategy;

/// The option files with QEMU told to reconnect to the companion 500 ms after a disconnect.
fn reconnecting_config(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-patches-free-config");
    let dst = dir.join("qemu-config");
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    let nic = dst.join("vhost-user-nic.args");
    let text = std::fs::read_to_string(&nic).unwrap();
    let changed = text.replace(
        "path={vhost_socket}",
        "path={vhost_socket},reconnect-ms=500",
    );
    assert_ne!(text, changed, "the NIC's chardev line moved");
    std::fs::write(&nic, changed).unwrap();
    dst
}

/// Polls `check` on the companion's `stats` until it holds or `timeout` passes.
fn wait_stats(
    ctl: &mut ControlClient,
    what: &str,
    timeout: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let start = Instant::now();
    loop {
        let stats = ctl.call(&Request::Stats).expect("stats");
        if check(&stats) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{what} not seen within {timeout:?}: {stats}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A frame sent to the guest lands in its receive buffers.
fn nic_delivers(ctl: &mut ControlClient) {
    let before = ctl.call(&Request::Stats).unwrap()["guest_link"]["frames_to_guest"]
        .as_u64()
        .unwrap();
    ctl.call(&Request::SendEvent {
        event: GuestEvent::Resume,
    })
    .expect("send_event");
    wait_stats(ctl, "the frame delivered", Duration::from_secs(30), |s| {
        s["guest_link"]["frames_to_guest"].as_u64().unwrap() > before
    });
}

/// Kills a child of this test on drop.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "end-to-end (real QEMU): `bash tools/test.sh` runs it"
)]
fn private_sockets_and_a_broken_vhost_user_connection_is_served_again() {
    let _m = machine();
    init_logging();
    let dir = RunDir::new("untrusted-local");
    let opts = demo_options(Strategy::Transparent, &dir);
    let mut spec = demo::vm_spec(&opts, "vm", Role::Source);
    spec.config_dir = Some(reconnecting_config(&dir.path));
    // The guest brings eth0 up (receive buffers posted) and opens the device once.
    spec.guest_args = "vfmig.run=none".into();
    let mut vm = RunningVm::launch(spec).expect("launch");
    vm.wait_guest_up(Duration::from_secs(120))
        .expect("guest up");

    let mut backend = vm.paths.vhost_socket.clone().into_os_string();
    backend.push(".backend");
    for socket in [
        vm.paths.vhost_socket.clone(),
        backend.into(),
        vm.paths.control_socket.clone(),
    ] {
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", socket.display());
    }

    let mut ctl = vm.control().expect("control socket");
    wait_stats(
        &mut ctl,
        "the guest's first frame",
        Duration::from_secs(120),
        |s| s["guest_link"]["frames_from_guest"].as_u64().unwrap() > 0,
    );
    nic_delivers(&mut ctl);

    // The companion goes away under QEMU and comes back on the same sockets.
    let pid = vm.companion_pid().expect("companion pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    drop(ctl);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let log = std::fs::File::create(dir.path.join("companion-restarted.log")).unwrap();
    let _companion = Owned(
        Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("restart the companion"),
    );
    let mut ctl = ControlClient::connect(&vm.paths.control_socket, Duration::from_secs(30))
        .expect("the restarted companion's control socket");
    // QEMU reconnects and hands over guest RAM again; the NIC delivers again.
    let start = Instant::now();
    loop {
        let status = ctl.status().expect("status");
        if status.vhost_connected && !status.regions.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "QEMU did not reconnect to the restarted companion: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    nic_delivers(&mut ctl);
    assert!(vm.qemu_running(), "QEMU survived the broken connection");
}
