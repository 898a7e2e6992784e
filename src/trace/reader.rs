//! Reading a trace back, and checking it against the trace-event format rules vfmig relies on.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::event::{EventKind, TraceEvent, Track};
use super::recorder::{PASS_EVENT, PHASE_CATEGORY};
use super::TraceError;

/// A trace read back from Chrome trace-event JSON (object form).
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// The events, in file order.
    pub events: Vec<TraceEvent>,
    /// `displayTimeUnit`, if present (`"ms"` in vfmig's traces).
    pub display_time_unit: Option<String>,
    /// `otherData`: free-form facts about the migration (strategy, VM, QEMU version,
    /// `downtime_ms`, …).
    pub other_data: Map<String, Value>,
}

/// One QEMU pass (`MIGRATION_PASS`) on the timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pass {
    /// QEMU's pass number (`args.pass`), or the ordinal of the event (1, 2, …) without it.
    pub number: u64,
    /// When, µs.
    pub ts_us: f64,
}

/// All samples of one counter series, sorted by time.
#[derive(Debug, Clone, PartialEq)]
pub struct CounterSeries {
    /// The counter's name as recorded (e.g. `remaining_bytes`, `a/device_dirty_pages`), or
    /// `name.key` for an `args` member other than `value`.
    pub name: String,
    /// A unique, readable label: `name` for pid 1 or a name that already carries a
    /// `prefix/`; otherwise `<process name or pid>/name`.
    pub label: String,
    /// The process that recorded it.
    pub pid: u32,
    /// `(ts µs, value)`, sorted by `ts`.
    pub points: Vec<(f64, f64)>,
}

impl CounterSeries {
    /// The counter's name without any `prefix/` (`device_dirty_pages` for
    /// `a/device_dirty_pages`).
    pub fn base_name(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or(&self.name)
    }
}

