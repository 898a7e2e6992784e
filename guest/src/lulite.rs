//! `lu-lite`'s distributed driver: the kernel of [`crate::lu`] on several ranks, with halos
//! exchanged by RDMA WRITE WITH_IMM (imm = iteration) into the neighbours' halo slots,
//! double-buffered by iteration parity; the ranks wait for both neighbours' rows before the
//! next iteration. At the end the ranks WRITE their row hashes to rank 0, which prints the
//! global checksum (the same for any number of ranks).
//!
//! Output lines: `{"tool":"lu-lite","rank":r,"iter":i,"ms":…}` per iteration,
//! `{"tool":"lu-lite","rank":r,"blackout_ms":…}`, `{"tool":"lu-lite","rank":r,"checksum":…,
//! "iters":n,"rows":…,"errors":…}`, and on rank 0 `{"tool":"lu-lite","rank":0,
//! "global_checksum":…,"ranks":k,"n":N,"iters":n}`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::lu::{global_checksum, rows_of, Block};
use crate::workload::{register_first, Comm, Job, Json};
use crate::{Device, Opcode, PinnedBuffer, Sge, Status};

/// The tool name in JSON lines.
pub const TOOL: &str = "lu-lite";
/// Immediate of the final row-hash gather (iteration numbers stay below it).
pub const GATHER_IMM: u32 = 0x8000_0000;

/// Byte offsets in every rank's one registered region (the same on all ranks for given N
/// and iterations).
///
/// Halos land in one slot per iteration (`iteration % slots`), so the region keeps every
/// row received over RDMA; the rank's checksum covers them as well as its grid. A write into
/// this VM that a migration lost would otherwise go unseen whenever the row had already been
/// copied out; with the log, it changes the checksum.
struct Layout {
    row: u64,
    slots: u64,
}

/// Most halo slots a region holds (beyond that, slots are reused).
const MAX_SLOTS: u64 = 4096;

impl Layout {
    fn new(n: usize, iters: u64) -> Self {
        Self {
            row: n as u64 * 8,
            slots: iters.clamp(1, MAX_SLOTS),
        }
    }
    /// The slot of an iteration.
    fn slot(&self, it: u64) -> u64 {
        it % self.slots
    }
    /// Halo slot for the row from the rank above.
    fn halo_up(&self, slot: u64) -> u64 {
        2 * slot * self.row
    }
    /// Halo slot for the row from the rank below.
    fn halo_down(&self, slot: u64) -> u64 {
        (2 * slot + 1) * self.row
    }
    /// Bytes of the halo log.
    fn halo_log_len(&self) -> u64 {
        2 * self.slots * self.row
    }
    /// Staging of my top row (to the rank above), by parity.
    fn send_up(&self, p: usize) -> u64 {
        self.halo_log_len() + p as u64 * self.row
    }
    /// Staging of my bottom row (to the rank below), by parity.
    fn send_down(&self, p: usize) -> u64 {
        self.halo_log_len() + (2 + p as u64) * self.row
    }
    /// Rank 0's gather area: N row hashes of 8 bytes (= one row's size).
    fn gather(&self) -> u64 {
        self.halo_log_len() + 4 * self.row
    }
    /// Staging of my row hashes.
    fn gather_send(&self) -> u64 {
        self.halo_log_len() + 5 * self.row
    }
    /// Where SENDs (the rendezvous) land.
    fn scratch(&self) -> u64 {
        self.halo_log_len() + 6 * self.row
    }
    fn len(&self) -> usize {
        (self.scratch() + 64) as usize
    }
}

fn put_f64s(buf: &mut PinnedBuffer, off: u64, v: &[f64]) {
    let dst = &mut buf.as_mut_slice()[off as usize..off as usize + v.len() * 8];
    for (d, x) in dst.chunks_exact_mut(8).zip(v) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

fn get_f64s(buf: &PinnedBuffer, off: u64, out: &mut [f64]) {
    // The companion wrote these bytes behind the compiler's back; the completion that told us
    // was taken under a lock (acquire), and the reads below are volatile per element anyway.
    let base = buf.as_ptr() as *const u8;
    for (i, x) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        for (k, byte) in b.iter_mut().enumerate() {
            let at = off as usize + i * 8 + k;
            assert!(at < buf.len());
            // SAFETY: `at` is inside the buffer (checked above), which lives for this call.
            *byte = unsafe { std::ptr::read_volatile(base.add(at)) };
        }
        *x = f64::from_le_bytes(b);
    }
}

