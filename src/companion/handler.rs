//! The companion's answers to its control socket: one arm per [`Request`], each giving the
//! request's reply struct or a [`RequestError`].

use std::sync::atomic::Ordering;

use vm_memory::GuestAddressSpace;

use super::control::{
    self, GeneratorStartReply, GeneratorStopReply, GuestEvent, Handler, HexError, LedgerReply,
    QuitReply, ReadReply, Reply, Request, ScanReply, SendEventReply, SetThrottleReply,
    SetTrackingReply, StatsReply, StatusReply, StepsReply, WriteReply, MAX_READ,
};
use super::device::{DeviceError, VmStart};
use super::generator::{self, Generator, GeneratorError, GeneratorStatus, WindowError};
use super::Companion;
use crate::memory::{guest_ram, DmaError};

/// Why the companion refused a request. The reply's `error` is this message followed by its
/// causes'.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// `generator_start` failed.
    #[error("the traffic generator did not start")]
    GeneratorStart(#[source] GeneratorError),
    /// `generator_stop` before any `generator_start`.
    #[error("no generator was started; send generator_start first")]
    NoGeneratorToStop,
    /// `ledger` before any `generator_start`.
    #[error("no generator was started, so there is no ledger")]
    NoLedger,
    /// `scan` of a window of the wrong shape.
    #[error("scan refused")]
    ScanWindow(#[source] WindowError),
    /// `scan` could not read a slot.
    #[error("scan of the window failed")]
    Scan(#[source] DmaError),
    /// `read` of more than [`MAX_READ`] bytes.
    #[error("read of {len} bytes refused: at most {MAX_READ} per request")]
    ReadTooLong {
        /// The bytes asked for.
        len: u64,
    },
    /// `read` refused by the DMA engine.
    #[error("cannot read guest RAM")]
    Read(#[source] DmaError),
    /// `write`'s `hex` is not hex bytes.
    #[error("the write's `hex` is not hex bytes")]
    WriteHex(#[source] HexError),
    /// `write` refused by the DMA engine.
    #[error("cannot write guest RAM")]
    Write(#[source] DmaError),
    /// The VF's state could not be exported.
    #[error("cannot export the soft VF's state")]
    VfExport(#[source] DeviceError),
    /// The VF's state could not be imported.
    #[error("cannot import the soft VF's state")]
    VfImport(#[source] DeviceError),
    /// The VF's state could not be dropped.
    #[error("cannot release the soft VF's state")]
    VfRelease(#[source] DeviceError),
    /// The VF's exported state could not be taken back.
    #[error("cannot take the soft VF's state back")]
    VfReclaim(#[source] DeviceError),
}

impl Companion {
    fn generator_status(&self) -> Option<GeneratorStatus> {
        self.generator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Generator::status)
    }

    fn status(&self) -> StatusReply {
        let mem = self.dma.ram().memory();
        StatusReply {
            name: self.name.clone(),
            pid: std::process::id(),
            vhost_connected: self.vhost_connected.load(Ordering::SeqCst),
            regions: guest_ram::regions(&mem),
            gate: self.dma.gate_state(),
            tracking: self.dma.tracking(),
            vhost_messages: self.vhost_messages.lock().clone(),
            vfio: self.device.vfio_status(),
        }
    }

    fn stats(&self) -> StatsReply {
        let mem = self.dma.ram().memory();
        let regions = guest_ram::regions(&mem);
        let gate = self.dma.gate_state();
        StatsReply {
            dma: self.dma.stats(),
            net: self.net.stats(),
            epoch: gate.epoch,
            device_dirty_pages: self.dma.device_dirty_bitmap().count(),
            log_requested: gate.log_requested,
            log_on: gate.log_requested && !regions.is_empty() && regions.iter().all(|r| r.logged),
            quiesced: gate.quiesced,
            tracking: self.dma.tracking(),
            generator: self.generator_status(),
            soft_vf: self.device.fabric_stats(),
            guest_link: self.guest.stats(),
            throttle: self.converge.stats(),
            handoff: self.net.handoff().report(),
        }
    }
}

impl Handler for Companion {
    type Error = RequestError;

    fn handle(&self, request: Request) -> Result<Reply, RequestError> {
        match request {
            Request::Status => Ok(self.status().into()),
            Request::Stats => Ok(self.stats().into()),
            Request::GeneratorStart(config) => {
                let mut slot = self.generator.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(g) = slot.as_mut() {
                    g.stop();
                }
                *slot = Some(
                    Generator::start(self.dma.clone(), config)
                        .map_err(RequestError::GeneratorStart)?,
                );
                Ok(GeneratorStartReply {}.into())
            }
            Request::GeneratorStop => {
                let mut slot = self.generator.lock().unwrap_or_else(|e| e.into_inner());
                let g = slot.as_mut().ok_or(RequestError::NoGeneratorToStop)?;
                g.stop();
                Ok(GeneratorStopReply {
                    generator: g.status(),
                }
                .into())
            }
            Request::Ledger => {
                let slot = self.generator.lock().unwrap_or_else(|e| e.into_inner());
                let g = slot.as_ref().ok_or(RequestError::NoLedger)?;
                Ok(LedgerReply {
                    window: g.ledger().window(),
                    versions: g.ledger().versions(),
                    generator: g.status(),
                }
                .into())
            }
            Request::Scan { window } => {
                window.validate().map_err(RequestError::ScanWindow)?;
                let slots = generator::scan(&self.dma, &window).map_err(RequestError::Scan)?;
                Ok(ScanReply { slots }.into())
            }
            Request::Read { gpa, len } => {
                if len > MAX_READ {
                    return Err(RequestError::ReadTooLong { len });
                }
                let bytes = self.dma.read(gpa, len).map_err(RequestError::Read)?;
                Ok(ReadReply {
                    hex: control::to_hex(&bytes),
                }
                .into())
            }
            Request::Write { gpa, hex } => {
                let bytes = control::from_hex(&hex).map_err(RequestError::WriteHex)?;
                self.dma.write(gpa, &bytes).map_err(RequestError::Write)?;
                Ok(WriteReply {
                    written: bytes.len(),
                }
                .into())
            }
            Request::VfExport => Ok(self
                .device
                .export(&self.guest)
                .map_err(RequestError::VfExport)?
                .into()),
            Request::VfImport { vf, rx_frames } => {
                let reply = self
                    .device
                    .import(&self.guest, vf, &rx_frames, VmStart::Later)
                    .map_err(RequestError::VfImport)?;
                self.net.handoff().imported_over_control();
                Ok(reply.into())
            }
            Request::VfRelease => {
                // A destination drops what the handoff brought, and claims nothing.
                self.net.handoff().drop_incoming();
                Ok(self
                    .device
                    .drop_state(&self.guest)
                    .map_err(RequestError::VfRelease)?
                    .into())
            }
            // The source takes its state back, and its destination is told.
            Request::VfReclaim => Ok(self
                .net
                .handoff()
                .take_back()
                .map_err(RequestError::VfReclaim)?
                .into()),
            Request::SendEvent { event } => {
                let e = match event {
                    GuestEvent::Suspend => vfmig_proto::Event::Suspend,
                    GuestEvent::Resume => vfmig_proto::Event::Resume,
                };
                self.guest.queue(0, vfmig_proto::Message::Event(e));
                Ok(SendEventReply { sent: event }.into())
            }
            Request::SetTracking { enabled } => {
                self.dma.set_tracking(enabled);
                Ok(SetTrackingReply { tracking: enabled }.into())
            }
            Request::Steps => Ok(StepsReply {
                steps: crate::trace::steps::snapshot(),
            }
            .into()),
            Request::SetThrottle { policy, bandwidth } => {
                self.converge.set(policy, bandwidth);
                Ok(SetThrottleReply { policy, bandwidth }.into())
            }
            Request::Quit => {
                self.quit.store(true, Ordering::SeqCst);
                tracing::info!("quit requested on the control socket");
                self.device.release();
                // Exit from a helper thread after the reply has gone out.
                std::thread::spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    std::process::exit(0);
                });
                Ok(QuitReply {}.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::super::control::{ControlClient, ControlError};
    use super::super::converge::DeviceThrottle;
    use super::super::device::Device;
    use super::super::generator::{GeneratorConfig, SlotContent, Window};
    use super::super::guest_link::GuestLink;
    use super::*;
    use crate::memory::DmaEngine;
    use crate::vf::soft::{ClusterMap, FabricTiming, SoftVf};

    /// A companion of VM `name` over 1 MiB of guest RAM, with a soft VF on loopback when
    /// `soft_vf`, serving its control socket in `dir`.
    fn companion(dir: &Path, name: &str, soft_vf: bool) -> (Arc<DmaEngine>, ControlClient) {
        let ram = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let dma = Arc::new(DmaEngine::new(ram));
        dma.adopt_memory();
        let vf = soft_vf.then(|| {
            SoftVf::start(
                name,
                dma.clone(),
                "127.0.0.1:0",
                ClusterMap::default(),
                FabricTiming::default(),
                crate::vf::soft::test_auth(name),
            )
            .unwrap()
        });
        let device = Device::new(vf.map(|vf| vf.backend()), dma.clone());
        let guest = GuestLink::new(device.verbs(), dma.clone()).unwrap();
        let companion = Arc::new(Companion::new(name, dma.clone(), device, guest));
        static SOCKETS: AtomicUsize = AtomicUsize::new(0);
        let path = dir.join(format!("{}.sock", SOCKETS.fetch_add(1, Ordering::Relaxed)));
        control::serve(&path, companion).unwrap();
        let client = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
        (dma, client)
    }

    fn refusal<T: std::fmt::Debug>(r: Result<T, ControlError>) -> String {
        match r {
            Err(ControlError::Refused { message, .. }) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    const WINDOW: Window = Window {
        gpa: 0x1_0000,
        slots: 8,
        stride: 4096,
        record_size: 64,
    };

    #[test]
    fn every_reply_of_the_companion_reads_as_the_clients_type() {
        let dir = tempfile::tempdir().unwrap();
        let (dma, mut c) = companion(dir.path(), "vm", true);
        let status = c.status().unwrap();
        assert_eq!(status.name, "vm");
        assert_eq!(status.regions.len(), 1);
        assert!(status.vfio.is_none());
        assert!(c.set_tracking(true).unwrap().tracking);
        let throttle = DeviceThrottle::Fixed(50_000_000);
        assert_eq!(c.set_throttle(throttle, 1 << 20).unwrap().policy, throttle);
        let t = c.stats().unwrap().throttle;
        assert_eq!((t.policy, t.bandwidth, t.rate), (throttle, 1 << 20, 0));
        assert_eq!(c.write(0x2000, b"vfmig").unwrap().written, 5);
        assert_eq!(c.read(0x2000, 5).unwrap().hex, control::to_hex(b"vfmig"));
        c.generator_start(GeneratorConfig {
            window: WINDOW,
            rate: 10_000,
        })
        .unwrap();
        while c.stats().unwrap().generator.map_or(0, |g| g.writes) < 20 {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!c.generator_stop().unwrap().generator.running);
        let ledger = c.ledger().unwrap();
        assert_eq!(ledger.window, WINDOW);
        let slots = c.scan(WINDOW).unwrap().slots;
        for (slot, version) in slots.iter().zip(&ledger.versions) {
            assert_eq!(*slot, SlotContent::Record(*version));
        }
        let stats = c.stats().unwrap();
        assert_eq!(stats.dma.writes, 1 + ledger.generator.writes);
        assert!(stats.soft_vf.is_some());
        assert_eq!(
            c.send_event(GuestEvent::Suspend).unwrap().sent,
            GuestEvent::Suspend
        );

        // The soft VF moves to another companion of the same VM.
        dma.quiesce();
        let exported = c.vf_export().unwrap();
        assert_eq!(exported.vf.vm, "vm");
        let (_, mut d) = companion(dir.path(), "vm", false);
        assert!(refusal(d.vf_import(exported.vf.clone(), vec![])).contains("no soft VF"));
        let (_, mut d) = companion(dir.path(), "vm", true);
        let imported = d.vf_import(exported.vf, exported.rx_frames).unwrap();
        assert!(imported.announced_to.is_empty(), "{imported:?}");
    }

    #[test]
    fn refusals_say_what_was_refused_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut c) = companion(dir.path(), "vm", false);
        let m = refusal(c.call_as::<WriteReply>(&Request::Write {
            gpa: 0,
            hex: "zz".into(),
        }));
        assert_eq!(
            m,
            "the write's `hex` is not hex bytes: not a hex byte at offset 0: \"zz\""
        );
        let m = refusal(c.write(1 << 30, &[0xee; 16]));
        assert!(m.starts_with("cannot write guest RAM: "), "{m}");
        assert!(m.contains("outside guest RAM"), "{m}");
        assert!(m.contains("nothing was written"), "{m}");
        let m = refusal(c.read(0, MAX_READ + 1));
        assert!(m.contains("at most"), "{m}");
        let m = refusal(c.generator_stop());
        assert!(m.contains("send generator_start first"), "{m}");
        let m = refusal(c.ledger());
        assert!(m.contains("no ledger"), "{m}");
        let m = refusal(c.generator_start(GeneratorConfig {
            window: WINDOW,
            rate: 0,
        }));
        assert_eq!(
            m,
            "the traffic generator did not start: rate must be at least 1 write per second"
        );
        let m = refusal(c.scan(Window { slots: 0, ..WINDOW }));
        assert_eq!(m, "scan refused: the window has no slots");
        let m = refusal(c.vf_export());
        assert!(m.contains("no soft VF"), "{m}");

        let (_, mut v) = companion(dir.path(), "vm", true);
        let m = refusal(v.vf_export());
        assert!(
            m.starts_with("cannot export the soft VF's state: ") && m.contains("quiesced"),
            "{m}"
        );
    }
}
