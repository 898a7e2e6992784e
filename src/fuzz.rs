//! Fuzz entry points: one per decoder and handler of untrusted input. Each takes arbitrary
//! bytes and must never panic, abort or hang; a malformed input is an error the code under
//! test counts, logs and drops.
//!
//! | target     | untrusted party | what runs                                                   |
//! |------------|-----------------|-------------------------------------------------------------|
//! | `guest`    | the guest       | `vfmig_proto::decode` and `GuestLink::on_frame` on a soft VF |
//! | `fabric`   | the network     | `wire::read_frame` / `decode`, then the soft VF's responder and requester |
//! | `qmp`      | QEMU's monitor  | the QMP line reader and parser, the typed replies           |
//! | `control`  | local clients   | control request parsing and the companion's handler         |
//! | `vhost`    | the vhost-user front-end | the message filter between QEMU and the backend    |
//!
//! Two drivers feed them: `cargo fuzz` (the `fuzz/` project, libFuzzer, coverage-guided) and,
//! on a stable toolchain, the tests at the end of this file (structured-random and mutated seed
//! inputs from a fixed seed, `VFMIG_FUZZ_RUNS` inputs per target, and every input kept under
//! `fuzz/regressions/<target>/`). `tools/fuzz.sh` picks one; the seed corpora in
//! `fuzz/corpus/<target>/` are [`seeds`], written by `tools/fuzz.sh --seeds`.
//!
//! Several targets keep one rig (a soft VF, a guest link, a companion) for the process and put
//! the VF back into its starting state before each input, so an input's outcome does not
//! depend on the ones before it.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vfmig_proto as proto;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::companion::control::{Handler, Request};
use crate::companion::device::Device;
use crate::companion::guest_link::GuestLink;
use crate::companion::{vhost_filter, Companion};
use crate::memory::DmaEngine;
use crate::qmp::{MigrationInfo, VmStatus};
use crate::vf::soft::wire;
use crate::vf::soft::{ClusterMap, FabricAuth, FabricTiming, SoftVf, VfState};
use crate::vf::verbs::{Access, GpaRange, RecvWr};

/// A fuzz entry point: any bytes, never a panic.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of `fuzz/fuzz_targets/*.rs` and of the corpus folders).
pub const TARGETS: &[(&str, Target)] = &[
    ("guest", guest),
    ("fabric", fabric),
    ("qmp", qmp),
    ("control", control),
    ("vhost", vhost),
];

/// Largest input a target looks at; the rest is ignored (inputs beyond are not more
/// interesting, only slower).
pub const MAX_INPUT: usize = 64 << 10;
/// Most frames, lines or messages one input is cut into.
const MAX_PIECES: usize = 64;

/// Guest RAM of every rig.
const RAM: u64 = 1 << 20;
/// The region every rig registers: guest-physical, and its length.
const MR_GPA: u64 = 0x1_0000;
const MR_LEN: u64 = 0x1_0000;
/// The peer VM of the fabric and guest rigs; its address refuses connections at once.
const PEER: &str = "p";
const PEER_ADDR: &str = "127.0.0.1:1";

fn dma() -> Arc<DmaEngine> {
    let ram = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)])
            .expect("1 MiB of anonymous memory for the fuzz rig"),
    );
    let dma = Arc::new(DmaEngine::new(ram));
    dma.adopt_memory();
    dma
}

/// A soft VF with one region (local and remote write) and QPs 1 and 2 connected to the peer's
/// QPs 1 and 2, two receives posted on QP 1; and that state, to put back before each input.
fn soft_vf(vm: &str) -> (Arc<DmaEngine>, SoftVf, VfState) {
    let dma = dma();
    let timing = FabricTiming {
        retry_interval: Duration::from_millis(20),
        hold_timeout: Duration::from_millis(100),
        rnr_timeout: Duration::from_millis(100),
    };
    let cluster = ClusterMap {
        vms: BTreeMap::from([(PEER.to_string(), PEER_ADDR.to_string())]),
        ..ClusterMap::default()
    };
    // The frame layer after the handshake: what an authenticated peer's frames reach.
    let vf = SoftVf::start(
        vm,
        dma.clone(),
        "127.0.0.1:0",
        cluster,
        timing,
        FabricAuth::Insecure,
    )
    .expect("a soft VF on loopback for the fuzz rig");
    let access = Access {
        local_write: true,
        remote_write: true,
    };
    let range = GpaRange {
        gpa: MR_GPA,
        len: MR_LEN,
    };
    let key = vf
        .register_mr(0, vec![range], access)
        .expect("the rig's region");
    for peer_qp in [1, 2] {
        let qp = vf.create_qp();
        vf.connect_qp(qp, PEER, peer_qp).expect("the rig's QPs");
    }
    for wr_id in [10, 11] {
        let sge = proto::Sge {
            addr: 0,
            len: 4096,
            lkey: key,
        };
        vf.post_recv(1, RecvWr { wr_id, sge })
            .expect("the rig's receives");
    }
    dma.quiesce();
    let baseline = vf.export_state().expect("the rig's state, quiesced");
    dma.resume();
    (dma, vf, baseline)
}

/// Cuts `data` into pieces, each prefixed by its length (u16, little-endian); the last piece
/// takes what is left when its length runs past the end.
fn pieces(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = &data[..data.len().min(MAX_INPUT)];
    std::iter::from_fn(move || {
        if rest.len() < 2 {
            return None;
        }
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let (piece, after) = body.split_at(n.min(body.len()));
        rest = after;
        Some(piece)
    })
    .take(MAX_PIECES)
}