fn hashes_bytes(h: &[u64]) -> Vec<f64> {
    // Row hashes travel as raw 8-byte words; reuse the f64 helpers bit-for-bit.
    h.iter().map(|x| f64::from_bits(*x)).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs a single rank without a device (`--local`), printing the same lines.
pub fn local(n: usize, iters: u64) -> Result<i32, String> {
    // The same pinned buffer as with a device, to show what backs it (no registration).
    match PinnedBuffer::new(buffer_len(n, iters)) {
        Ok(buf) => Json::tool(TOOL)
            .u("rank", 0)
            .s("mode", "local")
            .s("pages", buf.backing().name())
            .u("segments", buf.segments().len() as u64)
            .u("gpa", buf.segments()[0].gpa)
            .print(),
        Err(e) => Json::tool(TOOL)
            .u("rank", 0)
            .s("mode", "local")
            .s("pin_error", &e.to_string())
            .print(),
    }
    let mut b = Block::new(n, 0, n);
    for i in 0..iters {
        let t0 = Instant::now();
        b.step(None, None);
        Json::tool(TOOL)
            .u("rank", 0)
            .u("iter", i)
            .f("ms", ms(t0.elapsed()))
            .print();
    }
    Json::tool(TOOL).u("rank", 0).f("blackout_ms", 0.0).print();
    Json::tool(TOOL)
        .u("rank", 0)
        .s("checksum", &format!("{:016x}", b.checksum()))
        .u("iters", iters)
        .u("rows", n as u64)
        .u("errors", 0)
        .print();
    Json::tool(TOOL)
        .u("rank", 0)
        .s(
            "global_checksum",
            &format!("{:016x}", global_checksum(&b.row_hashes())),
        )
        .u("ranks", 1)
        .u("n", n as u64)
        .u("iters", iters)
        .print();
    Ok(0)
}

/// Halos received so far, to tell a duplicate completion from a new one.
#[derive(Default)]
struct Received {
    /// (rank, imm) of halos not yet consumed.
    arrived: HashSet<(usize, u32)>,
    /// (rank, imm) of every halo ever received.
    seen: HashSet<(usize, u32)>,
    /// Completions for a halo already received: an operation applied twice.
    duplicates: u64,
}

/// Takes completions into `rx` (rank, imm); true if any came. A failed completion is an
/// error (Comm printed and counted it): a lost halo would hang the neighbours.
fn absorb(comm: &mut Comm<'_>, rx: &mut Received, wait: Duration) -> Result<bool, String> {
    let cs = comm.next(wait)?;
    let any = !cs.is_empty();
    for c in cs {
        if c.status != Status::Success {
            return Err(format!(
                "{:?} completion on QP {} failed: {:?}",
                c.opcode, c.qp, c.status
            ));
        }
        if c.opcode == Opcode::RecvRdmaWithImm {
            if let (Some(p), Some(imm)) = (comm.job.rank_of_qp(c.qp), c.imm) {
                if rx.seen.insert((p, imm)) {
                    rx.arrived.insert((p, imm));
                } else {
                    rx.duplicates += 1;
                    eprintln!("lu-lite: duplicate completion of halo {imm} from rank {p}");
                }
            }
        }
    }
    Ok(any)
}

/// The checks on `--n` and `--iters` for `size` ranks.
pub fn check(n: usize, size: usize, iters: u64) -> Result<(), String> {
    if n < 3 || size == 0 || n / size == 0 || iters >= GATHER_IMM as u64 {
        return Err(format!(
            "--n must be at least 3 and at least the number of ranks ({size}); --iters below 2^31"
        ));
    }
    Ok(())
}

/// The length of the one buffer a rank registers for an `n`×`n` grid and `iters` iterations.
pub fn buffer_len(n: usize, iters: u64) -> usize {
    Layout::new(n, iters).len()
}

/// What one rank's run ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The rank's checksum: FNV-1a 64 over its grid's checksum and the hash of every halo
    /// row it received.
    pub checksum: u64,
    /// FNV-1a 64 of the owned rows.
    pub grid_checksum: u64,
    /// Rank 0: the global checksum.
    pub global: Option<u64>,
    /// Iterations done.
    pub iters: u64,
    /// Completions with an error status.
    pub errors: u64,
    /// Longest gap between consecutive successful completions.
    pub blackout: Duration,
}

