//! The per-VM companion process.
//!
//! It is QEMU's vhost-user-net backend ([`vhost_net`]), owns the VF's path into guest RAM
//! (the [`DmaEngine`]), runs the traffic generator that stands in for remote RDMA writes
//! ([`generator`]), and answers the orchestrator on a control socket ([`control`]).

pub mod control;
pub mod device;
pub mod generator;
pub mod guest_link;
pub mod vhost_filter;
pub mod vhost_net;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestAddressSpace;

use std::os::fd::AsRawFd;

use vmm_sys_util::epoll::EventSet;

use crate::memory::guest_ram;
use crate::memory::DmaEngine;
use crate::vf::vfio::{VfioVf, VfioVfError};
use crate::vf::{self, soft::SoftVf};
use control::{Handler, Request, MAX_READ};
use device::DeviceSide;
use generator::{Generator, GeneratorStatus};
use guest_link::GuestLink;
use vhost_net::NetBackend;

/// Errors that stop the companion.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    /// The vhost-user socket could not be set up.
    #[error("VM {vm}: cannot listen on vhost-user socket {path}: {reason}")]
    Listen {
        /// The VM's name.
        vm: String,
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The control socket could not be set up.
    #[error("VM {vm}: cannot serve control socket {path}: {source}")]
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
    #[error("VM {vm}: the soft VF cannot listen on {addr}: {source}")]
    Fabric {
        /// The VM's name.
        vm: String,
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VFIO VF could not be opened.
    #[error("VM {vm}: cannot own the VFIO VF {bdf}: {error}")]
    Vfio {
        /// The VM's name.
        vm: String,
        /// The VF's PCI address.
        bdf: String,
        /// Why (in the message, so not repeated as a cause).
        error: Box<VfioVfError>,
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
    pub cluster: vf::soft::ClusterMap,
    /// PCI address of a VF bound to vfio-pci that the companion owns; none: no VFIO VF.
    pub vfio: Option<String>,
}

/// The companion's shared state, as the control socket sees it.
struct Companion {
    name: String,
    dma: Arc<DmaEngine>,
    net: NetBackend,
    vf: Option<SoftVf>,
    /// The VFIO VF's device side (`--vfio`).
    device: Option<Arc<DeviceSide>>,
    guest: Arc<GuestLink>,
    generator: Mutex<Option<Generator>>,
    vhost_connected: AtomicBool,
    vhost_messages: vhost_filter::SharedMessageLog,
    quit: AtomicBool,
}

impl Companion {
    fn generator_status(&self) -> Option<GeneratorStatus> {
        self.generator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Generator::status)
    }

    fn status(&self) -> Value {
        let mem = self.dma.ram().memory();
        json!({
            "name": self.name,
            "pid": std::process::id(),
            "vhost_connected": self.vhost_connected.load(Ordering::SeqCst),
            "regions": guest_ram::regions(&mem),
            "gate": self.dma.gate_state(),
            "tracking": self.dma.tracking(),
            "vhost_messages": *self.vhost_messages.lock(),
            "vfio": self.device.as_ref().map(|d| d.status()),
        })
    }

    fn stats(&self) -> Value {
        let mem = self.dma.ram().memory();
        let regions = guest_ram::regions(&mem);
        let gate = self.dma.gate_state();
        json!({
            "dma": self.dma.stats(),
            "net": self.net.stats(),
            "epoch": gate.epoch,
            "device_dirty_pages": self.dma.device_dirty_bitmap().count(),
            "log_requested": gate.log_requested,
            "log_on": gate.log_requested && !regions.is_empty() && regions.iter().all(|r| r.logged),
            "quiesced": gate.quiesced,
            "tracking": self.dma.tracking(),
            "generator": self.generator_status(),
            "soft_vf": self.vf.as_ref().map(SoftVf::stats),
            "guest_link": self.guest.stats(),
        })
    }
}

impl Handler for Companion {
    fn handle(&self, request: Request) -> Result<Value, String> {
        match request {
            Request::Status => Ok(self.status()),
            Request::Stats => Ok(self.stats()),
            Request::GeneratorStart(config) => {
                let mut slot = self.generator.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(g) = slot.as_mut() {
                    g.stop();
                }
                *slot = Some(Generator::start(self.dma.clone(), config)?);
                Ok(json!({}))
            }
            Request::GeneratorStop => {
                let mut slot = self.generator.lock().unwrap_or_else(|e| e.into_inner());
                let g = slot
                    .as_mut()
                    .ok_or("no generator was started; send generator_start first")?;
                g.stop();
                Ok(json!({ "generator": g.status() }))
            }
            Request::Ledger => {
                let slot = self.generator.lock().unwrap_or_else(|e| e.into_inner());
                let g = slot
                    .as_ref()
                    .ok_or("no generator was started, so there is no ledger")?;
                Ok(json!({
                    "window": g.ledger().window(),
                    "versions": g.ledger().versions(),
                    "generator": g.status(),
                }))
            }
            Request::Scan { window } => {
                window.validate()?;
                let found = generator::scan(&self.dma, &window).map_err(|e| e.to_string())?;
                Ok(json!({ "slots": found }))
            }
            Request::Read { gpa, len } => {
                if len > MAX_READ {
                    return Err(format!(
                        "read of {len} bytes refused: at most {MAX_READ} per request"
                    ));
                }
                let bytes = self.dma.read(gpa, len).map_err(|e| e.to_string())?;
                Ok(json!({ "hex": control::to_hex(&bytes) }))
            }
            Request::Write { gpa, hex } => {
                let bytes = control::from_hex(&hex)?;
                self.dma.write(gpa, &bytes).map_err(|e| e.to_string())?;
                Ok(json!({ "written": bytes.len() }))
            }
            Request::VfExport => {
                let vf = self
                    .vf
                    .as_ref()
                    .ok_or("this companion has no soft VF (--fabric-listen)")?;
                let state = vf.export_state().map_err(|e| e.to_string())?;
                let rx: Vec<String> = self
                    .guest
                    .take_waiting()
                    .iter()
                    .map(|f| control::to_hex(f))
                    .collect();
                Ok(json!({ "vf": state, "rx_frames": rx }))
            }
            Request::VfImport {
                vf: state,
                rx_frames,
            } => {
                let vf = self
                    .vf
                    .as_ref()
                    .ok_or("this companion has no soft VF (--fabric-listen)")?;
                let frames = rx_frames
                    .iter()
                    .map(|h| control::from_hex(h))
                    .collect::<Result<Vec<_>, _>>()?;
                vf.import_state(state).map_err(|e| e.to_string())?;
                self.guest.restore_waiting(frames);
                let reached = vf.announce();
                Ok(json!({ "announced_to": reached }))
            }
            Request::SendEvent { event } => {
                let e = match event {
                    control::GuestEvent::Suspend => vfmig_proto::Event::Suspend,
                    control::GuestEvent::Resume => vfmig_proto::Event::Resume,
                };
                self.guest.queue(0, vfmig_proto::Message::Event(e));
                Ok(json!({ "sent": event }))
            }
            Request::SetTracking { enabled } => {
                self.dma.set_tracking(enabled);
                Ok(json!({ "tracking": enabled }))
            }
            Request::Quit => {
                self.quit.store(true, Ordering::SeqCst);
                tracing::info!("quit requested on the control socket");
                if let Some(device) = &self.device {
                    device.release();
                }
                // Exit from a helper thread after the reply has gone out.
                std::thread::spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    std::process::exit(0);
                });
                Ok(json!({}))
            }
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
    // Own the VFIO VF before anything else, so that a VF that cannot be used stops the
    // companion at once with the reason.
    let device = match &config.vfio {
        Some(bdf) => {
            let vfio = VfioVf::open(bdf).map_err(|source| CompanionError::Vfio {
                vm: config.name.clone(),
                bdf: bdf.clone(),
                error: Box::new(source),
            })?;
            let side = DeviceSide::new(Box::new(vfio), dma.clone());
            side.start_sync_thread(device::SYNC_PERIOD)
                .map_err(|e| CompanionError::Daemon {
                    vm: config.name.clone(),
                    reason: format!("cannot start the VF dirty-sync thread: {e}"),
                })?;
            Some(side)
        }
        None => None,
    };
    let vf = match &config.fabric_listen {
        Some(addr) => Some(
            SoftVf::start(
                &config.name,
                dma.clone(),
                addr,
                config.cluster.clone(),
                vf::soft::FabricTiming::default(),
            )
            .map_err(|e| CompanionError::Fabric {
                vm: config.name.clone(),
                addr: addr.clone(),
                source: e,
            })?,
        ),
        None => None,
    };
    let guest = GuestLink::new(vf.clone(), dma.clone()).map_err(|e| CompanionError::Daemon {
        vm: config.name.clone(),
        reason: format!("cannot set up the guest link: {e}"),
    })?;
    let mut net = NetBackend::new(dma.clone(), guest.clone());
    if let Some(side) = &device {
        net = net.with_device(side.clone());
    }
    let companion = Arc::new(Companion {
        name: config.name.clone(),
        dma,
        net: net.clone(),
        vf,
        device: device.clone(),
        guest: guest.clone(),
        generator: Mutex::new(None),
        vhost_connected: AtomicBool::new(false),
        vhost_messages: Default::default(),
        quit: AtomicBool::new(false),
    });
    control::serve(&config.control, companion.clone()).map_err(|source| {
        CompanionError::Control {
            vm: config.name.clone(),
            path: config.control.clone(),
            source,
        }
    })?;

    // QEMU connects to the public socket; the backend crate listens on a private one behind
    // the message filter (see `vhost_filter`).
    let listen_err = |reason: String| CompanionError::Listen {
        vm: config.name.clone(),
        path: config.socket.clone(),
        reason,
    };
    let mut backend_path = config.socket.clone().into_os_string();
    backend_path.push(".backend");
    let backend_path = PathBuf::from(backend_path);
    let mut listener = Listener::new(&backend_path, true).map_err(|e| listen_err(e.to_string()))?;
    let _ = std::fs::remove_file(&config.socket);
    let public = UnixListener::bind(&config.socket).map_err(|e| listen_err(e.to_string()))?;
    let mut daemon =
        VhostUserDaemon::new(format!("vfmig-{}", config.name), net, ram).map_err(|e| {
            CompanionError::Daemon {
                vm: config.name.clone(),
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
                vm: config.name.clone(),
                reason: format!("cannot watch the guest link's event: {e}"),
            })?;
    }
    tracing::info!(
        vm = %config.name,
        socket = %config.socket.display(),
        control = %config.control.display(),
        "companion ready: waiting for QEMU on the vhost-user socket"
    );
    // QEMU connects once per run; after it disconnects (the VM quit, or migrated away and was
    // shut down), keep the control socket up so that the guest RAM last mapped can still be
    // verified, and accept a new connection if one comes.
    loop {
        let (qemu, _) = public.accept().map_err(|e| listen_err(e.to_string()))?;
        let to_backend =
            UnixStream::connect(&backend_path).map_err(|e| listen_err(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| CompanionError::Daemon {
                vm: config.name.clone(),
                reason: e.to_string(),
            })?;
        companion.vhost_connected.store(true, Ordering::SeqCst);
        tracing::info!("QEMU connected");
        let log = companion.vhost_messages.clone();
        let net = companion.net.clone();
        let filter = std::thread::Builder::new()
            .name("vfmig-vhost-filter".into())
            .spawn(move || {
                vhost_filter::run(qemu, to_backend, log, |queue| {
                    net.quiesce("SET_VRING_ENABLE 0", queue)
                })
            })
            .map_err(|e| CompanionError::Daemon {
                vm: config.name.clone(),
                reason: format!("cannot start the vhost-user filter thread: {e}"),
            })?;
        let result = daemon.wait();
        match filter.join() {
            Ok(Err(e)) => tracing::warn!(error = %e, "vhost-user filter ended with an error"),
            Err(_) => tracing::error!("vhost-user filter thread panicked"),
            Ok(Ok(())) => {}
        }
        companion.vhost_connected.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => tracing::info!("QEMU disconnected"),
            Err(e) => tracing::warn!(error = %e, "QEMU connection ended with an error"),
        }
        if companion.quit.load(Ordering::SeqCst) {
            if let Some(side) = &device {
                side.release();
            }
            return Ok(());
        }
    }
}
