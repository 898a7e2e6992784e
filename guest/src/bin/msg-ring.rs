//! `msg-ring --me NAME --peers A,B,C [--size 100000] [--iters 200] [--timeout 120] [--if eth0]`
//!
//! Messages around a ring over the soft VF's message channel (`vfmig_guest::channel`, what the
//! libfabric provider carries MPI's messages on): in iteration `i` every rank sends a message
//! to the next rank and receives one from the previous. Sizes cycle through one byte to three
//! 64 KiB segments and more, so single- and multi-segment messages and the credits that
//! return are all exercised. Each received message must be exactly what its sender made
//! (a pattern of sender, iteration and length); every byte goes into the rank's checksum,
//! which is the same on every run.
//!
//! Output lines: `{"tool":"msg-ring","rank":r,"iter":i,"ms":…}` per iteration, then
//! `{"tool":"msg-ring","rank":r,"blackout_ms":…}` and `{"tool":"msg-ring","rank":r,
//! "checksum":…,"iters":n,"errors":e,"bytes":b}` (errors: messages that differed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vfmig_guest::channel::{Addr, Channel, Message};
use vfmig_guest::workload::{fail, Args, Job, Json};
use vfmig_guest::Device;

const TOOL: &str = "msg-ring";
/// Every endpoint of this workload is port 1 of its VM (one process per VM).
const PORT: u32 = 1;

/// The length of iteration `i`'s message, for `--size s`.
fn len_of(i: u64, s: usize) -> usize {
    match i % 4 {
        0 => s / 8 + 1,
        1 => s,
        2 => 3 * s + 5,
        _ => 17,
    }
}

/// What rank `from` sends in iteration `i`.
fn pattern(from: usize, i: u64, len: usize) -> Vec<u8> {
    let seed = (from as u64).wrapping_mul(0x9e37_79b9) ^ i.wrapping_mul(0x85eb_ca6b);
    (0..len as u64)
        .map(|k| (seed.wrapping_add(k.wrapping_mul(0x2545_f491)) >> 7) as u8)
        .collect()
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn run() -> Result<i32, String> {
    let a = Args::from_env()?;
    let job = Job::from_args(&a)?;
    let size = a.num("size", 100_000)? as usize;
    let iters = a.num("iters", 200)?;
    let timeout = Duration::from_secs(a.num("timeout", 120)?);
    if job.size() < 2 {
        return Err("a ring needs two ranks at least (--peers a,b)".into());
    }
    if 3 * size + 5 > vfmig_guest::channel::MAX_MESSAGE {
        return Err(format!(
            "--size {size} makes messages longer than a channel carries"
        ));
    }
    let ifname = a.str("if").unwrap_or("eth0");
    let dev = Device::open(ifname).map_err(|e| e.to_string())?;
    let r = job.rank;
    let k = job.size();
    let addr = |rank: usize| Addr {
        vm: job.peers[rank].clone(),
        port: PORT,
    };
    let (next, prev) = (addr((r + 1) % k), addr((r + k - 1) % k));
    let mut ch = Channel::open(Arc::new(dev), addr(r)).map_err(|e| e.to_string())?;
    ch.connect(&next).map_err(|e| e.to_string())?;
    ch.connect(&prev).map_err(|e| e.to_string())?;
    let (mut checksum, mut errors, mut bytes) = (0xcbf2_9ce4_8422_2325u64, 0u64, 0u64);
    let mut blackout = Duration::ZERO;
    let mut last_arrival: Option<Instant> = None;
    let mut early: Vec<(Addr, Message)> = Vec::new();
    for i in 0..iters {
        let started = Instant::now();
        let msg = Message {
            kind: 1,
            tag: i,
            data: (i % 2 == 0).then_some(i),
            payload: pattern(r, i, len_of(i, size)),
        };
        ch.send(&next, msg)
            .map_err(|e| format!("iteration {i}: sending to {next}: {e}"))?;
        let deadline = started + timeout;
        let got = loop {
            if let Some(at) = early
                .iter()
                .position(|(from, m)| *from == prev && m.tag == i)
            {
                break early.swap_remove(at).1;
            }
            let mut out = Vec::new();
            if let Some((peer, why)) = ch.progress(&mut out).into_iter().next() {
                return Err(format!("iteration {i}: the link to {peer} failed: {why}"));
            }
            if !out.is_empty() {
                let now = Instant::now();
                if let Some(t) = last_arrival {
                    blackout = blackout.max(now - t);
                }
                last_arrival = Some(now);
                early.extend(out);
                continue;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "iteration {i}: no message from {prev} within {} s",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
        };
        let want = pattern((r + k - 1) % k, i, len_of(i, size));
        if got.payload != want || got.data != (i % 2 == 0).then_some(i) {
            errors += 1;
            Json::tool(TOOL)
                .u("rank", r as u64)
                .u("iter", i)
                .s("error", "a message differed from what its sender made")
                .print();
        }
        checksum = fnv(checksum, &got.payload);
        bytes += got.payload.len() as u64;
        Json::tool(TOOL)
            .u("rank", r as u64)
            .u("iter", i)
            .f("ms", started.elapsed().as_secs_f64() * 1e3)
            .print();
    }
    // The last message to the next rank may still wait for its credits: progress until it
    // is all sent, then a moment more for the credits this rank owes.
    let deadline = Instant::now() + timeout;
    let mut linger: Option<Instant> = None;
    while linger.is_none_or(|t| Instant::now() < t) {
        if let Some((peer, why)) = ch.progress(&mut Vec::new()).into_iter().next() {
            return Err(format!(
                "after the last iteration: the link to {peer} failed: {why}"
            ));
        }
        if ch.queued() == 0 && linger.is_none() {
            linger = Some(Instant::now() + Duration::from_millis(200));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the last message to {next} was not all sent within {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Json::tool(TOOL)
        .u("rank", r as u64)
        .f("blackout_ms", blackout.as_secs_f64() * 1e3)
        .print();
    Json::tool(TOOL)
        .u("rank", r as u64)
        .s("checksum", &format!("{checksum:016x}"))
        .u("iters", iters)
        .u("errors", errors)
        .u("bytes", bytes)
        .print();
    Ok(0)
}

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(TOOL, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_cover_one_and_several_segments_and_patterns_differ_by_sender_and_iteration() {
        let s = 100_000;
        let lens: Vec<usize> = (0..4).map(|i| len_of(i, s)).collect();
        assert!(lens.contains(&17) && lens.iter().any(|&l| l > 3 * 65536));
        assert_ne!(pattern(0, 1, 64), pattern(1, 1, 64));
        assert_ne!(pattern(0, 1, 64), pattern(0, 2, 64));
        assert_eq!(pattern(2, 5, 64), pattern(2, 5, 64));
    }
}
