//! The per-VM companion process.
//!
//! It is QEMU's vhost-user-net backend ([`vhost_net`]), owns the VF's path into guest RAM
//! (the [`DmaEngine`]), runs the traffic generator that stands in for remote RDMA writes
//! ([`generator`]), throttles the device when precopy does not converge ([`converge`]), hands
//! the VF to (or takes it from) the VM's other companion at a migration ([`handoff`]), and
//! answers the orchestrator on a control socket ([`control`]).

pub mod control;
pub mod converge;
pub mod device;
pub mod generator;
pub mod guest_link;
mod handler;
pub mod handoff;
pub mod op_latency;
pub mod vhost_filter;
pub mod vhost_net;

pub use handler::RequestError;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;

use std::os::fd::AsRawFd;

use vmm_sys_util::epoll::EventSet;

use crate::memory::guest_ram;
use crate::memory::DmaEngine;
use crate::vf::soft::{self, SoftVf};
use crate::vf::vfio::{VfioVf, VfioVfError};
use crate::vf::VfBackend;
use converge::{Converge, DeviceThrottle};
use device::Device;
use generator::Generator;
use guest_link::GuestLink;
use vhost_net::NetBackend;

/// Errors that stop the companion.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    /// The vhost-user socket could not be set up.
    #[error("VM {vm}: cannot listen on vhost-user socket {path}")]
    Listen {
        /// The VM's name.
        vm: String,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user backend's private socket could not be set up.
    #[error(
        "VM {vm}: cannot listen on the backend socket {path}; check that its directory is \
         writable"
    )]
    BackendSocket {
        /// The VM's name.
        vm: String,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The control socket could not be set up.
    #[error("VM {vm}: cannot serve control socket {path}")]
    Control {
        /// The VM's name.
        vm: String,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The soft VF's fabric could not listen.
    #[error("VM {vm}: the soft VF cannot listen on {addr}; check that the address is free")]
    Fabric {
        /// The VM's name.
        vm: String,
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The fabric's keys could not be used.
    #[error("VM {vm}: cannot authenticate the soft VF's fabric")]
    FabricKeys {
        /// The VM's name.
        vm: String,
        /// Why.
        #[source]
        source: soft::KeyError,
    },
    /// A fabric without keys was asked for, and not explicitly.
    #[error(
        "VM {vm}: the soft VF's fabric needs keys: run `vfmig keys generate --cluster FILE \
         --dir DIR` and start the companion with --fabric-key DIR/{vm}.key (or, for benchmarks \
         only, --insecure-fabric)"
    )]
    NoFabricKey {
        /// The VM's name.
        vm: String,
    },
    /// The VFIO VF could not be opened.
    #[error("VM {vm}: cannot own the VFIO VF {bdf}")]
    Vfio {
        /// The VM's name.
        vm: String,
        /// The VF's PCI address.
        bdf: String,
        /// Why.
        #[source]
        source: Box<VfioVfError>,
    },
    /// Both a soft VF and a VFIO VF were asked for.
    #[error(
        "VM {vm}: the companion owns one VF: give either --vfio (a VF bound to vfio-pci) or \
         --fabric-listen (the soft VF), not both"
    )]
    TwoVfs {
        /// The VM's name.
        vm: String,
    },
    /// A thread of the companion could not start.
    #[error("VM {vm}: cannot start {what}; the process may be out of threads or memory")]
    Thread {
        /// The VM's name.
        vm: String,
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user daemon failed.
    #[error("VM {vm}: vhost-user backend failed: {reason}")]
    Daemon {
        /// The VM's name.
        vm: String,
        /// Why.
        reason: String,
    },
}

/// How to run a companion.
#[derive(Debug, Clone)]
pub struct CompanionConfig {
    /// The VM's name (for logs and status).
    pub name: String,
    /// The vhost-user socket the companion listens on; QEMU connects to it.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// Start with dirty tracking of device writes off (`unsafe-no-tracking`).
    pub unsafe_no_tracking: bool,
    /// Where the soft VF listens for peers (`host:port`); none: no fabric.
    pub fabric_listen: Option<String>,
    /// VM name → fabric address of every VM (the cluster file).
    pub cluster: soft::ClusterMap,
    /// This VM's private fabric key (a 0600 file, from `vfmig keys generate`); with the
    /// cluster file's job key and public keys, every fabric link is authenticated.
    pub fabric_key: Option<PathBuf>,
    /// Run the fabric without authentication (benchmarks only): anyone who reaches the port
    /// can write the guest's RAM.
    pub insecure_fabric: bool,
    /// PCI address of a VF bound to vfio-pci that the companion owns; none: no VFIO VF.
    pub vfio: Option<String>,
    /// Device auto-converge: `off`, `auto` or a fixed rate ([`converge`]).
    pub device_throttle: converge::DeviceThrottle,
    /// The migration bandwidth `auto` assumes until the orchestrator says, bytes/s.
    pub migration_bandwidth: u64,
    /// The VM migrates in: its VF state comes from the source's companion (the handoff).
    pub incoming: bool,
}

