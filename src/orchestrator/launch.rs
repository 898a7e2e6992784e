//! Launching a VM: its companion first, then a stock QEMU wired to it, everything in one run
//! directory (sockets, serial log, logs, pid files).
//!
//! The QEMU options come from `qemu-patches-free-config/` (compiled in; `config_dir` overrides).

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
    #[error("VM {vm}: cannot prepare run directory {dir}: {source}")]
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
    #[error("VM {vm}: cannot start {what} ({program}): {source}")]
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
    #[error("VM {vm}: {source}")]
    Qmp {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// The companion's control socket failed.
    #[error("VM {vm}: {source}")]
    Control {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: ControlError,
    },
}

/// Which side of a migration a VM is started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Boots and runs the guest.
    Source,
    /// Waits for an incoming migration (`-incoming defer -S`).
    Destination,
}

/// The VM's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nic {
    /// virtio-net whose backend is the vfmig companion (vhost-user).
    VhostUser,
    /// The same NIC with no backend and no companion: the baseline.
    Plain,
}

/// Where the guest's kernel and initramfs are.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The image `tools/setup.sh` builds: under `$VFMIG_CACHE`, or `.cache/` of the source tree.
    pub fn from_setup() -> Result<Self, String> {
        let cache = std::env::var_os("VFMIG_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache"));
        let image = Self {
            kernel: cache.join("kernel/vmlinuz"),
            initrd: cache.join("initramfs.cpio.gz"),
        };
        for f in [&image.kernel, &image.initrd] {
            if !f.exists() {
                return Err(format!(
                    "guest image file {} is missing: run `bash tools/setup.sh` (as root) first",
                    f.display()
                ));
            }
        }
        Ok(image)
    }
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The VM's name.
    pub name: String,
    /// Its run directory (created).
    pub run_dir: PathBuf,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Source or destination.
    pub role: Role,
    /// QEMU accelerator (`tcg` or `kvm`).
    pub accel: String,
    /// The guest (source only needs it to boot; the destination gets the same options).
    pub image: GuestImage,
    /// The `vfmig` binary to run the companion with.
    pub vfmig_bin: PathBuf,
    /// QEMU binary.
    pub qemu_bin: String,
    /// Override of the compiled-in option files.
    pub config_dir: Option<PathBuf>,
    /// The NIC's MAC address.
    pub mac: String,
    /// The NIC, and with it whether a companion runs.
    pub nic: Nic,
    /// Network namespace to run the companion and QEMU in (a "host"); none: this one.
    pub netns: Option<String>,
    /// The companion's soft VF: its fabric address and the cluster file; none: no VF.
    pub fabric: Option<FabricSpec>,
    /// Extra guest kernel arguments (`vfmig.run=… vfmig.args=…` for the guest's agent).
    pub guest_args: String,
    /// A pcie-root-port for a passthrough VF (`passthrough-hotplug`), with or without a device
    /// in it; none: no port.
    pub passthrough: Option<PassthroughSlot>,
}

/// The PCIe slot of a passthrough VF.
#[derive(Debug, Clone)]
pub struct PassthroughSlot {
    /// The `-device` value of the VF plugged in at start (`vfio-pci,host=…,id=…,bus=PORT` in
    /// production; an emulated PCIe NIC in the tests), or `None` for an empty slot (a
    /// destination: its VF is plugged in after the migration).
    pub device: Option<String>,
}

/// The id of the pcie-root-port of the passthrough VF (`passthrough-port.args`).
pub const PASSTHROUGH_PORT: &str = "vfmig-vf-port";
/// The id of the passthrough VF device.
pub const PASSTHROUGH_DEVICE: &str = "vfmig-vf";

/// The `-device` value of the emulated PCIe NIC that stands in for a passthrough VF where there
/// is none (the tests): a virtio-net-pci on the VF's port, without a backend.
pub fn stand_in_vf_device(mac: &str) -> String {
    format!("virtio-net-pci,id={PASSTHROUGH_DEVICE},bus={PASSTHROUGH_PORT},mac={mac},romfile=")
}

/// The soft VF of a VM's companion.
#[derive(Debug, Clone)]
pub struct FabricSpec {
    /// Address the soft VF listens on (`host:port`).
    pub listen: String,
    /// The cluster file.
    pub cluster: PathBuf,
}

/// The files of one VM's run directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunPaths {
    /// The directory.
    pub dir: PathBuf,
    /// vhost-user socket (the companion listens, QEMU connects).
    pub vhost_socket: PathBuf,
    /// The companion's control socket.
    pub control_socket: PathBuf,
    /// QEMU's QMP socket.
    pub qmp_socket: PathBuf,
    /// The guest console.
    pub serial_log: PathBuf,
    /// The companion's log.
    pub companion_log: PathBuf,
    /// QEMU's stderr.
    pub qemu_log: PathBuf,
    /// QEMU's pid.
    pub qemu_pid: PathBuf,
    /// The companion's pid.
    pub companion_pid: PathBuf,
}