impl Trace {
    /// Reads, [`validate`]s and parses the trace in `path`.
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| TraceError::Json {
            what: path.display().to_string(),
            source,
        })?;
        Self::from_value(value)
    }

    /// [`validate`]s and parses a trace from its JSON text.
    pub fn from_json(text: &str) -> Result<Trace, TraceError> {
        let value: Value = serde_json::from_str(text).map_err(|source| TraceError::Json {
            what: "trace".to_string(),
            source,
        })?;
        Self::from_value(value)
    }

    /// [`validate`]s and parses a trace from its JSON value.
    pub fn from_value(mut value: Value) -> Result<Trace, TraceError> {
        validate(&value)?;
        let Value::Object(top) = &mut value else {
            unreachable!("validate accepts only objects")
        };
        let Some(Value::Array(raw)) = top.remove("traceEvents") else {
            unreachable!("validate requires traceEvents")
        };
        let events = raw
            .into_iter()
            .enumerate()
            .map(|(index, raw)| {
                serde_json::from_value::<TraceEvent>(raw)
                    .map_err(|source| TraceError::Event { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let display_time_unit = top
            .get("displayTimeUnit")
            .and_then(Value::as_str)
            .map(str::to_string);
        let other_data = match top.remove("otherData") {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };
        Ok(Trace {
            events,
            display_time_unit,
            other_data,
        })
    }

    /// The trace as JSON again (object form).
    pub fn to_json(&self) -> Value {
        let mut top = Map::new();
        top.insert(
            "traceEvents".to_string(),
            serde_json::to_value(&self.events).unwrap_or(Value::Null),
        );
        if let Some(unit) = &self.display_time_unit {
            top.insert("displayTimeUnit".to_string(), Value::String(unit.clone()));
        }
        top.insert(
            "otherData".to_string(),
            Value::Object(self.other_data.clone()),
        );
        Value::Object(top)
    }

    /// `otherData[key]`.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.other_data.get(key)
    }

    /// The name a `process_name` metadata event gave `pid`.
    pub fn process_name(&self, pid: u32) -> Option<&str> {
        self.events
            .iter()
            .filter(|e| e.ph == EventKind::Metadata && e.name == "process_name" && e.pid == pid)
            .find_map(|e| e.args.get("name").and_then(Value::as_str))
    }

    /// The migration phases: complete events of category `"phase"`, sorted by start.
    pub fn phases(&self) -> Vec<&TraceEvent> {
        let mut phases: Vec<&TraceEvent> = self
            .events
            .iter()
            .filter(|e| e.ph == EventKind::Complete && e.cat.as_deref() == Some(PHASE_CATEGORY))
            .collect();
        phases.sort_by(|a, b| a.ts.total_cmp(&b.ts));
        phases
    }

    /// QEMU's passes: the `MIGRATION_PASS` instants, sorted by time.
    pub fn passes(&self) -> Vec<Pass> {
        let mut events: Vec<&TraceEvent> = self
            .events
            .iter()
            .filter(|e| {
                matches!(e.ph, EventKind::Instant | EventKind::InstantLegacy)
                    && e.name == PASS_EVENT
            })
            .collect();
        events.sort_by(|a, b| a.ts.total_cmp(&b.ts));
        events
            .iter()
            .enumerate()
            .map(|(i, e)| Pass {
                number: e
                    .args
                    .get("pass")
                    .and_then(Value::as_u64)
                    .unwrap_or(i as u64 + 1),
                ts_us: e.ts,
            })
            .collect()
    }

    /// Every counter series, ordered by pid, then name.
    pub fn counters(&self) -> Vec<CounterSeries> {
        let mut by_key: BTreeMap<(u32, String), Vec<(f64, f64)>> = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.ph == EventKind::Counter) {
            let Some(args) = e.args.as_object() else {
                continue;
            };
            for (key, value) in args {
                let Some(value) = value.as_f64() else {
                    continue;
                };
                let name = if key == "value" {
                    e.name.clone()
                } else {
                    format!("{}.{key}", e.name)
                };
                by_key.entry((e.pid, name)).or_default().push((e.ts, value));
            }
        }
        by_key
            .into_iter()
            .map(|((pid, name), mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                let label = if pid == Track::ORCHESTRATOR_PID || name.contains('/') {
                    name.clone()
                } else {
                    match self.process_name(pid) {
                        Some(process) => format!("{process}/{name}"),
                        None => format!("pid{pid}/{name}"),
                    }
                };
                CounterSeries {
                    name,
                    label,
                    pid,
                    points,
                }
            })
            .collect()
    }

    /// The end of the last timed event, µs (0 for a trace without any).
    pub fn end_us(&self) -> f64 {
        self.events
            .iter()
            .filter(|e| e.ph != EventKind::Metadata)
            .map(TraceEvent::end_us)
            .fold(0.0, f64::max)
    }
}

/// Checks `value` against the Chrome trace-event rules vfmig relies on:
///
/// - the top level is an object with a `traceEvents` array (and `otherData`, if present, is an
///   object);
/// - every event is an object with `ph` (one of `X i I C M B E`), a string `name` and an
///   integer `pid` (0 ≤ pid < 2³²; likewise `tid` when present);
/// - every event but metadata (`M`) has a numeric `ts` ≥ 0;
/// - `X` has a numeric `dur` ≥ 0;
/// - `C` has an object `args` whose values are all numbers;
/// - `i` / `I` have `s` in `g`, `p`, `t` if present.
///
/// The error names the index of the first offending event and what is wrong with it.
pub fn validate(value: &Value) -> Result<(), TraceError> {
    let Some(top) = value.as_object() else {
        return Err(TraceError::top(format!(
            "the top level must be an object with a traceEvents array, not {}",
            kind_of(value)
        )));
    };
    let events = match top.get("traceEvents") {
        Some(Value::Array(events)) => events,
        Some(other) => {
            return Err(TraceError::top(format!(
                "traceEvents must be an array, not {}",
                kind_of(other)
            )))
        }
        None => return Err(TraceError::top("no traceEvents array")),
    };
    if let Some(other) = top.get("otherData") {
        if !other.is_object() {
            return Err(TraceError::top(format!(
                "otherData must be an object, not {}",
                kind_of(other)
            )));
        }
    }
    for (index, event) in events.iter().enumerate() {
        validate_event(index, event)?;
    }
    Ok(())
}

fn validate_event(index: usize, event: &Value) -> Result<(), TraceError> {
    let Some(obj) = event.as_object() else {
        let reason = format!("must be an object, not {}", kind_of(event));
        return Err(TraceError::event(index, reason));
    };
    let rules = EventRules { index, obj };
    let ph = rules.ph()?;
    rules.name(ph)?;
    rules.ids(ph)?;
    if ph != "M" {
        rules.non_negative_number("ts", ph)?;
    }
    match ph {
        "X" => rules.non_negative_number("dur", ph),
        "C" => rules.counter_args(),
        "i" | "I" => rules.instant_scope(ph),
        _ => Ok(()),
    }
}

/// The format's rules, checked on event `index` of `traceEvents`.
struct EventRules<'a> {
    index: usize,
    obj: &'a Map<String, Value>,
}

