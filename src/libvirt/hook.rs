//! The libvirt `qemu` hook: the companion's life tied to its domain's.
//!
//! libvirt runs `/etc/libvirt/hooks/qemu DOMAIN OPERATION SUB-OPERATION EXTRA` with the
//! domain's XML on stdin, and waits for it. vfmig's hook (`vfmig libvirt hook`, installed by
//! `vfmig libvirt install-hook`) acts on two operations of domains that carry vfmig metadata:
//! - `migrate`, first on the destination of an incoming migration: it marks the domain as
//!   incoming (a file `incoming` beside its socket), for `prepare`;
//! - `prepare`, before libvirt starts QEMU, for a start and for an incoming migration alike:
//!   it starts the domain's companion, detached from the hook, and returns once the companion
//!   listens on the domain's vhost-user socket (QEMU, the vhost-user client, then finds it).
//!   For an incoming migration the companion starts with `--incoming`: it gets the VF's state
//!   from the source's companion at the switchover (the companions' handoff). If the companion
//!   cannot start, the hook fails with the reason and libvirt does not start QEMU.
//! - `release`, after QEMU is gone (stopped, crashed, or migrated away): it asks the companion
//!   to quit, and stops it if it does not.
//!
//! The companion's files live beside the domain's socket: `control.sock`, `companion.log`,
//! `companion.pid`, and after `release` its last statistics, `last-stats.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::domain::{self, DomainError, VfmigDomain};
use super::host::HostConfig;
use crate::companion::control::{ControlClient, Request};

/// How long `prepare` waits for the companion's socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `release` waits for the companion to quit before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the hook failed (libvirt shows the message).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The domain's XML is not a usable vfmig domain.
    #[error("vfmig hook: {0}")]
    Domain(#[from] DomainError),
    /// The domain wants a fabric but the host has no fabric address.
    #[error(
        "vfmig hook: domain {0} has a fabric port but this host has no fabric address: set \
         \"fabric_address\" in {path}",
        path = HostConfig::path().display()
    )]
    NoFabricAddress(String),
    /// The companion's directory could not be made.
    #[error("vfmig hook: cannot create {path} for the companion of domain {domain}")]
    Dir {
        /// The domain.
        domain: String,
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The companion could not be started.
    #[error("vfmig hook: cannot start the companion of domain {domain} ({bin})")]
    Spawn {
        /// The domain.
        domain: String,
        /// The binary.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The companion exited, or never listened, before QEMU could connect.
    #[error(
        "vfmig hook: the companion of domain {domain} is not serving {socket}: {why}; its log \
         {log} ends with: {tail}"
    )]
    NotServing {
        /// The domain.
        domain: String,
        /// Its socket.
        socket: PathBuf,
        /// What happened.
        why: String,
        /// The log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
}

/// What the hook does for one call.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Start the domain's companion with these arguments (after the binary).
    Start {
        /// The domain.
        domain: VfmigDomain,
        /// `vfmig` arguments.
        args: Vec<String>,
    },
    /// Stop the domain's companion.
    Stop(VfmigDomain),
    /// An incoming migration begins: the companion `prepare` starts is the destination's.
    MarkIncoming(VfmigDomain),
    /// Not a vfmig domain, or an operation vfmig does not act on.
    Nothing,
}