/// Joins pieces as [`pieces`] cuts them (for seeds).
pub fn join_pieces(pieces: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        out.extend_from_slice(&(p.len() as u16).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

struct GuestRig {
    vf: SoftVf,
    link: Arc<GuestLink>,
    baseline: VfState,
}

/// Guest frames: each piece of `data` is one frame the guest transmits, decoded and acted on
/// by the guest link over a soft VF; the frames for the guest are then taken as its receive
/// queue would.
pub fn guest(data: &[u8]) {
    static RIG: OnceLock<GuestRig> = OnceLock::new();
    let rig = RIG.get_or_init(|| {
        let (dma, vf, baseline) = soft_vf("g");
        let link = GuestLink::new(Some(Arc::new(vf.clone())), dma).expect("the rig's guest link");
        GuestRig { vf, link, baseline }
    });
    let _ = rig.vf.import_state(rig.baseline.clone());
    for frame in pieces(data) {
        let _ = proto::decode(frame);
        rig.link.on_frame(frame);
    }
    while let Some(frame) = rig.link.next_for_guest() {
        let _ = proto::decode(&frame);
    }
}

/// Fabric frames: `data` is a stream of length-prefixed frames from peer `p`, read and
/// decoded as a connection does, each request applied by the soft VF's responder and each
/// ack taken by its requester.
pub fn fabric(data: &[u8]) {
    static RIG: OnceLock<(SoftVf, VfState)> = OnceLock::new();
    let (vf, baseline) = RIG.get_or_init(|| {
        let (_, vf, baseline) = soft_vf("f");
        (vf, baseline)
    });
    let _ = vf.import_state(baseline.clone());
    let mut stream = &data[..data.len().min(MAX_INPUT)];
    for _ in 0..MAX_PIECES {
        match wire::read_frame(&mut stream) {
            Ok(Some(frame)) => {
                let _ = vf.on_peer_frame(PEER, frame);
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// QMP replies: `data` is what QEMU's monitor sends. Every line is read (bounded) and parsed
/// as the client's reader thread does; replies are read as the typed replies of a migration.
/// (A whole `QmpClient` over these bytes costs a thread and a 4096-event queue per input, a
/// hundred times the parsing: its reader is this loop, and its tests cover the routing.)
pub fn qmp(data: &[u8]) {
    use crate::qmp::wire::{self as qw, Line};
    let data = &data[..data.len().min(MAX_INPUT)];
    let mut reader = Cursor::new(data);
    let mut buf = Vec::new();
    for _ in 0..MAX_PIECES {
        match qw::read_line_bounded(&mut reader, 4096, &mut buf) {
            Ok(Line::Data) if qw::is_blank(&buf) => {}
            Ok(Line::Data) => {
                if let Ok(qw::Message::Reply {
                    reply: qw::Reply::Return(value),
                    ..
                }) = qw::parse_message(&buf)
                {
                    let _ = serde_json::from_value::<MigrationInfo>(value.clone());
                    let _ = serde_json::from_value::<VmStatus>(value);
                }
            }
            Ok(Line::TooLong(_)) => {}
            Ok(Line::Eof) | Err(_) => break,
        }
    }
}

struct ControlRig {
    vf: SoftVf,
    guest: Arc<GuestLink>,
    companion: Companion,
    baseline: VfState,
}

/// Control requests: each line of `data` is one request on the control socket, parsed and
/// answered by an in-process companion with a soft VF (`quit` is parsed, not acted on: it
/// ends the process by design); the reply is put into JSON as the socket does.
pub fn control(data: &[u8]) {
    static RIG: OnceLock<ControlRig> = OnceLock::new();
    let rig = RIG.get_or_init(|| {
        let (dma, vf, baseline) = soft_vf("c");
        let device = Device::new(Some(vf.backend()), dma.clone());
        let guest = GuestLink::new(device.verbs(), dma.clone()).expect("the rig's guest link");
        let companion = Companion::new("c", dma, device, guest.clone());
        ControlRig {
            vf,
            guest,
            companion,
            baseline,
        }
    });
    let _ = rig.vf.import_state(rig.baseline.clone());
    let data = &data[..data.len().min(MAX_INPUT)];
    for line in data.split(|&b| b == b'\n').take(MAX_PIECES) {
        let Ok(request) = serde_json::from_slice::<Request>(line) else {
            continue;
        };
        if request == Request::Quit {
            continue;
        }
        if let Ok(reply) = rig.companion.handle(request) {
            let _ = serde_json::to_value(&reply);
        }
    }
    while rig.guest.next_for_guest().is_some() {}
}

/// vhost-user messages: `data` is what QEMU sends on the vhost-user socket, run through the
/// message filter to a backend that reads nothing back.
pub fn vhost(data: &[u8]) {
    use std::io::Write;
    let data = &data[..data.len().min(MAX_INPUT)];
    let Ok((mut front, qemu)) = UnixStream::pair() else {
        return;
    };
    let Ok((backend, _backend_peer)) = UnixStream::pair() else {
        return;
    };
    if front.write_all(data).is_err() || front.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let _ = vhost_filter::run(qemu, backend, Default::default(), |_| {});
}

/// Valid inputs for `target`, built by encoding real frames, lines and messages: the seed
/// corpus of `fuzz/corpus/<target>/` and of the stable driver.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "guest" => seeds::guest(),
        "fabric" => seeds::fabric(),
        "qmp" => seeds::qmp(),
        "control" => seeds::control(),
        "vhost" => seeds::vhost(),
        _ => Vec::new(),
    }
}

mod seeds;

#[cfg(test)]
mod tests;
