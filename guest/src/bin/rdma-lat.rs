//! `rdma-lat --me NAME --peers A,B --size 64 --iters N [--if eth0]`
//!
//! Ping-pong with RDMA WRITE WITH_IMM (imm = iteration): rank 0 writes, rank 1 answers each
//! write with one of its own. Rank 0 reports `ib_write_lat`-style one-way times (round trip / 2)
//! in microseconds; rank 1 reports how many it answered.

use std::time::{Duration, Instant};

use vfmig_guest::workload::{fail, pair_setup, Args, Comm, Job, Json, PAIR_SCRATCH};
use vfmig_guest::{Device, Opcode, PinnedBuffer, Sge, Status};

const TOOL: &str = "rdma-lat";

/// Waits for the peer's WRITE_WITH_IMM with immediate `imm`.
fn wait_for(comm: &mut Comm<'_>, imm: u32, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        for c in comm.next(Duration::from_millis(100))? {
            if c.status != Status::Success {
                return Err(format!(
                    "{:?} completion failed: {:?} (wr_id {})",
                    c.opcode, c.status, c.wr_id
                ));
            }
            if c.opcode == Opcode::RecvRdmaWithImm {
                if c.imm == Some(imm) {
                    return Ok(());
                }
                return Err(format!("expected immediate {imm}, got {:?}", c.imm));
            }
        }
        if start.elapsed() > timeout {
            return Err(format!("no message {imm} within {} s", timeout.as_secs()));
        }
    }
}

/// min, max, median, mean, population stdev, 99th percentile.
fn stats(v: &mut [f64]) -> (f64, f64, f64, f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    let p99 = v[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
    (v[0], v[n - 1], v[n / 2], mean, var.sqrt(), p99)
}

fn run() -> Result<i32, String> {
    let a = Args::from_env()?;
    let job = Job::from_args(&a)?;
    if job.size() != 2 {
        return Err("rdma-lat runs on exactly two VMs (--peers a,b)".into());
    }
    let size = a.num("size", 64)?;
    let iters = a.num("iters", 1000)?;
    let timeout = Duration::from_secs(a.num("timeout", 120)?);
    if size == 0 || size > u32::MAX as u64 || iters > u32::MAX as u64 {
        return Err("--size must be 1 to 2^32-1 bytes, --iters below 2^32".into());
    }
    let ifname = a.str("if").unwrap_or("eth0");

    let dev = Device::open(ifname).map_err(|e| e.to_string())?;
    let buf = PinnedBuffer::new(size as usize + PAIR_SCRATCH).map_err(|e| e.to_string())?;
    let me = job.rank;
    let peer = 1 - me;
    let (key, mut comm) = pair_setup(&dev, &buf, job, TOOL, 16, timeout)?;
    let sge = Sge {
        addr: 0,
        len: size as u32,
        lkey: key,
    };
    let mut one_way = Vec::with_capacity(iters as usize);
    for i in 0..iters {
        let imm = i as u32;
        if me == 0 {
            let t0 = Instant::now();
            comm.write(peer, i, sge, 0, 1, Some(imm))?;
            wait_for(&mut comm, imm, timeout)?;
            one_way.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0);
        } else {
            wait_for(&mut comm, imm, timeout)?;
            comm.write(peer, i, sge, 0, 1, Some(imm))?;
        }
    }
    // Let our last writes complete.
    let start = Instant::now();
    while comm.outstanding > 0 && start.elapsed() < timeout {
        for c in comm.next(Duration::from_millis(100))? {
            if c.status != Status::Success {
                return Err(format!("{:?} failed: {:?}", c.opcode, c.status));
            }
        }
    }
    if me == 0 {
        let (min, max, typ, avg, sd, p99) = stats(&mut one_way);
        Json::tool(TOOL)
            .u("#bytes", size)
            .u("#iterations", iters)
            .f("t_min[usec]", min)
            .f("t_max[usec]", max)
            .f("t_typical[usec]", typ)
            .f("t_avg[usec]", avg)
            .f("t_stdev[usec]", sd)
            .f("99% percentile[usec]", p99)
            .print();
    } else {
        Json::tool(TOOL)
            .s("role", "responder")
            .u("#bytes", size)
            .u("#iterations", iters)
            .print();
    }
    Ok(if comm.errors > 0 { 1 } else { 0 })
}

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(TOOL, &e),
    }
}
