//! What the ranks print on their consoles, and waiting for their results (step 4).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::{timed_out, ScenarioError, ScenarioOptions};

/// What a rank printed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RankResult {
    /// Its checksum.
    pub checksum: Option<String>,
    /// Per-iteration times, ms.
    pub iteration_ms: Vec<f64>,
    /// Longest gap between its completions, ms.
    pub blackout_ms: Option<f64>,
    /// Errors it reported.
    pub errors: Vec<String>,
    /// Completions with an error status, by its count.
    pub failed_completions: u64,
    /// Completions it received twice.
    pub duplicates: u64,
    /// rdma-bw: bytes it sent (sender) or received (receiver).
    pub bytes: Option<u64>,
    /// Whether it printed its final result.
    pub done: bool,
    /// rdma-lat: the typical (median) one-way latency, µs.
    pub latency_us: Option<f64>,
}

/// The job's lines in a serial log: JSON objects with a `tool` field.
pub fn job_lines(serial: &Path) -> Vec<Value> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let at = l.find('{')?;
            serde_json::from_str::<Value>(&l[at..]).ok()
        })
        .filter(|v| v.get("tool").is_some())
        .collect()
}

/// How long a finished job must print nothing more before its result is read.
const RESULT_SETTLE: Duration = Duration::from_secs(1);

pub(super) fn rank_result(lines: &[Value]) -> RankResult {
    let mut r = RankResult::default();
    for v in lines {
        if let Some(ms) = v["ms"].as_f64() {
            if v.get("iter").is_some() {
                r.iteration_ms.push(ms);
            }
        }
        for key in ["bytes_sent", "bytes_received"] {
            if let Some(b) = v[key].as_u64() {
                r.bytes = Some(b);
                r.done = true;
            }
        }
        // rdma-lat: the initiator's report, or the responder's.
        if v.get("t_typical[usec]").is_some() || v["role"] == "responder" {
            r.done = true;
            r.latency_us = v["t_typical[usec]"].as_f64();
        }
        if let Some(c) = v["checksum"].as_str() {
            r.done = true;
            r.checksum = Some(c.to_string());
            r.failed_completions = v["errors"].as_u64().unwrap_or(0);
            r.duplicates = v["duplicates"].as_u64().unwrap_or(0);
        }
        if let Some(b) = v["blackout_ms"].as_f64() {
            r.blackout_ms = Some(b);
        }
        if let Some(e) = v["error"].as_str() {
            // A failed completion is one line each (workload.rs): say which, once per kind;
            // `failed_completions` counts them.
            let e = match e {
                "completion" => format!(
                    "{} completion on QP {} failed: {}",
                    v["opcode"].as_str().unwrap_or("a"),
                    v["qp"],
                    v["status"].as_str().unwrap_or("unknown status")
                ),
                other => other.to_string(),
            };
            if !r.errors.contains(&e) {
                r.errors.push(e);
            }
        }
    }
    r
}

/// Step 4: waits for every rank's result, rank `i` reading `logs[i]` (`a`'s console continues
/// in its destinations' logs). With `stall`, a job in which no rank printed anything for that
/// long is a result (the second value says who is missing), not an error.
pub(in crate::lab) fn wait_for_results(
    opts: &ScenarioOptions,
    names: &[String],
    logs: &[Vec<PathBuf>],
    deadline: Instant,
    stall: Option<Duration>,
) -> Result<(Vec<RankResult>, Option<String>), ScenarioError> {
    let lines_of = |i: usize| -> Vec<Value> { logs[i].iter().flat_map(|l| job_lines(l)).collect() };
    let mut last_change = (Instant::now(), 0usize);
    loop {
        let lines: Vec<Vec<Value>> = (0..names.len()).map(lines_of).collect();
        let ranks: Vec<RankResult> = lines.iter().map(|l| rank_result(l)).collect();
        let printed: usize = lines.iter().map(Vec::len).sum();
        if printed != last_change.1 {
            last_change = (Instant::now(), printed);
        }
        // A rank that stops on an error prints its checksum first and the error right after:
        // the result counts once nothing more came for a moment.
        let finished = ranks.iter().all(|r| r.done || !r.errors.is_empty());
        if finished && last_change.0.elapsed() >= RESULT_SETTLE {
            return Ok((ranks, None));
        }
        let missing = || -> Vec<&String> {
            names
                .iter()
                .zip(&ranks)
                .filter(|(_, r)| !r.done)
                .map(|(n, _)| n)
                .collect()
        };
        let stalled_for = last_change.0.elapsed();
        if stall.is_some_and(|s| stalled_for > s) || (stall.is_some() && Instant::now() > deadline)
        {
            let detail = format!(
                "no result from {:?}: the job printed nothing for {} s",
                missing(),
                stalled_for.as_secs()
            );
            tracing::warn!(%detail, "the job stalled");
            return Ok((ranks, Some(detail)));
        }
        if Instant::now() > deadline {
            return Err(timed_out(opts, format!("no checksum from {:?}", missing())));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
