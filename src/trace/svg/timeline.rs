//! The timeline at the top of the picture: one bar per phase, labelled inside it when the
//! label fits, else below it; QEMU's passes as ticks labelled above it; the time axis under it.

use std::fmt::Write as _;

use super::axis::{time_ticks, Axis};
use super::canvas::{escape, text_width, Svg};
use super::{
    BAR_HEIGHT, BAR_TOP, PASS_ROW_Y, PHASE_LABEL_ROW_Y, PLOT_LEFT, PLOT_RIGHT, SMALL_SIZE,
    TEXT_SIZE, TIME_AXIS_Y, WIDTH,
};
use crate::trace::event::TraceEvent;
use crate::trace::reader::Pass;
use crate::trace::report::fmt_ms;

/// Draws the track names, the phase bars and their labels, the pass ticks and the time axis.
/// The phase labels go on top of the pass ticks.
pub(super) fn draw_timeline(
    svg: &mut Svg,
    phases: &[&TraceEvent],
    passes: &[Pass],
    axis: &Axis,
    x_of: &dyn Fn(f64) -> f64,
) {
    track_names(svg, !passes.is_empty());
    let mut labels = Svg::new(WIDTH, 0.0);
    let mut below = Rows::new(PHASE_LABEL_ROW_Y.len(), 8.0);
    for (i, phase) in phases.iter().enumerate() {
        phase_bar(svg, &mut labels, &mut below, phase, i, x_of);
    }
    pass_ticks(svg, passes, x_of);
    svg.body.push_str(&labels.body);
    svg.line(
        PLOT_LEFT,
        TIME_AXIS_Y,
        PLOT_RIGHT,
        TIME_AXIS_Y,
        "#333",
        1.0,
        None,
    );
    time_ticks(svg, axis, x_of, TIME_AXIS_Y);
}

/// The x extent of `phase` in the picture.
pub(super) fn phase_extent(phase: &TraceEvent, x_of: &dyn Fn(f64) -> f64) -> (f64, f64) {
    (x_of(phase.ts / 1e3), x_of(phase.end_us() / 1e3))
}

/// The colour of the phase called `name`, the `index`th of the trace.
pub(super) fn phase_color(name: &str, index: usize) -> &'static str {
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

/// The names of the tracks, left of the plot.
fn track_names(svg: &mut Svg, with_passes: bool) {
    svg.text(
        PLOT_LEFT - 8.0,
        BAR_TOP + BAR_HEIGHT / 2.0 + 4.0,
        TEXT_SIZE,
        "end",
        "bold",
        "#333",
        "phases",
    );
    if with_passes {
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
}

/// The bar of the `index`th phase into `svg`, its label into `labels`.
fn phase_bar(
    svg: &mut Svg,
    labels: &mut Svg,
    below: &mut Rows,
    phase: &TraceEvent,
    index: usize,
    x_of: &dyn Fn(f64) -> f64,
) {
    let (x0, x1) = phase_extent(phase, x_of);
    let width = (x1 - x0).max(1.0);
    let color = phase_color(&phase.name, index);
    let dur = format!("{} ms", fmt_ms(phase.dur.unwrap_or(0.0) / 1e3));
    let _ = write!(
        svg.body,
        r##"<rect class="phase" x="{x0:.1}" y="{BAR_TOP}" width="{width:.1}" height="{BAR_HEIGHT}" fill="{color}" stroke="#fff" stroke-width="0.5"><title>{}</title></rect>"##,
        escape(&format!("{} {dur}", phase.name))
    );
    svg.body.push('\n');
    let label = PhaseLabel {
        name: &phase.name,
        dur: &dur,
        color,
        mid: (x0 + x1) / 2.0,
        width,
    };
    if !label.inside(labels) {
        label.below(labels, below);
    }
}

/// The label of one phase bar.
struct PhaseLabel<'a> {
    name: &'a str,
    dur: &'a str,
    color: &'static str,
    /// The middle of the bar.
    mid: f64,
    /// The width of the bar.
    width: f64,
}