/// Runs rank `job.rank` of an `n`×`n` grid for `iters` iterations on `dev`: registers `buf`
/// (at least [`buffer_len`] bytes; it must be the device's first registration), creates and
/// connects the QPs, meets the peers, computes and exchanges halos, gathers the row hashes on
/// rank 0, and prints the JSON lines. An error after the iterations started still prints the
/// final lines first.
pub fn run_rank(
    dev: &Device,
    buf: &mut PinnedBuffer,
    job: Job,
    n: usize,
    iters: u64,
    timeout: Duration,
) -> Result<Outcome, String> {
    let size = job.size();
    check(n, size, iters)?;
    let r = job.rank;
    let (lo, hi) = rows_of(n, r, size);
    let lay = Layout::new(n, iters);
    if buf.len() < lay.len() {
        return Err(format!("buffer of {} bytes, need {}", buf.len(), lay.len()));
    }
    let key = register_first(dev, buf)?;
    Json::tool(TOOL)
        .u("rank", r as u64)
        .s("me", &job.me)
        .u("ranks", size as u64)
        .u("rows_lo", lo as u64)
        .u("rows_hi", hi as u64)
        .s("pages", buf.backing().name())
        .u("segments", buf.segments().len() as u64)
        .s("mac", &dev.mac_string())
        .print();
    let scratch = Sge {
        addr: lay.scratch(),
        len: 64,
        lkey: key,
    };
    let mut comm = Comm::connect(dev, job, TOOL, scratch, 16)?;
    comm.rendezvous(
        Sge {
            addr: lay.scratch(),
            len: 8,
            lkey: key,
        },
        timeout,
    )?;
    comm.reset_blackout();

    let mut block = Block::new(n, lo, hi);
    let up = block.has_up().then(|| r - 1);
    let down = block.has_down().then(|| r + 1);
    let mut halo_up = up.map(|_| crate::lu::initial_row(n, lo - 1));
    let mut halo_down = down.map(|_| crate::lu::initial_row(n, hi));
    // Every WRITE_WITH_IMM that arrived.
    let mut rx = Received::default();
    let row_len = lay.row as u32;
    let mut failed: Option<String> = None;

    let mut done = 0u64;
    for it in 0..iters {
        let t0 = Instant::now();
        block.step(halo_up.as_deref(), halo_down.as_deref());
        if it + 1 < iters {
            let p = (it % 2) as usize;
            let slot = lay.slot(it);
            let imm = it as u32;
            if let Some(u) = up {
                put_f64s(buf, lay.send_up(p), block.top());
                let sge = Sge {
                    addr: lay.send_up(p),
                    len: row_len,
                    lkey: key,
                };
                // I am the row below `u`: my top row is its halo from below.
                if let Err(e) = comm.write(u, it, sge, lay.halo_down(slot), 1, Some(imm)) {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(d) = down {
                put_f64s(buf, lay.send_down(p), block.bottom());
                let sge = Sge {
                    addr: lay.send_down(p),
                    len: row_len,
                    lkey: key,
                };
                if let Err(e) = comm.write(d, it, sge, lay.halo_up(slot), 1, Some(imm)) {
                    failed = Some(e);
                    break;
                }
            }
            let mut last = Instant::now();
            loop {
                let have_up = up.is_none_or(|u| rx.arrived.contains(&(u, imm)));
                let have_down = down.is_none_or(|d| rx.arrived.contains(&(d, imm)));
                if have_up && have_down && comm.outstanding == 0 {
                    break;
                }
                match absorb(&mut comm, &mut rx, Duration::from_millis(100)) {
                    Ok(true) => last = Instant::now(),
                    Ok(false) if last.elapsed() > timeout => {
                        failed = Some(format!(
                            "iteration {it}: no completion for {} s (halo from above: {have_up}, \
                             from below: {have_down}, own writes outstanding: {})",
                            timeout.as_secs(),
                            comm.outstanding
                        ));
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if failed.is_some() {
                break;
            }
            if let (Some(u), Some(h)) = (up, halo_up.as_mut()) {
                get_f64s(buf, lay.halo_up(slot), h);
                rx.arrived.remove(&(u, imm));
            }
            if let (Some(d), Some(h)) = (down, halo_down.as_mut()) {
                get_f64s(buf, lay.halo_down(slot), h);
                rx.arrived.remove(&(d, imm));
            }
        }
        done = it + 1;
        Json::tool(TOOL)
            .u("rank", r as u64)
            .u("iter", it)
            .f("ms", ms(t0.elapsed()))
            .print();
    }

    // Gather the row hashes on rank 0.
    let hashes = block.row_hashes();
    let mut global = None;
    if failed.is_none() {
        let result = (|| -> Result<(), String> {
            if r == 0 {
                put_f64s(buf, lay.gather(), &hashes_bytes(&hashes));
                let mut last = Instant::now();
                while (1..size).any(|p| !rx.arrived.contains(&(p, GATHER_IMM | p as u32))) {
                    if absorb(&mut comm, &mut rx, Duration::from_millis(100))? {
                        last = Instant::now();
                    } else if last.elapsed() > timeout {
                        return Err(format!(
                            "row hashes not gathered within {} s",
                            timeout.as_secs()
                        ));
                    }
                }
                let mut all = vec![0f64; n];
                get_f64s(buf, lay.gather(), &mut all);
                let all: Vec<u64> = all.iter().map(|x| x.to_bits()).collect();
                global = Some(global_checksum(&all));
            } else {
                let off = lay.gather_send();
                put_f64s(buf, off, &hashes_bytes(&hashes));
                let sge = Sge {
                    addr: off,
                    len: hashes.len() as u32 * 8,
                    lkey: key,
                };
                comm.write(
                    0,
                    u64::MAX,
                    sge,
                    lay.gather() + lo as u64 * 8,
                    1,
                    Some(GATHER_IMM | r as u32),
                )?;
                let mut last = Instant::now();
                while comm.outstanding > 0 {
                    if absorb(&mut comm, &mut rx, Duration::from_millis(100))? {
                        last = Instant::now();
                    } else if last.elapsed() > timeout {
                        return Err(format!(
                            "row-hash WRITE not completed within {} s",
                            timeout.as_secs()
                        ));
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            failed = Some(e);
        }
    }

    Json::tool(TOOL)
        .u("rank", r as u64)
        .f("blackout_ms", ms(comm.blackout))
        .print();
    // The rank's checksum: its grid, and every halo row it received over RDMA.
    let received = crate::lu::fnv1a(
        crate::lu::FNV_OFFSET,
        &buf.as_slice()[..lay.halo_log_len() as usize],
    );
    let checksum = crate::lu::fnv1a(
        crate::lu::fnv1a(crate::lu::FNV_OFFSET, &block.checksum().to_le_bytes()),
        &received.to_le_bytes(),
    );
    Json::tool(TOOL)
        .u("rank", r as u64)
        .s("checksum", &format!("{checksum:016x}"))
        .s("grid_checksum", &format!("{:016x}", block.checksum()))
        .s("received_checksum", &format!("{received:016x}"))
        .u("iters", done)
        .u("rows", (hi - lo) as u64)
        .u("errors", comm.errors)
        .u("duplicates", rx.duplicates)
        .print();
    if let Some(g) = global {
        Json::tool(TOOL)
            .u("rank", 0)
            .s("global_checksum", &format!("{g:016x}"))
            .u("ranks", size as u64)
            .u("n", n as u64)
            .u("iters", done)
            .print();
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if comm.errors > 0 {
        return Err(format!("{} completions with an error status", comm.errors));
    }
    Ok(Outcome {
        checksum,
        grid_checksum: block.checksum(),
        global,
        iters: done,
        errors: comm.errors,
        blackout: comm.blackout,
    })
}
