//! `vfmig bench fabric`: soft-VF RDMA WRITE bandwidth (64 B to 1 MiB) and latency between two
//! soft VFs over loopback TCP, authenticated (the default) and, side by side in the same run,
//! without authentication (`--insecure-fabric`); and the limits it works within: memcpy
//! bandwidth, a plain TCP socket pair over loopback, and the same socket pair used in the
//! soft VF's shape (below).
//!
//! **The soft VF's shape.** A soft-VF WRITE is a message that the target acknowledges, with a
//! window of requests in flight, an ack-reader thread on the requester that completes them,
//! and a caller that waits on the completion queue (a condition variable). A one-way 64 B
//! WRITE_WITH_IMM crosses a link's reader thread on the target and wakes the waiter there.
//! Plain TCP has none of that: a stream with no acks, read by the thread that waits. The
//! "TCP, acked" bandwidth and the "TCP, handed off" latency put exactly that structure on the
//! same socket pair, without framing, MAC, guest memory or the DMA engine: what is left
//! between them and the soft VF is the soft VF's own cost, and what is between them and plain
//! TCP is the price of the structure on this machine. The frame MAC's own bandwidth (one side's
//! keyed BLAKE3 over a request) is beside them: an authenticated soft VF pays it on each side.
//!
//! `--sizes` measures some sizes only, and `--soft-vf-only` the authenticated soft VF alone,
//! so that a profiler sees nothing else (`perf record -- vfmig bench fabric --soft-vf-only`;
//! its threads are `vfmig-fabric-pe*`, the targets' connections, and `vfmig-fabric-ac*`, the
//! requesters' ack readers).

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::mmap::FromRangesError;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::stats::median;
use crate::memory::{DmaEngine, DmaError};
use crate::vf::soft::{
    ephemeral_job, frame_mac, wire, ClusterMap, FabricAuth, FabricTiming, KeyError, SoftVf,
};
use crate::vf::verbs::{Access, GpaRange, RecvWr, SendOp, SendWr, Sge, Status, VerbsError};

const RAM: usize = 96 << 20;
const BUF_GPA: u64 = 16 << 20;
const BUF_LEN: u64 = 64 << 20;
const VA: u64 = 0x7f00_0000_0000;
const DEPTH: usize = 64;

