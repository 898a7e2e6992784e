//! Recording a migration's timeline as Chrome trace events.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};
use serde_json::{json, Map, Value};

use super::event::{EventKind, TraceEvent, Track};
use super::TraceError;
use crate::qmp::MigrationInfo;

/// The category of the migration phases' spans.
pub const PHASE_CATEGORY: &str = "phase";
/// The category of QEMU's events (`MIGRATION_PASS`, …).
pub const QEMU_CATEGORY: &str = "qemu";
/// The category of counter samples.
pub const COUNTER_CATEGORY: &str = "counter";
/// The name of QEMU's pass event.
pub const PASS_EVENT: &str = "MIGRATION_PASS";

/// Records a migration's timeline: phase spans, QEMU's events and counter samples, with
/// timestamps in µs since the recorder was created.
///
/// **Sharing.** Every method takes `&self`; the events sit behind a [`Mutex`], so the recorder
/// is `Send + Sync`: wrap it in an [`Arc`](std::sync::Arc) to record from the orchestrator's
/// thread and from threads polling the companions at once. Recording an event is one short
/// lock and a `Vec` push.
///
/// Tracks: the phases go to (pid 1, tid 1) with category `"phase"`; instants such as QEMU's
/// `MIGRATION_PASS` to (pid 1, tid 2) with category `"qemu"`; counters of the orchestrator and
/// the source QEMU to pid 1, the companions' to the pid that
/// [`register_process`](Self::register_process) returns (2, 3, …). Perfetto draws one
/// counter track per (pid, name).
///
/// ```
/// use vfmig::trace::TraceRecorder;
/// let rec = TraceRecorder::new();
/// rec.set_meta("strategy", "transparent");
/// rec.enter_phase_at("precopy", 0.0);
/// rec.counter("remaining_bytes", 10.0, 536870912.0);
/// rec.pass(500.0, 1);
/// rec.close_phase_at(1000.0);
/// let json = rec.to_json();
/// assert!(json["traceEvents"].as_array().unwrap().len() >= 3);
/// ```
#[derive(Debug)]
pub struct TraceRecorder {
    start: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<TraceEvent>,
    processes: BTreeMap<u32, String>,
    threads: BTreeMap<Track, String>,
    meta: Map<String, Value>,
    open_phase: Option<(String, f64)>,
}

impl Default for TraceRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceRecorder {
    /// A recorder whose time zero is now. It names pid 1 `orchestrator` and its tracks
    /// `phases` (tid 1) and `qemu events` (tid 2).
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    /// A recorder whose time zero is `start` (e.g. the instant the migration began).
    pub fn starting_at(start: Instant) -> Self {
        let mut inner = Inner::default();
        inner
            .processes
            .insert(Track::ORCHESTRATOR_PID, "orchestrator".to_string());
        inner.threads.insert(Track::PHASES, "phases".to_string());
        inner.threads.insert(Track::QEMU, "qemu events".to_string());
        TraceRecorder {
            start,
            inner: Mutex::new(inner),
        }
    }