/// How the soft VF's links authenticate: with this VM's key and the cluster file's keys, or not
/// at all when `--insecure-fabric` says so; neither is refused.
fn fabric_auth(config: &CompanionConfig) -> Result<soft::FabricAuth, CompanionError> {
    let vm = config.name.clone();
    match (&config.fabric_key, config.insecure_fabric) {
        (_, true) => {
            tracing::warn!(%vm, "--insecure-fabric: the soft VF's fabric is NOT authenticated; for benchmarks only");
            Ok(soft::FabricAuth::Insecure)
        }
        (Some(key), false) => soft::FabricKeys::load(&config.cluster, &vm, key)
            .map(|k| soft::FabricAuth::Keys(Arc::new(k)))
            .map_err(|source| {
                tracing::error!(%vm, error = %source, "fabric keys refused");
                CompanionError::FabricKeys { vm, source }
            }),
        (None, false) => {
            tracing::error!(%vm, "no fabric key and no --insecure-fabric: refusing to start");
            Err(CompanionError::NoFabricKey { vm })
        }
    }
}

/// The companion's shared state, as the control socket sees it.
pub(crate) struct Companion {
    name: String,
    dma: Arc<DmaEngine>,
    net: NetBackend,
    /// The VF, whichever the backend (or none).
    device: Arc<Device>,
    guest: Arc<GuestLink>,
    generator: Mutex<Option<Generator>>,
    /// Device auto-converge.
    converge: Arc<Converge>,
    vhost_connected: AtomicBool,
    vhost_messages: vhost_filter::SharedMessageLog,
    quit: AtomicBool,
}

impl Companion {
    /// A companion of VM `name` around its device and guest link, with no vhost-user
    /// connection yet (the control socket's view; also an in-process companion for
    /// [`crate::fuzz`]).
    pub(crate) fn new(
        name: &str,
        dma: Arc<DmaEngine>,
        device: Arc<Device>,
        guest: Arc<GuestLink>,
    ) -> Self {
        Self {
            name: name.into(),
            net: NetBackend::new(dma.clone(), guest.clone(), device.clone()),
            converge: Arc::new(Converge::new(
                dma.clone(),
                DeviceThrottle::default(),
                converge::DEFAULT_BANDWIDTH,
            )),
            dma,
            device,
            guest,
            generator: Mutex::new(None),
            vhost_connected: AtomicBool::new(false),
            vhost_messages: Default::default(),
            quit: AtomicBool::new(false),
        }
    }
}

/// The companion's one VF, from either backend: a VF bound to vfio-pci (`--vfio`, owned
/// before anything else, so that a VF that cannot be used stops the companion at once with the
/// reason), or the soft VF (`--fabric-listen`); none without either.
fn vf_backend(
    config: &CompanionConfig,
    dma: &Arc<DmaEngine>,
) -> Result<Option<VfBackend>, CompanionError> {
    match (&config.vfio, &config.fabric_listen) {
        (Some(_), Some(_)) => Err(CompanionError::TwoVfs {
            vm: config.name.clone(),
        }),
        (Some(bdf), None) => {
            let vfio = VfioVf::open(bdf).map_err(|source| CompanionError::Vfio {
                vm: config.name.clone(),
                bdf: bdf.clone(),
                source: Box::new(source),
            })?;
            Ok(Some(vfio.into_backend()))
        }
        (None, Some(addr)) => {
            let auth = fabric_auth(config)?;
            let vf = SoftVf::start(
                &config.name,
                dma.clone(),
                addr,
                config.cluster.clone(),
                soft::FabricTiming::default(),
                auth,
            )
            .map_err(|source| CompanionError::Fabric {
                vm: config.name.clone(),
                addr: addr.clone(),
                source,
            })?;
            Ok(Some(vf.backend()))
        }
        (None, None) => Ok(None),
    }
}

