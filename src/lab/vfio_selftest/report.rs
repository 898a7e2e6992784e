//! What a self-test found: each step's result, as a line while it runs and as one JSON
//! object at the end.

use std::fmt;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::plan::STEPS;
use crate::vf::DirtyTracking;

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// It passed.
    Ok,
    /// It failed, with the error (shown as `error: …`).
    Failed(String),
    /// It did not run, and why.
    Skipped(String),
}

impl fmt::Display for StepResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepResult::Ok => f.write_str("ok"),
            StepResult::Failed(e) => write!(f, "error: {e}"),
            StepResult::Skipped(why) => write!(f, "skipped: {why}"),
        }
    }
}

/// One finished step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its name (one of [`STEPS`]).
    pub name: &'static str,
    /// How it ended.
    pub result: StepResult,
    /// What it did, when it passed.
    pub detail: String,
}

impl Step {
    /// Whether it passed.
    pub fn ok(&self) -> bool {
        self.result == StepResult::Ok
    }
}

impl fmt::Display for Step {
    /// `step NAME: ok (detail)`, `step NAME: error: WHAT`, or `step NAME: skipped: WHY`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {}: {}", self.name, self.result)?;
        if self.ok() && !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// The outcome of a self-test. As JSON: `{"bdf":…, "steps":{"open":"ok", …},
/// "dirty_tracking":…, "ok":…, "details":{…}}`, steps in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfTestReport {
    /// The address tested.
    pub bdf: String,
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// The dirty-tracking mode found, if the device opened.
    pub dirty_tracking: Option<DirtyTracking>,
}

impl SelfTestReport {
    /// Whether every step passed (every one of [`STEPS`], and `device_dma` when it ran).
    pub fn ok(&self) -> bool {
        STEPS
            .iter()
            .all(|name| self.steps.iter().any(|s| s.name == *name))
            && self.steps.iter().all(Step::ok)
    }
}

/// The steps as an ordered JSON object.
struct StepMap<'a>(&'a [Step], bool);

impl Serialize for StepMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let details = self.1;
        let items: Vec<&Step> = self
            .0
            .iter()
            .filter(|st| !details || !st.detail.is_empty())
            .collect();
        let mut map = s.serialize_map(Some(items.len()))?;
        for st in items {
            if details {
                map.serialize_entry(st.name, &st.detail)?;
            } else {
                map.serialize_entry(st.name, &st.result.to_string())?;
            }
        }
        map.end()
    }
}

impl Serialize for SelfTestReport {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("bdf", &self.bdf)?;
        map.serialize_entry("steps", &StepMap(&self.steps, false))?;
        map.serialize_entry("dirty_tracking", &self.dirty_tracking)?;
        map.serialize_entry("ok", &self.ok())?;
        map.serialize_entry("details", &StepMap(&self.steps, true))?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ok(name: &'static str) -> Step {
        Step {
            name,
            result: StepResult::Ok,
            detail: String::new(),
        }
    }

    #[test]
    fn the_json_has_the_steps_in_order_then_mode_and_ok() {
        let mut steps: Vec<Step> = STEPS.iter().map(|n| ok(n)).collect();
        steps[4].detail = "VFIO_DEVICE_RESET done".into();
        let r = SelfTestReport {
            bdf: "0000:00:02.1".into(),
            steps,
            dirty_tracking: Some(DirtyTracking::AllWritablePages),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.starts_with(
                r#"{"bdf":"0000:00:02.1","steps":{"open":"ok","map_memfd":"ok","read_config":"ok","bus_master":"ok","reset":"ok","dirty_tracking":"ok","unmap":"ok","release":"ok"},"dirty_tracking":"all-writable-pages","ok":true"#
            ),
            "{json}"
        );
        assert!(
            json.ends_with(r#""details":{"reset":"VFIO_DEVICE_RESET done"}}"#),
            "{json}"
        );
        let r2 = SelfTestReport {
            dirty_tracking: Some(DirtyTracking::DeviceDmaLogging),
            ..r
        };
        let v: serde_json::Value = serde_json::to_value(&r2).unwrap();
        assert_eq!(v["dirty_tracking"], "device-dma-logging");
    }

    #[test]
    fn the_step_line_shows_what_was_done() {
        let s = Step {
            name: "reset",
            result: StepResult::Ok,
            detail: "VFIO_DEVICE_RESET done".into(),
        };
        assert_eq!(s.to_string(), "step reset: ok (VFIO_DEVICE_RESET done)");
        assert_eq!(ok("open").to_string(), "step open: ok");
    }
}
