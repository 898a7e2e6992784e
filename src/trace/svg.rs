//! A picture of a migration trace: a self-contained SVG (no scripts, fonts or links).
//!
//! From top to bottom: a title with `otherData`'s strategy / VM / QEMU version and the totals;
//! the phase timeline (one coloured bar per phase, labelled with its name and duration, inside
//! the bar when it fits, else below it with a leader line), QEMU's passes as ticks labelled
//! `pass N`, and a time axis in ms; then line charts sharing that time axis:
//! `remaining_bytes` (MiB), `dirty_pages_rate` (pages/s) and, when any companion recorded it,
//! `device_dirty_pages` (one line per companion). A chart whose counter has no samples is
//! replaced by a one-line note. Phases are shaded faintly behind the charts and passes run
//! through them as dashed lines.
//!
//! Element invariants (tests rely on them): the only `<rect>` elements are the phase bars,
//! and the only `<polyline>` elements are the counter lines, one per plotted series.

use std::fmt::Write as _;

use super::event::TraceEvent;
use super::reader::{CounterSeries, Trace};
use super::report::fmt_ms;

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

const MIB: f64 = 1024.0 * 1024.0;

const SERIES_COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
];

/// A chart to draw under the timeline.
struct Chart<'a> {
    /// Title above the frame.
    title: &'static str,
    /// Rotated y-axis title.
    axis: &'static str,
    /// Counter name the chart shows (for the note when it has no samples).
    counter: &'static str,
    /// Divides the raw values (MiB: 2²⁰).
    scale: f64,
    /// The series, with their colours.
    series: Vec<(&'a CounterSeries, &'static str)>,
}

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
    let plotted = charts.iter().filter(|c| !c.series.is_empty()).count();
    // Two charts fill a 600 px picture; a third one makes it taller rather than cramped.
    let chart_height = match plotted {
        0 | 1 => 150.0,
        2 => 122.0,
        _ => 112.0,
    };
    let mut height = CHARTS_TOP;
    for chart in &charts {
        height += if chart.series.is_empty() {
            NOTE_HEIGHT
        } else {
            CHART_HEADER + chart_height + CHART_GAP
        };
    }
    height += BOTTOM_MARGIN;

    let mut svg = Svg::new(WIDTH, height);

    // Title and summary.
    let mut title = String::from("Migration timeline");
    for (key, label) in [("strategy", ""), ("vm", "VM "), ("qemu_version", "QEMU ")] {
        if let Some(value) = trace.meta(key) {
            let value = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string);
            let _ = write!(title, " · {label}{value}");
        }
    }
    svg.text(PLOT_LEFT, 26.0, TITLE_SIZE, "start", "bold", "#111", &title);
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
    svg.text(
        PLOT_LEFT, 45.0, TEXT_SIZE, "start", "normal", "#555", &summary,
    );

    // What the charts draw behind their lines: faint phase bands and dashed pass lines.
    let backdrop = Backdrop {
        phases: phases
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (x0, x1) = phase_extent(p, &x_of);
                (x0, x1, phase_color(&p.name, i))
            })
            .collect(),
        passes: passes.iter().map(|p| x_of(p.ts_us / 1e3)).collect(),
    };

    // Track names on the left.
    svg.text(
        PLOT_LEFT - 8.0,
        BAR_TOP + BAR_HEIGHT / 2.0 + 4.0,
        TEXT_SIZE,
        "end",
        "bold",
        "#333",
        "phases",
    );
    if !passes.is_empty() {
        svg.text(
            PLOT_LEFT - 8.0,
            PASS_ROW_Y[0],
            SMALL_SIZE,
            "end",
            "normal",
            "#555",
            "QEMU",
        );
    }

    // The phase bars; their labels go on top of the pass ticks, so into `labels` first.
    let mut labels = Svg::new(WIDTH, height);
    let mut below = Rows::new(PHASE_LABEL_ROW_Y.len(), 8.0);
    for (i, phase) in phases.iter().enumerate() {
        let (x0, x1) = phase_extent(phase, &x_of);
        let width = (x1 - x0).max(1.0);
        let color = phase_color(&phase.name, i);
        let dur = format!("{} ms", fmt_ms(phase.dur.unwrap_or(0.0) / 1e3));
        let _ = write!(
            svg.body,
            r##"<rect class="phase" x="{x0:.1}" y="{BAR_TOP}" width="{width:.1}" height="{BAR_HEIGHT}" fill="{color}" stroke="#fff" stroke-width="0.5"><title>{}</title></rect>"##,
            escape(&format!("{} {dur}", phase.name))
        );
        svg.body.push('\n');
        let inside_one = format!("{} · {dur}", phase.name);
        let mid = (x0 + x1) / 2.0;
        if text_width(&inside_one, TEXT_SIZE) + 8.0 <= width {
            labels.text_halo(
                mid,
                BAR_TOP + BAR_HEIGHT / 2.0 + 4.0,
                TEXT_SIZE,
                "middle",
                "#111",
                color,
                &inside_one,
            );
        } else if text_width(&phase.name, TEXT_SIZE).max(text_width(&dur, SMALL_SIZE)) + 6.0
            <= width
        {
            labels.text_halo(
                mid,
                BAR_TOP + 14.0,
                TEXT_SIZE,
                "middle",
                "#111",
                color,
                &phase.name,
            );
            labels.text_halo(
                mid,
                BAR_TOP + 28.0,
                SMALL_SIZE,
                "middle",
                "#333",
                color,
                &dur,
            );
        } else {
            // Below the bar, after a swatch of the bar's colour; a leader line joins the
            // first row of labels to its bar (lower rows would cross the labels above).
            let label = format!("{} {dur}", phase.name);
            let w = text_width(&label, SMALL_SIZE) + 13.0;
            let (row, left) = below.place(mid, w);
            let y = PHASE_LABEL_ROW_Y[row];
            if row == 0 {
                labels.line(
                    mid,
                    BAR_TOP + BAR_HEIGHT,
                    mid,
                    y - SMALL_SIZE,
                    "#555",
                    0.8,
                    None,
                );
            }
            labels.square(left, y - 8.5, 9.0, color);
            labels.text(
                left + 13.0,
                y,
                SMALL_SIZE,
                "start",
                "normal",
                "#222",
                &label,
            );
        }
    }

    // Pass ticks and labels.
    let mut above = Rows::new(PASS_ROW_Y.len(), PLOT_LEFT);
    for pass in &passes {
        let x = x_of(pass.ts_us / 1e3);
        svg.line(
            x,
            BAR_TOP - 6.0,
            x,
            BAR_TOP + BAR_HEIGHT + 4.0,
            "#222",
            1.6,
            None,
        );
        // "pass N" where there is room, "N" where it is crowded, nothing where even that
        // would overlap (the tick stays, and the report lists every pass).
        for label in [format!("pass {}", pass.number), pass.number.to_string()] {
            if let Some((row, left)) = above.try_place(x, text_width(&label, SMALL_SIZE)) {
                svg.text(
                    left,
                    PASS_ROW_Y[row],
                    SMALL_SIZE,
                    "start",
                    "normal",
                    "#222",
                    &label,
                );
                break;
            }
        }
    }

    svg.body.push_str(&labels.body);

    // The timeline's time axis.
    svg.line(
        PLOT_LEFT,
        TIME_AXIS_Y,
        PLOT_RIGHT,
        TIME_AXIS_Y,
        "#333",
        1.0,
        None,
    );
    time_ticks(&mut svg, &axis, &x_of, TIME_AXIS_Y);

    // The charts.
    let mut top = CHARTS_TOP;
    let mut last_frame_bottom = None;
    for chart in &charts {
        if chart.series.is_empty() {
            svg.text(
                PLOT_LEFT,
                top + 17.0,
                TEXT_SIZE,
                "start",
                "italic",
                "#777",
                &format!(
                    "{}: no {} samples in this trace",
                    chart.title, chart.counter
                ),
            );
            top += NOTE_HEIGHT;
            continue;
        }
        let frame_top = top + CHART_HEADER;
        let frame_bottom = frame_top + chart_height;
        draw_chart(
            &mut svg,
            chart,
            &axis,
            &backdrop,
            &x_of,
            top,
            frame_top,
            frame_bottom,
        );
        last_frame_bottom = Some(frame_bottom);
        top = frame_bottom + CHART_GAP;
    }
    if let Some(bottom) = last_frame_bottom {
        time_ticks(&mut svg, &axis, &x_of, bottom);
    }

    svg.finish()
}

