//! The audit's PNG: two panels over the noise levels, one line per split depth (and wire
//! encoding when there are several): on the left the share of sensitive tokens the strongest
//! attack recovers, with the 10% line; on the right greedy agreement with the noise-free run.
//!
//! Drawn with plotters' bitmap backend into a buffer and written as PNG by `tandem-report`
//! (the `png` crate). Text needs a TrueType font, read at run time from `--plot-font` (an
//! error when it cannot be read) or the usual DejaVu paths; without one the chart is drawn
//! without text and says so.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use tandem_report::charts::{encode_png, load_font};

use crate::run::AuditReport;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 520;

/// One plotted line: its label and a value per noise level.
struct Series {
    label: String,
    values: Vec<f64>,
}

fn series(report: &AuditReport, metric: impl Fn(&crate::run::Cell) -> f64) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    let several_wires = report.settings.wire.len() > 1;
    for c in &report.cells {
        let label = if several_wires {
            format!("k={} {}", c.edge_layers, c.wire)
        } else {
            format!("k={}", c.edge_layers)
        };
        match out.iter_mut().find(|s| s.label == label) {
            Some(s) => s.values.push(metric(c)),
            None => out.push(Series {
                label,
                values: vec![metric(c)],
            }),
        }
    }
    out
}

/// Writes the chart to `path`. Answers whether text (labels, legend) was drawn.
pub fn write_png(report: &AuditReport, path: &Path, font: Option<&Path>) -> Result<bool> {
    let text = load_font(font).context("--plot-font")?;
    let labels: Vec<String> = report.settings.noise.iter().map(|l| l.label()).collect();
    let recovery = series(report, |c| 100.0 * c.best_sensitive_recovery());
    let agreement = series(report, |c| 100.0 * c.greedy_agreement);
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let panels = [
            (left, &recovery, "sensitive tokens recovered (%)", true),
            (
                right,
                &agreement,
                "greedy agreement with noise-free (%)",
                false,
            ),
        ];
        for (area, lines, title, threshold) in panels {
            draw_panel(&area, lines, &labels, title, threshold, text)?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    let png = encode_png(WIDTH, HEIGHT, &buf)?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
    Ok(text)
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    lines: &[Series],
    labels: &[String],
    title: &str,
    threshold: bool,
    text: bool,
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing the chart: {e}");
    let n = labels.len().max(1);
    let x_range = -0.2f64..(n as f64 - 0.8);
    let mut builder = ChartBuilder::on(area);
    builder.margin(16);
    if text {
        builder
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(x_range, 0f64..101f64)
        .map_err(err)?;
    let label_of = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_labels(n)
            .x_label_formatter(&label_of)
            .x_desc("noise level (per-row epsilon)")
            .y_labels(11);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(err)?;
    if threshold {
        chart
            .draw_series(LineSeries::new(
                [(-0.2, 10.0), (n as f64 - 0.8, 10.0)],
                RGBColor(200, 0, 0).stroke_width(1),
            ))
            .map_err(err)?;
    }
    for (i, s) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .map(|(x, &y)| (x as f64, y))
            .collect();
        let drawn = chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?;
        if text {
            drawn
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}
