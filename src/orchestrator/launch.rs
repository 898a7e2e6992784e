//! Launching a VM: its companion first, then a stock QEMU wired to it, everything in one run
//! directory (sockets, serial log, logs, pid files).
//!
//! The QEMU options come from `qemu-patches-free-config/` (compiled in; `config_dir` overrides).
//! `spec.rs` holds what a VM is launched from, `qemu_args.rs` builds QEMU's command line; this
//! file starts and supervises the two processes.

mod qemu_args;
mod spec;

pub use qemu_args::{parse_args, qemu_args};
pub use spec::{
    mac_for, stand_in_vf_device, FabricSpec, GuestImage, IpNic, Nic, PassthroughSlot, Role,
    RunPaths, VmSpec, PASSTHROUGH_DEVICE, PASSTHROUGH_PORT,
};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::companion::control::{ControlClient, ControlError};
use crate::qmp::{QmpClient, QmpError};

/// Errors of launching or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The run directory could not be prepared.
    #[error("VM {vm}: cannot prepare run directory {dir}: check its parent and permissions")]
    RunDir {
        /// The VM.
        vm: String,
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("VM {vm}: cannot start {what} ({program}): check that it is installed and runnable")]
    Spawn {
        /// The VM.
        vm: String,
        /// Companion or QEMU.
        what: &'static str,
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A process exited while starting.
    #[error("VM {vm}: {what} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    Died {
        /// The VM.
        vm: String,
        /// Companion or QEMU.
        what: &'static str,
        /// Its exit status.
        status: String,
        /// Its log.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// A config file is wrong.
    #[error("QEMU option file {file}: {reason}")]
    Config {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A config file of `config_dir` could not be read.
    #[error("cannot read QEMU option file {}: check --config-dir", file.display())]
    ConfigRead {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file of the guest image is missing.
    #[error(
        "guest image file {} is missing: run `bash tools/setup.sh` (as root) first",
        file.display()
    )]
    NoGuestImage {
        /// The missing file.
        file: PathBuf,
    },
    /// The guest did not start its NIC in time.
    #[error(
        "VM {vm}: the guest did not start the vhost-user NIC within {secs} s (no SET_MEM_TABLE); \
         see the serial log {serial}"
    )]
    GuestNotUp {
        /// The VM.
        vm: String,
        /// Seconds waited.
        secs: u64,
        /// The guest's console.
        serial: PathBuf,
    },
    /// QMP failed.
    #[error("VM {vm}: talking to QEMU over QMP failed")]
    Qmp {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// The companion's control socket failed.
    #[error("VM {vm}: talking to the companion over its control socket failed")]
    Control {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: ControlError,
    },
}