/// The vhost-user side of the companion: the public socket QEMU connects to, the backend
/// crate's private socket behind the message filter, and the crate's daemon.
struct VhostServer {
    vm: String,
    socket: PathBuf,
    public: UnixListener,
    backend_path: PathBuf,
    listener: Listener,
    daemon: VhostUserDaemon<NetBackend>,
    net: NetBackend,
}

impl VhostServer {
    /// Binds both sockets (mode 0600 whatever the umask) and starts the daemon, whose vring
    /// worker also serves the frames `guest` queues.
    fn bind(
        vm: &str,
        socket: &Path,
        net: NetBackend,
        ram: guest_ram::GuestRam,
        guest: &GuestLink,
    ) -> Result<Self, CompanionError> {
        let mut backend_path = socket.to_owned().into_os_string();
        backend_path.push(".backend");
        let backend_path = PathBuf::from(backend_path);
        let listener = control::bind_private(&backend_path)
            .map(Listener::from)
            .map_err(|source| CompanionError::BackendSocket {
                vm: vm.into(),
                path: backend_path.clone(),
                source: vhost::vhost_user::Error::SocketError(source),
            })?;
        let public = control::bind_private(socket).map_err(|source| CompanionError::Listen {
            vm: vm.into(),
            path: socket.into(),
            source,
        })?;
        let daemon =
            VhostUserDaemon::new(format!("vfmig-{vm}"), net.clone(), ram).map_err(|e| {
                CompanionError::Daemon {
                    vm: vm.into(),
                    reason: e.to_string(),
                }
            })?;
        // Frames queued for the guest wake the vring worker through this event.
        if let Some(handler) = daemon.get_epoll_handlers().first() {
            handler
                .register_listener(
                    guest.rx_event.as_raw_fd(),
                    EventSet::IN,
                    u64::from(vhost_net::RX_PENDING_EVENT),
                )
                .map_err(|e| CompanionError::Daemon {
                    vm: vm.into(),
                    reason: format!("cannot watch the guest link's event: {e}"),
                })?;
        }
        Ok(Self {
            vm: vm.into(),
            socket: socket.into(),
            public,
            backend_path,
            listener,
            daemon,
            net,
        })
    }

    /// Removes both socket files (the companion is done).
    fn remove_sockets(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.backend_path);
    }

    /// Serves one front-end connection, from accept to disconnect. A connection that ends
    /// with an error (a refused message, a broken socket) is logged; the next one is served
    /// the same way. Returns the front-end's process id, if the socket tells it.
    fn serve_one(
        &mut self,
        connected: &AtomicBool,
        log: &vhost_filter::SharedMessageLog,
    ) -> Result<Option<i32>, CompanionError> {
        let listen_err = |source: std::io::Error| CompanionError::Listen {
            vm: self.vm.clone(),
            path: self.socket.clone(),
            source,
        };
        let (qemu, _) = self.public.accept().map_err(listen_err)?;
        let pid = nix::sys::socket::getsockopt(&qemu, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|c| c.pid())
            .filter(|p| *p > 0);
        let to_backend = UnixStream::connect(&self.backend_path).map_err(listen_err)?;
        self.daemon
            .start(&mut self.listener)
            .map_err(|e| CompanionError::Daemon {
                vm: self.vm.clone(),
                reason: e.to_string(),
            })?;
        connected.store(true, Ordering::SeqCst);
        tracing::info!("QEMU connected");
        let log = log.clone();
        let net = self.net.clone();
        let filter = std::thread::Builder::new()
            .name("vfmig-vhost-filter".into())
            .spawn(move || {
                vhost_filter::run(qemu, to_backend, log, |queue| {
                    net.quiesce("SET_VRING_ENABLE 0", queue)
                })
            })
            .map_err(|source| CompanionError::Thread {
                vm: self.vm.clone(),
                what: "the vhost-user filter thread",
                source,
            })?;
        let result = self.daemon.wait();
        match filter.join() {
            Ok(Err(e)) => tracing::warn!(error = %e, "vhost-user filter ended with an error"),
            Err(_) => tracing::error!("vhost-user filter thread panicked"),
            Ok(Ok(())) => {}
        }
        connected.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => tracing::info!("QEMU disconnected; waiting for a new connection"),
            Err(e) => tracing::warn!(
                error = %e,
                "QEMU connection ended with an error; waiting for a new connection"
            ),
        }
        Ok(pid)
    }
}

/// How long a QEMU whose connection ended has to exit before it is taken to be alive (and
/// about to reconnect).
const QEMU_EXIT_GRACE: Duration = Duration::from_secs(3);

