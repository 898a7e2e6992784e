//! `lu-lite --me NAME --peers A,B,C [--n 256] [--iters 200] [--timeout 120] [--if eth0] [--local]`
//!
//! An LU/SSOR-style stencil (see `vfmig_guest::lu`) on an N×N grid split by rows. After each
//! iteration's sweep, each rank RDMA-WRITEs its edge rows WITH_IMM (imm = iteration) into its
//! neighbours' halo slots, double-buffered by iteration parity, and waits for both
//! neighbours' rows before the next iteration. At the end the ranks WRITE their row hashes to
//! rank 0, which prints the global checksum (the same for any number of ranks).
//!
//! Output lines: `{"tool":"lu-lite","rank":r,"iter":i,"ms":…}` per iteration,
//! `{"tool":"lu-lite","rank":r,"blackout_ms":…}`, `{"tool":"lu-lite","rank":r,"checksum":…,
//! "iters":n,"rows":…,"errors":…}`, and on rank 0 `{"tool":"lu-lite","rank":0,
//! "global_checksum":…,"ranks":k,"n":N,"iters":n}`. `--local` runs a single rank without a
//! device.

use std::time::Duration;

use vfmig_guest::lulite::{buffer_len, check, local, run_rank, TOOL};
use vfmig_guest::workload::{fail, Args, Job};
use vfmig_guest::{Device, PinnedBuffer};

fn run() -> Result<i32, String> {
    let a = Args::from_env()?;
    let job = Job::from_args(&a)?;
    let n = a.num("n", 256)? as usize;
    let iters = a.num("iters", 200)?;
    let timeout = Duration::from_secs(a.num("timeout", 120)?);
    check(n, job.size(), iters)?;
    if a.flag("local") {
        if job.size() != 1 {
            return Err("--local runs a single rank (--peers with one name)".into());
        }
        return local(n, iters);
    }
    let ifname = a.str("if").unwrap_or("eth0");
    let dev = Device::open(ifname).map_err(|e| e.to_string())?;
    let mut buf = PinnedBuffer::new(buffer_len(n, iters)).map_err(|e| e.to_string())?;
    run_rank(&dev, &mut buf, job, n, iters, timeout)?;
    Ok(0)
}

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(TOOL, &e),
    }
}