#[allow(clippy::too_many_arguments)]
fn draw_chart(
    svg: &mut Svg,
    chart: &Chart<'_>,
    time: &Axis,
    backdrop: &Backdrop,
    x_of: &dyn Fn(f64) -> f64,
    top: f64,
    frame_top: f64,
    frame_bottom: f64,
) {
    let values = chart
        .series
        .iter()
        .flat_map(|(s, _)| s.points.iter().map(|p| p.1 / chart.scale));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let lo = lo.min(0.0);
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let y_axis = Axis::new(lo, hi, 4);
    let y_of = |v: f64| {
        frame_bottom - (v - y_axis.min) / (y_axis.max - y_axis.min) * (frame_bottom - frame_top)
    };

    // Title and legend.
    svg.text(
        PLOT_LEFT,
        top + 13.0,
        TEXT_SIZE,
        "start",
        "bold",
        "#222",
        chart.title,
    );
    let mut x = PLOT_RIGHT;
    for (series, color) in chart.series.iter().rev() {
        let w = text_width(&series.label, SMALL_SIZE);
        x -= w;
        svg.text(
            x,
            top + 13.0,
            SMALL_SIZE,
            "start",
            "normal",
            "#333",
            &series.label,
        );
        svg.line(x - 24.0, top + 9.5, x - 6.0, top + 9.5, color, 2.0, None);
        x -= 36.0;
    }
    if !backdrop.passes.is_empty() {
        // The pass marker in the legend.
        let label = "QEMU pass";
        let w = text_width(label, SMALL_SIZE);
        x -= w;
        svg.text(x, top + 13.0, SMALL_SIZE, "start", "normal", "#333", label);
        svg.line(
            x - 24.0,
            top + 9.5,
            x - 6.0,
            top + 9.5,
            "#777",
            1.0,
            Some("3,3"),
        );
    }

    // Phase bands, pass lines, grid, frame and y axis.
    for &(x0, x1, color) in &backdrop.phases {
        svg.polygon(
            &[
                (x0, frame_top),
                (x1, frame_top),
                (x1, frame_bottom),
                (x0, frame_bottom),
            ],
            color,
            0.12,
        );
    }
    for &x in &backdrop.passes {
        svg.line(x, frame_top, x, frame_bottom, "#777", 1.0, Some("3,3"));
    }
    for &t in &time.ticks {
        let x = x_of(t);
        svg.line(x, frame_top, x, frame_bottom, "#e4e4e4", 1.0, None);
    }
    for &v in &y_axis.ticks {
        let y = y_of(v);
        svg.line(PLOT_LEFT, y, PLOT_RIGHT, y, "#e4e4e4", 1.0, None);
        svg.line(PLOT_LEFT - 5.0, y, PLOT_LEFT, y, "#333", 1.0, None);
        svg.text(
            PLOT_LEFT - 8.0,
            y + 3.5,
            SMALL_SIZE,
            "end",
            "normal",
            "#333",
            &y_axis.label(v),
        );
    }
    svg.line(
        PLOT_LEFT,
        frame_top,
        PLOT_LEFT,
        frame_bottom,
        "#333",
        1.0,
        None,
    );
    svg.line(
        PLOT_LEFT,
        frame_bottom,
        PLOT_RIGHT,
        frame_bottom,
        "#333",
        1.0,
        None,
    );
    svg.line(
        PLOT_RIGHT,
        frame_top,
        PLOT_RIGHT,
        frame_bottom,
        "#ccc",
        1.0,
        None,
    );
    svg.line(
        PLOT_LEFT, frame_top, PLOT_RIGHT, frame_top, "#ccc", 1.0, None,
    );
    let mid = (frame_top + frame_bottom) / 2.0;
    let _ = writeln!(
        svg.body,
        r##"<text x="22" y="{mid:.1}" font-size="{TEXT_SIZE}" text-anchor="middle" fill="#333" transform="rotate(-90 22 {mid:.1})">{}</text>"##,
        escape(chart.axis)
    );

    // The lines.
    for (series, color) in &chart.series {
        let points: Vec<String> = series
            .points
            .iter()
            .map(|&(ts, v)| format!("{:.1},{:.1}", x_of(ts / 1e3), y_of(v / chart.scale)))
            .collect();
        let _ = writeln!(
            svg.body,
            r#"<polyline class="counter" points="{}" fill="none" stroke="{color}" stroke-width="1.8" stroke-linejoin="round" stroke-linecap="round"><title>{}</title></polyline>"#,
            points.join(" "),
            escape(&series.label)
        );
        if series.points.len() <= 12 {
            for &(ts, v) in &series.points {
                let _ = writeln!(
                    svg.body,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    x_of(ts / 1e3),
                    y_of(v / chart.scale)
                );
            }
        }
    }
}

