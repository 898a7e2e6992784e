//! Seed inputs per target: real frames, lines and messages, encoded by the code that sends
//! them, framed as the targets cut their input.

use serde_json::json;
use vfmig_proto as proto;

use super::{join_pieces, MR_GPA, PEER};
use crate::companion::control::{GuestEvent, Request};
use crate::companion::generator::{GeneratorConfig, Window};
use crate::vf::soft::wire::{self, AckStatus, Frame};
use crate::vf::soft::{VfState, VF_STATE_VERSION};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

fn command(seq: u32, msg: proto::Message) -> Vec<u8> {
    proto::encode(&proto::Frame {
        dst: proto::COMPANION_MAC,
        src: GUEST_MAC,
        seq,
        msg,
    })
}

pub(super) fn guest() -> Vec<Vec<u8>> {
    // The rig's region key and QP numbers are 1 and 1, 2 (see `soft_vf`).
    let sge = |addr, len| proto::Sge { addr, len, lkey: 1 };
    let session = vec![
        command(1, proto::Message::Open),
        command(
            2,
            proto::Message::RegMr {
                addr: 0,
                access: proto::access::LOCAL_WRITE | proto::access::REMOTE_WRITE,
                segments: vec![proto::Segment {
                    gpa: MR_GPA,
                    len: 4096,
                }],
            },
        ),
        command(3, proto::Message::CreateQp),
        command(3, proto::Message::CreateQpAt { qp: 0x8000_0001 }),
        command(
            4,
            proto::Message::ConnectQp {
                qp: 3,
                peer: PEER.into(),
                peer_qp: 7,
            },
        ),
        command(
            5,
            proto::Message::PostRecv {
                qp: 1,
                wr_id: 50,
                sge: sge(0, 256),
            },
        ),
        command(
            6,
            proto::Message::PostSend {
                qp: 1,
                wr_id: 60,
                sge: sge(0, 64),
                op: proto::SendOp::Write {
                    remote_addr: 0x100,
                    rkey: 9,
                    imm: Some(7),
                },
            },
        ),
        command(
            7,
            proto::Message::PostSend {
                qp: 2,
                wr_id: 61,
                sge: sge(64, 32),
                op: proto::SendOp::Send { imm: None },
            },
        ),
        command(8, proto::Message::DeregMr { key: 1 }),
        command(
            9,
            proto::Message::EventAck {
                event: proto::Event::Suspend,
            },
        ),
        command(11, proto::Message::DestroyQp { qp: 2 }),
    ];
    let mut out = vec![join_pieces(&session)];
    out.extend(session.iter().map(|f| join_pieces(std::slice::from_ref(f))));
    // A companion-to-guest frame sent by the guest.
    out.push(join_pieces(&[command(
        10,
        proto::Message::Reply {
            status: 1,
            value: 0,
            error: "no".into(),
        },
    )]));
    out
}

pub(super) fn fabric() -> Vec<Vec<u8>> {
    // The rig's QP 1 is connected to the peer's QP 1, has two receives, and expects PSN 1.
    let write = |psn, imm| Frame::Write {
        src_qp: 1,
        dst_qp: 1,
        psn,
        rkey: 1,
        addr: 0x10,
        imm,
        payload: b"a peer's bytes".to_vec(),
    };
    let send = |psn| Frame::Send {
        src_qp: 1,
        dst_qp: 1,
        psn,
        imm: Some(3),
        payload: vec![0xab; 40],
    };
    let ack = Frame::Ack {
        qp: 1,
        psn: 1,
        status: AckStatus::Ok,
    };
    let hello = Frame::Hello {
        vm: PEER.into(),
        listen: "127.0.0.1:7000".into(),
        announce: false,
    };
    let stream = |frames: &[Frame]| frames.iter().flat_map(wire::encode).collect::<Vec<u8>>();
    vec![
        stream(&[
            hello,
            write(1, None),
            send(2),
            write(3, Some(9)),
            write(2, None),
        ]),
        stream(&[write(1, None)]),
        stream(&[send(1)]),
        stream(&[send(1), send(1), write(5, None)]),
        stream(&[ack]),
    ]
}

