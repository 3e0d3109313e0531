//! A [`Timeline`] drawn as an SVG: one lane per track that has something in the window, a
//! time axis, spans as bars coloured by category and marks as ticks. Small enough to put
//! in docs; Perfetto is the tool for exploring.

use std::fmt::Write as _;

use super::Timeline;

const LABEL_W: f64 = 190.0;
const LANE_H: f64 = 16.0;
const AXIS_H: f64 = 28.0;

/// Fill colour of a span or mark category.
fn colour(cat: &str) -> &'static str {
    super::CATEGORIES
        .iter()
        .find(|(c, _)| *c == cat)
        .map_or("#7f7f7f", |(_, col)| col)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Draws the part of `t` between `from` and `to` (ns from the trace's epoch), `width`
/// pixels wide, under `title`.
pub fn render(t: &Timeline, from: u64, to: u64, width: f64, title: &str) -> String {
    let to = to.max(from + 1);
    let plot_w = (width - LABEL_W - 10.0).max(100.0);
    let x = |ns: u64| LABEL_W + (ns.clamp(from, to) - from) as f64 * plot_w / (to - from) as f64;
    let mut lanes = String::new();
    let mut shown: Vec<&str> = Vec::new();
    let mut y = AXIS_H + 18.0;
    for p in &t.processes {
        let visible: Vec<_> = p
            .tracks
            .iter()
            .filter(|tr| {
                tr.spans
                    .iter()
                    .any(|s| s.start < to && s.start.saturating_add(s.dur) > from)
                    || tr.marks.iter().any(|m| (from..to).contains(&m.at))
            })
            .collect();
        if visible.is_empty() {
            continue;
        }
        let _ = writeln!(
            lanes,
            r#"<text x="4" y="{:.1}" font-weight="bold">{}</text>"#,
            y + 11.0,
            escape(&p.name)
        );
        y += LANE_H;
        for tr in visible {
            let _ = writeln!(
                lanes,
                r#"<text x="14" y="{:.1}">{}</text>"#,
                y + 11.0,
                escape(&tr.name)
            );
            for s in tr
                .spans
                .iter()
                .filter(|s| s.start < to && s.start.saturating_add(s.dur) > from)
            {
                if !shown.contains(&s.cat) {
                    shown.push(s.cat);
                }
                let (x0, x1) = (x(s.start), x(s.start.saturating_add(s.dur)));
                let _ = writeln!(
                    lanes,
                    r#"<rect x="{x0:.2}" y="{:.1}" width="{:.2}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                    y + 2.0,
                    (x1 - x0).max(0.5),
                    LANE_H - 4.0,
                    colour(s.cat),
                    escape(&s.name)
                );
            }
            for m in tr.marks.iter().filter(|m| (from..to).contains(&m.at)) {
                let xm = x(m.at);
                let _ = writeln!(
                    lanes,
                    r#"<path d="M{xm:.2} {:.1} l-3 -5 h6 z" fill="{}"><title>{}</title></path>"#,
                    y + LANE_H - 1.0,
                    colour(m.cat),
                    escape(&m.name)
                );
            }
            y += LANE_H;
        }
    }
    // Legend: every category drawn, in the order of the colour table.
    y += 8.0;
    let mut lx = 4.0;
    for (cat, col) in super::CATEGORIES.iter().filter(|(c, _)| shown.contains(c)) {
        if lx + 130.0 > width {
            lx = 4.0;
            y += LANE_H;
        }
        let _ = writeln!(
            lanes,
            r#"<rect x="{lx:.0}" y="{:.1}" width="12" height="10" fill="{col}"/><text x="{:.0}" y="{:.1}">{cat}</text>"#,
            y + 2.0,
            lx + 16.0,
            y + 11.0
        );
        lx += 22.0 + 7.0 * cat.len() as f64;
    }
    y += LANE_H;
    let height = y + 10.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="4" y="14" font-size="13" font-weight="bold">{}</text>
"#,
        escape(title)
    );
    // Axis: about ten ticks at a round step.
    let span_ns = (to - from) as f64;
    let raw = span_ns / 10.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
        .max(1.0);
    let mut tick = 0.0;
    while tick <= span_ns {
        let xt = LABEL_W + tick * plot_w / span_ns;
        let _ = writeln!(
            svg,
            r##"<line x1="{xt:.1}" y1="{AXIS_H}" x2="{xt:.1}" y2="{:.1}" stroke="#eee"/><text x="{xt:.1}" y="{:.1}" text-anchor="middle">{:.1} ms</text>"##,
            height - 10.0,
            AXIS_H - 4.0,
            (from as f64 + tick) / 1e6
        );
        tick += step;
    }
    svg.push_str(&lanes);
    svg.push_str("</svg>\n");
    svg
}