/// The phases' x extents and colours, and the passes' x, in the charts' coordinates.
struct Backdrop {
    phases: Vec<(f64, f64, &'static str)>,
    passes: Vec<f64>,
}

fn with_colors(series: Vec<&CounterSeries>, first: usize) -> Vec<(&CounterSeries, &'static str)> {
    series
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, SERIES_COLORS[(first + i) % SERIES_COLORS.len()]))
        .collect()
}

fn phase_extent(phase: &TraceEvent, x_of: &dyn Fn(f64) -> f64) -> (f64, f64) {
    (x_of(phase.ts / 1e3), x_of(phase.end_us() / 1e3))
}

fn phase_color(name: &str, index: usize) -> &'static str {
    const OTHERS: [&str; 3] = ["#b3b3b3", "#80b1d3", "#bebada"];
    match name {
        "prepare-destination" => "#8da0cb",
        "precopy" => "#66c2a5",
        "switchover" => "#fc8d62",
        "destination-up" => "#e78ac3",
        "suspend" | "resume" => "#ffd92f",
        "detach" | "attach" => "#e5c494",
        "done" => "#a6d854",
        _ => OTHERS[index % OTHERS.len()],
    }
}

/// Estimated width of `text` in a sans-serif font of `size` px (a little generous, so that
/// labels judged to fit do fit).
fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.58
}

