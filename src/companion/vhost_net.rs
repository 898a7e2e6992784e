//! The companion as a vhost-user-net backend.
//!
//! QEMU's virtio-net device, with `-netdev vhost-user`, hands this backend the guest RAM
//! (`SET_MEM_TABLE`), the virtqueues, and during a migration its dirty log (`SET_LOG_BASE`) —
//! the one channel through which an unmodified QEMU merges another process's dirty pages into
//! precopy. The hooks that matter to migration:
//! - `features` offers `VHOST_F_LOG_ALL` and `protocol_features` offers `LOG_SHMFD`; without
//!   either, QEMU blocks migration;
//! - `acked_features` learns from `LOG_ALL` that a migration runs (and, after a quiesce, that
//!   QEMU restarted the device);
//! - `update_memory` adopts each new memory table;
//! - `stop_vring`, called inside `GET_VRING_BASE` before the reply, is the switchover point:
//!   the device is quiesced there, so its last writes are logged before QEMU's final sync.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use super::device::Device;
use super::guest_link::GuestLink;
use super::handoff::Handoff;
use crate::memory::guest_ram::GuestRam;
use crate::memory::DmaEngine;
use crate::memory::QemuLogBitmap;

/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;
/// Event id of "frames wait for the guest" (after the queues and the exit event).
pub const RX_PENDING_EVENT: u16 = 3;
/// Largest frame taken from the guest (with the virtio-net header).
const MAX_TX_FRAME: usize = 65_562;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 256;
/// Size of `virtio_net_hdr_v1` (VERSION_1 always carries `num_buffers`).
pub const NET_HDR_LEN: u32 = 12;

/// Counters of the net device.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct NetStats {
    /// Frames the guest transmitted (counted and dropped for now).
    pub tx_frames: u64,
    /// Bytes of those frames, without the virtio-net header.
    pub tx_bytes: u64,
    /// Quiesces at switchover (`GET_VRING_BASE`).
    pub quiesces: u64,
    /// Memory tables received.
    pub mem_tables: u64,
}

#[derive(Default)]
struct Counters {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    quiesces: AtomicU64,
    mem_tables: AtomicU64,
    worker_errors: AtomicU64,
}

/// The vhost-user-net backend. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct NetBackend {
    dma: Arc<DmaEngine>,
    guest: Arc<GuestLink>,
    event_idx: Arc<AtomicBool>,
    counters: Arc<Counters>,
    /// The companion's VF (whichever backend, or none): each memory table is mapped into it,
    /// and it is quiesced at switchover.
    device: Arc<Device>,
    /// The VF's handoff to (or from) this VM's other companion at switchover.
    handoff: Arc<Handoff>,
}

impl NetBackend {
    /// A backend whose device writes go through `dma`, whose vfmig frames go to `guest`, and
    /// which drives the companion's VF through `device`.
    pub fn new(dma: Arc<DmaEngine>, guest: Arc<GuestLink>, device: Arc<Device>) -> Self {
        Self {
            handoff: Handoff::new(device.clone(), guest.clone()),
            dma,
            guest,
            event_idx: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(Counters::default()),
            device,
        }
    }

    /// The VF's handoff between this VM's companions.
    pub fn handoff(&self) -> &Arc<Handoff> {
        &self.handoff
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        let c = &self.counters;
        NetStats {
            tx_frames: c.tx_frames.load(Ordering::Relaxed),
            tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
            quiesces: c.quiesces.load(Ordering::Relaxed),
            mem_tables: c.mem_tables.load(Ordering::Relaxed),
        }
    }

    /// Events a vring worker could not handle (a broken ring, say): logged, and the worker
    /// went on.
    pub fn worker_errors(&self) -> u64 {
        self.counters.worker_errors.load(Ordering::Relaxed)
    }