impl RunPaths {
    /// The standard layout under `dir`.
    pub fn under(dir: &Path) -> Self {
        Self {
            dir: dir.into(),
            vhost_socket: dir.join("vhost-user.sock"),
            control_socket: dir.join("control.sock"),
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            companion_log: dir.join("companion.log"),
            qemu_log: dir.join("qemu.log"),
            qemu_pid: dir.join("qemu.pid"),
            companion_pid: dir.join("companion.pid"),
        }
    }
}

const VM_ARGS: &str = include_str!("../../qemu-patches-free-config/vm.args");
const DESTINATION_ARGS: &str = include_str!("../../qemu-patches-free-config/destination.args");
const TEST_GUEST_ARGS: &str = include_str!("../../qemu-patches-free-config/test-guest.args");
const VHOST_USER_NIC_ARGS: &str =
    include_str!("../../qemu-patches-free-config/vhost-user-nic.args");
const PLAIN_NIC_ARGS: &str = include_str!("../../qemu-patches-free-config/plain-nic.args");
const PASSTHROUGH_PORT_ARGS: &str =
    include_str!("../../qemu-patches-free-config/passthrough-port.args");

/// Parses an option file: one option per line, `#` comments, the first space splits the option
/// from its value; placeholders `{key}` are replaced from `vars`.
pub fn parse_args(
    file: &str,
    text: &str,
    vars: &[(&str, String)],
) -> Result<Vec<String>, LaunchError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut filled = line.to_string();
        for (k, v) in vars {
            filled = filled.replace(&format!("{{{k}}}"), v);
        }
        if let Some(open) = filled.find('{') {
            if let Some(close) = filled[open..].find('}') {
                return Err(LaunchError::Config {
                    file: file.into(),
                    reason: format!(
                        "line {}: unknown placeholder {}",
                        n + 1,
                        &filled[open..open + close + 1]
                    ),
                });
            }
        }
        if !filled.starts_with('-') {
            return Err(LaunchError::Config {
                file: file.into(),
                reason: format!("line {}: does not start with an option", n + 1),
            });
        }
        match filled.split_once(' ') {
            Some((opt, val)) => {
                out.push(opt.to_string());
                out.push(val.trim().to_string());
            }
            None => out.push(filled),
        }
    }
    Ok(out)
}