/// Escapes text for XML content and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Labels placed on a few rows without overlapping: each goes on the first row where it fits
/// (centred on its anchor, kept inside the plot), or on the least crowded row.
struct Rows {
    taken: Vec<Vec<(f64, f64)>>,
    min_left: f64,
}

impl Rows {
    /// `rows` rows; no label starts left of `min_left`.
    fn new(rows: usize, min_left: f64) -> Self {
        Rows {
            taken: vec![Vec::new(); rows],
            min_left,
        }
    }

    /// Returns the row and the left x of a label `width` wide anchored at `center`: where it
    /// fits at its anchor; else slid along a row to the free spot nearest the anchor; else
    /// (no room anywhere) on the row whose last label ends first.
    fn place(&mut self, center: f64, width: f64) -> (usize, f64) {
        if let Some(placed) = self.try_place(center, width) {
            return placed;
        }
        let want = self.left(center, width);
        let max_left = (PLOT_RIGHT - width).max(self.min_left);
        let mut best: Option<(f64, usize, f64)> = None;
        for (r, row) in self.taken.iter().enumerate() {
            let candidates = std::iter::once(want)
                .chain(row.iter().flat_map(|&(l, rt)| [rt + 6.0, l - width - 6.0]));
            for c in candidates {
                let c = c.clamp(self.min_left, max_left);
                let fits = row
                    .iter()
                    .all(|&(l, rt)| c + width + 6.0 <= l || c >= rt + 6.0);
                let d = (c - want).abs();
                if fits && best.is_none_or(|b| d < b.0) {
                    best = Some((d, r, c));
                }
            }
        }
        if let Some((_, row, left)) = best {
            self.taken[row].push((left, left + width));
            return (row, left);
        }
        // Nowhere free: the row whose last label ends first.
        let end = |row: &Vec<(f64, f64)>| row.iter().map(|p| p.1).fold(0.0, f64::max);
        let row = (0..self.taken.len())
            .min_by(|&a, &b| end(&self.taken[a]).total_cmp(&end(&self.taken[b])))
            .unwrap_or(0);
        let left = self.left(center, width);
        self.taken[row].push((left, left + width));
        (row, left)
    }