pub(super) fn qmp() -> Vec<Vec<u8>> {
    let greeting = json!({"QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 9}, "package": "v9.2.0"},
        "capabilities": ["oob"]
    }});
    let lines = [
        greeting,
        json!({"return": {}, "id": 1}),
        json!({"return": {"status": "running", "running": true}, "id": 2}),
        json!({"return": {
            "status": "completed", "total-time": 1200, "downtime": 30, "setup-time": 2,
            "ram": {"transferred": 1048576, "remaining": 0, "total": 2147483648u64,
                    "duplicate": 5, "normal": 200, "dirty-pages-rate": 10, "mbps": 900.5,
                    "dirty-sync-count": 4},
            "vfio": {"transferred": 4096}
        }, "id": 3}),
        json!({"error": {"class": "GenericError", "desc": "no migration"}, "id": 4}),
        json!({"event": "MIGRATION", "data": {"status": "completed"},
               "timestamp": {"seconds": 1700000000u64, "microseconds": 5}}),
        json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}),
    ];
    let text: Vec<String> = lines.iter().map(|l| format!("{l}\n")).collect();
    let mut out = vec![text.concat().into_bytes()];
    out.push(format!("{}{}", text[0], text[1]).into_bytes());
    out.extend(text.into_iter().map(String::into_bytes));
    out
}

pub(super) fn control() -> Vec<Vec<u8>> {
    let window = Window {
        gpa: 0x2_0000,
        slots: 8,
        stride: 4096,
        record_size: 64,
    };
    let state = VfState {
        version: VF_STATE_VERSION,
        vm: "c".into(),
        epoch: 1,
        peer_epochs: Default::default(),
        mrs: vec![],
        next_key: 1,
        qps: vec![],
        next_qp: 1,
        cq: vec![],
    };
    let requests = [
        Request::Status,
        Request::Stats,
        Request::GeneratorStart(GeneratorConfig { window, rate: 1000 }),
        Request::Ledger,
        Request::GeneratorStop,
        Request::Scan { window },
        Request::Read {
            gpa: 0x2_0000,
            len: 64,
        },
        Request::Write {
            gpa: 0x2_0000,
            hex: "00ff10".into(),
        },
        Request::SendEvent {
            event: GuestEvent::Suspend,
        },
        Request::SetTracking { enabled: true },
        Request::SetThrottle {
            policy: crate::companion::converge::DeviceThrottle::Auto,
            bandwidth: 1 << 27,
        },
        Request::VfExport,
        Request::VfImport {
            vf: state,
            rx_frames: vec!["0102".into()],
        },
        Request::Quit,
    ];
    let lines: Vec<String> = requests
        .iter()
        .map(|r| serde_json::to_string(r).expect("every request is JSON"))
        .collect();
    let mut out = vec![lines.join("\n").into_bytes()];
    out.extend(lines.into_iter().map(String::into_bytes));
    out
}

/// A vhost-user message on the wire: request, flags, size, payload.
fn vhost_message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

pub(super) fn vhost() -> Vec<Vec<u8>> {
    use vhost::vhost_user::message::{FrontendReq, VhostUserVirtioFeatures};
    const V1: u32 = 0x1;
    const NEED_REPLY: u32 = 0x8;
    let code = |r: FrontendReq| r as u32;
    let enable = |index: u32, num: u32| {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        p
    };
    let features = VhostUserVirtioFeatures::PROTOCOL_FEATURES
        .bits()
        .to_le_bytes();
    let messages = [
        vhost_message(code(FrontendReq::GET_FEATURES), V1, &[]),
        vhost_message(code(FrontendReq::SET_VRING_ENABLE), V1, &enable(0, 1)),
        vhost_message(
            code(FrontendReq::SET_VRING_ENABLE),
            V1 | NEED_REPLY,
            &enable(1, 1),
        ),
        vhost_message(code(FrontendReq::SET_FEATURES), V1, &features),
        vhost_message(code(FrontendReq::SET_VRING_ENABLE), V1, &enable(0, 0)),
        vhost_message(code(FrontendReq::SEND_RARP), V1 | NEED_REPLY, &[0x52; 8]),
        vhost_message(code(FrontendReq::GET_VRING_BASE), V1, &enable(0, 0)),
    ];
    let mut out = vec![messages.concat()];
    out.extend(messages.iter().cloned());
    out
}
