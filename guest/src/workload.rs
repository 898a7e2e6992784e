//! What the workload binaries share: argument parsing, JSON lines, the rank/key/QP numbering
//! convention, a start-up rendezvous, receive replenishing, completion bookkeeping and the
//! cooperative SUSPEND/RESUME handling.
//!
//! # Numbering convention
//! Region keys and QP numbers are assigned by the companion from 1 per VM in call order. Every
//! rank of a job (`--peers a,b,c`, rank = index of `--me`) therefore:
//! 1. registers its buffer(s) in a fixed order, before anything else: key 1 is the first
//!    registration (the workloads register one buffer, at address 0, so remote addresses are
//!    offsets);
//! 2. creates one QP per other rank, in rank order: rank `r`'s QP towards rank `p` is
//!    `1 + (p if p < r else p - 1)`; the peer's QP towards `r` is `1 + (r if r < p else r - 1)`;
//! 3. connects each QP to the peer's VM name and the peer's QP number.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vfmig_proto::{Completion, Event, Opcode, Sge, Status};

use crate::Device;

/// An error for a workload: its message is printed and the program exits non-zero.
pub type Error = String;

/// `--key value` arguments.
#[derive(Debug, Clone, Default)]
pub struct Args {
    map: HashMap<String, String>,
}

impl Args {
    /// Parses `--key value` pairs (and `--flag` when followed by another `--` or nothing).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, Error> {
        let mut map = HashMap::new();
        let mut it = args.into_iter().peekable();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a:?} (options are --key value)"))?;
            let val = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().unwrap_or_default(),
                _ => String::new(),
            };
            map.insert(key.to_string(), val);
        }
        Ok(Args { map })
    }

    /// From the process's arguments.
    pub fn from_env() -> Result<Args, Error> {
        Args::parse(std::env::args().skip(1))
    }

    /// A string option.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    /// A required string option.
    pub fn req(&self, key: &str) -> Result<&str, Error> {
        self.str(key)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("missing --{key}"))
    }

    /// A flag.
    pub fn flag(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// A number option with a default.
    pub fn num(&self, key: &str, default: u64) -> Result<u64, Error> {
        match self.str(key) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .map_err(|_| format!("--{key} wants a number, got {s:?}")),
        }
    }
}

/// This VM's place in a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// My VM name.
    pub me: String,
    /// All VM names, in rank order.
    pub peers: Vec<String>,
    /// My index in `peers`.
    pub rank: usize,
}

impl Job {
    /// From `--me` and `--peers`.
    pub fn from_args(a: &Args) -> Result<Job, Error> {
        let me = a.req("me")?.to_string();
        let peers: Vec<String> = a
            .req("peers")?
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        if peers.iter().any(|p| p.is_empty() || p.len() > 64) {
            return Err("--peers: names must be 1 to 64 bytes".into());
        }
        for (i, p) in peers.iter().enumerate() {
            if peers[..i].contains(p) {
                return Err(format!("--peers names {p} twice"));
            }
        }
        let rank = peers
            .iter()
            .position(|p| *p == me)
            .ok_or_else(|| format!("--me {me} is not in --peers {}", peers.join(",")))?;
        Ok(Job { me, peers, rank })
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.peers.len()
    }

    /// My QP number towards rank `p`.
    pub fn qp_to(&self, p: usize) -> u32 {
        qp_number(self.rank, p)
    }

    /// Rank `p`'s QP number towards me.
    pub fn peer_qp(&self, p: usize) -> u32 {
        qp_number(p, self.rank)
    }

    /// The rank my QP `qp` leads to.
    pub fn rank_of_qp(&self, qp: u32) -> Option<usize> {
        let i = (qp as usize).checked_sub(1)?;
        let p = if i < self.rank { i } else { i + 1 };
        (p < self.size()).then_some(p)
    }
}

/// Rank `r`'s QP number towards rank `p` (`p != r`).
pub fn qp_number(r: usize, p: usize) -> u32 {
    1 + if p < r { p } else { p - 1 } as u32
}

/// A JSON object printed as one line.
#[derive(Debug, Default)]
pub struct Json(String);

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

impl Json {
    /// `{"tool": tool`.
    pub fn tool(tool: &str) -> Json {
        Json::new().s("tool", tool)
    }