    /// Like [`place`](Self::place), but `None` when no row has room.
    fn try_place(&mut self, center: f64, width: f64) -> Option<(usize, f64)> {
        let left = self.left(center, width);
        let right = left + width;
        let free = |row: &Vec<(f64, f64)>| {
            row.iter()
                .all(|&(l, r)| right + 6.0 <= l || left >= r + 6.0)
        };
        let row = self.taken.iter().position(free)?;
        self.taken[row].push((left, right));
        Some((row, left))
    }

    fn left(&self, center: f64, width: f64) -> f64 {
        (center - width / 2.0).clamp(self.min_left, (PLOT_RIGHT - width).max(self.min_left))
    }
}

/// A linear axis with "nice" ticks (1, 2, 5 × 10ⁿ) covering `[min, max]`.
/// The time axis's ticks, their labels and its title, hanging below the line at `y`.
fn time_ticks(svg: &mut Svg, axis: &Axis, x_of: &dyn Fn(f64) -> f64, y: f64) {
    for &t in &axis.ticks {
        let x = x_of(t);
        svg.line(x, y, x, y + 5.0, "#333", 1.0, None);
        svg.text(
            x,
            y + 17.0,
            SMALL_SIZE,
            "middle",
            "normal",
            "#333",
            &axis.label(t),
        );
    }
    svg.text(
        PLOT_RIGHT,
        y + 31.0,
        SMALL_SIZE,
        "end",
        "normal",
        "#555",
        "time since start (ms)",
    );
}

struct Axis {
    min: f64,
    max: f64,
    step: f64,
    ticks: Vec<f64>,
}

impl Axis {
    fn new(min: f64, max: f64, target_ticks: usize) -> Self {
        let span = (max - min).max(f64::MIN_POSITIVE);
        let raw = span / target_ticks.max(1) as f64;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * magnitude)
            .find(|&s| s >= raw)
            .unwrap_or(10.0 * magnitude);
        let lo = (min / step).floor() * step;
        let hi = ((max / step).ceil() * step).max(lo + step);
        let count = ((hi - lo) / step).round() as usize;
        let ticks = (0..=count).map(|i| lo + step * i as f64).collect();
        Axis {
            min: lo,
            max: hi,
            step,
            ticks,
        }
    }

    /// A tick label: as few decimals as the step needs; in thousands (`k`) on an axis that
    /// reaches 10 000 with a step of 1000 or more.
    fn label(&self, v: f64) -> String {
        let v = if v.abs() < self.step * 1e-9 { 0.0 } else { v };
        if self.step >= 1000.0 && self.max.abs().max(self.min.abs()) >= 10_000.0 && v != 0.0 {
            let decimals = decimals_for(self.step / 1000.0);
            return format!("{:.decimals$}k", v / 1000.0);
        }
        let decimals = decimals_for(self.step);
        format!("{v:.decimals$}")
    }
}

/// The decimals needed to write `x` exactly (up to 6).
fn decimals_for(x: f64) -> usize {
    (0..6)
        .find(|&d| {
            let scaled = x * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.abs().max(1.0)
        })
        .unwrap_or(6)
}

/// An SVG document being written.
struct Svg {
    width: f64,
    height: f64,
    body: String,
}

