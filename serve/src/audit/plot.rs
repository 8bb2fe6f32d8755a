//! The audit's PNG: two panels over the noise levels, one line per split depth (and wire
//! encoding when there are several): on the left the share of sensitive tokens the strongest
//! attack recovers, with the 10% line; on the right greedy agreement with the noise-free run.
//!
//! Drawn with plotters' bitmap backend into a buffer and written by the small PNG encoder
//! below (no image crate; `miniz_oxide` deflates the pixels: a chart is mostly white, so
//! about 1.9 MB of pixels take tens of kB). Text needs a TrueType font,
//! read at run time from `--plot-font` or the usual DejaVu paths (plotters' font-kit, which
//! pulls in fontconfig, stays off); without one the chart is drawn without text and says so.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use super::run::AuditReport;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 520;

/// Fonts tried when none is given.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a font for plotters; answers whether text can be drawn.
fn load_font(font: Option<&Path>) -> bool {
    let candidates: Vec<&Path> = match font {
        Some(p) => vec![p],
        None => FONT_PATHS.iter().map(Path::new).collect(),
    };
    for p in candidates {
        if let Ok(bytes) = std::fs::read(p) {
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// One plotted line: its label and a value per noise level.
struct Series {
    label: String,
    values: Vec<f64>,
}

fn series(report: &AuditReport, metric: impl Fn(&super::run::Cell) -> f64) -> Vec<Series> {
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
    let text = load_font(font);
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
    let png = encode_png(WIDTH, HEIGHT, &buf);
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

/// zlib level of the pixels (miniz's default).
const ZLIB_LEVEL: u8 = 6;

/// A PNG of `rgb` (8-bit RGB, row-major): unfiltered rows, zlib-compressed in one `IDAT`.
/// (Deflate's matches at the row's distance already do what PNG's `Up` filter would.)
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(rgb.len() + height as usize);
    for row in rgb.chunks_exact(width as usize * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let z = miniz_oxide::deflate::compress_to_vec_zlib(&raw, ZLIB_LEVEL);
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, adaptive, no interlace
    let mut png = PNG_SIGNATURE.to_vec();
    for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &z[..]), (b"IEND", &[][..])] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// Reads back a PNG as [`encode_png`] writes it (8-bit RGB, zlib `IDAT` data, no filters),
/// checking every CRC and the zlib stream's Adler-32: `(width, height, rgb)`. For tests and
/// checks of written charts; not a general PNG decoder.
pub fn decode_png(png: &[u8]) -> Result<(u32, u32, Vec<u8>)> {
    anyhow::ensure!(png.starts_with(PNG_SIGNATURE), "no PNG signature");
    let mut at = 8;
    let (mut size, mut idat) = (None, Vec::new());
    loop {
        let len_bytes: [u8; 4] = png
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .context("truncated chunk")?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        let chunk = png.get(at + 4..at + 8 + len).context("truncated chunk")?;
        let crc: [u8; 4] = png
            .get(at + 8 + len..at + 12 + len)
            .and_then(|b| b.try_into().ok())
            .context("truncated CRC")?;
        anyhow::ensure!(crc32(chunk) == u32::from_be_bytes(crc), "bad CRC");
        let (kind, data) = chunk.split_at(4);
        match kind {
            b"IHDR" => {
                anyhow::ensure!(data.len() == 13 && data[8..10] == [8, 2], "not 8-bit RGB");
                let w = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let h = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
                size = Some((w, h));
            }
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    let (w, h) = size.context("no IHDR")?;
    let row = w as usize * 3 + 1;
    let expected = row.checked_mul(h as usize).context("image too large")?;
    // The limit keeps a corrupt or hostile stream from inflating without bound.
    let raw = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&idat, expected)
        .map_err(|e| anyhow!("bad zlib data: {e}"))?;
    anyhow::ensure!(raw.len() == expected, "wrong data length");
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for r in raw.chunks_exact(row) {
        anyhow::ensure!(r[0] == 0, "filtered row");
        rgb.extend_from_slice(&r[1..]);
    }
    Ok((w, h, rgb))
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn png_round_trips() {
        let rgb: Vec<u8> = (0..3 * 300 * 100).map(|i| (i % 251) as u8).collect();
        let png = encode_png(300, 100, &rgb);
        let (w, h, back) = decode_png(&png).expect("decode");
        assert_eq!((w, h), (300, 100));
        assert_eq!(back, rgb);
        let mut bad = png.clone();
        bad[40] ^= 1;
        assert!(decode_png(&bad).is_err());
        assert!(decode_png(b"GIF89a").is_err());
    }

    /// A chart-like image (white, one line) is written in a small fraction of its pixel
    /// bytes and reads back exactly; a zlib stream altered behind a valid chunk CRC is
    /// refused by its Adler-32.
    #[test]
    fn a_mostly_white_image_compresses_and_a_corrupt_stream_is_refused() {
        let (w, h) = (1200u32, 520u32);
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        for x in 0..w as usize {
            let y = 100 + (x * 300 / w as usize);
            rgb[(y * w as usize + x) * 3..][..3].copy_from_slice(&[230, 120, 0]);
        }
        let png = encode_png(w, h, &rgb);
        assert!(png.len() < rgb.len() / 50, "{} bytes", png.len());
        let (_, _, back) = decode_png(&png).expect("decode");
        assert_eq!(back, rgb);

        // Flip a bit inside the IDAT's zlib data, then fix the chunk's CRC so only the
        // zlib layer can notice.
        let idat = png.windows(4).position(|c| c == b"IDAT").expect("IDAT");
        let len = u32::from_be_bytes(png[idat - 4..idat].try_into().expect("len")) as usize;
        let mut bad = png.clone();
        bad[idat + 4 + len - 2] ^= 0x10; // within the trailing Adler-32
        let crc = crc32(&bad[idat..idat + 4 + len]);
        bad[idat + 4 + len..idat + 8 + len].copy_from_slice(&crc.to_be_bytes());
        assert!(decode_png(&bad).is_err());
    }

    #[test]
    fn png_has_its_chunks() {
        let png = encode_png(2, 2, &[0u8; 12]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert!(png.windows(4).any(|w| w == b"IDAT"));
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
    }
}