/// Whether process `pid` ends (or is a zombie) within `grace`.
fn process_ends(pid: i32, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        // The state is the first field after the command's closing parenthesis.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().chars().next())
            });
        match state {
            None | Some(None) | Some(Some('Z' | 'X' | 'x')) => return true,
            _ if Instant::now() >= deadline => return false,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Companion {
    /// QEMU's connection ended. If QEMU's process ended too (or cannot be known), the VM
    /// stopped: the VF retires if it was live here ([`Device::on_qemu_gone`]). A QEMU that
    /// still runs may reconnect (`reconnect-ms`) and keeps its VF.
    fn on_qemu_disconnected(&self, pid: Option<i32>) {
        if let Some(pid) = pid {
            if !process_ends(pid, QEMU_EXIT_GRACE) {
                tracing::warn!(
                    vm = %self.name,
                    pid,
                    "QEMU's connection ended but QEMU still runs: the VF stays for its reconnect"
                );
                return;
            }
        }
        // An incoming VM whose QEMU is gone will not run here: stop seeking its VF, so that
        // this companion never takes the place of the VM's next destination.
        self.net.handoff().drop_incoming();
        if let Some(told) = self.device.on_qemu_gone() {
            tracing::warn!(vm = %self.name, ?told, "QEMU is gone with the VM: its VF retired");
        }
    }
}

/// Runs a companion until QEMU has disconnected for good or `quit` arrives.
pub fn run(config: CompanionConfig) -> Result<(), CompanionError> {
    let ram = guest_ram::empty();
    let dma = Arc::new(DmaEngine::new(ram.clone()));
    if config.unsafe_no_tracking {
        dma.set_tracking(false);
    }
    let device = Device::new(vf_backend(&config, &dma)?, dma.clone());
    device
        .start_sync_thread(device::SYNC_PERIOD)
        .map_err(|source| CompanionError::Thread {
            vm: config.name.clone(),
            what: "the VF dirty-sync thread",
            source,
        })?;
    let guest =
        GuestLink::new(device.verbs(), dma.clone()).map_err(|source| CompanionError::Thread {
            vm: config.name.clone(),
            what: "the guest link's completion pump",
            source,
        })?;
    let companion = Arc::new(Companion::new(
        &config.name,
        dma,
        device.clone(),
        guest.clone(),
    ));
    companion
        .converge
        .set(config.device_throttle, config.migration_bandwidth);
    companion
        .converge
        .clone()
        .start()
        .map_err(|source| CompanionError::Thread {
            vm: config.name.clone(),
            what: "the device-throttle policy",
            source,
        })?;
    let net = companion.net.clone();
    if config.incoming {
        net.handoff()
            .expect_incoming()
            .map_err(|source| CompanionError::Thread {
                vm: config.name.clone(),
                what: "the VF handoff's seeker",
                source,
            })?;
    }
    control::serve(&config.control, companion.clone()).map_err(|source| {
        CompanionError::Control {
            vm: config.name.clone(),
            path: config.control.clone(),
            source,
        }
    })?;

    let mut vhost = VhostServer::bind(&config.name, &config.socket, net, ram, &guest)?;
    tracing::info!(
        vm = %config.name,
        socket = %config.socket.display(),
        control = %config.control.display(),
        "companion ready: waiting for QEMU on the vhost-user socket"
    );
    // QEMU connects once per run, and again when its connection broke and it reconnects
    // (`reconnect-ms`). After it disconnects (the VM quit, or migrated away and was shut down),
    // keep the control socket up so that the guest RAM last mapped can still be verified, and
    // accept a new connection if one comes.
    loop {
        let qemu = vhost.serve_one(&companion.vhost_connected, &companion.vhost_messages)?;
        companion.on_qemu_disconnected(qemu);
        if companion.quit.load(Ordering::SeqCst) {
            device.release();
            vhost.remove_sockets();
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use vhost::vhost_user::message::FrontendReq;
    use vhost_filter::{read_message, write_message, Message};

    fn request(request: FrontendReq) -> Message {
        Message {
            request: request.into(),
            flags: 0x1,
            payload: vec![],
            fds: vec![],
        }
    }

    /// Connects as a front-end, claims the backend and asks for its features: `Some` if the
    /// backend answered.
    fn claim(socket: &Path) -> Option<u64> {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        write_message(&s, &request(FrontendReq::SET_OWNER)).ok()?;
        write_message(&s, &request(FrontendReq::GET_FEATURES)).ok()?;
        let reply = read_message(&s).ok()??;
        Some(u64::from_le_bytes(reply.payload.get(..8)?.try_into().ok()?))
    }

    #[test]
    fn a_dropped_front_end_is_replaced_by_the_next_and_both_sockets_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost-user.sock");
        let ram = guest_ram::empty();
        let dma = Arc::new(DmaEngine::new(ram.clone()));
        let guest = GuestLink::new(None, dma.clone()).unwrap();
        let net = NetBackend::new(dma.clone(), guest.clone(), Device::new(None, dma));
        let mut server = VhostServer::bind("t", &socket, net, ram, &guest).unwrap();
        let modes: Vec<u32> = [socket.clone(), dir.path().join("vhost-user.sock.backend")]
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().permissions().mode() & 0o777)
            .collect();
        // The server lives on its thread (the crate's daemon joins its workers when dropped).
        std::thread::spawn(move || {
            let (connected, log) = (AtomicBool::new(false), Default::default());
            while server.serve_one(&connected, &log).is_ok() {}
        });
        assert_eq!(modes, [0o600, 0o600], "public and backend socket modes");
        for attempt in 0..3 {
            let features = claim(&socket);
            assert!(
                features.is_some_and(|f| f & (1 << 32) != 0),
                "connection {attempt} was not served"
            );
        }
    }
}

#[cfg(test)]
mod qemu_gone_tests {
    use super::*;

    #[test]
    fn a_process_that_runs_is_not_taken_for_gone_and_one_that_exited_is() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(!process_ends(pid, Duration::from_millis(100)));
        child.kill().unwrap();
        // Not reaped yet: a zombie counts as gone.
        assert!(process_ends(pid, Duration::from_secs(5)));
        child.wait().unwrap();
        assert!(process_ends(pid, Duration::ZERO));
    }

    #[test]
    fn an_incoming_companion_whose_qemu_is_gone_stops_seeking_the_vf() {
        use crate::companion::handoff::HandoffPhase;
        let (device, dma, guest) = device::tests::soft_handle("a");
        let companion = Companion::new("a", dma, device, guest);
        let handoff = companion.net.handoff().clone();
        handoff.expect_incoming().unwrap();
        assert_eq!(handoff.report().phase, HandoffPhase::Seeking);
        // QEMU's connection ended and its process with it (no pid to wait for).
        companion.on_qemu_disconnected(None);
        let r = handoff.report();
        assert_eq!(r.phase, HandoffPhase::Idle, "{r:?}");
        assert!(!handoff.awaits_state(), "still seeking");
    }
}

