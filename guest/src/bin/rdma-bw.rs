//! `rdma-bw --me NAME --peers A,B --size BYTES --iters N [--depth 64] [--if eth0]`
//!
//! Rank 0 RDMA-WRITEs `size` bytes WITH_IMM (imm = message number) to rank 1, `iters` times,
//! keeping `depth` writes outstanding; rank 1 keeps receives posted and sums the `byte_len` of
//! its RECV_RDMA_WITH_IMM completions. Both print a progress line every second and one
//! `ib_write_bw`-style report at the end (MB = 2^20 bytes, as perftest).

use std::time::{Duration, Instant};

use vfmig_guest::workload::{fail, pair_setup, Args, Job, Json, PAIR_SCRATCH};
use vfmig_guest::{Device, Opcode, PinnedBuffer, Sge, Status};

const TOOL: &str = "rdma-bw";

/// Bandwidth bookkeeping: total, per-100 ms buckets for the peak, a progress line each second.
struct Meter {
    start: Option<Instant>,
    last: Option<Instant>,
    bytes: u64,
    msgs: u64,
    bucket_start: Option<Instant>,
    bucket_bytes: u64,
    peak: f64,
    next_progress: Option<Instant>,
}

const BUCKET: Duration = Duration::from_millis(100);
const MB: f64 = (1 << 20) as f64;

impl Meter {
    fn new() -> Meter {
        Meter {
            start: None,
            last: None,
            bytes: 0,
            msgs: 0,
            bucket_start: None,
            bucket_bytes: 0,
            peak: 0.0,
            next_progress: None,
        }
    }

    fn begin(&mut self) {
        if self.start.is_none() {
            let now = Instant::now();
            self.start = Some(now);
            self.bucket_start = Some(now);
            self.next_progress = Some(now + Duration::from_secs(1));
        }
    }

    fn add(&mut self, bytes: u64) {
        self.begin();
        let now = Instant::now();
        self.bytes += bytes;
        self.msgs += 1;
        self.last = Some(now);
        self.bucket_bytes += bytes;
        if let Some(b) = self.bucket_start {
            let dt = now - b;
            if dt >= BUCKET {
                self.peak = self
                    .peak
                    .max(self.bucket_bytes as f64 / dt.as_secs_f64() / MB);
                self.bucket_start = Some(now);
                self.bucket_bytes = 0;
            }
        }
    }

    fn progress(&mut self) {
        if let (Some(start), Some(next)) = (self.start, self.next_progress) {
            let now = Instant::now();
            if now >= next {
                Json::tool(TOOL)
                    .u("t_ms", (now - start).as_millis() as u64)
                    .u("bytes", self.bytes)
                    .print();
                self.next_progress = Some(next + Duration::from_secs(1));
            }
        }
    }

    fn report(&self, role: &str, size: u64, iters: u64, bytes_key: &str) {
        let secs = match (self.start, self.last) {
            (Some(s), Some(l)) if l > s => (l - s).as_secs_f64(),
            _ => 0.0,
        };
        let avg = if secs > 0.0 {
            self.bytes as f64 / secs / MB
        } else {
            0.0
        };
        let peak = if self.peak > 0.0 {
            self.peak.max(avg)
        } else {
            avg
        };
        let rate = if secs > 0.0 {
            self.msgs as f64 / secs / 1e6
        } else {
            0.0
        };
        Json::tool(TOOL)
            .s("role", role)
            .u("#bytes", size)
            .u("#iterations", iters)
            .f("BW peak[MB/sec]", peak)
            .f("BW average[MB/sec]", avg)
            .f("MsgRate[Mpps]", rate)
            .u(bytes_key, self.bytes)
            .print();
    }
}

fn run() -> Result<i32, String> {
    let a = Args::from_env()?;
    let job = Job::from_args(&a)?;
    if job.size() != 2 {
        return Err("rdma-bw runs on exactly two VMs (--peers a,b)".into());
    }
    let size = a.num("size", 65536)?;
    let iters = a.num("iters", 1000)?;
    let depth = a.num("depth", 64)?.max(1) as usize;
    let timeout = Duration::from_secs(a.num("timeout", 120)?);
    if size == 0 || size > u32::MAX as u64 {
        return Err("--size must be 1 to 2^32-1 bytes".into());
    }
    let ifname = a.str("if").unwrap_or("eth0");

    let dev = Device::open(ifname).map_err(|e| e.to_string())?;
    let buf = PinnedBuffer::new(size as usize + PAIR_SCRATCH).map_err(|e| e.to_string())?;
    let me = job.rank;
    let peer = 1 - me;
    let (key, mut comm) = pair_setup(&dev, &buf, job, TOOL, (depth * 2).max(128), timeout)?;
    comm.reset_blackout();
    let mut m = Meter::new();
    let mut idle_since = Instant::now();

    if me == 0 {
        let sge = Sge {
            addr: 0,
            len: size as u32,
            lkey: key,
        };
        let (mut posted, mut done) = (0u64, 0u64);
        m.begin();
        while done < iters {
            while posted < iters && comm.outstanding < depth {
                // The peer registered its buffer first: its key is 1; address 0.
                comm.write(peer, posted, sge, 0, 1, Some(posted as u32))?;
                posted += 1;
            }
            let cs = comm.next(Duration::from_millis(100))?;
            if !cs.is_empty() {
                idle_since = Instant::now();
            }
            for c in cs {
                if c.opcode == Opcode::Write {
                    if c.status != Status::Success {
                        m.report("sender", size, iters, "bytes_sent");
                        return Err(format!("WRITE {} failed: {:?}", c.wr_id, c.status));
                    }
                    done += 1;
                    m.add(size);
                }
            }
            m.progress();
            if idle_since.elapsed() > timeout {
                return Err(format!("no completion for {} s", timeout.as_secs()));
            }
        }
        m.report("sender", size, iters, "bytes_sent");
    } else {
        let mut got = 0u64;
        while got < iters {
            let cs = comm.next(Duration::from_millis(100))?;
            if !cs.is_empty() {
                idle_since = Instant::now();
            }
            for c in cs {
                if c.opcode == Opcode::RecvRdmaWithImm {
                    if c.status != Status::Success {
                        m.report("receiver", size, iters, "bytes_received");
                        return Err(format!("receive failed: {:?}", c.status));
                    }
                    got += 1;
                    m.add(c.byte_len as u64);
                }
            }
            m.progress();
            if idle_since.elapsed() > timeout {
                m.report("receiver", size, iters, "bytes_received");
                return Err(format!(
                    "no data for {} s after {got} of {iters} messages",
                    timeout.as_secs()
                ));
            }
        }
        m.report("receiver", size, iters, "bytes_received");
    }
    Ok(if comm.errors > 0 { 1 } else { 0 })
}

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(TOOL, &e),
    }
}