fn read_config(dir: &Option<PathBuf>, name: &str, builtin: &str) -> Result<String, LaunchError> {
    match dir {
        None => Ok(builtin.to_string()),
        Some(d) => std::fs::read_to_string(d.join(name)).map_err(|e| LaunchError::Config {
            file: d.join(name).display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The QEMU command line for `spec`.
pub fn qemu_args(spec: &VmSpec, paths: &RunPaths) -> Result<Vec<String>, LaunchError> {
    let p = |p: &Path| p.display().to_string();
    let vars = [
        ("name", spec.name.clone()),
        ("accel", spec.accel.clone()),
        ("mem_mib", spec.mem_mib.to_string()),
        ("vhost_socket", p(&paths.vhost_socket)),
        ("qmp_socket", p(&paths.qmp_socket)),
        ("serial_log", p(&paths.serial_log)),
        ("qemu_pid", p(&paths.qemu_pid)),
        ("mac", spec.mac.clone()),
        ("kernel", p(&spec.image.kernel)),
        ("initrd", p(&spec.image.initrd)),
        ("guest_args", spec.guest_args.clone()),
    ];
    let mut args = parse_args(
        "vm.args",
        &read_config(&spec.config_dir, "vm.args", VM_ARGS)?,
        &vars,
    )?;
    let (nic_file, nic_builtin) = match spec.nic {
        Nic::VhostUser => ("vhost-user-nic.args", VHOST_USER_NIC_ARGS),
        Nic::Plain => ("plain-nic.args", PLAIN_NIC_ARGS),
    };
    args.extend(parse_args(
        nic_file,
        &read_config(&spec.config_dir, nic_file, nic_builtin)?,
        &vars,
    )?);
    args.extend(parse_args(
        "test-guest.args",
        &read_config(&spec.config_dir, "test-guest.args", TEST_GUEST_ARGS)?,
        &vars,
    )?);
    if let Some(slot) = &spec.passthrough {
        args.extend(parse_args(
            "passthrough-port.args",
            &read_config(
                &spec.config_dir,
                "passthrough-port.args",
                PASSTHROUGH_PORT_ARGS,
            )?,
            &[("vf_port", PASSTHROUGH_PORT.into())],
        )?);
        if let Some(device) = &slot.device {
            args.extend(["-device".to_string(), device.clone()]);
        }
    }
    if spec.role == Role::Destination {
        args.extend(parse_args(
            "destination.args",
            &read_config(&spec.config_dir, "destination.args", DESTINATION_ARGS)?,
            &vars,
        )?);
    }
    Ok(args)
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
        let vm = spec.name.clone();
        let paths = RunPaths::under(&spec.run_dir);
        let run_dir = spec.run_dir.clone();
        let dir_err = |source| LaunchError::RunDir {
            vm: vm.clone(),
            dir: run_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(dir_err)?;
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
            let log = File::create(&me.paths.companion_log).map_err(dir_err)?;
            let log2 = log.try_clone().map_err(dir_err)?;
            let mut cmd = in_netns(&me.spec.netns, &me.spec.vfmig_bin.display().to_string());
            cmd.arg("companion");
            if let Some(f) = &me.spec.fabric {
                cmd.arg("--fabric-listen")
                    .arg(&f.listen)
                    .arg("--cluster")
                    .arg(&f.cluster);
            }
            let companion = cmd
                .arg("--name")
                .arg(&me.spec.name)
                .arg("--socket")
                .arg(&me.paths.vhost_socket)
                .arg("--control")
                .arg(&me.paths.control_socket)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .map_err(|source| LaunchError::Spawn {
                    vm: vm.clone(),
                    what: "companion",
                    program: me.spec.vfmig_bin.display().to_string(),
                    source,
                })?;
            let _ = std::fs::write(&me.paths.companion_pid, format!("{}\n", companion.id()));
            me.companion = Some(companion);
            let socket = me.paths.vhost_socket.clone();
            me.wait_for_file(&socket, "companion", Duration::from_secs(10))?;
        }

        let qlog = File::create(&me.paths.qemu_log).map_err(dir_err)?;
        let qemu = in_netns(&me.spec.netns, &me.spec.qemu_bin)
            .args(&qemu_args)
            .stdin(Stdio::null())
            .stdout(qlog.try_clone().map_err(dir_err)?)
            .stderr(qlog)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                vm: vm.clone(),
                what: "QEMU",
                program: me.spec.qemu_bin.clone(),
                source,
            })?;
        me.qemu = Some(qemu);
        me.wait_for_file(
            &me.paths.qmp_socket.clone(),
            "QEMU",
            Duration::from_secs(30),
        )?;
        tracing::info!(vm = %vm, role = ?me.spec.role, dir = %me.paths.dir.display(), "VM launched");
        Ok(me)
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

/// A locally administered MAC address derived from a VM name.
pub fn mac_for(name: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(name.as_bytes()).to_le_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(role: Role) -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            run_dir: "/run/x".into(),
            mem_mib: 512,
            role,
            accel: "tcg".into(),
            image: GuestImage {
                kernel: "/k".into(),
                initrd: "/i".into(),
            },
            vfmig_bin: "vfmig".into(),
            qemu_bin: "qemu-system-x86_64".into(),
            config_dir: None,
            mac: mac_for("vm1"),
            nic: Nic::VhostUser,
            netns: None,
            fabric: None,
            guest_args: String::new(),
            passthrough: None,
        }
    }

    #[test]
    fn the_shipped_option_files_give_the_vhost_user_wiring() {
        let s = spec(Role::Source);
        let args = qemu_args(&s, &RunPaths::under(&s.run_dir)).unwrap();
        let joined = args.join(" ");
        assert!(joined.contains("-object memory-backend-memfd,id=ram,size=512M,share=on"));
        assert!(joined.contains("-chardev socket,id=vfmig-vhost,path=/run/x/vhost-user.sock"));
        assert!(joined.contains("-append console=ttyS0 memmap=16M$0x18000000"));
        assert!(!args.contains(&"-incoming".to_string()));
        let d = spec(Role::Destination);
        let args = qemu_args(&d, &RunPaths::under(&d.run_dir)).unwrap();
        let i = args.iter().position(|a| a == "-incoming").unwrap();
        assert_eq!(args[i + 1], "defer");
        assert!(args.contains(&"-S".to_string()));
        let mut p = spec(Role::Source);
        p.nic = Nic::Plain;
        let joined = qemu_args(&p, &RunPaths::under(&p.run_dir))
            .unwrap()
            .join(" ");
        assert!(!joined.contains("vhost-user"));
        assert!(joined.contains("-device virtio-net-pci,id=vfmig-nic"));
        assert!(
            joined.contains("share=on"),
            "same RAM backend as with the companion"
        );
    }

    #[test]
    fn unknown_placeholders_and_bare_values_are_refused() {
        assert!(matches!(
            parse_args("f", "-name {nope}", &[]),
            Err(LaunchError::Config { .. })
        ));
        assert!(matches!(
            parse_args("f", "name-without-dash", &[]),
            Err(LaunchError::Config { .. })
        ));
        assert_eq!(
            parse_args("f", "# c\n-a b c\n-S\n", &[]).unwrap(),
            vec!["-a", "b c", "-S"]
        );
    }
}