#[cfg(test)]
mod fabric_auth_tests {
    use super::*;

    fn config(fabric_key: Option<PathBuf>, insecure_fabric: bool) -> CompanionConfig {
        CompanionConfig {
            name: "a".into(),
            socket: "/nonexistent/vhost.sock".into(),
            control: "/nonexistent/control.sock".into(),
            unsafe_no_tracking: false,
            fabric_listen: Some("127.0.0.1:0".into()),
            cluster: soft::ClusterMap::default(),
            fabric_key,
            insecure_fabric,
            vfio: None,
            device_throttle: converge::DeviceThrottle::Auto,
            migration_bandwidth: converge::DEFAULT_BANDWIDTH,
            incoming: false,
        }
    }

    #[test]
    fn a_fabric_without_keys_is_refused_unless_explicitly_insecure() {
        let e = fabric_auth(&config(None, false)).unwrap_err();
        assert!(matches!(e, CompanionError::NoFabricKey { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("vfmig keys generate") && msg.contains("--insecure-fabric"),
            "{msg}"
        );
        assert!(matches!(
            fabric_auth(&config(None, true)),
            Ok(soft::FabricAuth::Insecure)
        ));
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cf = dir.path().join("cluster.json");
        std::fs::write(&cf, r#"{"vms": {"a": "127.0.0.1:1"}}"#).unwrap();
        let g = soft::generate_keys(&cf, &dir.path().join("keys")).unwrap();
        let key = g.private_keys["a"].clone();
        let mut c = config(Some(key.clone()), false);
        c.cluster = soft::ClusterMap::load(&cf).unwrap();
        assert!(fabric_auth(&c).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = fabric_auth(&c).unwrap_err();
        let chain = format!("{:?}", anyhow::Error::from(e));
        assert!(chain.contains("chmod 600"), "{chain}");
    }
}