impl Svg {
    fn new(width: f64, height: f64) -> Self {
        Svg {
            width,
            height,
            body: String::new(),
        }
    }

    /// A filled polygon (also the picture's squares: `<rect>` is kept for the phase bars).
    fn polygon(&mut self, points: &[(f64, f64)], color: &str, opacity: f64) {
        let points: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            self.body,
            r#"<polygon points="{}" fill="{color}" fill-opacity="{opacity}"/>"#,
            points.join(" ")
        );
    }

    /// A filled square with its top left corner at (`x`, `y`).
    fn square(&mut self, x: f64, y: f64, side: f64, color: &str) {
        self.polygon(
            &[(x, y), (x + side, y), (x + side, y + side), (x, y + side)],
            color,
            1.0,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn text(
        &mut self,
        x: f64,
        y: f64,
        size: f64,
        anchor: &str,
        style: &str,
        color: &str,
        text: &str,
    ) {
        let style = match style {
            "bold" => r#" font-weight="bold""#,
            "italic" => r#" font-style="italic""#,
            _ => "",
        };
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}" fill="{color}"{style}>{}</text>"#,
            escape(text)
        );
    }

    /// Text with a `halo`-coloured outline under it, readable across lines drawn below.
    #[allow(clippy::too_many_arguments)]
    fn text_halo(
        &mut self,
        x: f64,
        y: f64,
        size: f64,
        anchor: &str,
        color: &str,
        halo: &str,
        text: &str,
    ) {
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}" fill="{color}" stroke="{halo}" stroke-width="4" stroke-linejoin="round" paint-order="stroke">{}</text>"#,
            escape(text)
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn line(
        &mut self,
        x1: f64,
        y1: f64,
        x2: f64,
        y2: f64,
        color: &str,
        width: f64,
        dash: Option<&str>,
    ) {
        let dash = dash.map_or_else(String::new, |d| format!(r#" stroke-dasharray="{d}""#));
        let _ = writeln!(
            self.body,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{color}" stroke-width="{width}"{dash}/>"#
        );
    }

    fn finish(self) -> String {
        let (w, h) = (self.width, self.height);
        format!(
            concat!(
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#,
                "\n<title>vfmig migration timeline</title>\n",
                r##"<polygon points="0,0 {w:.0},0 {w:.0},{h:.0} 0,{h:.0}" fill="#ffffff"/>"##,
                "\n{body}</svg>"
            ),
            w = w,
            h = h,
            body = self.body
        )
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn crowded_labels_slide_to_free_room_instead_of_overlapping() {
        let mut rows = Rows::new(3, 8.0);
        // Seven labels 120 px wide, all anchored at the right end: three rows at the anchor
        // hold three; the rest must slide left, never overlap.
        let placed: Vec<(usize, f64)> = (0..7)
            .map(|_| rows.place(PLOT_RIGHT - 10.0, 120.0))
            .collect();
        for (i, &(ri, li)) in placed.iter().enumerate() {
            for &(rj, lj) in &placed[i + 1..] {
                assert!(ri != rj || (li - lj).abs() >= 120.0, "{placed:?}");
            }
            assert!(li >= 8.0 && li + 120.0 <= PLOT_RIGHT, "{placed:?}");
        }
    }

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

    #[test]
    fn axis_ticks_are_nice() {
        let a = Axis::new(0.0, 2796.0, 9);
        assert_eq!(a.step, 500.0);
        assert_eq!(a.max, 3000.0);
        assert_eq!(a.label(1500.0), "1500");
        let a = Axis::new(0.0, 0.7, 4);
        assert_eq!(a.label(0.2), "0.2");
        let a = Axis::new(0.0, 7900.0, 4);
        assert_eq!(a.label(2000.0), "2000");
        let a = Axis::new(0.0, 79_000.0, 4);
        assert_eq!(a.label(20_000.0), "20k");
        let a = Axis::new(0.0, 0.1, 4);
        assert_eq!(a.label(0.025), "0.025");
    }
}