impl PhaseLabel<'_> {
    /// Writes the label inside the bar, on one line or on two; false when it fits on neither.
    fn inside(&self, labels: &mut Svg) -> bool {
        let inside_one = format!("{} · {}", self.name, self.dur);
        if text_width(&inside_one, TEXT_SIZE) + 8.0 <= self.width {
            let y = BAR_TOP + BAR_HEIGHT / 2.0 + 4.0;
            labels.text_halo(
                self.mid,
                y,
                TEXT_SIZE,
                "middle",
                "#111",
                self.color,
                &inside_one,
            );
            return true;
        }
        let widest = text_width(self.name, TEXT_SIZE).max(text_width(self.dur, SMALL_SIZE));
        if widest + 6.0 > self.width {
            return false;
        }
        let (mid, color) = (self.mid, self.color);
        labels.text_halo(
            mid,
            BAR_TOP + 14.0,
            TEXT_SIZE,
            "middle",
            "#111",
            color,
            self.name,
        );
        labels.text_halo(
            mid,
            BAR_TOP + 28.0,
            SMALL_SIZE,
            "middle",
            "#333",
            color,
            self.dur,
        );
        true
    }

    /// Writes the label below the bar, after a swatch of the bar's colour; a leader line joins
    /// the first row of labels to its bar (lower rows would cross the labels above).
    fn below(&self, labels: &mut Svg, rows: &mut Rows) {
        let label = format!("{} {}", self.name, self.dur);
        let w = text_width(&label, SMALL_SIZE) + 13.0;
        let (row, left) = rows.place(self.mid, w);
        let y = PHASE_LABEL_ROW_Y[row];
        if row == 0 {
            let (x, top) = (self.mid, BAR_TOP + BAR_HEIGHT);
            labels.line(x, top, x, y - SMALL_SIZE, "#555", 0.8, None);
        }
        labels.square(left, y - 8.5, 9.0, self.color);
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

/// One tick per QEMU pass across the bars, labelled above them: "pass N" where there is room,
/// "N" where it is crowded, nothing where even that would overlap (the tick stays, and the
/// report lists every pass).
fn pass_ticks(svg: &mut Svg, passes: &[Pass], x_of: &dyn Fn(f64) -> f64) {
    let mut above = Rows::new(PASS_ROW_Y.len(), PLOT_LEFT);
    for pass in passes {
        let x = x_of(pass.ts_us / 1e3);
        let (top, bottom) = (BAR_TOP - 6.0, BAR_TOP + BAR_HEIGHT + 4.0);
        svg.line(x, top, x, bottom, "#222", 1.6, None);
        for label in [format!("pass {}", pass.number), pass.number.to_string()] {
            if let Some((row, left)) = above.try_place(x, text_width(&label, SMALL_SIZE)) {
                let y = PASS_ROW_Y[row];
                svg.text(left, y, SMALL_SIZE, "start", "normal", "#222", &label);
                break;
            }
        }
    }
}

/// Labels placed on a few rows without overlapping: each goes on the first row where it fits
/// (centred on its anchor, kept inside the plot), or on the least crowded row.
pub(super) struct Rows {
    taken: Vec<Vec<(f64, f64)>>,
    min_left: f64,
}

impl Rows {
    /// `rows` rows; no label starts left of `min_left`.
    pub(super) fn new(rows: usize, min_left: f64) -> Self {
        Rows {
            taken: vec![Vec::new(); rows],
            min_left,
        }
    }

    /// Returns the row and the left x of a label `width` wide anchored at `center`: where it
    /// fits at its anchor; else slid along a row to the free spot nearest the anchor; else
    /// (no room anywhere) on the row whose last label ends first.
    pub(super) fn place(&mut self, center: f64, width: f64) -> (usize, f64) {
        if let Some(placed) = self.try_place(center, width) {
            return placed;
        }
        let (row, left) = self
            .nearest_free(center, width)
            .unwrap_or_else(|| (self.least_crowded(), self.left(center, width)));
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

    /// The row and left x of the free spot nearest the anchor, sliding along the rows.
    fn nearest_free(&self, center: f64, width: f64) -> Option<(usize, f64)> {
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
        best.map(|(_, row, left)| (row, left))
    }

    /// The row whose last label ends first.
    fn least_crowded(&self) -> usize {
        let end = |row: &Vec<(f64, f64)>| row.iter().map(|p| p.1).fold(0.0, f64::max);
        (0..self.taken.len())
            .min_by(|&a, &b| end(&self.taken[a]).total_cmp(&end(&self.taken[b])))
            .unwrap_or(0)
    }

    fn left(&self, center: f64, width: f64) -> f64 {
        (center - width / 2.0).clamp(self.min_left, (PLOT_RIGHT - width).max(self.min_left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
