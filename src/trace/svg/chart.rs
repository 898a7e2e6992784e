//! The line charts under the timeline: which counters get one, and how one is drawn (title and
//! legend, phase bands and pass lines behind, grid, frame, y axis, then the lines).

use std::fmt::Write as _;

use super::axis::Axis;
use super::canvas::{escape, text_width, Svg};
use super::{PLOT_LEFT, PLOT_RIGHT, SMALL_SIZE, TEXT_SIZE};
use crate::trace::reader::CounterSeries;

pub(super) const MIB: f64 = 1024.0 * 1024.0;

const SERIES_COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
];

/// A chart to draw under the timeline.
pub(super) struct Chart<'a> {
    /// Title above the frame.
    pub(super) title: &'static str,
    /// Rotated y-axis title.
    axis: &'static str,
    /// Counter name the chart shows (for the note when it has no samples).
    pub(super) counter: &'static str,
    /// Divides the raw values (MiB: 2²⁰).
    scale: f64,
    /// The series, with their colours.
    pub(super) series: Vec<(&'a CounterSeries, &'static str)>,
}

/// The charts of `counters`: `remaining_bytes` (MiB) and `dirty_pages_rate` (pages/s) always
/// (without samples they become a note), `device_dirty_pages` (one line per companion) when
/// any companion recorded it, and `device_throttle_rate` (MB/s of dirtied pages) when a
/// companion's throttle engaged.
pub(super) fn charts(counters: &[CounterSeries]) -> Vec<Chart<'_>> {
    let find = |base: &str| -> Vec<&CounterSeries> {
        counters
            .iter()
            .filter(|s| s.name == base || s.base_name() == base)
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let mut charts = vec![
        Chart {
            title: "Remaining RAM to send",
            axis: "MiB",
            counter: "remaining_bytes",
            scale: MIB,
            series: with_colors(find("remaining_bytes"), 0),
        },
        Chart {
            title: "Guest dirty-page rate (QEMU)",
            axis: "pages/s",
            counter: "dirty_pages_rate",
            scale: 1.0,
            series: with_colors(find("dirty_pages_rate"), 1),
        },
    ];
    let device = find("device_dirty_pages");
    if !device.is_empty() {
        charts.push(Chart {
            title: "Pages the VF dirtied (companion)",
            axis: "pages",
            counter: "device_dirty_pages",
            scale: 1.0,
            series: with_colors(device, 2),
        });
    }
    // A line that stays at 0 says the throttle never engaged: worth no chart.
    let throttle: Vec<&CounterSeries> = find("device_throttle_rate")
        .into_iter()
        .filter(|s| s.points.iter().any(|p| p.1 > 0.0))
        .collect();
    if !throttle.is_empty() {
        charts.push(Chart {
            title: "Device write throttle in force (companion; 0: none)",
            axis: "MB/s",
            counter: "device_throttle_rate",
            scale: 1e6,
            series: with_colors(throttle, 3),
        });
    }
    charts
}

fn with_colors(series: Vec<&CounterSeries>, first: usize) -> Vec<(&CounterSeries, &'static str)> {
    series
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, SERIES_COLORS[(first + i) % SERIES_COLORS.len()]))
        .collect()
}

/// The phases' x extents and colours, and the passes' x, in the charts' coordinates.
pub(super) struct Backdrop {
    pub(super) phases: Vec<(f64, f64, &'static str)>,
    pub(super) passes: Vec<f64>,
}

/// Where a chart goes: its title line starts at `top`, its frame spans `frame_top` to
/// `frame_bottom`; x is time as on the timeline.
pub(super) struct Place<'a> {
    pub(super) time: &'a Axis,
    pub(super) x_of: &'a dyn Fn(f64) -> f64,
    pub(super) top: f64,
    pub(super) frame_top: f64,
    pub(super) frame_bottom: f64,
}

impl Place<'_> {
    /// The y of value `v` on `y_axis`.
    fn y_of(&self, y_axis: &Axis, v: f64) -> f64 {
        self.frame_bottom
            - (v - y_axis.min) / (y_axis.max - y_axis.min) * (self.frame_bottom - self.frame_top)
    }
}

/// Draws `chart` at `place`, with `backdrop` behind its lines.
pub(super) fn draw_chart(svg: &mut Svg, chart: &Chart<'_>, place: &Place<'_>, backdrop: &Backdrop) {
    let y_axis = y_axis(chart);
    legend(svg, chart, place.top, !backdrop.passes.is_empty());
    behind(svg, place, backdrop);
    grid_and_frame(svg, place, &y_axis);
    let mid = (place.frame_top + place.frame_bottom) / 2.0;
    let _ = writeln!(
        svg.body,
        r##"<text x="22" y="{mid:.1}" font-size="{TEXT_SIZE}" text-anchor="middle" fill="#333" transform="rotate(-90 22 {mid:.1})">{}</text>"##,
        escape(chart.axis)
    );
    lines(svg, chart, place, &y_axis);
}

