//! Several libvirt "hosts" on one machine, for the tests that migrate with `virsh`: each is a
//! `libvirtd` inside one of the lab's network namespaces ([`Hosts`]), with a mount namespace
//! of its own over libvirt's fixed paths (`/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`,
//! …), vfmig's (`/etc/vfmig`, `/run/vfmig`), its own hostname and host UUID (libvirt refuses to
//! migrate to itself), TCP listening without authentication on the lab's private bridge, and
//! vfmig's `qemu` hook installed. QEMU runs as root, unconfined, its output in files (no
//! virtlogd).
//!
//! From outside the namespaces a host's directories are under its root
//! ([`LibvirtHosts::root`]): `ROOT/vfmig/NAME/control.sock` is the companion's control socket of
//! domain NAME on that host, the same socket as `/run/vfmig/NAME/control.sock` inside.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::hosts::{Hosts, HostsError};

/// Why the libvirt hosts could not be set up or driven.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtLabError {
    /// libvirt is not installed.
    #[error("libvirt is not installed ({0} is missing): run `bash tools/setup.sh`")]
    NotInstalled(PathBuf),
    /// The network namespaces.
    #[error(transparent)]
    Hosts(#[from] HostsError),
    /// A file or directory of a host.
    #[error("cannot prepare libvirt host {host} ({path})")]
    Files {
        /// The host.
        host: usize,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// libvirtd did not start.
    #[error("libvirtd of host {host} did not answer within {secs} s; its log: {log}")]
    NotUp {
        /// The host.
        host: usize,
        /// The wait.
        secs: u64,
        /// Its log file.
        log: PathBuf,
    },
    /// A `virsh` command failed.
    #[error("`virsh {args}` on host {host} failed: {stderr}")]
    Virsh {
        /// The host.
        host: usize,
        /// Its arguments.
        args: String,
        /// Its error output.
        stderr: String,
    },
    /// `virsh` could not be run.
    #[error("cannot run virsh")]
    Spawn(#[source] std::io::Error),
}

/// libvirt hosts; dropping them destroys their domains and stops their daemons.
pub struct LibvirtHosts {
    net: Hosts,
    roots: Vec<PathBuf>,
    daemons: Vec<Child>,
}

/// The directories a host mounts over: (under its root, inside its namespace).
const MOUNTS: [(&str, &str); 7] = [
    ("etc-libvirt", "/etc/libvirt"),
    ("run-libvirt", "/run/libvirt"),
    ("lib-libvirt", "/var/lib/libvirt"),
    ("cache-libvirt", "/var/cache/libvirt"),
    ("log-libvirt", "/var/log/libvirt"),
    ("etc-vfmig", "/etc/vfmig"),
    ("vfmig", "/run/vfmig"),
];

fn files(host: usize, path: &Path) -> impl FnOnce(std::io::Error) -> LibvirtLabError + '_ {
    move |source| LibvirtLabError::Files {
        host,
        path: path.into(),
        source,
    }
}

/// Copies the directory tree `from` into `to`.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

impl LibvirtHosts {
    /// Starts `count` hosts under `run_dir`, whose hooks run `vfmig_bin`.
    pub fn start(run_dir: &Path, count: usize, vfmig_bin: &Path) -> Result<Self, LibvirtLabError> {
        Self::start_beside(run_dir, count, 0, vfmig_bin)
    }

    /// [`LibvirtHosts::start`], on a network of `count + others` hosts: the `others`, after the
    /// libvirt hosts, run no libvirt (peers' VMs go there, [`LibvirtHosts::net`]).
    pub fn start_beside(
        run_dir: &Path,
        count: usize,
        others: usize,
        vfmig_bin: &Path,
    ) -> Result<Self, LibvirtLabError> {
        for needed in [
            "/usr/sbin/libvirtd",
            "/usr/bin/virsh",
            "/etc/libvirt/qemu.conf",
        ] {
            if !Path::new(needed).exists() {
                return Err(LibvirtLabError::NotInstalled(needed.into()));
            }
        }
        let net = Hosts::create(count + others)?;
        let mut hosts = Self {
            net,
            roots: Vec::new(),
            daemons: Vec::new(),
        };
        for i in 0..count {
            let root = run_dir.join(format!("libvirt-host{i}"));
            hosts.prepare(i, &root, vfmig_bin)?;
            hosts.roots.push(root);
        }
        for i in 0..count {
            let child = hosts.spawn_daemon(i)?;
            hosts.daemons.push(child);
        }
        for i in 0..count {
            hosts.wait_up(i, Duration::from_secs(30))?;
        }
        tracing::info!(count, "libvirt hosts up");
        Ok(hosts)
    }

    /// Writes host `i`'s configuration under `root`.
    fn prepare(&self, i: usize, root: &Path, vfmig_bin: &Path) -> Result<(), LibvirtLabError> {
        for (dir, _) in MOUNTS {
            let d = root.join(dir);
            std::fs::create_dir_all(&d).map_err(files(i, &d))?;
        }
        let etc = root.join("etc-libvirt");
        copy_tree(Path::new("/etc/libvirt"), &etc).map_err(files(i, &etc))?;
        let append = |file: &str, text: String| -> Result<(), LibvirtLabError> {
            use std::io::Write;
            let path = etc.join(file);
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(files(i, &path))
        };
        let uuid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            i as u64 + 1
        );
        append(
            "libvirtd.conf",
            format!(
                "\nlisten_tls = 0\nlisten_tcp = 1\nauth_tcp = \"none\"\nhost_uuid = \"{uuid}\"\n\
                 log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n"
            ),
        )?;
        append(
            "qemu.conf",
            "\nsecurity_driver = \"none\"\nuser = \"root\"\ngroup = \"root\"\n\
             stdio_handler = \"file\"\n"
                .into(),
        )?;
        let hook = etc.join("hooks").join("qemu");
        std::fs::create_dir_all(etc.join("hooks")).map_err(files(i, &hook))?;
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\n# vfmig libvirt hook (test host {i})\nexec {} libvirt hook \"$@\"\n",
                vfmig_bin.display()
            ),
        )
        .map_err(files(i, &hook))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
                .map_err(files(i, &hook))?;
        }
        let host_json = root.join("etc-vfmig").join("host.json");
        std::fs::write(
            &host_json,
            format!("{{\"fabric_address\": \"{}\"}}\n", self.net.addr(i)),
        )
        .map_err(files(i, &host_json))?;
        Ok(())
    }

    /// Starts host `i`'s libvirtd in its namespaces.
    fn spawn_daemon(&self, i: usize) -> Result<Child, LibvirtLabError> {
        let root = &self.roots[i];
        let mut script = String::from("set -e\n");
        for (dir, at) in MOUNTS {
            script += &format!(
                "mkdir -p {at}\nmount --bind {} {at}\n",
                root.join(dir).display()
            );
        }
        script += &format!(
            "hostname vfmig-lv-{i}\nexec /usr/sbin/libvirtd --listen --pid-file \
             /run/libvirt/libvirtd.pid\n"
        );
        let log = root.join("libvirtd.out");
        let out = std::fs::File::create(&log).map_err(files(i, &log))?;
        let err = out.try_clone().map_err(files(i, &log))?;
        Command::new("ip")
            .args(["netns", "exec", &self.net.netns(i)])
            .args(["unshare", "--mount", "--uts", "--propagation", "private"])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(files(i, &log))
    }

    fn wait_up(&self, i: usize, timeout: Duration) -> Result<(), LibvirtLabError> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.virsh(i, &["hostname"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(LibvirtLabError::NotUp {
            host: i,
            secs: timeout.as_secs(),
            log: self.roots[i].join("log-libvirt").join("libvirtd.log"),
        })
    }

    /// How the test reaches host `i`'s libvirtd: its unix socket, from outside its namespaces.
    pub fn local_uri(&self, i: usize) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.roots[i]
                .join("run-libvirt")
                .join("libvirt-sock")
                .display()
        )
    }

    /// How other hosts reach host `i`'s libvirtd: TCP on the lab's bridge.
    pub fn uri(&self, i: usize) -> String {
        format!("qemu+tcp://{}/system", self.net.addr(i))
    }

    /// The network namespaces, the libvirt hosts' and the others'.
    pub fn net(&self) -> &Hosts {
        &self.net
    }

    /// Host `i`'s address on the lab's bridge.
    pub fn addr(&self, i: usize) -> std::net::Ipv4Addr {
        self.net.addr(i)
    }

    /// Host `i`'s root: its private directories, seen from outside (`vfmig/` is its
    /// `/run/vfmig`).
    pub fn root(&self, i: usize) -> &Path {
        &self.roots[i]
    }

    /// The directory of domain `name`'s companion on host `i`, seen from outside.
    pub fn companion_dir(&self, i: usize, name: &str) -> PathBuf {
        self.roots[i].join("vfmig").join(name)
    }

    /// Runs `virsh` against host `i`; its standard output.
    pub fn virsh(&self, i: usize, args: &[&str]) -> Result<String, LibvirtLabError> {
        let out = Command::new("virsh")
            .args(["-c", &self.local_uri(i)])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(LibvirtLabError::Spawn)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(LibvirtLabError::Virsh {
                host: i,
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

impl Drop for LibvirtHosts {
    fn drop(&mut self) {
        for i in 0..self.daemons.len() {
            if let Ok(names) = self.virsh(i, &["list", "--name"]) {
                for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
                    let _ = self.virsh(i, &["destroy", name]);
                }
            }
        }
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        // Companions the release hook could not stop.
        for root in &self.roots {
            let Ok(dirs) = std::fs::read_dir(root.join("vfmig")) else {
                continue;
            };
            for dir in dirs.flatten() {
                let pid = std::fs::read_to_string(dir.path().join("companion.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok());
                if let Some(pid) = pid {
                    // SAFETY: kill(2) with a pid from a companion's pid file under this lab's
                    // own run directory; it touches no memory of this process.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    // A process left in a host's network namespace keeps its links alive.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while crate::libvirt::hook::alive(pid) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
    }
}
