//! The run's PNG (`--plot PATH`): four panels, 1200 × 900 pixels.
//!
//! - Top left, top right, bottom left: the distributions of TTFT, TPOT and end-to-end time
//!   of the completed generations, as CDFs (x: milliseconds, y: share of samples at or below
//!   it, in %), with the p50 and p99 marked by vertical lines.
//! - Bottom right: throughput over time from the report's timeline: output tokens per second
//!   during each second (left axis) and generations in progress (right axis).
//!
//! Drawn with plotters' bitmap backend into a buffer and written as PNG by `tandem-report`
//! (the `png` crate), which also loads the font: `--plot-font` or the usual DejaVu paths. A
//! `--plot-font` that cannot be read is an error; when none is given and no DejaVu font is
//! installed, the chart is drawn without any text (axes and lines only) and the command says
//! so on stderr.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

pub use tandem_report::charts::decode_png;
use tandem_report::charts::{encode_png, load_font};

use crate::device::{GenerationRecord, Outcome};
use crate::report::Report;

pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 900;

/// Most points drawn per CDF (samples are thinned evenly beyond that).
const MAX_CDF_POINTS: usize = 2_000;

/// A CDF in percent over sorted samples, thinned to at most [`MAX_CDF_POINTS`] points.
pub fn cdf(mut samples: Vec<f64>) -> Vec<(f64, f64)> {
    samples.retain(|v| v.is_finite());
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let step = n.div_ceil(MAX_CDF_POINTS).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (samples[i], 100.0 * (i + 1) as f64 / n as f64))
        .collect();
    if let Some(&last) = samples.last() {
        if out.last().map(|p| p.1) != Some(100.0) {
            out.push((last, 100.0));
        }
    }
    out
}

/// Writes the chart of a run to `path`. Answers whether text (titles, labels, legends) was
/// drawn.
pub fn write_png(
    report: &Report,
    records: &[GenerationRecord],
    path: &Path,
    font: Option<&Path>,
) -> Result<bool> {
    let text = load_font(font).context("--plot-font")?;
    let done: Vec<&GenerationRecord> = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Done { .. }))
        .collect();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let ttft: Vec<f64> = done.iter().filter_map(|r| r.ttft.map(ms)).collect();
    let tpot: Vec<f64> = done
        .iter()
        .flat_map(|r| r.gaps.iter().copied().map(ms))
        .collect();
    let e2e: Vec<f64> = done.iter().map(|r| ms(r.e2e)).collect();

    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let panels = root.split_evenly((2, 2));
        let cdfs = [
            ("time to first token", ttft),
            ("time per output token (gaps between tokens)", tpot),
            ("end to end", e2e),
        ];
        for (area, (title, samples)) in panels.iter().zip(cdfs) {
            draw_cdf(area, title, samples, text)?;
        }
        draw_timeline(&panels[3], report, text)?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    let png = encode_png(WIDTH, HEIGHT, &buf)?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
    Ok(text)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

fn draw_cdf(area: &Area<'_>, title: &str, samples: Vec<f64>, text: bool) -> Result<()> {
    let n = samples.len();
    let points = cdf(samples);
    let x_max = points.last().map_or(1.0, |p| p.0).max(1e-3) * 1.05;
    let mut builder = ChartBuilder::on(area);
    builder.margin(16);
    if text {
        builder
            .caption(format!("{title} (n={n})"), ("sans-serif", 18))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..x_max, 0f64..101f64)
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("milliseconds")
            .y_desc("% of samples at or below")
            .y_labels(11);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(err)?;
    let color = RGBColor(31, 119, 180);
    for (p, mark) in [(50.0, RGBColor(120, 120, 120)), (99.0, RGBColor(200, 0, 0))] {
        if let Some(&(x, _)) = points.iter().find(|q| q.1 >= p) {
            let line = chart
                .draw_series(LineSeries::new(
                    [(x, 0.0), (x, 100.0)],
                    mark.stroke_width(1),
                ))
                .map_err(err)?;
            if text {
                line.label(format!("p{p:.0} {x:.1} ms"))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], mark));
            }
        }
    }
    let stairs: Vec<(f64, f64)> = std::iter::once((0.0, 0.0))
        .chain(points.iter().copied())
        .collect();
    chart
        .draw_series(LineSeries::new(stairs, color.stroke_width(2)))
        .map_err(err)?;
    if text && n > 0 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

fn draw_timeline(area: &Area<'_>, report: &Report, text: bool) -> Result<()> {
    let t = &report.timeline;
    let t_max = t.last().map_or(1.0, |s| s.t_s).max(1.0);
    let rate_max = t
        .iter()
        .map(|s| s.output_tokens_per_s)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let active_max = t.iter().map(|s| s.active).max().unwrap_or(0).max(1) as f64 * 1.1;
    let mut builder = ChartBuilder::on(area);
    builder.margin(16);
    if text {
        builder
            .caption("throughput over time", ("sans-serif", 18))
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..t_max, 0f64..rate_max)
        .map_err(err)?
        .set_secondary_coord(0f64..t_max, 0f64..active_max);
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("seconds since the start")
            .y_desc("output tokens per second");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(err)?;
    let mut secondary = chart.configure_secondary_axes();
    if text {
        secondary.y_desc("generations in progress");
    } else {
        secondary.x_labels(0).y_labels(0);
    }
    secondary.draw().map_err(err)?;
    let (rate_color, active_color) = (RGBColor(31, 119, 180), RGBColor(230, 120, 0));
    let rate = chart
        .draw_series(LineSeries::new(
            t.iter().map(|s| (s.t_s, s.output_tokens_per_s)),
            rate_color.stroke_width(2),
        ))
        .map_err(err)?;
    if text {
        rate.label("output tok/s (left)")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], rate_color));
    }
    let active = chart
        .draw_secondary_series(LineSeries::new(
            t.iter().map(|s| (s.t_s, s.active as f64)),
            active_color.stroke_width(2),
        ))
        .map_err(err)?;
    if text {
        active
            .label("in progress (right)")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], active_color));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdfs_end_at_100_and_thin_long_inputs() {
        assert!(cdf(Vec::new()).is_empty());
        assert_eq!(
            cdf(vec![3.0, 1.0, 2.0, 4.0]),
            [(1.0, 25.0), (2.0, 50.0), (3.0, 75.0), (4.0, 100.0)]
        );
        let long = cdf((0..10_001).map(f64::from).collect());
        assert!(long.len() <= MAX_CDF_POINTS + 1, "{}", long.len());
        assert_eq!(long.last(), Some(&(10_000.0, 100.0)));
        assert!(long
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
