//! One Chrome trace event, as written by [`TraceRecorder`](super::TraceRecorder) and read by
//! [`Trace`](super::Trace).
//!
//! The format is the "JSON object format" of the Chrome trace-event specification
//! (<https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU>), which
//! Perfetto and `chrome://tracing` open. Timestamps and durations are in microseconds.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kind of an event: its `"ph"` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// `"X"`: a complete event, a span with `ts` and `dur`.
    #[serde(rename = "X")]
    Complete,
    /// `"i"`: an instant event (a point in time), scoped by `"s"`.
    #[serde(rename = "i")]
    Instant,
    /// `"I"`: the deprecated spelling of an instant event.
    #[serde(rename = "I")]
    InstantLegacy,
    /// `"C"`: a counter sample; each member of `args` is one series.
    #[serde(rename = "C")]
    Counter,
    /// `"M"`: metadata, e.g. `process_name`, `thread_name`.
    #[serde(rename = "M")]
    Metadata,
    /// `"B"`: the beginning of a duration event.
    #[serde(rename = "B")]
    Begin,
    /// `"E"`: the end of a duration event.
    #[serde(rename = "E")]
    End,
}

impl EventKind {
    /// The `"ph"` letters accepted by [`validate`](super::validate).
    pub const LETTERS: [&'static str; 7] = ["X", "i", "I", "C", "M", "B", "E"];

    /// The `"ph"` letter of this kind.
    pub fn letter(self) -> &'static str {
        match self {
            EventKind::Complete => "X",
            EventKind::Instant => "i",
            EventKind::InstantLegacy => "I",
            EventKind::Counter => "C",
            EventKind::Metadata => "M",
            EventKind::Begin => "B",
            EventKind::End => "E",
        }
    }
}

/// Where an event is drawn: a process (`pid`) and a thread (`tid`) inside it.
///
/// vfmig's convention: pid 1 is the orchestrator and the source QEMU (tid 1 the phases,
/// tid 2 QEMU's events); pids 2, 3, … are companions (see
/// [`TraceRecorder::register_process`](super::TraceRecorder::register_process)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Track {
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
}

impl Track {
    /// The orchestrator's process.
    pub const ORCHESTRATOR_PID: u32 = 1;
    /// The migration phases: (pid 1, tid 1).
    pub const PHASES: Track = Track { pid: 1, tid: 1 };
    /// QEMU's events such as `MIGRATION_PASS`: (pid 1, tid 2).
    pub const QEMU: Track = Track { pid: 1, tid: 2 };

    /// A track.
    pub const fn new(pid: u32, tid: u32) -> Self {
        Track { pid, tid }
    }
}

/// One trace event. Optional fields are omitted from the JSON when `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// The event's name (a phase, `MIGRATION_PASS`, a counter, `process_name`, …).
    pub name: String,
    /// Category (`"phase"`, `"qemu"`, `"counter"`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cat: Option<String>,
    /// Kind (`"ph"`).
    pub ph: EventKind,
    /// Timestamp, µs since the start of the trace. Metadata events carry 0.
    #[serde(default)]
    pub ts: f64,
    /// Duration in µs, for [`EventKind::Complete`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dur: Option<f64>,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    #[serde(default)]
    pub tid: u32,
    /// Scope of an instant event: `"g"` (global), `"p"` (process) or `"t"` (thread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<String>,
    /// Arguments (an object; `{"value": v}` for vfmig's counters).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
}

impl TraceEvent {
    /// The end of the event, µs: `ts + dur` for a complete event, `ts` otherwise.
    pub fn end_us(&self) -> f64 {
        self.ts + self.dur.unwrap_or(0.0)
    }

    /// The event's track.
    pub fn track(&self) -> Track {
        Track::new(self.pid, self.tid)
    }
}
