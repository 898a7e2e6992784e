//! `vf-probe --me NAME`: feeds the companion bad input through the real guest path and checks
//! that each is refused with a clear error, that nothing is written, and that the VF keeps
//! serving. One VM, its QPs connected to each other through the fabric (the VM is its own
//! peer). Prints one JSON line per check, then `{"tool":"vf-probe","ok":true|false}`.

use std::time::Duration;

use vfmig_guest::workload::{fail, Args, Json};
use vfmig_guest::{access, Completion, Device, PinnedBuffer, Sge, Status};
use vfmig_proto::{encode, Frame, Message, Segment, COMPANION_MAC};

const TOOL: &str = "vf-probe";
const LEN: usize = 64 << 10;

struct Probe {
    ok: bool,
}

impl Probe {
    fn check(&mut self, step: &str, pass: bool, detail: &str) {
        self.ok &= pass;
        Json::tool(TOOL)
            .s("step", step)
            .s("result", if pass { "ok" } else { "FAILED" })
            .s("detail", detail)
            .print();
    }
}

fn one(dev: &Device) -> Option<Completion> {
    dev.wait_cq(1, Duration::from_secs(20)).into_iter().next()
}

/// Two fresh QPs of this VM, connected to each other.
fn pair(dev: &Device, me: &str) -> Result<(u32, u32), String> {
    let (a, b) = (
        dev.create_qp().map_err(|e| e.to_string())?,
        dev.create_qp().map_err(|e| e.to_string())?,
    );
    dev.connect_qp(a, me, b).map_err(|e| e.to_string())?;
    dev.connect_qp(b, me, a).map_err(|e| e.to_string())?;
    Ok((a, b))
}

fn run(me: &str) -> Result<bool, String> {
    let dev = Device::open("eth0").map_err(|e| e.to_string())?;
    let mut buf = PinnedBuffer::new(LEN).map_err(|e| e.to_string())?;
    let key = dev
        .register(&buf, 0, access::LOCAL_WRITE | access::REMOTE_WRITE)
        .map_err(|e| e.to_string())?;
    let mut p = Probe { ok: true };

    // A region whose pages are not guest RAM.
    let r = dev.register_segments(
        0,
        access::REMOTE_WRITE,
        vec![Segment {
            gpa: 1 << 40,
            len: 4096,
        }],
    );
    p.check(
        "register_outside_ram",
        matches!(&r, Err(e) if e.to_string().contains("outside guest RAM")),
        &format!("{r:?}"),
    );

    // An unknown peer.
    let q = dev.create_qp().map_err(|e| e.to_string())?;
    let r = dev.connect_qp(q, "nobody", 1);
    p.check(
        "connect_unknown_peer",
        matches!(&r, Err(e) if e.to_string().contains("cluster")),
        &format!("{r:?}"),
    );

    // Local buffer outside the poster's regions.
    let (a, _) = pair(&dev, me)?;
    let bad_sge = Sge {
        addr: LEN as u64 - 8,
        len: 64,
        lkey: key,
    };
    dev.post_write(a, 1, bad_sge, 0, key, None)
        .map_err(|e| e.to_string())?;
    let c = one(&dev);
    p.check(
        "sge_outside_region",
        c.map(|c| c.status) == Some(Status::LocalProtectionError),
        &format!("{c:?}"),
    );

    // A bad rkey, and a write past the region's end, each on fresh QPs.
    buf.as_mut_slice()[..16].copy_from_slice(b"vfmig bad input!");
    let before = buf.as_slice()[LEN - 8..].to_vec();
    let sge = Sge {
        addr: 0,
        len: 16,
        lkey: key,
    };
    let (a, _) = pair(&dev, me)?;
    dev.post_write(a, 2, sge, 0x100, key + 99, None)
        .map_err(|e| e.to_string())?;
    let c = one(&dev);
    p.check(
        "bad_rkey",
        c.map(|c| c.status) == Some(Status::RemoteAccessError),
        &format!("{c:?}"),
    );
    let (a, _) = pair(&dev, me)?;
    dev.post_write(a, 3, sge, LEN as u64 - 8, key, None)
        .map_err(|e| e.to_string())?;
    let c = one(&dev);
    p.check(
        "write_past_region_end",
        c.map(|c| c.status) == Some(Status::RemoteAccessError),
        &format!("{c:?}"),
    );
    p.check(
        "nothing_written",
        buf.as_slice()[LEN - 8..] == before[..],
        "the last bytes of the region are unchanged",
    );

    // Malformed frames: bad magic, unknown kind, truncated body.
    let good = encode(&Frame {
        dst: COMPANION_MAC,
        src: dev.mac(),
        seq: 9,
        msg: Message::CreateQp,
    });
    let mut bad_magic = good.clone();
    bad_magic[14] ^= 0xff;
    let mut bad_kind = good.clone();
    bad_kind[17] = 0x66;
    let reg = encode(&Frame {
        dst: COMPANION_MAC,
        src: dev.mac(),
        seq: 10,
        msg: Message::RegMr {
            addr: 0,
            access: 0,
            segments: vec![Segment { gpa: 0, len: 1 }; 4],
        },
    });
    for f in [&bad_magic[..], &bad_kind[..], &reg[..reg.len() - 20]] {
        dev.send_raw(f).map_err(|e| e.to_string())?;
    }
    Json::tool(TOOL)
        .s("step", "malformed_frames_sent")
        .u("count", 3)
        .print();

    // Still serving: a valid write lands, and its completion comes back.
    let (a, _) = pair(&dev, me)?;
    dev.post_write(a, 4, sge, 0x200, key, None)
        .map_err(|e| e.to_string())?;
    let c = one(&dev);
    let landed = buf.as_slice()[0x200..0x210] == *b"vfmig bad input!";
    p.check(
        "still_serving",
        c.map(|c| c.status) == Some(Status::Success) && landed,
        &format!("{c:?}, data landed: {landed}"),
    );
    Ok(p.ok)
}

fn main() {
    let args = Args::from_env().unwrap_or_else(|e| fail(TOOL, &e));
    let me = args
        .req("me")
        .unwrap_or_else(|e| fail(TOOL, &e))
        .to_string();
    match run(&me) {
        Ok(ok) => {
            Json::tool(TOOL)
                .s("ok", if ok { "true" } else { "false" })
                .print();
            std::process::exit(if ok { 0 } else { 1 });
        }
        Err(e) => fail(TOOL, &e),
    }
}
