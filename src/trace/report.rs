//! Where a migration's time went: the phase table, QEMU's passes and the counters, drawn from
//! a [`Trace`].

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::reader::Trace;

/// One row of the phase table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseRow {
    /// The phase (`prepare-destination`, `precopy`, …).
    pub name: String,
    /// Start, ms since the start of the trace.
    pub start_ms: f64,
    /// Duration, ms.
    pub duration_ms: f64,
    /// Share of [`Report::total_ms`], %.
    pub share_pct: f64,
}

/// One QEMU pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PassRow {
    /// QEMU's pass number.
    pub number: u64,
    /// When, ms since the start of the trace.
    pub at_ms: f64,
}

/// Summary of one counter series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CounterStats {
    /// The series' label (e.g. `remaining_bytes`, `a/device_dirty_pages`).
    pub name: String,
    /// Number of samples.
    pub samples: usize,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Last value (by time).
    pub last: f64,
    /// Time of the last sample, ms.
    pub last_ms: f64,
}

/// One step of the switchover (category `step` from a companion, `takeover` from the
/// orchestrator), timed from the source's quiesce.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRow {
    /// The step (`quiesce`, `vf-export`, `announce`, `vm-runs-here`, …).
    pub name: String,
    /// Whose track it is on (`source companion`, `destination companion`, `orchestrator`).
    pub process: String,
    /// What it concerned (a peer, a count).
    pub detail: String,
    /// Start, ms from the start of the source's quiesce (from the first step when the trace
    /// has no quiesce).
    pub at_ms: f64,
    /// Duration, ms.
    pub duration_ms: f64,
}

/// The categories of switchover steps.
pub const STEP_CATEGORIES: [&str; 2] = ["step", "takeover"];

/// The report of one migration trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The phases, in order of start.
    pub phases: Vec<PhaseRow>,
    /// From the start of the first phase to the end of the last, ms (0 without phases).
    pub total_ms: f64,
    /// QEMU's passes, in order.
    pub passes: Vec<PassRow>,
    /// Every counter series.
    pub counters: Vec<CounterStats>,
    /// `otherData.downtime_ms`, when the trace has it (QEMU's downtime).
    pub downtime_ms: Option<f64>,
    /// The switchover's steps, in order of start.
    pub steps: Vec<StepRow>,
    /// `otherData`, as recorded.
    pub meta: serde_json::Map<String, Value>,
}