/// A VM and its companion, running. Dropping it stops both.
pub struct RunningVm {
    /// Its spec.
    pub spec: VmSpec,
    /// Its files.
    pub paths: RunPaths,
    companion: Option<Child>,
    qemu: Option<Child>,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl RunningVm {
    /// Starts the companion, waits until it listens, then starts QEMU and waits for QMP.
    pub fn launch(spec: VmSpec) -> Result<Self, LaunchError> {
        let paths = RunPaths::under(&spec.run_dir);
        std::fs::create_dir_all(&spec.run_dir).map_err(run_dir_error(&spec))?;
        for s in [
            &paths.vhost_socket,
            &paths.control_socket,
            &paths.qmp_socket,
        ] {
            let _ = std::fs::remove_file(s);
        }
        let qemu_args = qemu_args(&spec, &paths)?;

        let mut me = Self {
            spec,
            paths,
            companion: None,
            qemu: None,
        };
        if me.spec.nic == Nic::VhostUser {
            me.start_companion()?;
            let socket = me.paths.vhost_socket.clone();
            me.wait_for_file(&socket, "companion", Duration::from_secs(10))?;
        }
        me.start_qemu(&qemu_args)?;
        me.wait_for_file(
            &me.paths.qmp_socket.clone(),
            "QEMU",
            Duration::from_secs(30),
        )?;
        tracing::info!(vm = %me.spec.name, role = ?me.spec.role, dir = %me.paths.dir.display(), "VM launched");
        Ok(me)
    }

    /// Starts the companion, logging to `companion.log`, and writes its pid file.
    fn start_companion(&mut self) -> Result<(), LaunchError> {
        let spec = &self.spec;
        let dir_err = run_dir_error(spec);
        let log = File::create(&self.paths.companion_log).map_err(&dir_err)?;
        let log2 = log.try_clone().map_err(&dir_err)?;
        let mut cmd = in_netns(&spec.netns, &spec.vfmig_bin.display().to_string());
        cmd.arg("companion");
        if let Some(f) = &spec.fabric {
            cmd.arg("--fabric-listen")
                .arg(&f.listen)
                .arg("--cluster")
                .arg(&f.cluster);
            match &f.key {
                Some(key) => cmd.arg("--fabric-key").arg(key),
                None => cmd.arg("--insecure-fabric"),
            };
            // A destination's companion gets the VF's state from the source's, at switchover.
            if spec.role == Role::Destination && !f.no_handoff {
                cmd.arg("--incoming");
            }
            if f.untracked {
                cmd.arg("--unsafe-no-tracking");
            }
        }
        let companion = cmd
            .arg("--name")
            .arg(&spec.name)
            .arg("--socket")
            .arg(&self.paths.vhost_socket)
            .arg("--control")
            .arg(&self.paths.control_socket)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                vm: spec.name.clone(),
                what: "companion",
                program: spec.vfmig_bin.display().to_string(),
                source,
            })?;
        let _ = std::fs::write(&self.paths.companion_pid, format!("{}\n", companion.id()));
        self.companion = Some(companion);
        Ok(())
    }

    /// Starts QEMU with `args`, logging to `qemu.log`.
    fn start_qemu(&mut self, args: &[String]) -> Result<(), LaunchError> {
        let spec = &self.spec;
        let dir_err = run_dir_error(spec);
        let qlog = File::create(&self.paths.qemu_log).map_err(&dir_err)?;
        let qemu = in_netns(&spec.netns, &spec.qemu_bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(qlog.try_clone().map_err(&dir_err)?)
            .stderr(qlog)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                vm: spec.name.clone(),
                what: "QEMU",
                program: spec.qemu_bin.clone(),
                source,
            })?;
        self.qemu = Some(qemu);
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), LaunchError> {
        let vm = self.spec.name.clone();
        for (what, child, log) in [
            ("companion", &mut self.companion, &self.paths.companion_log),
            ("QEMU", &mut self.qemu, &self.paths.qemu_log),
        ] {
            if let Some(c) = child {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(LaunchError::Died {
                        vm,
                        what,
                        status: status.to_string(),
                        log: log.clone(),
                        tail: tail(log, 15),
                    });
                }
            }
        }
        Ok(())
    }

    fn wait_for_file(
        &mut self,
        path: &Path,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if path.exists() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(LaunchError::Died {
                    vm: self.spec.name.clone(),
                    what,
                    status: format!("no {} after {} s", path.display(), timeout.as_secs()),
                    log: self.paths.companion_log.clone(),
                    tail: tail(&self.paths.companion_log, 15),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A QMP connection to this VM's QEMU.
    pub fn qmp(&self) -> Result<QmpClient, LaunchError> {
        QmpClient::connect(&self.paths.qmp_socket, Duration::from_secs(30)).map_err(|source| {
            LaunchError::Qmp {
                vm: self.spec.name.clone(),
                source,
            }
        })
    }

    /// A connection to this VM's companion.
    pub fn control(&self) -> Result<ControlClient, LaunchError> {
        ControlClient::connect(&self.paths.control_socket, Duration::from_secs(10)).map_err(
            |source| LaunchError::Control {
                vm: self.spec.name.clone(),
                source,
            },
        )
    }

    /// Waits until the guest's driver has started the NIC: the companion has guest RAM (with
    /// a companion), or the guest's init reports the NIC bound (without one).
    pub fn wait_guest_up(&mut self, timeout: Duration) -> Result<Duration, LaunchError> {
        let start = Instant::now();
        let mut control = match self.spec.nic {
            Nic::VhostUser => Some(self.control()?),
            Nic::Plain => None,
        };
        loop {
            self.check_alive()?;
            let up = match control.as_mut() {
                Some(c) => !c
                    .status()
                    .map_err(|source| LaunchError::Control {
                        vm: self.spec.name.clone(),
                        source,
                    })?
                    .regions
                    .is_empty(),
                None => std::fs::read_to_string(&self.paths.serial_log)
                    .unwrap_or_default()
                    .contains("vfmig-guest: nic-bound"),
            };
            if up {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(LaunchError::GuestNotUp {
                    vm: self.spec.name.clone(),
                    secs: timeout.as_secs(),
                    serial: self.paths.serial_log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// QEMU's pid, while it runs.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(Child::id)
    }

    /// The companion's pid, while it runs.
    pub fn companion_pid(&self) -> Option<u32> {
        self.companion.as_ref().map(Child::id)
    }

    /// Whether QEMU still runs.
    pub fn qemu_running(&mut self) -> bool {
        self.qemu
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills QEMU at once (a failure drill).
    pub fn kill_qemu(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops QEMU (QMP `quit`, then kill) and the companion.
    pub fn stop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            if let Ok(qmp) = QmpClient::connect(&self.paths.qmp_socket, Duration::from_secs(2)) {
                let _ = qmp.quit();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(q.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = q.kill();
            let _ = q.wait();
        }
        if let Some(mut c) = self.companion.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The error of a failed step in preparing `spec`'s run directory.
fn run_dir_error(spec: &VmSpec) -> impl Fn(std::io::Error) -> LaunchError + '_ {
    move |source| LaunchError::RunDir {
        vm: spec.name.clone(),
        dir: spec.run_dir.clone(),
        source,
    }
}

/// A command for `program`, run inside `netns` when one is given.
fn in_netns(netns: &Option<String>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}