    /// An empty object.
    pub fn new() -> Json {
        Json(String::new())
    }

    fn key(mut self, k: &str) -> Json {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        self.0.push_str(&escape(k));
        self.0.push(':');
        self
    }

    /// A string field.
    pub fn s(self, k: &str, v: &str) -> Json {
        let mut j = self.key(k);
        j.0.push_str(&escape(v));
        j
    }

    /// An integer field.
    pub fn u(self, k: &str, v: u64) -> Json {
        let mut j = self.key(k);
        j.0.push_str(&v.to_string());
        j
    }

    /// A number field (3 decimals; non-finite becomes 0).
    pub fn f(self, k: &str, v: f64) -> Json {
        let mut j = self.key(k);
        let v = if v.is_finite() { v } else { 0.0 };
        j.0.push_str(&format!("{v:.3}"));
        j
    }

    /// The JSON text.
    pub fn text(&self) -> String {
        if self.0.is_empty() {
            "{}".into()
        } else {
            format!("{}}}", self.0)
        }
    }

    /// Prints it as a line on stdout, flushed.
    pub fn print(&self) {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{}", self.text());
        let _ = out.flush();
    }
}

/// Registers `buf` as the job's one region (address space from 0, local and remote write) and
/// checks it got key 1, which the numbering convention of the workloads relies on.
pub fn register_first(dev: &crate::Device, buf: &crate::PinnedBuffer) -> Result<u32, String> {
    let key = dev
        .register(
            buf,
            0,
            crate::access::LOCAL_WRITE | crate::access::REMOTE_WRITE,
        )
        .map_err(|e| format!("register {} bytes: {e}", buf.len()))?;
    if key != 1 {
        return Err(format!(
            "the companion gave the first region key {key}, expected 1 (was the device used \
             before this program?)"
        ));
    }
    Ok(key)
}

/// Bytes after a two-rank tool's data where SENDs (the rendezvous) land.
pub const PAIR_SCRATCH: usize = 64;

/// What a two-rank perftest-style tool (rdma-bw, rdma-lat) starts with: a buffer of `size`
/// bytes of data followed by [`PAIR_SCRATCH`] bytes, registered as key 1, and a [`Comm`]
/// connected to the peer that has met it. Receives of `recv_depth` are kept posted.
pub fn pair_setup<'a>(
    dev: &'a Device,
    buf: &crate::PinnedBuffer,
    job: Job,
    tool: &'static str,
    recv_depth: usize,
    timeout: Duration,
) -> Result<(u32, Comm<'a>), Error> {
    let size = (buf.len() - PAIR_SCRATCH) as u64;
    let key = register_first(dev, buf)?;
    let scratch = Sge {
        addr: size,
        len: PAIR_SCRATCH as u32,
        lkey: key,
    };
    let mut comm = Comm::connect(dev, job, tool, scratch, recv_depth)?;
    comm.rendezvous(
        Sge {
            addr: size,
            len: 8,
            lkey: key,
        },
        timeout,
    )?;
    Ok((key, comm))
}

/// Prints `{"tool":tool,"error":msg}` and exits with status 1.
pub fn fail(tool: &str, msg: &str) -> ! {
    Json::tool(tool).s("error", msg).print();
    eprintln!("{tool}: error: {msg}");
    std::process::exit(1)
}

#[derive(Debug, Default)]
struct GateState {
    requested: bool,
    acked: bool,
}

/// Cooperative SUSPEND/RESUME: on SUSPEND the workload stops posting sends, waits for its
/// outstanding ones, acknowledges, and posts nothing until RESUME. RESUME and MIGRATED are
/// acknowledged at once. Each event is printed as `{"tool":…,"event":…}`.
#[derive(Debug, Default)]
pub struct EventGate {
    st: Mutex<GateState>,
    cv: Condvar,
}

