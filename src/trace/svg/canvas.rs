//! The SVG document being written: its drawing primitives and XML escaping.

use std::fmt::Write as _;

/// An SVG document being written.
pub(super) struct Svg {
    width: f64,
    height: f64,
    pub(super) body: String,
}

impl Svg {
    pub(super) fn new(width: f64, height: f64) -> Self {
        Svg {
            width,
            height,
            body: String::new(),
        }
    }

    /// A filled polygon (also the picture's squares: `<rect>` is kept for the phase bars).
    pub(super) fn polygon(&mut self, points: &[(f64, f64)], color: &str, opacity: f64) {
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
    pub(super) fn square(&mut self, x: f64, y: f64, side: f64, color: &str) {
        self.polygon(
            &[(x, y), (x + side, y), (x + side, y + side), (x, y + side)],
            color,
            1.0,
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn text(
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
    pub(super) fn text_halo(
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
    pub(super) fn line(
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

    pub(super) fn finish(self) -> String {
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

/// Estimated width of `text` in a sans-serif font of `size` px (a little generous, so that
/// labels judged to fit do fit).
pub(super) fn text_width(text: &str, size: f64) -> f64 {
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