/// The companion's directory (beside its socket).
fn dir_of(d: &VfmigDomain) -> PathBuf {
    d.socket
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The companion's control socket.
pub fn control_socket(d: &VfmigDomain) -> PathBuf {
    dir_of(d).join("control.sock")
}

/// The mark `migrate` leaves for `prepare`: the domain migrates in.
fn incoming_mark(d: &VfmigDomain) -> PathBuf {
    dir_of(d).join("incoming")
}

/// `migrate`: marks the domain as incoming.
pub fn mark_incoming(d: &VfmigDomain) -> Result<(), HookError> {
    let dir = dir_of(d);
    let dir_err = |source| HookError::Dir {
        domain: d.name.clone(),
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(dir_err)?;
    std::fs::write(incoming_mark(d), b"").map_err(dir_err)
}

/// Whether the domain migrates in; the mark is taken (a later start is a fresh start).
pub fn take_incoming_mark(d: &VfmigDomain) -> bool {
    std::fs::remove_file(incoming_mark(d)).is_ok()
}

/// What to do for `operation` on a domain with this XML.
pub fn plan(operation: &str, xml: &str, host: &HostConfig) -> Result<Plan, HookError> {
    if !matches!(operation, "prepare" | "release" | "migrate") {
        return Ok(Plan::Nothing);
    }
    let Some(d) = domain::read(xml)? else {
        return Ok(Plan::Nothing);
    };
    match operation {
        "release" => return Ok(Plan::Stop(d)),
        "migrate" => return Ok(Plan::MarkIncoming(d)),
        _ => {}
    }
    let s = |p: &Path| p.display().to_string();
    let mut args = vec![
        "companion".to_string(),
        "--name".into(),
        d.name.clone(),
        "--socket".into(),
        s(&d.socket),
        "--control".into(),
        s(&control_socket(&d)),
    ];
    let c = &d.companion;
    if let Some(port) = c.fabric_port {
        let addr = host
            .fabric_address
            .as_ref()
            .ok_or_else(|| HookError::NoFabricAddress(d.name.clone()))?;
        args.extend(["--fabric-listen".into(), format!("{addr}:{port}")]);
        if let Some(cluster) = &c.cluster {
            args.extend(["--cluster".into(), s(cluster)]);
        }
        if let Some(key) = &c.fabric_key {
            args.extend(["--fabric-key".into(), s(key)]);
        }
        if c.insecure_fabric {
            args.push("--insecure-fabric".into());
        }
    }
    if c.unsafe_no_tracking {
        args.push("--unsafe-no-tracking".into());
    }
    Ok(Plan::Start { domain: d, args })
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Whether process `pid` still runs (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Starts the companion (detached: its own process group, its output in its log) and waits
/// until it listens on the domain's socket.
pub fn start(bin: &Path, d: &VfmigDomain, args: &[String]) -> Result<(), HookError> {
    let dir = dir_of(d);
    std::fs::create_dir_all(&dir).map_err(|source| HookError::Dir {
        domain: d.name.clone(),
        path: dir.clone(),
        source,
    })?;
    // Taken first: stopping a companion left from an earlier run clears the mark.
    let incoming = take_incoming_mark(d);
    // A companion left from an earlier run of this domain would hold the socket: it goes.
    stop(d);
    let args: Vec<String> = args
        .iter()
        .cloned()
        .chain(incoming.then(|| "--incoming".to_string()))
        .collect();
    let _ = std::fs::remove_file(&d.socket);
    let log = dir.join("companion.log");
    let spawn_err = |source| HookError::Spawn {
        domain: d.name.clone(),
        bin: bin.into(),
        source,
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(spawn_err)?;
    let err = out.try_clone().map_err(spawn_err)?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(spawn_err)?
    };
    let _ = std::fs::write(dir.join("companion.pid"), format!("{}\n", child.id()));
    let not_serving = |why: String| HookError::NotServing {
        domain: d.name.clone(),
        socket: d.socket.clone(),
        why,
        log: log.clone(),
        tail: tail(&log),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        // The stale socket was removed above: a socket there now is the companion's, bound and
        // listening (a probe connection would look like a QEMU that came and went).
        if std::fs::metadata(&d.socket).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            tracing::info!(domain = %d.name, pid = child.id(), incoming, "companion started for the domain");
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(not_serving(format!("it exited ({status})")));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(not_serving(format!(
                "no socket within {} s",
                START_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where [`stop`] keeps the companion's last statistics.
pub fn last_stats_path(d: &VfmigDomain) -> PathBuf {
    dir_of(d).join("last-stats.json")
}

/// Keeps what the companion knows at the end in `last-stats.json` beside its socket: its
/// statistics (device writes, dirty pages, quiesce) and, if its traffic generator ran, the
/// generator's ledger (the last version of every record that landed), for whoever profiles
/// or checks the migration after the companion is gone.
fn keep_last_stats(d: &VfmigDomain, c: &mut ControlClient) {
    let stats = c.call(&Request::Stats).unwrap_or(serde_json::Value::Null);
    let ledger = c.call(&Request::Ledger).unwrap_or(serde_json::Value::Null);
    let text = serde_json::json!({ "stats": stats, "ledger": ledger }).to_string();
    if let Err(e) = std::fs::write(last_stats_path(d), text) {
        tracing::warn!(domain = %d.name, error = %e, "cannot keep the companion's last statistics");
    }
}

/// Stops the domain's companion: `quit` over its control socket, then SIGTERM and SIGKILL to
/// the pid in its pid file if it is still there. Never fails: what could not be done is logged.
pub fn stop(d: &VfmigDomain) {
    let dir = dir_of(d);
    let pid_file = dir.join("companion.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    if let Ok(mut c) = ControlClient::connect(&control_socket(d), Duration::from_secs(2)) {
        keep_last_stats(d, &mut c);
        if let Err(e) = c.quit() {
            tracing::warn!(domain = %d.name, error = %e, "the companion did not take `quit`");
        }
    }
    if let Some(pid) = pid {
        for signal in [None, Some(libc::SIGTERM), Some(libc::SIGKILL)] {
            if let Some(sig) = signal {
                if !alive(pid) {
                    break;
                }
                // SAFETY: kill(2) with a pid read from the companion's own pid file and a
                // valid signal number; it touches no memory of this process.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !alive(pid) {
                break;
            }
        }
        if alive(pid) {
            tracing::warn!(domain = %d.name, pid, "the companion would not stop");
        }
    }
    let _ = std::fs::remove_file(pid_file);
    let _ = std::fs::remove_file(incoming_mark(d));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::domain::{to_xml, CompanionSettings, DomainSpec};

    fn xml(companion: CompanionSettings) -> String {
        to_xml(&DomainSpec {
            name: "a".into(),
            domain_type: "qemu".into(),
            memory_mib: 256,
            vcpus: 1,
            mac: "52:54:00:00:00:01".into(),
            run_dir: "/run/vfmig".into(),
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            kernel: None,
            disk: None,
            serial_log: None,
            companion,
        })
    }

    fn host() -> HostConfig {
        HostConfig {
            fabric_address: Some("10.0.0.1".into()),
            run_dir: None,
        }
    }

    #[test]
    fn prepare_starts_the_companion_with_the_domains_settings_and_release_stops_it() {
        let x = xml(CompanionSettings {
            fabric_port: Some(7000),
            cluster: Some("/etc/vfmig/c.json".into()),
            fabric_key: Some("/etc/vfmig/a.key".into()),
            insecure_fabric: false,
            unsafe_no_tracking: true,
        });
        let Plan::Start { domain, args } = plan("prepare", &x, &host()).unwrap() else {
            panic!("prepare must start the companion");
        };
        assert_eq!(domain.name, "a");
        assert_eq!(
            args.join(" "),
            "companion --name a --socket /run/vfmig/a/vhost-user.sock --control \
             /run/vfmig/a/control.sock --fabric-listen 10.0.0.1:7000 --cluster \
             /etc/vfmig/c.json --fabric-key /etc/vfmig/a.key --unsafe-no-tracking"
        );
        assert!(matches!(plan("release", &x, &host()).unwrap(), Plan::Stop(d) if d.name == "a"));
        assert!(
            matches!(plan("migrate", &x, &host()).unwrap(), Plan::MarkIncoming(d) if d.name == "a")
        );
        for op in ["start", "started", "stopped", "reconnect"] {
            assert_eq!(plan(op, &x, &host()).unwrap(), Plan::Nothing, "{op}");
        }
    }

    #[test]
    fn other_domains_are_left_alone_and_a_fabric_without_a_host_address_is_refused() {
        let plain = "<domain type='kvm'><name>web</name><devices/></domain>";
        assert_eq!(plan("prepare", plain, &host()).unwrap(), Plan::Nothing);
        let x = xml(CompanionSettings {
            fabric_port: Some(7000),
            ..Default::default()
        });
        let e = plan("prepare", &x, &HostConfig::default()).unwrap_err();
        assert!(
            matches!(&e, HookError::NoFabricAddress(n) if n == "a"),
            "{e}"
        );
        assert!(e.to_string().contains("fabric_address"));
    }

    #[test]
    fn the_mark_of_an_incoming_migration_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = VfmigDomain {
            name: "a".into(),
            socket: dir.path().join("a").join("vhost-user.sock"),
            companion: CompanionSettings::default(),
        };
        assert!(!take_incoming_mark(&d), "a start");
        mark_incoming(&d).unwrap();
        assert!(take_incoming_mark(&d), "the migration's prepare");
        assert!(!take_incoming_mark(&d), "the next start is a fresh one");
    }

    #[test]
    fn a_companion_that_exits_at_once_fails_the_start_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let d = VfmigDomain {
            name: "a".into(),
            socket: dir.path().join("a").join("vhost-user.sock"),
            companion: CompanionSettings::default(),
        };
        // `false` exits 1 without listening.
        let e = start(Path::new("/bin/false"), &d, &[]).unwrap_err();
        assert!(
            matches!(&e, HookError::NotServing { why, .. } if why.contains("exited")),
            "{e}"
        );
    }
}
