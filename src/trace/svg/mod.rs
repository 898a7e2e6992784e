//! A picture of a migration trace: a self-contained SVG (no scripts, fonts or links).
//!
//! From top to bottom: a title with `otherData`'s strategy / VM / QEMU version and the totals;
//! the phase timeline (one coloured bar per phase, labelled with its name and duration, inside
//! the bar when it fits, else below it with a leader line), QEMU's passes as ticks labelled
//! `pass N`, and a time axis in ms; then line charts sharing that time axis:
//! `remaining_bytes` (MiB), `dirty_pages_rate` (pages/s) and, when any companion recorded it,
//! `device_dirty_pages` (one line per companion), and the device throttle's rate when it
//! engaged (`device_throttle_rate`). A chart whose counter has no samples is
//! replaced by a one-line note. Phases are shaded faintly behind the charts and passes run
//! through them as dashed lines. When the trace has the switchover's steps (the companions'
//! and the VF's move), a last panel zooms on them, in ms from the source's quiesce.
//!
//! The module by role: `timeline.rs` (phase bars, pass ticks, their labels), `chart.rs` (the
//! counter charts), `steps.rs` (the switchover's steps), `axis.rs` (nice ticks and the time
//! axis), `canvas.rs` (SVG primitives and escaping); this file lays the picture out and
//! writes the title.
//!
//! Element invariants (tests rely on them): the only `<rect>` elements are the phase bars,
//! and the only `<polyline>` elements are the counter lines, one per plotted series.

use std::fmt::Write as _;

mod axis;
mod canvas;
mod chart;
mod steps;
mod timeline;

use super::event::TraceEvent;
use super::reader::{Pass, Trace};
use super::report::fmt_ms;
use axis::{time_ticks, Axis};
use canvas::Svg;
use chart::{charts, draw_chart, Backdrop, Chart, Place};
use timeline::{draw_timeline, phase_color, phase_extent};

const WIDTH: f64 = 1000.0;
/// Left edge of the plots (room for the y tick labels and the rotated axis titles).
const PLOT_LEFT: f64 = 92.0;
/// Right edge of the plots.
const PLOT_RIGHT: f64 = 972.0;
const PLOT_WIDTH: f64 = PLOT_RIGHT - PLOT_LEFT;

const TITLE_SIZE: f64 = 16.0;
const TEXT_SIZE: f64 = 12.0;
const SMALL_SIZE: f64 = 10.5;

const PASS_ROW_Y: [f64; 2] = [78.0, 90.0];
const BAR_TOP: f64 = 98.0;
const BAR_HEIGHT: f64 = 34.0;
const PHASE_LABEL_ROW_Y: [f64; 3] = [149.0, 162.0, 175.0];
const TIME_AXIS_Y: f64 = 186.0;
const CHARTS_TOP: f64 = 228.0;
/// Height of a chart's title and legend line above its frame.
const CHART_HEADER: f64 = 20.0;
const CHART_GAP: f64 = 18.0;
const NOTE_HEIGHT: f64 = 26.0;
const BOTTOM_MARGIN: f64 = 46.0;

/// Renders `trace` as a self-contained SVG of about 1000 × 600 px (taller with the
/// `device_dirty_pages` chart): the phase bars with QEMU's passes and a time axis in ms on
/// top, then line charts of `remaining_bytes` (MiB), `dirty_pages_rate` (pages/s) and, when
/// present, `device_dirty_pages` (one line per companion), sharing that time axis. A counter
/// without samples gets a one-line note instead of its chart. The only `<rect>`s are the
/// phase bars and the only `<polyline>`s the plotted series.
pub fn render_svg(trace: &Trace) -> String {
    let phases = trace.phases();
    let passes = trace.passes();
    let counters = trace.counters();
    let end_ms = (trace.end_us() / 1e3).max(1e-3);
    let axis = Axis::new(0.0, end_ms, 9);
    let x_of = |ms: f64| PLOT_LEFT + (ms - axis.min) / (axis.max - axis.min) * PLOT_WIDTH;

    let charts = charts(&counters);
    let chart_height = chart_height(&charts);
    let switchover_steps = super::report::steps(trace);
    // The steps' panel, when there are steps, goes under the charts and their time axis.
    let steps_top = picture_height(&charts, chart_height);
    let mut svg = Svg::new(WIDTH, steps_top + steps::panel_height(&switchover_steps));
    svg.text(
        PLOT_LEFT,
        26.0,
        TITLE_SIZE,
        "start",
        "bold",
        "#111",
        &title(trace),
    );
    let summary = summary(trace, &phases, &passes);
    svg.text(
        PLOT_LEFT, 45.0, TEXT_SIZE, "start", "normal", "#555", &summary,
    );
    let backdrop = backdrop(&phases, &passes, &x_of);
    draw_timeline(&mut svg, &phases, &passes, &axis, &x_of);
    draw_charts(&mut svg, &charts, chart_height, &axis, &backdrop, &x_of);
    steps::draw_steps(&mut svg, &switchover_steps, steps_top);
    svg.finish()
}