/// The y axis: from 0 (or below) to the highest value.
fn y_axis(chart: &Chart<'_>) -> Axis {
    let values = chart
        .series
        .iter()
        .flat_map(|(s, _)| s.points.iter().map(|p| p.1 / chart.scale));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let lo = lo.min(0.0);
    let hi = if hi > lo { hi } else { lo + 1.0 };
    Axis::new(lo, hi, 4)
}

/// The title on the left, and on the right the legend: a sample line per series, and the pass
/// marker when there are passes.
fn legend(svg: &mut Svg, chart: &Chart<'_>, top: f64, with_passes: bool) {
    let y = top + 13.0;
    svg.text(
        PLOT_LEFT,
        y,
        TEXT_SIZE,
        "start",
        "bold",
        "#222",
        chart.title,
    );
    let mut x = PLOT_RIGHT;
    for (series, color) in chart.series.iter().rev() {
        x -= text_width(&series.label, SMALL_SIZE);
        svg.text(x, y, SMALL_SIZE, "start", "normal", "#333", &series.label);
        svg.line(x - 24.0, top + 9.5, x - 6.0, top + 9.5, color, 2.0, None);
        x -= 36.0;
    }
    if with_passes {
        let label = "QEMU pass";
        x -= text_width(label, SMALL_SIZE);
        svg.text(x, y, SMALL_SIZE, "start", "normal", "#333", label);
        let dash = Some("3,3");
        svg.line(x - 24.0, top + 9.5, x - 6.0, top + 9.5, "#777", 1.0, dash);
    }
}

/// Faint phase bands and dashed pass lines across the frame.
fn behind(svg: &mut Svg, place: &Place<'_>, backdrop: &Backdrop) {
    let (top, bottom) = (place.frame_top, place.frame_bottom);
    for &(x0, x1, color) in &backdrop.phases {
        let band = [(x0, top), (x1, top), (x1, bottom), (x0, bottom)];
        svg.polygon(&band, color, 0.12);
    }
    for &x in &backdrop.passes {
        svg.line(x, top, x, bottom, "#777", 1.0, Some("3,3"));
    }
}

/// The grid at the time and y ticks, the y tick labels, and the frame.
fn grid_and_frame(svg: &mut Svg, place: &Place<'_>, y_axis: &Axis) {
    let (top, bottom) = (place.frame_top, place.frame_bottom);
    for &t in &place.time.ticks {
        let x = (place.x_of)(t);
        svg.line(x, top, x, bottom, "#e4e4e4", 1.0, None);
    }
    for &v in &y_axis.ticks {
        let y = place.y_of(y_axis, v);
        svg.line(PLOT_LEFT, y, PLOT_RIGHT, y, "#e4e4e4", 1.0, None);
        svg.line(PLOT_LEFT - 5.0, y, PLOT_LEFT, y, "#333", 1.0, None);
        let label = y_axis.label(v);
        svg.text(
            PLOT_LEFT - 8.0,
            y + 3.5,
            SMALL_SIZE,
            "end",
            "normal",
            "#333",
            &label,
        );
    }
    svg.line(PLOT_LEFT, top, PLOT_LEFT, bottom, "#333", 1.0, None);
    svg.line(PLOT_LEFT, bottom, PLOT_RIGHT, bottom, "#333", 1.0, None);
    svg.line(PLOT_RIGHT, top, PLOT_RIGHT, bottom, "#ccc", 1.0, None);
    svg.line(PLOT_LEFT, top, PLOT_RIGHT, top, "#ccc", 1.0, None);
}

/// One polyline per series; a dot per sample when there are few.
fn lines(svg: &mut Svg, chart: &Chart<'_>, place: &Place<'_>, y_axis: &Axis) {
    let point = |(ts, v): (f64, f64)| ((place.x_of)(ts / 1e3), place.y_of(y_axis, v / chart.scale));
    for (series, color) in &chart.series {
        let points: Vec<String> = series
            .points
            .iter()
            .map(|&p| {
                let (x, y) = point(p);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            svg.body,
            r#"<polyline class="counter" points="{}" fill="none" stroke="{color}" stroke-width="1.8" stroke-linejoin="round" stroke-linecap="round"><title>{}</title></polyline>"#,
            points.join(" "),
            escape(&series.label)
        );
        if series.points.len() <= 12 {
            for &p in &series.points {
                let (x, y) = point(p);
                let _ = writeln!(
                    svg.body,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
                );
            }
        }
    }
}