impl Report {
    /// Draws the report from `trace`.
    pub fn from_trace(trace: &Trace) -> Report {
        let phases = trace.phases();
        let first = phases.iter().map(|e| e.ts).fold(f64::INFINITY, f64::min);
        let last = phases.iter().map(|e| e.end_us()).fold(0.0, f64::max);
        let total_us = if phases.is_empty() {
            0.0
        } else {
            (last - first).max(0.0)
        };
        let phases = phases
            .iter()
            .map(|e| {
                let dur = e.dur.unwrap_or(0.0);
                PhaseRow {
                    name: e.name.clone(),
                    start_ms: e.ts / 1e3,
                    duration_ms: dur / 1e3,
                    share_pct: if total_us > 0.0 {
                        100.0 * dur / total_us
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        let passes = trace
            .passes()
            .into_iter()
            .map(|p| PassRow {
                number: p.number,
                at_ms: p.ts_us / 1e3,
            })
            .collect();
        let counters = trace
            .counters()
            .into_iter()
            .filter_map(|s| {
                let &(last_ts, last) = s.points.last()?;
                Some(CounterStats {
                    samples: s.points.len(),
                    min: s.points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
                    max: s
                        .points
                        .iter()
                        .map(|p| p.1)
                        .fold(f64::NEG_INFINITY, f64::max),
                    last,
                    last_ms: last_ts / 1e3,
                    name: s.label,
                })
            })
            .collect();
        let downtime_ms = trace.meta("downtime_ms").and_then(|v| match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        });
        Report {
            phases,
            total_ms: total_us / 1e3,
            passes,
            counters,
            downtime_ms,
            steps: steps(trace),
            meta: trace.other_data.clone(),
        }
    }

    /// The report in markdown: the phase table, summary lines (total, downtime, passes,
    /// `otherData`), and a table of the counters.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| phase | start ms | duration ms | share |\n");
        out.push_str("|---|---:|---:|---:|\n");
        for p in &self.phases {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {} | {:.1} % |",
                md_escape(&p.name),
                p.start_ms,
                fmt_ms(p.duration_ms),
                p.share_pct
            );
        }
        if self.phases.is_empty() {
            out.push_str("| (no phases recorded) | | | |\n");
        }
        out.push('\n');
        let _ = writeln!(out, "- total: {} ms", fmt_ms(self.total_ms));
        if let Some(downtime) = self.downtime_ms {
            let _ = writeln!(out, "- downtime: {} ms", fmt_ms(downtime));
        }
        if self.passes.is_empty() {
            out.push_str("- passes: none recorded\n");
        } else {
            let times: Vec<String> = self
                .passes
                .iter()
                .map(|p| format!("#{} at {:.1} ms", p.number, p.at_ms))
                .collect();
            let _ = writeln!(
                out,
                "- passes: {} ({})",
                self.passes.len(),
                times.join(", ")
            );
        }
        for (key, value) in &self.meta {
            if key == "downtime_ms" {
                continue;
            }
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "- {}: {}", md_escape(key), md_escape(&value));
        }
        if !self.steps.is_empty() {
            out.push_str("\n| step | where | detail | at ms (from the quiesce) | duration ms |\n");
            out.push_str("|---|---|---|---:|---:|\n");
            for s in &self.steps {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {:.2} | {:.2} |",
                    md_escape(&s.name),
                    md_escape(&s.process),
                    md_escape(&s.detail),
                    s.at_ms,
                    s.duration_ms
                );
            }
        }
        if !self.counters.is_empty() {
            out.push_str("\n| counter | samples | min | max | last |\n");
            out.push_str("|---|---:|---:|---:|---:|\n");
            for c in &self.counters {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    md_escape(&c.name),
                    c.samples,
                    fmt_value(c.min),
                    fmt_value(c.max),
                    fmt_value(c.last)
                );
            }
        }
        out
    }
}

/// The switchover's steps of `trace`, timed from the source companion's quiesce.
pub(super) fn steps(trace: &Trace) -> Vec<StepRow> {
    let mut events: Vec<_> = trace
        .events
        .iter()
        .filter(|e| {
            e.cat
                .as_deref()
                .is_some_and(|c| STEP_CATEGORIES.contains(&c))
        })
        .collect();
    events.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    let zero = events
        .iter()
        .find(|e| e.name == "quiesce")
        .or(events.first())
        .map_or(0.0, |e| e.ts);
    events
        .into_iter()
        .map(|e| StepRow {
            name: e.name.clone(),
            process: trace.process_name(e.pid).unwrap_or("?").to_string(),
            detail: e.args["detail"].as_str().unwrap_or_default().to_string(),
            at_ms: (e.ts - zero) / 1e3,
            duration_ms: e.dur.unwrap_or(0.0) / 1e3,
        })
        .collect()
}

