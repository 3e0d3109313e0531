//! The study's plots, as SVG (plotters): bars of a figure per configuration with the
//! repeats' range as error bars, and a published figure or the ideal as a line.

use std::path::Path;

use plotters::prelude::*;

use super::stats::Stat;

#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {why}")]
pub struct PlotError {
    path: String,
    why: String,
}

/// A horizontal line across the chart, with its label.
pub struct Reference {
    pub label: String,
    pub value: f64,
}

/// Draws `rows` (label, statistic) as bars with min–max error bars into `path`.
pub fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    rows: &[(String, Stat)],
    references: &[Reference],
) -> Result<(), PlotError> {
    let err = |e: String| PlotError {
        path: path.display().to_string(),
        why: e,
    };
    let top = rows
        .iter()
        .map(|(_, s)| s.max)
        .chain(references.iter().map(|r| r.value))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.15;
    let width = (160 + 90 * rows.len() as u32).clamp(480, 1400);
    let root = SVGBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let n = rows.len().max(1) as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..top)
        .map_err(|e| err(e.to_string()))?;
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_labels(rows.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (_, s))| {
            let i = i as u32;
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), s.median),
                ],
                RGBColor(76, 114, 176).filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (_, s))| {
            ErrorBar::new_vertical(
                SegmentValue::CenterOf(i as u32),
                s.min,
                s.median,
                s.max,
                BLACK.stroke_width(1),
                8,
            )
        }))
        .map_err(|e| err(e.to_string()))?;
    for (k, r) in references.iter().enumerate() {
        let colour = Palette99::pick(k + 1).to_rgba();
        chart
            .draw_series(LineSeries::new(
                [
                    (SegmentValue::Exact(0), r.value),
                    (SegmentValue::Exact(n), r.value),
                ],
                colour.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(r.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
    }
    if !references.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_bars_error_bars_and_references() {
        let dir = std::env::temp_dir().join(format!("pvsync-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.svg");
        let s = |m: f64| Stat {
            median: m,
            min: m * 0.9,
            max: m * 1.2,
            n: 3,
        };
        let rows = vec![("1:1".to_string(), s(1.0)), ("2x pv".to_string(), s(1.4))];
        let refs = [Reference {
            label: "published".into(),
            value: 2.18,
        }];
        bars(&p, "grace period / 1:1", "x", &rows, &refs).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(
            svg.starts_with("<svg") || svg.starts_with("<?xml"),
            "{svg:.80}"
        );
        assert!(svg.contains("2x pv") && svg.contains("published"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
