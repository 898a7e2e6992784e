//! Linear axes with "nice" ticks, and the time axis drawn under the timeline and the charts.

use super::canvas::Svg;
use super::{PLOT_RIGHT, SMALL_SIZE};

/// A linear axis with "nice" ticks (1, 2, 5 × 10ⁿ) covering `[min, max]`.
pub(super) struct Axis {
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) step: f64,
    pub(super) ticks: Vec<f64>,
}

impl Axis {
    pub(super) fn new(min: f64, max: f64, target_ticks: usize) -> Self {
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
    pub(super) fn label(&self, v: f64) -> String {
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

/// The time axis's ticks, their labels and its title, hanging below the line at `y`.
pub(super) fn time_ticks(svg: &mut Svg, axis: &Axis, x_of: &dyn Fn(f64) -> f64, y: f64) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
