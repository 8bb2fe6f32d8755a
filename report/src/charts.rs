//! What the privacy audit's chart (`tandem audit-privacy --plot`) and the load test's
//! (`tandem-loadtest --plot`) share:
//! - [`load_font`]: one TrueType font for plotters' text, from a given path or the usual
//!   DejaVu paths (plotters' font-kit, which pulls in fontconfig, stays off);
//! - [`encode_png`] and [`decode_png`]: 8-bit RGB pixels to and from PNG, through the `png`
//!   crate.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use plotters::style::FontStyle;

/// Fonts tried when none is given.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// The font plotters draws with. plotters keeps a registered font's bytes for the life of the
/// process, so the first font that loads is kept here, once; later calls reuse it.
static FONT: OnceLock<Vec<u8>> = OnceLock::new();

/// Registers a font for plotters' `sans-serif` family and answers whether text can be drawn.
///
/// `Some(path)`: that font, and an error when it cannot be read or is not a TrueType/OpenType
/// font. `None`: the first of [`FONT_PATHS`] that loads, or `Ok(false)` when none does (the
/// caller then draws without text and says so).
pub fn load_font(font: Option<&Path>) -> Result<bool> {
    if let Some(p) = font {
        let bytes = std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?;
        anyhow::ensure!(
            ttf_like(&bytes),
            "{}: not a TrueType/OpenType font",
            p.display()
        );
        let kept = FONT.get_or_init(|| bytes.clone());
        anyhow::ensure!(
            *kept == bytes,
            "{}: another font is already in use in this process",
            p.display()
        );
        return Ok(register(kept));
    }
    if let Some(bytes) = FONT.get() {
        return Ok(register(bytes));
    }
    for p in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(p) {
            if ttf_like(&bytes) {
                return Ok(register(FONT.get_or_init(|| bytes)));
            }
        }
    }
    Ok(false)
}

fn register(bytes: &'static [u8]) -> bool {
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

/// The sfnt versions of TrueType (`00 01 00 00`, `true`) and OpenType (`OTTO`) fonts.
fn ttf_like(bytes: &[u8]) -> bool {
    matches!(
        bytes.get(..4),
        Some([0, 1, 0, 0]) | Some(b"true") | Some(b"OTTO")
    )
}

/// A PNG of `rgb` (8-bit RGB, row-major, `width * height * 3` bytes).
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>> {
    anyhow::ensure!(
        rgb.len() as u64 == u64::from(width) * u64::from(height) * 3,
        "{} bytes are not {width}x{height} RGB pixels",
        rgb.len()
    );
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().context("PNG header")?;
    writer.write_image_data(rgb).context("PNG data")?;
    writer.finish().context("PNG end")?;
    Ok(out)
}

/// Reads a PNG back as 8-bit RGB: `(width, height, rgb)`. Refuses other colour types and bit
/// depths, and images over 64 megapixels (a hostile file cannot make it allocate more).
pub fn decode_png(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>)> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_limits(png::Limits {
        bytes: 64 << 20 << 2,
    });
    let mut reader = dec.read_info().context("not a PNG")?;
    let info = reader.info();
    anyhow::ensure!(
        info.color_type == png::ColorType::Rgb && info.bit_depth == png::BitDepth::Eight,
        "not 8-bit RGB ({:?}, {:?})",
        info.color_type,
        info.bit_depth
    );
    let (w, h) = (info.width, info.height);
    anyhow::ensure!(
        u64::from(w) * u64::from(h) <= 64 << 20,
        "{w}x{h} is too large"
    );
    let mut rgb = vec![0; reader.output_buffer_size().context("image too large")?];
    let frame = reader.next_frame(&mut rgb).context("bad PNG data")?;
    rgb.truncate(frame.buffer_size());
    Ok((w, h, rgb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32) -> Vec<u8> {
        (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn png_round_trips_and_has_its_chunks() {
        let rgb = image(300, 100);
        let png = encode_png(300, 100, &rgb).expect("encode");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        for chunk in [&b"IHDR"[..], b"IDAT", b"IEND"] {
            assert!(png.windows(4).any(|w| w == chunk), "{chunk:?}");
        }
        assert_eq!(decode_png(&png).expect("decode"), (300, 100, rgb));
    }

    #[test]
    fn a_mostly_white_image_compresses_and_corrupt_input_is_refused() {
        let (w, h) = (1200, 520);
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        rgb[..300].fill(0);
        let png = encode_png(w, h, &rgb).expect("encode");
        assert!(png.len() < rgb.len() / 50, "{} bytes", png.len());
        let mut bad = png.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x55; // inside IDAT: its CRC no longer matches
        assert!(decode_png(&bad).is_err());
        assert!(decode_png(b"GIF89a").is_err());
        assert!(decode_png(&png[..png.len() / 3]).is_err());
        assert!(encode_png(2, 2, &[0; 11]).is_err());
    }

    #[test]
    fn other_colour_types_are_refused() {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 2, 2);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("header");
        w.write_image_data(&[0; 4]).expect("data");
        w.finish().expect("finish");
        let err = decode_png(&out).expect_err("grey").to_string();
        assert!(err.contains("not 8-bit RGB"), "{err}");
    }

    #[test]
    fn a_given_font_that_is_not_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tandem-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("not-a-font.ttf");
        std::fs::write(&p, b"hello").expect("write");
        let err = load_font(Some(&p)).expect_err("not a font").to_string();
        assert!(err.contains("not a TrueType"), "{err}");
        let err = load_font(Some(&dir.join("missing.ttf")))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