/// The height of a chart's frame: two charts fill a 600 px picture; a third one makes it
/// taller rather than cramped.
fn chart_height(charts: &[Chart<'_>]) -> f64 {
    match charts.iter().filter(|c| !c.series.is_empty()).count() {
        0 | 1 => 150.0,
        2 => 122.0,
        _ => 112.0,
    }
}

/// The picture's height: the timeline, then each chart or note.
fn picture_height(charts: &[Chart<'_>], chart_height: f64) -> f64 {
    let mut height = CHARTS_TOP;
    for chart in charts {
        height += if chart.series.is_empty() {
            NOTE_HEIGHT
        } else {
            CHART_HEADER + chart_height + CHART_GAP
        };
    }
    height + BOTTOM_MARGIN
}

/// "Migration timeline", then `otherData`'s strategy, VM and QEMU version.
fn title(trace: &Trace) -> String {
    let mut title = String::from("Migration timeline");
    for (key, label) in [("strategy", ""), ("vm", "VM "), ("qemu_version", "QEMU ")] {
        if let Some(value) = trace.meta(key) {
            let value = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string);
            let _ = write!(title, " · {label}{value}");
        }
    }
    title
}

/// The totals under the title: total time, downtime, number of QEMU passes.
fn summary(trace: &Trace, phases: &[&TraceEvent], passes: &[Pass]) -> String {
    let mut summary = String::new();
    if let (Some(first), Some(last)) = (
        phases.first(),
        phases.iter().map(|e| e.end_us()).reduce(f64::max),
    ) {
        let _ = write!(summary, "total {} ms", fmt_ms((last - first.ts) / 1e3));
    }
    if let Some(downtime) = trace.meta("downtime_ms").and_then(|v| {
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    }) {
        let _ = write!(summary, " · downtime {} ms", fmt_ms(downtime));
    }
    let _ = write!(
        summary,
        "{}{} QEMU pass{}",
        if summary.is_empty() { "" } else { " · " },
        passes.len(),
        if passes.len() == 1 { "" } else { "es" }
    );
    summary
}

/// What the charts draw behind their lines: faint phase bands and dashed pass lines.
fn backdrop(phases: &[&TraceEvent], passes: &[Pass], x_of: &dyn Fn(f64) -> f64) -> Backdrop {
    Backdrop {
        phases: phases
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (x0, x1) = phase_extent(p, x_of);
                (x0, x1, phase_color(&p.name, i))
            })
            .collect(),
        passes: passes.iter().map(|p| x_of(p.ts_us / 1e3)).collect(),
    }
}