/// A duration in ms with the precision that matters: whole ms as such, else 2 decimals under
/// 10 ms, 1 under 1 s.
pub(crate) fn fmt_ms(ms: f64) -> String {
    if ms.fract() == 0.0 {
        format!("{ms:.0}")
    } else if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 1000.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// A counter value: integers as integers, others with 2 decimals.
fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Keeps a cell's text from breaking the table.
fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::testutil::sample_recorder;
    use crate::trace::TraceRecorder;

    #[test]
    fn phase_durations_equal_what_was_recorded_and_shares_sum_to_100() {
        let rec = TraceRecorder::new();
        let recorded = [
            ("prepare-destination", 0.0, 40_000.0),
            ("precopy", 40_000.0, 2_640_000.0),
            ("switchover", 2_640_000.0, 2_651_500.0),
            ("destination-up", 2_651_500.0, 2_790_000.0),
            ("done", 2_790_000.0, 2_796_000.0),
        ];
        for (name, start, end) in recorded {
            rec.enter_phase_at(name, start);
            rec.close_phase_at(end);
        }
        rec.set_meta("downtime_ms", 11.5);
        rec.pass(100_000.0, 1);
        rec.pass(900_000.0, 2);
        let trace = Trace::from_value(rec.to_json()).unwrap();
        let report = Report::from_trace(&trace);
        assert_eq!(report.phases.len(), 5);
        for (row, (name, start, end)) in report.phases.iter().zip(recorded) {
            assert_eq!(row.name, name);
            assert!((row.start_ms - start / 1e3).abs() < 1e-9);
            assert!((row.duration_ms - (end - start) / 1e3).abs() < 1e-9);
        }
        let shares: f64 = report.phases.iter().map(|p| p.share_pct).sum();
        assert!((shares - 100.0).abs() < 1e-6, "{shares}");
        assert!((report.total_ms - 2796.0).abs() < 1e-9);
        assert_eq!(report.downtime_ms, Some(11.5));
        assert_eq!(
            report.passes,
            vec![
                PassRow {
                    number: 1,
                    at_ms: 100.0
                },
                PassRow {
                    number: 2,
                    at_ms: 900.0
                }
            ]
        );
        let md = report.markdown();
        assert!(
            md.contains("| switchover | 2640.0 | 11.5 | 0.4 % |"),
            "{md}"
        );
        assert!(md.contains("- total: 2796 ms"), "{md}");
        assert!(md.contains("- downtime: 11.5 ms"), "{md}");
        assert!(
            md.contains("- passes: 2 (#1 at 100.0 ms, #2 at 900.0 ms)"),
            "{md}"
        );
    }

    #[test]
    fn counters_report_min_max_last() {
        let trace = Trace::from_value(sample_recorder().to_json()).unwrap();
        let report = Report::from_trace(&trace);
        let remaining = report
            .counters
            .iter()
            .find(|c| c.name == "remaining_bytes")
            .unwrap();
        assert_eq!(remaining.samples, 60);
        assert_eq!(remaining.max, 512.0 * 1024.0 * 1024.0);
        assert!(remaining.min <= remaining.last);
        let device = report
            .counters
            .iter()
            .find(|c| c.name == "a/device_dirty_pages")
            .unwrap();
        assert_eq!(device.last, device.max);
        assert_eq!(report.passes.len(), 4);
        let md = report.markdown();
        assert!(md.contains("| a/device_dirty_pages | 60 |"), "{md}");
        assert!(md.contains("- strategy: transparent"), "{md}");
    }

    #[test]
    fn steps_are_timed_from_the_quiesce_with_their_process() {
        use crate::trace::Track;
        let rec = TraceRecorder::new();
        let src = rec.register_process("source companion");
        let dst = rec.register_process("destination companion");
        let at = |pid| Track::new(pid, 1);
        let detail = |d: &str| serde_json::json!({ "detail": d });
        rec.span_on(
            at(dst),
            "announce",
            "step",
            12_000.0,
            14_500.0,
            detail("b,c"),
        );
        rec.span_on(at(src), "quiesce", "step", 10_000.0, 10_400.0, detail(""));
        rec.span_on(
            at(1),
            "vf_export",
            "takeover",
            11_000.0,
            11_500.0,
            detail(""),
        );
        rec.span_on(at(1), "precopy", "phase", 0.0, 10_000.0, detail(""));
        let report = Report::from_trace(&Trace::from_value(rec.to_json()).unwrap());
        let rows: Vec<(&str, &str, f64, f64)> = report
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.process.as_str(), s.at_ms, s.duration_ms))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("quiesce", "source companion", 0.0, 0.4),
                ("vf_export", "orchestrator", 1.0, 0.5),
                ("announce", "destination companion", 2.0, 2.5),
            ]
        );
        let md = report.markdown();
        assert!(
            md.contains("| announce | destination companion | b,c | 2.00 | 2.50 |"),
            "{md}"
        );
    }

    #[test]
    fn an_empty_trace_reports_nothing_without_dividing_by_zero() {
        let trace = Trace::from_json(r#"{"traceEvents": []}"#).unwrap();
        let report = Report::from_trace(&trace);
        assert_eq!(report.total_ms, 0.0);
        assert!(report.phases.is_empty() && report.counters.is_empty());
        let md = report.markdown();
        assert!(md.contains("no phases recorded") && md.contains("passes: none"));
    }
}