impl EventGate {
    /// Installs the gate as `dev`'s event callback.
    pub fn install(dev: &Device, tool: &'static str, rank: usize) -> Arc<EventGate> {
        let gate = Arc::new(EventGate::default());
        let g = gate.clone();
        let acker = dev.event_acker();
        dev.on_event(Box::new(move |e| {
            let name = match e {
                Event::Suspend => "suspend",
                Event::Resume => "resume",
                Event::Migrated => "migrated",
            };
            Json::tool(tool)
                .u("rank", rank as u64)
                .s("event", name)
                .print();
            let mut st = g.st.lock().unwrap_or_else(|p| p.into_inner());
            match e {
                Event::Suspend => st.requested = true,
                Event::Resume => {
                    st.requested = false;
                    st.acked = false;
                    let _ = acker.ack(e);
                }
                Event::Migrated => {
                    let _ = acker.ack(e);
                }
            }
            drop(st);
            g.cv.notify_all();
        }));
        gate
    }

    fn requested(&self) -> bool {
        self.st.lock().unwrap_or_else(|p| p.into_inner()).requested
    }
}

/// The workloads' view of the device: posts, completion bookkeeping, receive pools.
pub struct Comm<'a> {
    /// The device.
    pub dev: &'a Device,
    /// The job.
    pub job: Job,
    tool: &'static str,
    gate: Arc<EventGate>,
    /// Receive buffer for each posted receive (only SENDs land there).
    recv_sge: Sge,
    next_wr: u64,
    /// Sends posted and not completed yet.
    pub outstanding: usize,
    /// Completions with an error status.
    pub errors: u64,
    last_ok: Option<Instant>,
    /// Longest gap between consecutive successful completions.
    pub blackout: Duration,
    stash: VecDeque<Completion>,
    hello_from: Vec<bool>,
}

/// Immediate of the rendezvous SEND.
pub const HELLO_IMM: u32 = 0x4845_4c4f;
/// Tag of wr_ids of rendezvous SENDs.
const HELLO_WR: u64 = 1 << 63;
/// Tag of wr_ids of receives.
const RECV_WR: u64 = 1 << 62;