/// Why the fabric bench stopped.
#[derive(Debug, thiserror::Error)]
pub enum FabricBenchError {
    /// The bench's guest RAM could not be mapped.
    #[error("cannot map {} MiB of anonymous memory for the bench's guest RAM", RAM >> 20)]
    Ram(#[source] FromRangesError),
    /// The buffer could not be touched through the DMA engine.
    #[error("cannot fill the bench buffer through the DMA engine")]
    Dma(#[source] DmaError),
    /// A verbs call on a soft VF failed.
    #[error("a soft VF verbs call failed")]
    Verbs(#[from] VerbsError),
    /// A soft VF reported a failed completion.
    #[error("soft VF completion {0}: the fabric lost or refused a write")]
    Completion(String),
    /// A soft VF or a TCP peer stopped answering.
    #[error("{0}")]
    Stalled(&'static str),
    /// The bench's fabric keys could not be made.
    #[error("cannot make the bench's fabric keys")]
    Keys(#[from] KeyError),
    /// Starting a soft VF, or a TCP socket, failed.
    #[error("bench socket I/O failed")]
    Io(#[from] std::io::Error),
    /// A message size the bench cannot send.
    #[error("message size {0} B: the bench sends 1 B to {max} B", max = wire::MAX_PAYLOAD)]
    Size(u64),
}

/// What the bench measures.
#[derive(Debug, Clone)]
pub struct FabricOptions {
    /// Rounds per figure (the median is taken over them).
    pub rounds: usize,
    /// Message sizes, bytes.
    pub sizes: Vec<u64>,
    /// Only the authenticated soft VF, nothing beside it (to profile it alone); the other
    /// figures are 0.
    pub soft_vf_only: bool,
}

impl Default for FabricOptions {
    fn default() -> Self {
        Self {
            rounds: 5,
            sizes: (3..=10).map(|i| 1u64 << (2 * i)).collect(),
            soft_vf_only: false,
        }
    }
}

/// One message size's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SizeRow {
    /// Bytes per message.
    pub size: u64,
    /// Median soft-VF RDMA WRITE bandwidth, authenticated (the default), MiB/s.
    pub soft_vf_mib_s: f64,
    /// Median soft-VF RDMA WRITE bandwidth without authentication (`--insecure-fabric`), MiB/s.
    pub soft_vf_insecure_mib_s: f64,
    /// What authentication costs: 1 − authenticated ÷ unauthenticated bandwidth.
    pub auth_cost: f64,
    /// Median memcpy bandwidth, MiB/s.
    pub memcpy_mib_s: f64,
    /// Median bandwidth of one frame MAC (keyed BLAKE3) over a request of this size, MiB/s:
    /// each side of an authenticated soft VF computes one per request (the sender seals it,
    /// the target checks it), on top of what the unauthenticated soft VF does.
    pub mac_mib_s: f64,
    /// Median loopback TCP bandwidth, MiB/s.
    pub tcp_mib_s: f64,
    /// Median loopback TCP bandwidth in the soft VF's shape (every message acked, a window of
    /// [`DEPTH`], acks read by their own thread and handed to the poster), MiB/s.
    pub tcp_acked_mib_s: f64,
    /// Median CPU time per message of the process (all threads, user and system: what the
    /// messages cost on a shared machine, where bandwidth is what is left of the cores), µs:
    /// the authenticated soft VF.
    pub soft_vf_cpu_us: f64,
    /// The same, the soft VF without authentication.
    pub soft_vf_insecure_cpu_us: f64,
    /// The same, loopback TCP.
    pub tcp_cpu_us: f64,
    /// The same, loopback TCP in the soft VF's shape.
    pub tcp_acked_cpu_us: f64,
    /// Soft VF as a fraction of memcpy.
    pub fraction_of_memcpy: f64,
    /// Soft VF as a fraction of loopback TCP.
    pub fraction_of_tcp: f64,
    /// Soft VF as a fraction of loopback TCP in the soft VF's shape.
    pub fraction_of_tcp_acked: f64,
}

/// The bench's result.
#[derive(Debug, Clone, Serialize)]
pub struct FabricBench {
    /// Per size.
    pub rows: Vec<SizeRow>,
    /// Median one-way latency of a 64 B WRITE_WITH_IMM (round trip ÷ 2), authenticated, µs.
    pub write_lat_64b_us: f64,
    /// The same without authentication, µs.
    pub write_lat_64b_insecure_us: f64,
    /// Median one-way latency of 64 B over plain loopback TCP (round trip ÷ 2), µs.
    pub tcp_lat_64b_us: f64,
    /// The same with each side's socket read by its own thread, which hands the message to
    /// the waiting thread through a condition variable (the soft VF's shape), µs.
    pub tcp_handoff_lat_64b_us: f64,
    /// Rounds per figure (the median is taken over them).
    pub rounds: usize,
}

struct Side {
    vf: SoftVf,
    key: u32,
}

fn side(name: &str, auth: FabricAuth) -> Result<Side, FabricBenchError> {
    let ram = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).map_err(FabricBenchError::Ram)?,
    );
    let dma = Arc::new(DmaEngine::new(ram));
    dma.adopt_memory();
    // Touch every page of the buffer once, so no figure includes first-touch page faults.
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..BUF_LEN).step_by(chunk.len()) {
        dma.write(BUF_GPA + off, &chunk)
            .map_err(FabricBenchError::Dma)?;
    }
    let vf = SoftVf::start(
        name,
        dma,
        "127.0.0.1:0",
        ClusterMap::default(),
        FabricTiming::default(),
        auth,
    )?;
    let key = vf.register_mr(
        VA,
        vec![GpaRange {
            gpa: BUF_GPA,
            len: BUF_LEN,
        }],
        Access {
            local_write: true,
            remote_write: true,
        },
    )?;
    Ok(Side { vf, key })
}

fn write(wr_id: u64, size: u64, off: u64, lkey: u32, rkey: u32, imm: Option<u32>) -> SendWr {
    SendWr {
        wr_id,
        sge: Sge {
            addr: VA + off,
            len: size as u32,
            lkey,
        },
        op: SendOp::Write {
            remote_addr: VA + off,
            rkey,
            imm,
        },
    }
}

fn ops_for(size: u64) -> u64 {
    ((128u64 << 20) / size).clamp(512, 20_000)
}

fn soft_vf_bw(a: &Side, b: &Side, qa: u32, size: u64) -> Result<f64, FabricBenchError> {
    let ops = ops_for(size);
    let slots = (BUF_LEN / size).max(1);
    let start = Instant::now();
    let (mut posted, mut done, mut outstanding) = (0u64, 0u64, 0usize);
    while done < ops {
        while outstanding < DEPTH && posted < ops {
            let off = (posted % slots) * size;
            a.vf.post_send(qa, write(posted, size, off, a.key, b.key, None))?;
            posted += 1;
            outstanding += 1;
        }
        let cs = a.vf.wait_cq(DEPTH, Duration::from_secs(10));
        if cs.is_empty() {
            return Err(FabricBenchError::Stalled(
                "soft VF: no completion within 10 s",
            ));
        }
        for c in cs {
            if c.status != Status::Success {
                return Err(FabricBenchError::Completion(format!("{c:?}")));
            }
            done += 1;
            outstanding -= 1;
        }
    }
    Ok((ops * size) as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}

/// CPU time (user and system) this process has used so far, all threads, µs.
fn cpu_us() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` to the pointer, which points to one.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: zero-initialised (a valid `rusage`), then filled by getrusage.
    let ru = unsafe { ru.assume_init() };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// Runs `f`, which moves [`ops_for`]`(size)` messages and returns MiB/s; adds the CPU time
/// per message it took, µs.
fn with_cpu(
    size: u64,
    f: impl FnOnce() -> Result<f64, FabricBenchError>,
) -> Result<(f64, f64), FabricBenchError> {
    let start = cpu_us();
    let bw = f()?;
    Ok((bw, (cpu_us() - start) / ops_for(size) as f64))
}

fn memcpy_bw(size: u64) -> f64 {
    // Both non-zero, so both are touched (written) before timing, as the soft VF's buffers are.
    let src = vec![1u8; BUF_LEN as usize];
    let mut dst = vec![0x5au8; BUF_LEN as usize];
    let ops = ops_for(size);
    let slots = (BUF_LEN / size).max(1);
    let start = Instant::now();
    for i in 0..ops {
        let off = ((i % slots) * size) as usize;
        dst[off..off + size as usize].copy_from_slice(&src[off..off + size as usize]);
        std::hint::black_box(&mut dst);
    }
    (ops * size) as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

fn mac_bw(size: u64) -> f64 {
    let frame = wire::encode(&wire::Frame::Write {
        src_qp: 1,
        dst_qp: 2,
        psn: 1,
        rkey: 1,
        addr: VA,
        imm: None,
        payload: vec![7; size as usize],
    });
    let ops = ops_for(size);
    let start = Instant::now();
    for seq in 0..ops {
        std::hint::black_box(frame_mac(&[9; 32], seq, &frame));
    }
    (ops * size) as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

fn tcp_pair() -> std::io::Result<(std::net::TcpStream, std::net::TcpStream)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let c = std::net::TcpStream::connect(l.local_addr()?)?;
    let (s, _) = l.accept()?;
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}

fn tcp_bw(size: u64) -> std::io::Result<f64> {
    let (mut c, mut s) = tcp_pair()?;
    let ops = ops_for(size);
    let total = ops * size;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::other("TCP peer closed early"));
            }
            got += n as u64;
        }
        s.write_all(&[1])
    });
    let msg = vec![7u8; size as usize];
    let start = Instant::now();
    for _ in 0..ops {
        c.write_all(&msg)?;
    }
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack)?;
    let secs = start.elapsed().as_secs_f64();
    reader
        .join()
        .map_err(|_| std::io::Error::other("TCP reader panicked"))??;
    Ok(total as f64 / (1 << 20) as f64 / secs)
}

fn soft_vf_lat(a: &Side, b: &Side, qa: u32, qb: u32, iters: u32) -> Result<f64, FabricBenchError> {
    let recv = |key| RecvWr {
        wr_id: 0,
        sge: Sge {
            addr: VA,
            len: 0,
            lkey: key,
        },
    };
    let mut samples = Vec::with_capacity(iters as usize);
    for i in 0..iters {
        b.vf.post_recv(qb, recv(b.key))?;
        a.vf.post_recv(qa, recv(a.key))?;
        let t = Instant::now();
        a.vf.post_send(qa, write(u64::from(i), 64, 0, a.key, b.key, Some(i)))?;
        // b sees the receive, answers with its own write; a waits for that receive.
        loop {
            let cs = b.vf.wait_cq(4, Duration::from_secs(5));
            if cs.is_empty() {
                return Err(FabricBenchError::Stalled("latency: b got nothing"));
            }
            if cs.iter().any(|c| c.imm == Some(i)) {
                break;
            }
        }
        b.vf.post_send(qb, write(u64::from(i), 64, 64, b.key, a.key, Some(i)))?;
        loop {
            let cs = a.vf.wait_cq(4, Duration::from_secs(5));
            if cs.is_empty() {
                return Err(FabricBenchError::Stalled("latency: a got nothing"));
            }
            if cs.iter().any(|c| c.imm == Some(i) && c.wr_id == 0) {
                break;
            }
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
        // Drain b's send completion.
        let _ = b.vf.poll_cq(8);
    }
    Ok(median(samples))
}

fn tcp_lat(iters: u32) -> std::io::Result<f64> {
    let (mut c, mut s) = tcp_pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut b = [0u8; 64];
        for _ in 0..iters {
            s.read_exact(&mut b)?;
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut b = [0u8; 64];
    let mut samples = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    echo.join()
        .map_err(|_| std::io::Error::other("TCP echo panicked"))??;
    Ok(median(samples))
}

/// A slot one thread fills and another waits on: the soft VF's completion queue, reduced.
#[derive(Default)]
struct Handoff {
    count: Mutex<u64>,
    ready: Condvar,
}

impl Handoff {
    fn give(&self, n: u64) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += n;
        self.ready.notify_all();
    }

    /// Waits until something was given (at most `timeout`); takes it all.
    fn take(&self, timeout: Duration) -> u64 {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + timeout;
        while *c == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return 0;
            }
            c = self
                .ready
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::take(&mut *c)
    }
}

/// Reads `n` fixed-size messages from `s`, giving each to `to` (a reader thread's loop).
fn read_into_handoff(mut s: std::net::TcpStream, size: usize, n: u64, to: &Handoff) {
    let mut buf = vec![0u8; size];
    for _ in 0..n {
        if s.read_exact(&mut buf).is_err() {
            return;
        }
        to.give(1);
    }
}

/// Loopback TCP in the soft VF's shape: `size`-byte messages with a window of [`DEPTH`]; the
/// target's reader thread acks each with 16 bytes (batched while more is buffered is the soft
/// VF's trick too, but here each ack is its own write, as a lone request's would be); the
/// poster's ack-reader thread hands the acks over a condition variable.
fn tcp_acked_bw(size: u64) -> Result<f64, FabricBenchError> {
    let (c, mut s) = tcp_pair()?;
    let ops = ops_for(size);
    let target = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; size as usize];
        let ack = [0u8; 16];
        for _ in 0..ops {
            s.read_exact(&mut buf)?;
            s.write_all(&ack)?;
        }
        Ok(())
    });
    let acks = Arc::new(Handoff::default());
    let reader = {
        let (r, acks) = (c.try_clone()?, acks.clone());
        std::thread::spawn(move || read_into_handoff(r, 16, ops, &acks))
    };
    let mut c = c;
    let msg = vec![7u8; size as usize];
    let start = Instant::now();
    let (mut posted, mut done) = (0u64, 0u64);
    while done < ops {
        while posted - done < DEPTH as u64 && posted < ops {
            c.write_all(&msg)?;
            posted += 1;
        }
        let n = acks.take(Duration::from_secs(10));
        if n == 0 {
            return Err(FabricBenchError::Stalled("acked TCP: no ack within 10 s"));
        }
        done += n;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = reader.join();
    target
        .join()
        .map_err(|_| std::io::Error::other("TCP target panicked"))??;
    Ok((ops * size) as f64 / (1 << 20) as f64 / secs)
}

/// Loopback TCP ping-pong of 64 B in the soft VF's shape: on each side a reader thread takes
/// the message off the socket and hands it to the waiting thread, which answers.
fn tcp_handoff_lat(iters: u32) -> Result<f64, FabricBenchError> {
    let (c, s) = tcp_pair()?;
    let n = u64::from(iters);
    let (at_c, at_s) = (Arc::new(Handoff::default()), Arc::new(Handoff::default()));
    let readers = [
        (c.try_clone()?, at_c.clone()),
        (s.try_clone()?, at_s.clone()),
    ]
    .map(|(r, h)| std::thread::spawn(move || read_into_handoff(r, 64, n, &h)));
    let echo = {
        let (mut s, at_s) = (s, at_s);
        std::thread::spawn(move || -> std::io::Result<()> {
            let b = [0u8; 64];
            for _ in 0..n {
                if at_s.take(Duration::from_secs(5)) == 0 {
                    return Err(std::io::Error::other("handed-off TCP: echo got nothing"));
                }
                s.write_all(&b)?;
            }
            Ok(())
        })
    };
    let mut c = c;
    let b = [0u8; 64];
    let mut samples = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let t = Instant::now();
        c.write_all(&b)?;
        if at_c.take(Duration::from_secs(5)) == 0 {
            return Err(FabricBenchError::Stalled("handed-off TCP: no answer"));
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    echo.join()
        .map_err(|_| std::io::Error::other("TCP echo panicked"))??;
    for r in readers {
        let _ = r.join();
    }
    Ok(median(samples))
}

/// `a / b`, or 0 where `b` was not measured (JSON has no NaN).
fn frac(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Two soft VFs that know each other, with a connected QP each.
fn pair(auth: bool) -> Result<(Side, Side, u32, u32), FabricBenchError> {
    let (auth_a, auth_b) = if auth {
        let mut job = ephemeral_job(&["bench-a", "bench-b"])?;
        (
            job.remove("bench-a").unwrap_or(FabricAuth::Insecure),
            job.remove("bench-b").unwrap_or(FabricAuth::Insecure),
        )
    } else {
        (FabricAuth::Insecure, FabricAuth::Insecure)
    };
    let (a, b) = (side("bench-a", auth_a)?, side("bench-b", auth_b)?);
    a.vf.set_peer_address("bench-b", b.vf.listen_addr());
    b.vf.set_peer_address("bench-a", a.vf.listen_addr());
    let (qa, qb) = (a.vf.create_qp(), b.vf.create_qp());
    a.vf.connect_qp(qa, "bench-b", qb)?;
    b.vf.connect_qp(qb, "bench-a", qa)?;
    Ok((a, b, qa, qb))
}

/// Runs the fabric bench; `progress` is told each figure as it is measured.
pub fn run(
    opts: &FabricOptions,
    mut progress: impl FnMut(&str),
) -> Result<FabricBench, FabricBenchError> {
    if let Some(&bad) = opts
        .sizes
        .iter()
        .find(|&&s| s == 0 || s > wire::MAX_PAYLOAD as u64)
    {
        return Err(FabricBenchError::Size(bad));
    }
    let (rounds, all) = (opts.rounds.max(1), !opts.soft_vf_only);
    let (a, b, qa, qb) = pair(true)?;
    let (ia, ib, iqa, iqb) = pair(false)?;
    let mut rows = Vec::new();
    for &size in &opts.sizes {
        let (mut v, mut vi, mut m, mut t, mut ta) = (vec![], vec![], vec![], vec![], vec![]);
        let mut mac = vec![];
        let (mut vc, mut vic, mut tc, mut tac) = (vec![], vec![], vec![], vec![]);
        let push = |bw: &mut Vec<f64>, cpu: &mut Vec<f64>, (b, c): (f64, f64)| {
            bw.push(b);
            cpu.push(c);
        };
        for _ in 0..rounds {
            push(
                &mut v,
                &mut vc,
                with_cpu(size, || soft_vf_bw(&a, &b, qa, size))?,
            );
            if all {
                let insecure = with_cpu(size, || soft_vf_bw(&ia, &ib, iqa, size))?;
                push(&mut vi, &mut vic, insecure);
                m.push(memcpy_bw(size));
                mac.push(mac_bw(size));
                push(&mut t, &mut tc, with_cpu(size, || Ok(tcp_bw(size)?))?);
                push(&mut ta, &mut tac, with_cpu(size, || tcp_acked_bw(size))?);
            }
        }
        let (v, vi, m, t, ta) = (median(v), median(vi), median(m), median(t), median(ta));
        let mac = median(mac);
        progress(&format!(
            "{size} B: soft VF {v:.0} MiB/s (without authentication {vi:.0}), memcpy {m:.0} MiB/s, frame MAC {mac:.0} MiB/s, loopback TCP {t:.0} MiB/s (acked, in the soft VF's shape: {ta:.0})"
        ));
        rows.push(SizeRow {
            size,
            soft_vf_mib_s: v,
            soft_vf_insecure_mib_s: vi,
            auth_cost: 1.0 - frac(v, vi),
            memcpy_mib_s: m,
            mac_mib_s: mac,
            tcp_mib_s: t,
            tcp_acked_mib_s: ta,
            soft_vf_cpu_us: median(vc),
            soft_vf_insecure_cpu_us: median(vic),
            tcp_cpu_us: median(tc),
            tcp_acked_cpu_us: median(tac),
            fraction_of_memcpy: frac(v, m),
            fraction_of_tcp: frac(v, t),
            fraction_of_tcp_acked: frac(v, ta),
        });
    }
    let write_lat_64b_us = soft_vf_lat(&a, &b, qa, qb, 2000)?;
    let (write_lat_64b_insecure_us, tcp_lat_64b_us, tcp_handoff_lat_64b_us) = if all {
        (
            soft_vf_lat(&ia, &ib, iqa, iqb, 2000)?,
            tcp_lat(2000)?,
            tcp_handoff_lat(2000)?,
        )
    } else {
        (0.0, 0.0, 0.0)
    };
    progress(&format!(
        "64 B latency: soft VF {write_lat_64b_us:.1} µs (without authentication {write_lat_64b_insecure_us:.1} µs), loopback TCP {tcp_lat_64b_us:.1} µs (handed off, in the soft VF's shape: {tcp_handoff_lat_64b_us:.1} µs)"
    ));
    for s in [&a, &b, &ia, &ib] {
        s.vf.close();
    }
    Ok(FabricBench {
        rows,
        write_lat_64b_us,
        write_lat_64b_insecure_us,
        tcp_lat_64b_us,
        tcp_handoff_lat_64b_us,
        rounds,
    })
}

/// The bench as a markdown table.
pub fn markdown(b: &FabricBench) -> String {
    let mut s = String::from(
        "| size | soft VF MiB/s | without auth MiB/s | auth cost | memcpy MiB/s | frame MAC MiB/s | loopback TCP MiB/s | TCP, acked MiB/s | of memcpy | of TCP | of TCP, acked |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &b.rows {
        s += &format!(
            "| {} | {:.0} | {:.0} | {:.1} % | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} |\n",
            r.size,
            r.soft_vf_mib_s,
            r.soft_vf_insecure_mib_s,
            r.auth_cost * 100.0,
            r.memcpy_mib_s,
            r.mac_mib_s,
            r.tcp_mib_s,
            r.tcp_acked_mib_s,
            r.fraction_of_memcpy,
            r.fraction_of_tcp,
            r.fraction_of_tcp_acked
        );
    }
    s += "\nCPU per message, µs (the process, all threads, user and system):\n\n| size | soft VF | without auth | loopback TCP | TCP, acked |\n|---|---|---|---|---|\n";
    for r in &b.rows {
        s += &format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            r.size, r.soft_vf_cpu_us, r.soft_vf_insecure_cpu_us, r.tcp_cpu_us, r.tcp_acked_cpu_us
        );
    }
    s += &format!(
        "\n64 B one-way latency (round trip ÷ 2, median): soft VF {:.1} µs (without authentication {:.1} µs), loopback TCP {:.1} µs, TCP handed off in the soft VF's shape {:.1} µs\n",
        b.write_lat_64b_us, b.write_lat_64b_insecure_us, b.tcp_lat_64b_us, b.tcp_handoff_lat_64b_us
    );
    s
}