    /// The recorder's time zero.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// µs since the recorder's time zero.
    pub fn now_us(&self) -> f64 {
        self.start.elapsed().as_nanos() as f64 / 1e3
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    fn push(&self, event: TraceEvent) {
        self.lock().events.push(event);
    }

    /// Registers a process (e.g. `"companion a"`) and returns its pid (2, 3, …); the trace
    /// names it with a `process_name` metadata event. Registering the same name again
    /// returns the same pid.
    pub fn register_process(&self, name: &str) -> u32 {
        let mut inner = self.lock();
        if let Some((&pid, _)) = inner.processes.iter().find(|(_, n)| n.as_str() == name) {
            return pid;
        }
        let pid = inner.processes.keys().max().map_or(1, |&p| p + 1).max(2);
        inner.processes.insert(pid, name.to_string());
        pid
    }

    /// Names a process (a `process_name` metadata event), replacing any earlier name.
    pub fn name_process(&self, pid: u32, name: &str) {
        self.lock().processes.insert(pid, name.to_string());
    }

    /// Names a thread track (a `thread_name` metadata event).
    pub fn name_thread(&self, track: Track, name: &str) {
        self.lock().threads.insert(track, name.to_string());
    }

    /// A complete event (`"ph":"X"`) from `start_us` to `end_us` on the phase track
    /// (pid 1, tid 1). An `end_us` before `start_us` gives a zero duration.
    pub fn span(&self, name: &str, category: &str, start_us: f64, end_us: f64, args: Value) {
        self.span_on(Track::PHASES, name, category, start_us, end_us, args);
    }

    /// A complete event (`"ph":"X"`) on any track.
    pub fn span_on(
        &self,
        track: Track,
        name: &str,
        category: &str,
        start_us: f64,
        end_us: f64,
        args: Value,
    ) {
        let start_us = start_us.max(0.0);
        self.push(TraceEvent {
            name: name.to_string(),
            cat: Some(category.to_string()),
            ph: EventKind::Complete,
            ts: start_us,
            dur: Some((end_us - start_us).max(0.0)),
            pid: track.pid,
            tid: track.tid,
            s: None,
            args: object_or_null(args),
        });
    }

    /// Begins phase `name` now; see [`enter_phase_at`](Self::enter_phase_at).
    pub fn enter_phase(&self, name: &str) {
        self.enter_phase_at(name, self.now_us());
    }

    /// Begins phase `name` at `ts_us`: the open phase, if any, ends there and becomes a
    /// `"phase"` span. Entering the phase that is already open does nothing (like the
    /// orchestrator's own timeline).
    pub fn enter_phase_at(&self, name: &str, ts_us: f64) {
        let mut inner = self.lock();
        if inner.open_phase.as_ref().is_some_and(|(n, _)| n == name) {
            return;
        }
        if let Some((prev, start)) = inner.open_phase.take() {
            inner.events.push(phase_span(&prev, start, ts_us));
        }
        inner.open_phase = Some((name.to_string(), ts_us.max(0.0)));
    }

    /// Ends the open phase now; see [`close_phase_at`](Self::close_phase_at).
    pub fn close_phase(&self) {
        self.close_phase_at(self.now_us());
    }

    /// Ends the open phase at `ts_us` (call it once the last phase, `done`, is over). A phase
    /// still open when the trace is written is written as ending at that moment.
    pub fn close_phase_at(&self, ts_us: f64) {
        let mut inner = self.lock();
        if let Some((prev, start)) = inner.open_phase.take() {
            inner.events.push(phase_span(&prev, start, ts_us));
        }
    }

    /// An instant event (`"ph":"i"`, global scope `"s":"g"`) at `ts_us` on QEMU's track
    /// (pid 1, tid 2).
    pub fn instant(&self, name: &str, category: &str, ts_us: f64, args: Value) {
        self.instant_on(Track::QEMU, name, category, ts_us, args);
    }

    /// An instant event (`"ph":"i"`, `"s":"g"`) on any track.
    pub fn instant_on(&self, track: Track, name: &str, category: &str, ts_us: f64, args: Value) {
        self.push(TraceEvent {
            name: name.to_string(),
            cat: Some(category.to_string()),
            ph: EventKind::Instant,
            ts: ts_us.max(0.0),
            dur: None,
            pid: track.pid,
            tid: track.tid,
            s: Some("g".to_string()),
            args: object_or_null(args),
        });
    }

    /// QEMU's `MIGRATION_PASS` event number `pass` at `ts_us`: an instant of category
    /// `"qemu"` with `args: {"pass": pass}`.
    pub fn pass(&self, ts_us: f64, pass: u64) {
        self.instant(PASS_EVENT, QEMU_CATEGORY, ts_us, json!({ "pass": pass }));
    }

    /// A counter sample (`"ph":"C"`, `args: {"value": value}`) of the orchestrator / source
    /// QEMU (pid 1) at `ts_us`. Non-finite values are dropped (JSON cannot hold them).
    pub fn counter(&self, name: &str, ts_us: f64, value: f64) {
        self.counter_for(Track::ORCHESTRATOR_PID, name, ts_us, value);
    }

    /// A counter sample of process `pid` (a companion's, from
    /// [`register_process`](Self::register_process)). `name` may carry the companion's
    /// prefix, e.g. `a/device_dirty_pages`.
    pub fn counter_for(&self, pid: u32, name: &str, ts_us: f64, value: f64) {
        if !value.is_finite() {
            return;
        }
        self.push(TraceEvent {
            name: name.to_string(),
            cat: Some(COUNTER_CATEGORY.to_string()),
            ph: EventKind::Counter,
            ts: ts_us.max(0.0),
            dur: None,
            pid,
            tid: 0,
            s: None,
            args: json!({ "value": value }),
        });
    }

    /// A counter sample taken now.
    pub fn counter_now(&self, name: &str, value: f64) {
        self.counter(name, self.now_us(), value);
    }

    /// The counters of one `query-migrate` sample of the source at `ts_us`:
    /// `remaining_bytes`, `transferred_bytes`, `dirty_pages_rate` and `mbps`, those QEMU sent.
    pub fn migration_info(&self, ts_us: f64, info: &MigrationInfo) {
        let Some(ram) = &info.ram else { return };
        let counters = [
            ("remaining_bytes", ram.remaining.map(|v| v as f64)),
            ("transferred_bytes", ram.transferred.map(|v| v as f64)),
            ("dirty_pages_rate", ram.dirty_pages_rate.map(|v| v as f64)),
            ("mbps", ram.mbps),
        ];
        for (name, value) in counters {
            if let Some(value) = value {
                self.counter(name, ts_us, value);
            }
        }
    }

    /// Sets `otherData[key]` (e.g. `strategy`, `vm`, `qemu_version`, `downtime_ms`).
    pub fn set_meta(&self, key: &str, value: impl Into<Value>) {
        self.lock().meta.insert(key.to_string(), value.into());
    }

    /// The trace as JSON: `{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}`,
    /// metadata events first, then every other event sorted by `ts` (recording order among
    /// equal timestamps). A phase still open ends now.
    pub fn to_json(&self) -> Value {
        let now = self.now_us();
        let inner = self.lock();
        let mut events: Vec<TraceEvent> = Vec::with_capacity(inner.events.len() + 8);
        for (&pid, name) in &inner.processes {
            events.push(metadata("process_name", pid, 0, name));
        }
        for (track, name) in &inner.threads {
            events.push(metadata("thread_name", track.pid, track.tid, name));
        }
        let mut timed = inner.events.clone();
        if let Some((name, start)) = &inner.open_phase {
            timed.push(phase_span(name, *start, now));
        }
        timed.sort_by(|a, b| a.ts.total_cmp(&b.ts));
        events.extend(timed);
        json!({
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": Value::Object(inner.meta.clone()),
        })
    }

    /// Writes [`to_json`](Self::to_json) to `path` (through a temporary file beside it, so a
    /// reader never sees half a trace).
    pub fn write(&self, path: &Path) -> Result<(), TraceError> {
        let text = serde_json::to_string(&self.to_json()).map_err(|source| TraceError::Json {
            what: "trace".to_string(),
            source,
        })?;
        let io = |source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn phase_span(name: &str, start_us: f64, end_us: f64) -> TraceEvent {
    TraceEvent {
        name: name.to_string(),
        cat: Some(PHASE_CATEGORY.to_string()),
        ph: EventKind::Complete,
        ts: start_us,
        dur: Some((end_us - start_us).max(0.0)),
        pid: Track::PHASES.pid,
        tid: Track::PHASES.tid,
        s: None,
        args: Value::Null,
    }
}

fn metadata(kind: &str, pid: u32, tid: u32, name: &str) -> TraceEvent {
    TraceEvent {
        name: kind.to_string(),
        cat: None,
        ph: EventKind::Metadata,
        ts: 0.0,
        dur: None,
        pid,
        tid,
        s: None,
        args: json!({ "name": name }),
    }
}

/// Chrome's `args` is an object; anything else is wrapped as `{"value": v}`.
fn object_or_null(args: Value) -> Value {
    match args {
        Value::Null | Value::Object(_) => args,
        other => json!({ "value": other }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{validate, Trace};

    #[test]
    fn recorded_trace_round_trips_through_write_and_load_and_validates() {
        let rec = TraceRecorder::new();
        rec.set_meta("strategy", "transparent");
        rec.set_meta("downtime_ms", 11);
        rec.enter_phase_at("prepare-destination", 0.0);
        rec.enter_phase_at("precopy", 1_000.0);
        rec.counter("remaining_bytes", 1_500.0, 1024.0 * 1024.0);
        rec.pass(1_200.0, 1);
        let companion = rec.register_process("companion a");
        assert_eq!(companion, 2);
        assert_eq!(rec.register_process("companion a"), 2);
        rec.counter_for(companion, "a/device_dirty_pages", 1_600.0, 42.0);
        rec.counter("mbps", 1_700.0, f64::NAN); // dropped
        rec.enter_phase_at("switchover", 2_000.0);
        rec.enter_phase_at("switchover", 2_100.0); // no-op
        rec.enter_phase_at("done", 2_500.0);
        rec.close_phase_at(2_600.0);
        rec.span("custom <&>", "other", 100.0, 50.0, json!(7));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        rec.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        validate(&value).unwrap();
        assert_eq!(value["displayTimeUnit"], "ms");

        let trace = Trace::load(&path).unwrap();
        assert_eq!(trace.meta("strategy"), Some(&json!("transparent")));
        // Metadata first, then by ts.
        let events = &trace.events;
        let first_timed = events
            .iter()
            .position(|e| e.ph != EventKind::Metadata)
            .unwrap();
        assert!(events[..first_timed]
            .iter()
            .all(|e| e.ph == EventKind::Metadata));
        assert!(events[first_timed..]
            .iter()
            .all(|e| e.ph != EventKind::Metadata));
        assert!(events[first_timed..].windows(2).all(|w| w[0].ts <= w[1].ts));
        assert!(events
            .iter()
            .any(|e| e.name == "process_name" && e.pid == 2 && e.args["name"] == "companion a"));

        let phases: Vec<(&str, f64, f64)> = trace
            .phases()
            .iter()
            .map(|e| (e.name.as_str(), e.ts, e.dur.unwrap()))
            .collect();
        assert_eq!(
            phases,
            vec![
                ("prepare-destination", 0.0, 1_000.0),
                ("precopy", 1_000.0, 1_000.0),
                ("switchover", 2_000.0, 500.0),
                ("done", 2_500.0, 100.0),
            ]
        );
        let custom = events.iter().find(|e| e.name == "custom <&>").unwrap();
        assert_eq!(custom.dur, Some(0.0));
        assert_eq!(custom.args, json!({"value": 7}));
        let pass = events.iter().find(|e| e.name == PASS_EVENT).unwrap();
        assert_eq!((pass.pid, pass.tid, pass.s.as_deref()), (1, 2, Some("g")));
        assert_eq!(pass.cat.as_deref(), Some(QEMU_CATEGORY));
        assert!(!events.iter().any(|e| e.name == "mbps"));
        let series = trace.counters();
        assert_eq!(series.len(), 2);
        assert!(series
            .iter()
            .any(|s| s.label == "a/device_dirty_pages" && s.pid == 2));
        // Re-serialising the typed events gives the same JSON.
        assert_eq!(trace.to_json(), value);
    }

    #[test]
    fn an_open_phase_is_written_as_ending_now() {
        let rec = TraceRecorder::new();
        rec.enter_phase("precopy");
        let json = rec.to_json();
        validate(&json).unwrap();
        let trace = Trace::from_value(json).unwrap();
        assert_eq!(trace.phases().len(), 1);
    }

    #[test]
    fn migration_info_becomes_counters() {
        let rec = TraceRecorder::new();
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "active",
            "ram": {"remaining": 100, "transferred": 50, "dirty-pages-rate": 3000, "mbps": 812.5}
        }))
        .unwrap();
        rec.migration_info(10.0, &info);
        let trace = Trace::from_value(rec.to_json()).unwrap();
        let mut names: Vec<String> = trace.counters().into_iter().map(|s| s.label).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "dirty_pages_rate",
                "mbps",
                "remaining_bytes",
                "transferred_bytes"
            ]
        );
    }

    #[test]
    fn recorder_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TraceRecorder>();
        let rec = std::sync::Arc::new(TraceRecorder::new());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    for j in 0..100 {
                        rec.counter("held_ops", f64::from(i * 100 + j), 1.0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let json = rec.to_json();
        validate(&json).unwrap();
        assert_eq!(
            Trace::from_value(json).unwrap().counters()[0].points.len(),
            400
        );
    }
}