impl<'a> Comm<'a> {
    /// Creates and connects one QP per other rank (numbering convention), installs the event
    /// gate, and posts `recv_depth` receives on each QP (into `recv_sge`, where only SENDs
    /// land). Register buffers before calling this.
    pub fn connect(
        dev: &'a Device,
        job: Job,
        tool: &'static str,
        recv_sge: Sge,
        recv_depth: usize,
    ) -> Result<Comm<'a>, Error> {
        for p in 0..job.size() {
            if p == job.rank {
                continue;
            }
            let qp = dev
                .create_qp()
                .map_err(|e| format!("create QP for {}: {e}", job.peers[p]))?;
            if qp != job.qp_to(p) {
                return Err(format!(
                    "the companion numbered the QP for rank {p} {qp}, expected {} (was this \
                     device used before this program?)",
                    job.qp_to(p)
                ));
            }
        }
        for p in 0..job.size() {
            if p == job.rank {
                continue;
            }
            dev.connect_qp(job.qp_to(p), &job.peers[p], job.peer_qp(p))
                .map_err(|e| format!("connect QP {} to {}: {e}", job.qp_to(p), job.peers[p]))?;
        }
        let gate = EventGate::install(dev, tool, job.rank);
        let size = job.size();
        let mut c = Comm {
            dev,
            job,
            tool,
            gate,
            recv_sge,
            next_wr: 0,
            outstanding: 0,
            errors: 0,
            last_ok: None,
            blackout: Duration::ZERO,
            stash: VecDeque::new(),
            hello_from: vec![false; size],
        };
        for p in 0..size {
            if p != c.job.rank {
                for _ in 0..recv_depth {
                    c.post_recv(c.job.qp_to(p))?;
                }
            }
        }
        Ok(c)
    }

    fn post_recv(&mut self, qp: u32) -> Result<(), Error> {
        self.next_wr += 1;
        self.dev
            .post_recv(qp, RECV_WR | self.next_wr, self.recv_sge)
            .map_err(|e| format!("post receive: {e}"))
    }

    /// Waits, if a SUSPEND is pending, until sends may be posted again (acknowledging the
    /// SUSPEND once no send is outstanding). Completions seen meanwhile are kept for
    /// [`next`](Self::next).
    fn gate(&mut self) -> Result<(), Error> {
        if !self.gate.requested() {
            return Ok(());
        }
        while self.outstanding > 0 {
            let cs = self.collect(Duration::from_millis(100))?;
            self.stash.extend(cs);
        }
        let gate = self.gate.clone();
        let mut st = gate.st.lock().unwrap_or_else(|p| p.into_inner());
        if st.requested && !st.acked {
            self.dev
                .ack_event(Event::Suspend)
                .map_err(|e| format!("acknowledge SUSPEND: {e}"))?;
            st.acked = true;
            Json::tool(self.tool)
                .u("rank", self.job.rank as u64)
                .s("event", "suspend-acked")
                .print();
        }
        while st.requested {
            st = gate
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Acknowledges a pending SUSPEND if nothing is outstanding (call while idle-waiting).
    fn maybe_ack(&mut self) -> Result<(), Error> {
        if self.outstanding == 0 {
            let mut st = self.gate.st.lock().unwrap_or_else(|p| p.into_inner());
            if st.requested && !st.acked {
                self.dev
                    .ack_event(Event::Suspend)
                    .map_err(|e| format!("acknowledge SUSPEND: {e}"))?;
                st.acked = true;
                drop(st);
                Json::tool(self.tool)
                    .u("rank", self.job.rank as u64)
                    .s("event", "suspend-acked")
                    .print();
            }
        }
        Ok(())
    }

    /// Posts an RDMA WRITE to rank `p` (waiting first while suspended).
    pub fn write(
        &mut self,
        p: usize,
        wr_id: u64,
        sge: Sge,
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> Result<(), Error> {
        self.gate()?;
        self.dev
            .post_write(self.job.qp_to(p), wr_id, sge, remote_addr, rkey, imm)
            .map_err(|e| format!("post WRITE to {}: {e}", self.job.peers[p]))?;
        self.outstanding += 1;
        Ok(())
    }

    /// Takes completions from the device: updates the counters, the blackout, reposts a
    /// receive for each consumed one, absorbs rendezvous traffic, prints error completions.
    fn collect(&mut self, timeout: Duration) -> Result<Vec<Completion>, Error> {
        let cs = self.dev.wait_cq(64, timeout);
        let mut out = Vec::with_capacity(cs.len());
        for c in cs {
            let hello_send = c.wr_id & HELLO_WR != 0 && c.opcode == Opcode::Send;
            if matches!(c.opcode, Opcode::Write | Opcode::Send) && !hello_send {
                self.outstanding = self.outstanding.saturating_sub(1);
            }
            if matches!(c.opcode, Opcode::Recv | Opcode::RecvRdmaWithImm)
                && c.status != Status::Flushed
            {
                self.post_recv(c.qp)?;
            }
            if c.status == Status::Success {
                let now = Instant::now();
                if let Some(prev) = self.last_ok {
                    self.blackout = self.blackout.max(now - prev);
                }
                self.last_ok = Some(now);
            }
            if c.opcode == Opcode::Recv && c.imm == Some(HELLO_IMM) {
                if let Some(p) = self.job.rank_of_qp(c.qp) {
                    self.hello_from[p] = true;
                }
                continue;
            }
            if hello_send {
                out.push(c); // the rendezvous looks at these
                continue;
            }
            if c.status != Status::Success {
                self.errors += 1;
                Json::tool(self.tool)
                    .u("rank", self.job.rank as u64)
                    .s("error", "completion")
                    .s("status", &format!("{:?}", c.status))
                    .s("opcode", &format!("{:?}", c.opcode))
                    .u("qp", c.qp as u64)
                    .u("wr_id", c.wr_id)
                    .print();
            }
            out.push(c);
        }
        Ok(out)
    }

    /// The next completions (waiting up to `timeout`), rendezvous traffic removed. Error
    /// completions are included (and counted in [`errors`](Self::errors)).
    pub fn next(&mut self, timeout: Duration) -> Result<Vec<Completion>, Error> {
        if !self.stash.is_empty() {
            return Ok(self.stash.drain(..).collect());
        }
        self.maybe_ack()?;
        let cs = self.collect(timeout)?;
        Ok(cs
            .into_iter()
            .filter(|c| c.wr_id & HELLO_WR == 0 || c.opcode != Opcode::Send)
            .collect())
    }

    /// Starts measuring the blackout afresh.
    pub fn reset_blackout(&mut self) {
        self.blackout = Duration::ZERO;
        self.last_ok = None;
    }

    /// Makes sure every peer is connected and has its receives posted: sends each a hello
    /// SEND (from `hello_sge`) until one succeeds, and waits for each peer's hello. Failed
    /// hellos (peer not there yet) are retried every 200 ms until `timeout`.
    pub fn rendezvous(&mut self, hello_sge: Sge, timeout: Duration) -> Result<(), Error> {
        let start = Instant::now();
        let size = self.job.size();
        let me = self.job.rank;
        let mut sent_ok = vec![false; size];
        let mut in_flight = vec![false; size];
        let mut retry_at = vec![start; size];
        sent_ok[me] = true;
        self.hello_from[me] = true;
        let mut attempts = 0u64;
        loop {
            if sent_ok.iter().all(|&x| x) && self.hello_from.iter().all(|&x| x) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                let missing: Vec<&str> = (0..size)
                    .filter(|&p| !sent_ok[p] || !self.hello_from[p])
                    .map(|p| self.job.peers[p].as_str())
                    .collect();
                return Err(format!(
                    "rendezvous with {} not done within {} s ({attempts} hello attempts)",
                    missing.join(","),
                    timeout.as_secs()
                ));
            }
            let now = Instant::now();
            for p in 0..size {
                if !sent_ok[p] && !in_flight[p] && now >= retry_at[p] {
                    attempts += 1;
                    self.dev
                        .post_send(
                            self.job.qp_to(p),
                            HELLO_WR | p as u64,
                            hello_sge,
                            Some(HELLO_IMM),
                        )
                        .map_err(|e| format!("post hello SEND: {e}"))?;
                    in_flight[p] = true;
                }
            }
            for c in self.collect(Duration::from_millis(50))? {
                if c.wr_id & HELLO_WR != 0 && c.opcode == Opcode::Send {
                    let p = (c.wr_id & !HELLO_WR) as usize;
                    if p < size {
                        in_flight[p] = false;
                        if c.status == Status::Success {
                            sent_ok[p] = true;
                        } else {
                            retry_at[p] = Instant::now() + Duration::from_millis(200);
                        }
                    }
                } else {
                    self.stash.push_back(c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Args {
        Args::parse(s.split_whitespace().map(String::from)).unwrap()
    }

    #[test]
    fn qp_numbers_agree_between_peers() {
        let a = args("--me b --peers a,b,c,d --n 256 --local");
        let j = Job::from_args(&a).unwrap();
        assert_eq!(j.rank, 1);
        assert_eq!(a.num("n", 1).unwrap(), 256);
        assert!(a.flag("local"));
        assert_eq!(j.qp_to(0), 1);
        assert_eq!(j.qp_to(2), 2);
        assert_eq!(j.qp_to(3), 3);
        assert_eq!(j.peer_qp(0), 1); // a's QPs: b=1, c=2, d=3
        assert_eq!(j.peer_qp(2), 2); // c's QPs: a=1, b=2, d=3
        assert_eq!(j.peer_qp(3), 2);
        for qp in 1..=3 {
            let p = j.rank_of_qp(qp).unwrap();
            assert_eq!(j.qp_to(p), qp);
        }
        assert_eq!(j.rank_of_qp(0), None);
        assert_eq!(j.rank_of_qp(4), None);
        // every pair: my QP to p is what p expects as peer QP from me
        for r in 0..5 {
            for p in 0..5 {
                if r != p {
                    assert_eq!(qp_number(r, p), qp_number(r, p));
                    assert!(qp_number(r, p) >= 1 && qp_number(r, p) <= 4);
                }
            }
        }
        assert!(Job::from_args(&args("--me x --peers a,b")).is_err());
        assert!(Job::from_args(&args("--me a --peers a,a")).is_err());
        assert!(Args::parse(["x".to_string()]).is_err());
    }

    #[test]
    fn json_lines() {
        let j = Json::tool("rdma-bw")
            .s("role", "a\"b")
            .u("#bytes", 64)
            .f("BW peak[MB/sec]", 1.5)
            .f("nan", f64::NAN);
        assert_eq!(
            j.text(),
            r##"{"tool":"rdma-bw","role":"a\"b","#bytes":64,"BW peak[MB/sec]":1.500,"nan":0.000}"##
        );
        assert_eq!(Json::new().text(), "{}");
    }
}