    /// Quiesces the VF at the switchover point, before QEMU gets its reply: when this
    /// returns, every device write that landed is marked in QEMU's log. Idempotent.
    pub fn quiesce(&self, message: &str, queue_index: u32) {
        if let Some(waited) = self.device.quiesce(message) {
            // The state goes to a waiting destination now, overlapping QEMU's downtime.
            self.handoff.on_quiesce();
            self.counters.quiesces.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                queue = queue_index,
                waited_us = waited.as_micros() as u64,
                "{message}: VF quiesced before the reply"
            );
        }
    }

    /// Takes every frame the guest queued for transmission: vfmig frames go to the guest
    /// link, others are counted and dropped.
    fn drain_tx(&self, vring: &VringRwLock<GuestRam>) -> io::Result<()> {
        // Quiesced, the frames stay in the guest's ring for whoever runs the VM next.
        let Some(_turn) = self.guest.tx_turn() else {
            return Ok(());
        };
        let mem = self.dma.ram().memory();
        let mut state = vring.get_mut();
        // Each frame may queue a reply for the guest; take no more than there is room for.
        // The rest stay in the guest's ring until it takes frames (back-pressure).
        let room = self.guest.tx_room();
        let chains: Vec<_> = state
            .get_queue_mut()
            .iter(mem.clone())
            .map_err(|e| io::Error::other(format!("TX queue: {e}")))?
            .take(room)
            .collect();
        if chains.len() == room {
            self.guest.pause_tx(room);
        }
        if chains.is_empty() {
            return Ok(());
        }
        crate::trace::steps::first("first-frame-from-guest", "");
        for chain in chains {
            let taken = std::time::Instant::now();
            let head = chain.head_index();
            let mut frame = Vec::new();
            for desc in chain.filter(|d| !d.is_write_only()) {
                let n = (desc.len() as usize).min(MAX_TX_FRAME.saturating_sub(frame.len()));
                let at = frame.len();
                frame.resize(at + n, 0);
                if mem.read_slice(&mut frame[at..], desc.addr()).is_err() {
                    frame.truncate(at);
                    break;
                }
            }
            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            self.counters.tx_bytes.fetch_add(
                (frame.len() as u64).saturating_sub(u64::from(NET_HDR_LEN)),
                Ordering::Relaxed,
            );
            if frame.len() > NET_HDR_LEN as usize {
                self.guest
                    .on_frame_taken_at(&frame[NET_HDR_LEN as usize..], taken);
            }
            state
                .add_used(head, 0)
                .map_err(|e| io::Error::other(format!("TX used ring: {e}")))?;
        }
        state.signal_used_queue()
    }

    /// Writes the frames waiting for the guest into its receive buffers, as many as it has
    /// posted; the rest wait for the next RX kick.
    fn deliver_rx(&self, vring: &VringRwLock<GuestRam>) -> io::Result<()> {
        let mem = self.dma.ram().memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !self.dma.ring_writes_allowed() {
            return Ok(());
        }
        let mut delivered = false;
        while let Some(frame) = self.guest.next_for_guest() {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                self.guest.put_back(frame);
                break;
            };
            let head = chain.head_index();
            // virtio_net_hdr_v1: no offloads, num_buffers = 1.
            let mut data = vec![0u8; NET_HDR_LEN as usize];
            data[10] = 1;
            data.extend_from_slice(&frame);
            let mut written = 0usize;
            for desc in chain.filter(|d| d.is_write_only()) {
                if written == data.len() {
                    break;
                }
                let n = (desc.len() as usize).min(data.len() - written);
                if mem
                    .write_slice(&data[written..written + n], desc.addr())
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            let whole = written == data.len();
            if !whole {
                tracing::warn!(
                    frame = frame.len(),
                    written,
                    "guest receive buffer too small for a vfmig frame: dropped"
                );
            }
            state
                .add_used(head, written as u32)
                .map_err(|e| io::Error::other(format!("RX used ring: {e}")))?;
            if whole {
                self.guest.delivered(&frame);
            }
            delivered = true;
        }
        if delivered {
            crate::trace::steps::first("first-frame-to-guest", "");
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = QemuLogBitmap;
    type Vring = VringRwLock<GuestRam>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        self.dma.set_log_requested(log_all);
        if !log_all {
            // The migration ended (completed, failed or cancelled): no throttle without one.
            self.dma.throttle().lift();
        }
        // SET_FEATURES after a quiesce means QEMU is starting the device again: the source
        // VM runs again (a failed or cancelled migration), so the VF may work again.
        if self.dma.gate_state().quiesced {
            self.device.resume();
            self.handoff.on_resume();
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // SEND_RARP is answered by the message filter (the crate would reject it). REPLY_ACK
        // is not offered, so the filter never owes QEMU an ack for a message it holds.
        VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::RARP
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestRam) -> io::Result<()> {
        self.counters.mem_tables.fetch_add(1, Ordering::Relaxed);
        self.dma.adopt_memory();
        // A VM that migrated in runs: its VF state is taken over before its rings run.
        self.handoff.on_device_start();
        self.device.on_memory_table(&mem.memory().into_inner());
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // For net QEMU sends GET_VRING_BASE for queue 0 then 1 at stop-and-copy; quiesce on
        // the first, the second finds the gate closed already.
        self.quiesce("GET_VRING_BASE", queue_index);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the crate's vring worker for good, and the NIC with it. A
        // ring the guest broke (an invalid avail index, say) is the guest's to reset; the
        // worker goes on serving the other ring and the next events.
        if let Err(e) = self.serve_event(device_event, evset, vrings) {
            let n = self.counters.worker_errors.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= 10 || n.is_power_of_two() {
                tracing::warn!(
                    error = %e,
                    event = device_event,
                    worker_errors = n,
                    "vring event not handled; the worker goes on (a broken ring works again \
                     once the guest resets the device)"
                );
            }
        }
        Ok(())
    }
}

impl NetBackend {
    /// Handles one event of the vring worker.
    fn serve_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<GuestRam>],
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected event set {evset:?} on queue {device_event}"
            )));
        }
        match device_event {
            TX_QUEUE => {
                // Frames for the guest still go out when its TX ring is broken.
                let tx = self.drain_tx(&vrings[TX_QUEUE as usize]);
                let rx = self.deliver_rx(&vrings[RX_QUEUE as usize]);
                tx.and(rx)
            }
            // The guest posted receive buffers, or frames wait for it.
            RX_QUEUE | RX_PENDING_EVENT => {
                if device_event == RX_PENDING_EVENT {
                    let _ = self.guest.rx_event.read();
                }
                self.deliver_rx(&vrings[RX_QUEUE as usize])?;
                // TX frames left in the guest's ring while the RX queue was full, or queued
                // before the VM moved here: take them now that there is room and the ring
                // runs (the guest will not kick for them again).
                let tx_ready = vrings[TX_QUEUE as usize].get_ref().get_queue().ready();
                if tx_ready && self.guest.resume_tx() {
                    let tx = self.drain_tx(&vrings[TX_QUEUE as usize]);
                    let rx = self.deliver_rx(&vrings[RX_QUEUE as usize]);
                    tx.and(rx)?;
                }
                Ok(())
            }
            other => Err(io::Error::other(format!("event for unknown queue {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::guest_ram::GuestRamMmap;
    use vm_memory::{GuestAddress, GuestMemoryAtomic};

    #[test]
    fn a_broken_ring_is_logged_and_the_worker_goes_on() {
        let ram = GuestMemoryAtomic::new(
            GuestRamMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let dma = Arc::new(DmaEngine::new(ram.clone()));
        dma.adopt_memory();
        let guest = GuestLink::new(None, dma.clone()).unwrap();
        let net = NetBackend::new(dma.clone(), guest, Device::new(None, dma.clone()));
        let vrings: Vec<VringRwLock<GuestRam>> = (0..NUM_QUEUES)
            .map(|_| VringRwLock::new(ram.clone(), QUEUE_SIZE as u16).unwrap())
            .collect();
        let tx = &vrings[TX_QUEUE as usize];
        tx.set_queue_size(16);
        tx.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        tx.set_queue_ready(true);
        // The guest publishes an avail index 1000 entries ahead on a ring of 16.
        ram.memory()
            .write_obj(1000u16, GuestAddress(0x2002))
            .unwrap();
        for _ in 0..3 {
            net.handle_event(TX_QUEUE, EventSet::IN, &vrings, 0)
                .expect("the worker must not end on a broken ring");
        }
        assert_eq!(net.worker_errors(), 3);
        // Unknown events and event sets are contained the same way.
        net.handle_event(7, EventSet::IN, &vrings, 0).unwrap();
        net.handle_event(TX_QUEUE, EventSet::OUT, &vrings, 0)
            .unwrap();
        assert_eq!(net.worker_errors(), 5);
    }

    /// A backend over 1 MiB of guest RAM whose guest has one OPEN in its TX ring (descriptor
    /// 0 → the frame at 0x10000; used index at 0x3002).
    fn one_frame_in_the_tx_ring() -> (
        NetBackend,
        Arc<GuestLink>,
        Vec<VringRwLock<GuestRam>>,
        GuestMemoryAtomic<GuestRamMmap>,
    ) {
        use vfmig_proto as proto;
        let ram = GuestMemoryAtomic::new(
            GuestRamMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let dma = Arc::new(DmaEngine::new(ram.clone()));
        dma.adopt_memory();
        let guest = GuestLink::new(None, dma.clone()).unwrap();
        let net = NetBackend::new(dma.clone(), guest.clone(), Device::new(None, dma.clone()));
        let vrings: Vec<VringRwLock<GuestRam>> = (0..NUM_QUEUES)
            .map(|_| VringRwLock::new(ram.clone(), QUEUE_SIZE as u16).unwrap())
            .collect();
        let tx = &vrings[TX_QUEUE as usize];
        tx.set_queue_size(16);
        tx.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        tx.set_queue_ready(true);
        let mut frame = vec![0u8; NET_HDR_LEN as usize];
        frame.extend(proto::encode(&proto::Frame {
            dst: proto::COMPANION_MAC,
            src: [0x52, 0x54, 0, 0, 0, 1],
            seq: 1,
            msg: proto::Message::Open,
        }));
        let m = ram.memory();
        m.write_slice(&frame, GuestAddress(0x10000)).unwrap();
        m.write_obj(0x10000u64, GuestAddress(0x1000)).unwrap();
        m.write_obj(frame.len() as u32, GuestAddress(0x1008))
            .unwrap();
        m.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        (net, guest, vrings, ram)
    }

    fn used(ram: &GuestMemoryAtomic<GuestRamMmap>) -> u16 {
        ram.memory().read_obj::<u16>(GuestAddress(0x3002)).unwrap()
    }

    #[test]
    fn tx_frames_queued_before_the_vm_moved_here_are_taken_without_a_kick() {
        let (net, guest, vrings, ram) = one_frame_in_the_tx_ring();
        // The guest kicked for its frame at the source; here the import owes it a drain.
        guest.owe_tx_drain();
        net.handle_event(RX_PENDING_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(used(&ram), 1, "the frame was left in the guest's ring");
        assert_eq!(guest.stats().frames_from_guest, 1);
    }

    #[test]
    fn tx_frames_kicked_before_the_switchover_stay_in_the_guest_ring_until_the_device_resumes() {
        let (net, guest, vrings, ram) = one_frame_in_the_tx_ring();
        // The guest kicked before its vCPUs stopped; the worker gets to the kick only after
        // GET_VRING_BASE quiesced the device (and the VF state may be exported already).
        net.dma.quiesce();
        net.handle_event(TX_QUEUE, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(
            used(&ram),
            0,
            "a frame taken now would be lost with the frozen copy"
        );
        assert_eq!(guest.stats().frames_from_guest, 0);
        // The migration failed: the device resumes, and the next turn takes the frame.
        net.dma.resume();
        net.handle_event(RX_PENDING_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(used(&ram), 1, "the frame was left in the guest's ring");
        assert_eq!(guest.stats().frames_from_guest, 1);
    }

    #[test]
    fn a_full_reply_queue_leaves_tx_frames_in_the_guest_ring_until_frames_leave() {
        use crate::companion::guest_link::MAX_RX_FRAMES;
        use vfmig_proto as proto;
        let (net, guest, vrings, ram) = one_frame_in_the_tx_ring();
        // The guest has taken none of the frames queued for it.
        for _ in 0..MAX_RX_FRAMES {
            guest.queue(0, proto::Message::Event(proto::Event::Migrated));
        }
        net.handle_event(TX_QUEUE, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(used(&ram), 0, "the frame stays in the guest's ring");
        assert_eq!(guest.stats().frames_from_guest, 0);
        assert_eq!(guest.stats().frames_waiting, MAX_RX_FRAMES as u64);
        // One frame leaves; the next RX event takes the TX frame and queues its reply.
        assert!(guest.next_for_guest().is_some());
        net.handle_event(RX_PENDING_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(used(&ram), 1);
        assert_eq!(guest.stats().frames_from_guest, 1);
        assert_eq!(guest.stats().frames_waiting, MAX_RX_FRAMES as u64);
    }
}