impl EventRules<'_> {
    fn broken(&self, reason: impl Into<String>) -> TraceError {
        TraceError::event(self.index, reason)
    }

    /// The event's kind: one letter of [`EventKind::LETTERS`].
    fn ph(&self) -> Result<&str, TraceError> {
        match self.obj.get("ph") {
            None => Err(self.broken("has no \"ph\"")),
            Some(Value::String(ph)) if EventKind::LETTERS.contains(&ph.as_str()) => Ok(ph),
            Some(other) => Err(self.broken(format!(
                "\"ph\" is {other}, not one of {}",
                EventKind::LETTERS.join(" ")
            ))),
        }
    }

    fn name(&self, ph: &str) -> Result<(), TraceError> {
        match self.obj.get("name") {
            Some(Value::String(_)) => Ok(()),
            None => Err(self.broken(format!("{ph} event has no \"name\""))),
            Some(other) => {
                Err(self.broken(format!("\"name\" must be a string, not {}", kind_of(other))))
            }
        }
    }

    /// `pid` (required) and `tid` (optional) are 32-bit unsigned integers.
    fn ids(&self, ph: &str) -> Result<(), TraceError> {
        for (field, required) in [("pid", true), ("tid", false)] {
            match self.obj.get(field) {
                None if required => {
                    return Err(self.broken(format!("{ph} event has no \"{field}\"")))
                }
                None => {}
                Some(v) if v.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)) => {}
                Some(other) => {
                    return Err(self.broken(format!(
                        "\"{field}\" must be an integer from 0 to {}, not {other}",
                        u32::MAX
                    )))
                }
            }
        }
        Ok(())
    }

    fn non_negative_number(&self, field: &str, ph: &str) -> Result<(), TraceError> {
        let Some(v) = self.obj.get(field) else {
            return Err(self.broken(format!("{ph} event has no \"{field}\"")));
        };
        match v.as_f64() {
            Some(n) if n >= 0.0 => Ok(()),
            Some(n) => Err(self.broken(format!("{ph} event has a negative \"{field}\" ({n})"))),
            None => Err(self.broken(format!(
                "{ph} event's \"{field}\" must be a number, not {}",
                kind_of(v)
            ))),
        }
    }

    /// A counter's `args` is an object of numbers.
    fn counter_args(&self) -> Result<(), TraceError> {
        match self.obj.get("args") {
            Some(Value::Object(args)) => match args.iter().find(|(_, v)| !v.is_number()) {
                Some((key, v)) => Err(self.broken(format!(
                    "C event's args.{key} must be a number, not {}",
                    kind_of(v)
                ))),
                None => Ok(()),
            },
            None => Err(self.broken("C event has no \"args\"")),
            Some(other) => Err(self.broken(format!(
                "C event's \"args\" must be an object, not {}",
                kind_of(other)
            ))),
        }
    }

    /// An instant's scope `s`, when present, is `g`, `p` or `t`.
    fn instant_scope(&self, ph: &str) -> Result<(), TraceError> {
        match self.obj.get("s") {
            None => Ok(()),
            Some(Value::String(s)) if matches!(s.as_str(), "g" | "p" | "t") => Ok(()),
            Some(other) => Err(self.broken(format!(
                "{ph} event's scope \"s\" must be \"g\", \"p\" or \"t\", not {other}"
            ))),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A valid trace whose event #2 is replaced by `bad`.
    fn with_bad_event(bad: Value) -> Value {
        json!({
            "traceEvents": [
                {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "orchestrator"}},
                {"ph": "X", "name": "precopy", "cat": "phase", "ts": 0, "dur": 10, "pid": 1, "tid": 1},
                bad,
                {"ph": "C", "name": "remaining_bytes", "ts": 5, "pid": 1, "args": {"value": 1}},
            ],
            "displayTimeUnit": "ms",
        })
    }

    fn invalid_at(value: &Value) -> (Option<usize>, String) {
        match validate(value) {
            Err(TraceError::Invalid { index, reason }) => (index, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn accepts_every_kind() {
        let good = with_bad_event(
            json!({"ph": "i", "name": "MIGRATION_PASS", "ts": 3.5, "pid": 1, "tid": 2, "s": "g"}),
        );
        validate(&good).unwrap();
        let trace = Trace::from_value(good).unwrap();
        assert_eq!(trace.events.len(), 4);
        assert_eq!(
            trace.passes(),
            vec![Pass {
                number: 1,
                ts_us: 3.5
            }]
        );
        for ev in [
            json!({"ph": "B", "name": "x", "ts": 1, "pid": 1}),
            json!({"ph": "E", "name": "x", "ts": 2, "pid": 1}),
            json!({"ph": "I", "name": "x", "ts": 2, "pid": 1}),
            json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "phases"}}),
        ] {
            validate(&with_bad_event(ev)).unwrap();
        }
    }

    #[test]
    fn rejects_a_trace_without_trace_events() {
        let (index, reason) = invalid_at(&json!({"displayTimeUnit": "ms"}));
        assert_eq!(index, None);
        assert!(reason.contains("traceEvents"), "{reason}");
        let (index, _) = invalid_at(&json!([]));
        assert_eq!(index, None);
        let (index, reason) = invalid_at(&json!({"traceEvents": {}}));
        assert_eq!(index, None);
        assert!(reason.contains("array"), "{reason}");
        let err = validate(&json!({})).unwrap_err().to_string();
        assert!(err.starts_with("trace: "), "{err}");
    }

    #[test]
    fn rejects_an_event_without_ph() {
        let (index, reason) = invalid_at(&with_bad_event(
            json!({"name": "precopy", "ts": 0, "pid": 1}),
        ));
        assert_eq!(index, Some(2));
        assert!(reason.contains("\"ph\""), "{reason}");
        let err = validate(&with_bad_event(json!({"name": "x", "ts": 0, "pid": 1})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("event #2"), "{err}");
        // An unknown ph is refused too.
        let (index, _) = invalid_at(&with_bad_event(
            json!({"ph": "Q", "name": "x", "ts": 0, "pid": 1}),
        ));
        assert_eq!(index, Some(2));
    }

    #[test]
    fn rejects_x_without_dur() {
        let (index, reason) = invalid_at(&with_bad_event(
            json!({"ph": "X", "name": "switchover", "ts": 0, "pid": 1}),
        ));
        assert_eq!(index, Some(2));
        assert!(reason.contains("dur"), "{reason}");
        let (index, reason) = invalid_at(&with_bad_event(
            json!({"ph": "X", "name": "switchover", "ts": 0, "dur": -1, "pid": 1}),
        ));
        assert_eq!(index, Some(2));
        assert!(reason.contains("negative"), "{reason}");
    }

    #[test]
    fn rejects_a_counter_with_a_non_numeric_arg() {
        let (index, reason) = invalid_at(&with_bad_event(
            json!({"ph": "C", "name": "mbps", "ts": 0, "pid": 1, "args": {"value": "fast"}}),
        ));
        assert_eq!(index, Some(2));
        assert!(reason.contains("args.value"), "{reason}");
        let (index, _) = invalid_at(&with_bad_event(
            json!({"ph": "C", "name": "mbps", "ts": 0, "pid": 1}),
        ));
        assert_eq!(index, Some(2));
    }

    #[test]
    fn rejects_a_negative_ts() {
        let (index, reason) = invalid_at(&with_bad_event(
            json!({"ph": "i", "name": "MIGRATION_PASS", "ts": -5, "pid": 1, "s": "g"}),
        ));
        assert_eq!(index, Some(2));
        assert!(reason.contains("negative \"ts\""), "{reason}");
    }

    #[test]
    fn rejects_other_breaches() {
        for (bad, needle) in [
            (json!({"ph": "i", "name": "x", "pid": 1}), "no \"ts\""),
            (
                json!({"ph": "i", "name": "x", "ts": 1, "pid": 1, "s": "q"}),
                "scope",
            ),
            (json!({"ph": "i", "ts": 1, "pid": 1}), "name"),
            (json!({"ph": "i", "name": 3, "ts": 1, "pid": 1}), "name"),
            (json!({"ph": "i", "name": "x", "ts": 1}), "pid"),
            (json!({"ph": "i", "name": "x", "ts": 1, "pid": -1}), "pid"),
            (json!({"ph": "i", "name": "x", "ts": "1", "pid": 1}), "ts"),
            (json!("event"), "object"),
        ] {
            let (index, reason) = invalid_at(&with_bad_event(bad));
            assert_eq!(index, Some(2));
            assert!(reason.contains(needle), "{reason} lacks {needle}");
        }
    }

    #[test]
    fn from_json_reports_bad_json_and_load_reports_missing_files() {
        assert!(matches!(
            Trace::from_json("{not json"),
            Err(TraceError::Json { .. })
        ));
        let err = Trace::load(Path::new("/nonexistent/vfmig-trace.json")).unwrap_err();
        assert!(matches!(err, TraceError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/vfmig-trace.json"));
    }

    #[test]
    fn counters_are_grouped_by_pid_and_name() {
        let trace = Trace::from_value(json!({
            "traceEvents": [
                {"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "companion b"}},
                {"ph": "C", "name": "held_ops", "ts": 2, "pid": 3, "args": {"value": 4}},
                {"ph": "C", "name": "held_ops", "ts": 1, "pid": 3, "args": {"value": 3}},
                {"ph": "C", "name": "held_ops", "ts": 1, "pid": 1, "args": {"value": 9}},
                {"ph": "C", "name": "q", "ts": 1, "pid": 1, "args": {"rx": 1, "tx": 2}},
            ],
        }))
        .unwrap();
        let labels: Vec<(String, Vec<(f64, f64)>)> = trace
            .counters()
            .into_iter()
            .map(|s| (s.label, s.points))
            .collect();
        assert_eq!(
            labels,
            vec![
                ("held_ops".to_string(), vec![(1.0, 9.0)]),
                ("q.rx".to_string(), vec![(1.0, 1.0)]),
                ("q.tx".to_string(), vec![(1.0, 2.0)]),
                (
                    "companion b/held_ops".to_string(),
                    vec![(1.0, 3.0), (2.0, 4.0)]
                ),
            ]
        );
    }
}
