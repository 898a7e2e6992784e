//! The switchover's steps, zoomed: one row per step of the companions and of the VF's move
//! (see [`crate::trace::steps`]), on a time axis in ms from the source's quiesce, each a bar
//! as long as the step labelled with its name and duration (a tick labelled with its time for
//! an instant), coloured by where it ran. Drawn with `<line>`s and `<text>`s only.

use super::axis::Axis;
use super::canvas::Svg;
use super::{PLOT_LEFT, PLOT_RIGHT, PLOT_WIDTH, SMALL_SIZE, TEXT_SIZE};
use crate::trace::report::StepRow;

/// Height of the panel's title line.
const HEADER: f64 = 22.0;
/// Height of one step's row.
const ROW: f64 = 15.0;
/// Room for the axis under the rows.
const AXIS: f64 = 40.0;

/// The panel's height for `steps` (0 without steps).
pub(super) fn panel_height(steps: &[StepRow]) -> f64 {
    if steps.is_empty() {
        0.0
    } else {
        HEADER + ROW * steps.len() as f64 + AXIS
    }
}

/// Colour of a step by where it ran.
fn color(process: &str) -> &'static str {
    if process.starts_with("source") {
        "#d9822b"
    } else if process.starts_with("destination") {
        "#2b7bd9"
    } else if process.starts_with("peer") {
        "#3a9d4a"
    } else {
        "#555"
    }
}

/// Draws the panel with its top at `top`.
pub(super) fn draw_steps(svg: &mut Svg, steps: &[StepRow], top: f64) {
    if steps.is_empty() {
        return;
    }
    svg.text(
        PLOT_LEFT,
        top + 15.0,
        TEXT_SIZE,
        "start",
        "bold",
        "#111",
        "Switchover steps (orange: source companion, blue: destination, green: peers, grey: orchestrator)",
    );
    let end = steps
        .iter()
        .map(|s| s.at_ms + s.duration_ms)
        .fold(0.0, f64::max);
    let start = steps.iter().map(|s| s.at_ms).fold(0.0, f64::min);
    let axis = Axis::new(start.min(0.0), end.max(start + 1e-3), 8);
    // Labels go right of their bar; the bars use the left three quarters of the width.
    let span = PLOT_WIDTH * 0.75;
    let x_of = |ms: f64| PLOT_LEFT + (ms - axis.min) / (axis.max - axis.min) * span;
    for (i, s) in steps.iter().enumerate() {
        let y = top + HEADER + ROW * i as f64 + ROW / 2.0;
        let (x0, x1) = (x_of(s.at_ms), x_of(s.at_ms + s.duration_ms));
        let c = color(&s.process);
        if x1 - x0 < 2.0 {
            svg.line(x0, y - 5.0, x0, y + 5.0, c, 2.0, None);
        } else {
            svg.line(x0, y, x1, y, c, 8.0, None);
        }
        let label = if s.duration_ms > 0.0 {
            format!("{} · {:.2} ms", s.name, s.duration_ms)
        } else {
            format!("{} at {:.2} ms", s.name, s.at_ms)
        };
        svg.text(
            x1.max(x0) + 5.0,
            y + 4.0,
            SMALL_SIZE,
            "start",
            "normal",
            "#222",
            &label,
        );
    }
    let bottom = top + HEADER + ROW * steps.len() as f64 + 4.0;
    svg.line(
        PLOT_LEFT,
        bottom,
        PLOT_LEFT + span,
        bottom,
        "#333",
        1.0,
        None,
    );
    for &t in &axis.ticks {
        let x = x_of(t);
        svg.line(x, bottom, x, bottom + 5.0, "#333", 1.0, None);
        svg.text(
            x,
            bottom + 17.0,
            SMALL_SIZE,
            "middle",
            "normal",
            "#333",
            &axis.label(t),
        );
    }
    svg.text(
        PLOT_RIGHT,
        bottom + 31.0,
        SMALL_SIZE,
        "end",
        "normal",
        "#555",
        "ms from the source's quiesce",
    );
}

#[cfg(test)]
mod tests {
    use super::super::render_svg;
    use crate::trace::{Trace, TraceRecorder, Track};

    fn picture(with_steps: bool) -> String {
        let rec = TraceRecorder::new();
        rec.enter_phase_at("precopy", 0.0);
        rec.close_phase_at(1000.0);
        if with_steps {
            let pid = rec.register_process("destination companion");
            let at = Track::new(pid, 1);
            let detail = serde_json::json!({ "detail": "b" });
            rec.span_on(at, "announce", "step", 500.0, 700.0, detail.clone());
            rec.span_on(at, "vm-runs-here", "step", 800.0, 800.0, detail);
        }
        render_svg(&Trace::from_value(rec.to_json()).unwrap())
    }

    #[test]
    fn each_step_is_a_labelled_row_below_the_charts_and_no_rect() {
        let (with, without) = (picture(true), picture(false));
        assert!(with.contains("announce · 0.20 ms"), "{with}");
        assert!(
            with.contains("vm-runs-here at 0.30 ms"),
            "an instant says when"
        );
        assert!(
            with.contains("ms from the source"),
            "the panel's axis is titled"
        );
        assert_eq!(with.matches("<rect").count(), 1, "the phase bar only");
        assert!(!without.contains("Switchover steps"));
        let height = |svg: &str| {
            let h = svg.split("height=\"").nth(1).unwrap();
            h[..h.find('"').unwrap()].parse::<f64>().unwrap()
        };
        assert!(height(&with) > height(&without), "the panel adds its rows");
    }
}
