//! Migration timelines as Chrome trace-event JSON (opens in Perfetto), and `vfmig report`.
//!
//! A migration records its timeline with a [`TraceRecorder`]: the phases
//! (`prepare-destination`, `precopy`, `switchover`, `destination-up`, `done`) as complete
//! events, QEMU's `MIGRATION_PASS` events as instants, and counters sampled from
//! `query-migrate` (`remaining_bytes`, `transferred_bytes`, `dirty_pages_rate`, `mbps`) and from
//! the companions (`device_dirty_pages`, `held_ops`, `bytes_resent`). The file is the object
//! form of the Chrome trace-event format:
//!
//! ```json
//! {"traceEvents": [
//!   {"name":"process_name","ph":"M","ts":0.0,"pid":1,"tid":0,"args":{"name":"orchestrator"}},
//!   {"name":"precopy","cat":"phase","ph":"X","ts":45000.0,"dur":2595000.0,"pid":1,"tid":1},
//!   {"name":"MIGRATION_PASS","cat":"qemu","ph":"i","ts":60000.0,"pid":1,"tid":2,"s":"g","args":{"pass":1}},
//!   {"name":"remaining_bytes","cat":"counter","ph":"C","ts":45000.0,"pid":1,"tid":0,"args":{"value":536870912.0}}],
//!  "displayTimeUnit":"ms",
//!  "otherData":{"strategy":"transparent","vm":"a","downtime_ms":11}}
//! ```
//!
//! [`Trace`] reads it back ([`validate`] checks the format rules), [`Report`] tells where the
//! time went, [`render_svg`] draws it, and [`run_report`] does all three for `vfmig report`.

mod error;
mod event;
mod reader;
mod recorder;
mod report;
pub mod steps;
mod svg;
#[cfg(test)]
mod testutil;

use std::path::Path;

pub use error::TraceError;
pub use event::{EventKind, TraceEvent, Track};
pub use reader::{validate, CounterSeries, Pass, Trace};
pub use recorder::{TraceRecorder, COUNTER_CATEGORY, PASS_EVENT, PHASE_CATEGORY, QEMU_CATEGORY};
pub use report::{CounterStats, PassRow, PhaseRow, Report, StepRow};
pub use svg::render_svg;

/// `vfmig report`: loads and validates the trace in `trace`, writes its picture to `svg_out`,
/// and returns the report (the CLI prints [`Report::markdown`]).
pub fn run_report(trace: &Path, svg_out: &Path) -> Result<Report, TraceError> {
    let loaded = Trace::load(trace)?;
    std::fs::write(svg_out, render_svg(&loaded)).map_err(|source| TraceError::Io {
        path: svg_out.to_path_buf(),
        source,
    })?;
    Ok(Report::from_trace(&loaded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_report_writes_the_svg_and_returns_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.json");
        let svg = dir.path().join("trace.svg");
        testutil::sample_recorder().write(&trace).unwrap();
        let report = run_report(&trace, &svg).unwrap();
        assert_eq!(report.phases.len(), 5);
        let picture = std::fs::read_to_string(&svg).unwrap();
        assert!(picture.starts_with("<svg") && picture.ends_with("</svg>"));

        std::fs::write(&trace, r#"{"traceEvents":[{"name":"x","pid":1,"ts":0}]}"#).unwrap();
        let err = run_report(&trace, &svg).unwrap_err();
        assert!(
            matches!(err, TraceError::Invalid { index: Some(0), .. }),
            "{err}"
        );
    }
}