/// The charts one under the other (a note for a counter without samples), and the time axis
/// under the last one.
fn draw_charts(
    svg: &mut Svg,
    charts: &[Chart<'_>],
    chart_height: f64,
    axis: &Axis,
    backdrop: &Backdrop,
    x_of: &dyn Fn(f64) -> f64,
) {
    let mut top = CHARTS_TOP;
    let mut last_frame_bottom = None;
    for chart in charts {
        if chart.series.is_empty() {
            let note = format!(
                "{}: no {} samples in this trace",
                chart.title, chart.counter
            );
            svg.text(
                PLOT_LEFT,
                top + 17.0,
                TEXT_SIZE,
                "start",
                "italic",
                "#777",
                &note,
            );
            top += NOTE_HEIGHT;
            continue;
        }
        let frame_top = top + CHART_HEADER;
        let place = Place {
            time: axis,
            x_of,
            top,
            frame_top,
            frame_bottom: frame_top + chart_height,
        };
        draw_chart(svg, chart, &place, backdrop);
        last_frame_bottom = Some(place.frame_bottom);
        top = place.frame_bottom + CHART_GAP;
    }
    if let Some(bottom) = last_frame_bottom {
        time_ticks(svg, axis, x_of, bottom);
    }
}

#[cfg(test)]
mod tests {

    use super::chart::MIB;
    use super::*;
    use crate::trace::testutil::sample_recorder;
    use crate::trace::TraceRecorder;

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    fn well_formed(svg: &str) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.ends_with("</svg>"));
        assert_eq!(count(svg, "<svg"), 1);
        assert_eq!(count(svg, "<text"), count(svg, "</text>"));
        assert!(
            !svg.contains("NaN") && !svg.contains("inf"),
            "non-finite coordinates"
        );
    }

    #[test]
    fn renders_one_rect_per_phase_one_line_per_counter_and_escapes_names() {
        let rec = TraceRecorder::new();
        rec.set_meta("vm", "<vm & co>");
        rec.enter_phase_at("precopy", 0.0);
        rec.enter_phase_at("a<b>&c", 1_000_000.0);
        rec.enter_phase_at("done", 1_500_000.0);
        rec.close_phase_at(1_600_000.0);
        rec.pass(10_000.0, 1);
        for i in 0..10 {
            let t = f64::from(i) * 100_000.0;
            rec.counter("remaining_bytes", t, 1e8 - 1e7 * f64::from(i));
            rec.counter("dirty_pages_rate", t, 3000.0);
        }
        let svg = render_svg(&Trace::from_value(rec.to_json()).unwrap());
        well_formed(&svg);
        assert_eq!(count(&svg, "<rect"), 3);
        assert_eq!(count(&svg, "<polyline"), 2);
        assert_eq!(count(&svg, "<path"), 0);
        assert!(svg.contains("a&lt;b&gt;&amp;c"));
        assert!(!svg.contains("a<b>&c"));
        assert!(svg.contains("&lt;vm &amp; co&gt;"));
        assert!(svg.contains("pass 1"));
        assert!(!svg.contains("device_dirty_pages"));
    }

    #[test]
    fn renders_without_counters_and_with_a_single_sample() {
        let rec = TraceRecorder::new();
        rec.enter_phase_at("precopy", 0.0);
        rec.close_phase_at(500.0);
        let svg = render_svg(&Trace::from_value(rec.to_json()).unwrap());
        well_formed(&svg);
        assert_eq!(count(&svg, "<rect"), 1);
        assert_eq!(count(&svg, "<polyline"), 0);
        assert!(svg.contains("no remaining_bytes samples"));
        assert!(svg.contains("no dirty_pages_rate samples"));

        rec.counter("remaining_bytes", 100.0, 5.0 * MIB);
        let svg = render_svg(&Trace::from_value(rec.to_json()).unwrap());
        well_formed(&svg);
        assert_eq!(count(&svg, "<polyline"), 1);
        assert_eq!(count(&svg, "<circle"), 1);

        // Nothing at all.
        let svg = render_svg(&Trace::from_json(r#"{"traceEvents":[]}"#).unwrap());
        well_formed(&svg);
        assert_eq!(count(&svg, "<rect"), 0);
    }

    #[test]
    fn the_device_throttle_gets_a_chart_only_when_it_engaged() {
        let rec = TraceRecorder::new();
        rec.enter_phase_at("precopy", 0.0);
        rec.close_phase_at(3_000_000.0);
        let companion = rec.register_process("source companion");
        for i in 0..30 {
            let t = f64::from(i) * 100_000.0;
            rec.counter("remaining_bytes", t, 1e8);
            rec.counter("dirty_pages_rate", t, 3000.0);
            rec.counter_for(companion, "device_throttle_rate", t, 0.0);
        }
        let svg = render_svg(&Trace::from_value(rec.to_json()).unwrap());
        assert!(!svg.contains("Device write throttle"), "never engaged");
        assert_eq!(count(&svg, "<polyline"), 2);
        for i in 30..40 {
            let rate = 13.1e6 - 1.6e6 * f64::from(i - 30);
            rec.counter_for(companion, "device_throttle_rate", f64::from(i) * 1e5, rate);
        }
        let svg = render_svg(&Trace::from_value(rec.to_json()).unwrap());
        well_formed(&svg);
        assert!(svg.contains("Device write throttle in force"));
        assert!(svg.contains(">MB/s<"));
        assert_eq!(count(&svg, "<polyline"), 3);
    }

    #[test]
    fn renders_the_realistic_sample_to_tmp() {
        let trace = Trace::from_value(sample_recorder().to_json()).unwrap();
        let svg = render_svg(&trace);
        well_formed(&svg);
        assert_eq!(count(&svg, "<rect"), 5);
        // remaining_bytes, dirty_pages_rate, a/device_dirty_pages.
        assert_eq!(count(&svg, "<polyline"), 3);
        for n in 1..=4 {
            assert!(svg.contains(&format!(">pass {n}<")));
        }
        std::fs::write("/tmp/vfmig-report-sample.svg", &svg).unwrap();
    }
}
