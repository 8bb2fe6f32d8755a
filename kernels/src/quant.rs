//! Quantized weights for memory-light device parts (`tandem split --edge-dtype`):
//!
//! - [`Int8Rows`]: int8 with one absmax scale per row (`w ≈ q · s`, `s = max|w_row| / 127`):
//!   the projections of an `int8` edge, and its embedding table. A quarter of f32's bytes.
//! - [`Q4Blocks`]: 4-bit with one scale per block of [`Q4_BLOCK`] values of a row
//!   (`q ∈ [-8, 7]`, the scale chosen for the least squared error, see `q4_scale`): the
//!   embedding table of a `q4-embed` edge, an eighth of f32's bytes plus the scales. Only
//!   looked up, row by row, never multiplied.
//!
//! [`Int8Rows::matmul_to_vec`] multiplies f32 activations by the int8 weight directly,
//! widening 16 weights at a time in registers: no f32 copy of the weight exists at any time.
//! A row's result does not depend on the other rows of the batch (each output is one dot
//! product in a fixed order), so batched equals solo, as for the f32 and bf16 kernels.

use std::sync::{Mutex, OnceLock};

use crate::team::Team;

/// Values per scale in [`Q4Blocks`].
pub const Q4_BLOCK: usize = 32;

/// An `[n, k]` weight in int8 with one f32 scale per row. See the module doc.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Rows {
    n: usize,
    k: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
}

impl Int8Rows {
    /// Quantizes `w` (`[n, k]`, row-major) row by row. A row of zeros gets scale 0.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not [{n}, {k}]");
        let mut q = Vec::with_capacity(n * k);
        let mut scale = Vec::with_capacity(n);
        for row in w.chunks_exact(k.max(1)).take(n) {
            let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = absmax / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            q.extend(
                row.iter()
                    .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8),
            );
            scale.push(s);
        }
        Self { n, k, q, scale }
    }

    /// From stored parts: `q` is `[n, k]`, `scale` is `[n]`.
    pub fn from_parts(q: Vec<i8>, scale: Vec<f32>, n: usize, k: usize) -> Result<Self, String> {
        if q.len() != n * k || scale.len() != n {
            return Err(format!(
                "int8 weight [{n}, {k}] needs {} values and {n} scales, got {} and {}",
                n * k,
                q.len(),
                scale.len()
            ));
        }
        if let Some(bad) = scale.iter().find(|s| !s.is_finite() || **s < 0.0) {
            return Err(format!("int8 weight has an invalid scale {bad}"));
        }
        Ok(Self { n, k, q, scale })
    }

    /// The rows of `parts` one after the other (Q, K and V as one projection); every part
    /// must have the same `k`.
    pub fn concat(parts: Vec<Int8Rows>) -> Result<Self, String> {
        let k = parts.first().map_or(0, |p| p.k);
        if let Some(p) = parts.iter().find(|p| p.k != k) {
            return Err(format!(
                "cannot stack int8 weights of widths {k} and {}",
                p.k
            ));
        }
        let mut out = Self {
            n: 0,
            k,
            q: Vec::with_capacity(parts.iter().map(|p| p.q.len()).sum()),
            scale: Vec::new(),
        };
        for p in parts {
            out.n += p.n;
            out.q.extend_from_slice(&p.q);
            out.scale.extend_from_slice(&p.scale);
        }
        Ok(out)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The quantized values, `[n, k]` row-major.
    pub fn values(&self) -> &[i8] {
        &self.q
    }

    /// One scale per row.
    pub fn scales(&self) -> &[f32] {
        &self.scale
    }

    /// Bytes held: the values and the scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len()
    }

    /// Row `r` dequantized into `out` (`k` floats).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let s = self.scale[r];
        let row = &self.q[r * self.k..(r + 1) * self.k];
        for (o, &v) in out.iter_mut().zip(row) {
            *o = f32::from(v) * s;
        }
    }

    /// `x · Wᵀ` for `m` rows `x` (`[m, k]`, f32) as a new `[m, n]`.
    pub fn matmul_to_vec(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_on(Isa::detect(), x, m)
    }

    fn matmul_on(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "input is not [{m}, {k}]");
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        let team = Team::global();
        let threads = team.threads().min(n);
        if threads <= 1 || 2 * m * n * k < 1 << 20 {
            self.columns(isa, x, m, 0..n, &mut out, n);
            return out;
        }
        // Each part computes a contiguous range of output columns for every row into its own
        // buffer; the buffers are then laid into `out`.
        let per = n.div_ceil(threads);
        let parts: Vec<Mutex<Vec<f32>>> = (0..threads).map(|_| Mutex::new(Vec::new())).collect();
        team.run(threads, &|p| {
            let cols = (p * per).min(n)..((p + 1) * per).min(n);
            let mut buf = vec![0f32; m * cols.len()];
            let width = cols.len();
            self.columns(isa, x, m, cols, &mut buf, width);
            *parts[p].lock().unwrap_or_else(|e| e.into_inner()) = buf;
        });
        for (p, part) in parts.into_iter().enumerate() {
            let buf = part.into_inner().unwrap_or_else(|e| e.into_inner());
            let start = (p * per).min(n);
            let width = ((p + 1) * per).min(n) - start;
            if width == 0 {
                continue;
            }
            for (i, row) in buf.chunks_exact(width).enumerate() {
                out[i * n + start..i * n + start + width].copy_from_slice(row);
            }
        }
        out
    }

    /// Output columns `cols` for every row, into `out` (row stride `ldo`, column `cols.start`
    /// at offset 0).
    fn columns(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
        ldo: usize,
    ) {
        let k = self.k;
        for (c, j) in cols.enumerate() {
            let w = &self.q[j * k..(j + 1) * k];
            let s = self.scale[j];
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                out[i * ldo + c] = s * dot_i8(isa, xi, w);
            }
        }
    }
}

/// An `[n, k]` table in 4-bit blocks. See the module doc.
#[derive(Clone, Debug, PartialEq)]
pub struct Q4Blocks {
    n: usize,
    k: usize,
    /// Two values per byte (low nibble first), each stored as `q + 8`; a row takes
    /// `ceil(k / 2)` bytes.
    packed: Vec<u8>,
    /// One per block of [`Q4_BLOCK`] values; a row has `ceil(k / Q4_BLOCK)`.
    scale: Vec<f32>,
}

impl Q4Blocks {
    fn row_bytes(k: usize) -> usize {
        k.div_ceil(2)
    }

    fn row_blocks(k: usize) -> usize {
        k.div_ceil(Q4_BLOCK)
    }

    /// Quantizes `w` (`[n, k]`, row-major).
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "table is not [{n}, {k}]");
        let mut packed = vec![0u8; n * Self::row_bytes(k)];
        let mut scale = Vec::with_capacity(n * Self::row_blocks(k));
        for r in 0..n {
            let row = &w[r * k..(r + 1) * k];
            let out = &mut packed[r * Self::row_bytes(k)..(r + 1) * Self::row_bytes(k)];
            for (b, block) in row.chunks(Q4_BLOCK).enumerate() {
                let s = q4_scale(block);
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                for (t, v) in block.iter().enumerate() {
                    let q = ((v * inv).round().clamp(-8.0, 7.0) as i8 + 8) as u8;
                    let col = b * Q4_BLOCK + t;
                    out[col / 2] |= if col.is_multiple_of(2) { q } else { q << 4 };
                }
                scale.push(s);
            }
        }
        Self {
            n,
            k,
            packed,
            scale,
        }
    }

    /// From stored parts: `packed` is `[n, ceil(k / 2)]`, `scale` `[n, ceil(k / 32)]`.
    pub fn from_parts(
        packed: Vec<u8>,
        scale: Vec<f32>,
        n: usize,
        k: usize,
    ) -> Result<Self, String> {
        let (want_p, want_s) = (n * Self::row_bytes(k), n * Self::row_blocks(k));
        if packed.len() != want_p || scale.len() != want_s {
            return Err(format!(
                "4-bit table [{n}, {k}] needs {want_p} bytes and {want_s} scales, got {} and {}",
                packed.len(),
                scale.len()
            ));
        }
        if let Some(bad) = scale.iter().find(|s| !s.is_finite() || **s < 0.0) {
            return Err(format!("4-bit table has an invalid scale {bad}"));
        }
        Ok(Self {
            n,
            k,
            packed,
            scale,
        })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The packed nibbles, `[n, ceil(k / 2)]`.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The scales, `[n, ceil(k / 32)]`.
    pub fn scales(&self) -> &[f32] {
        &self.scale
    }

    /// Bytes held: the nibbles and the scales.
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * self.scale.len()
    }

    /// Row `r` dequantized into `out` (`k` floats).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let k = self.k;
        let bytes = &self.packed[r * Self::row_bytes(k)..(r + 1) * Self::row_bytes(k)];
        let scales = &self.scale[r * Self::row_blocks(k)..(r + 1) * Self::row_blocks(k)];
        for (col, o) in out.iter_mut().enumerate().take(k) {
            let byte = bytes[col / 2];
            let nib = if col.is_multiple_of(2) {
                byte & 0x0f
            } else {
                byte >> 4
            };
            *o = f32::from(nib as i8 - 8) * scales[col / Q4_BLOCK];
        }
    }
}

/// The scale of one 4-bit block: of the steps `absmax / d` for `d` from 7 (every value in
/// range) to 9 (the largest clipped to ±8 or 7 steps, the rest finer), the one with the least
/// squared error. Values are `round(w / s)` clamped to `[-8, 7]`.
fn q4_scale(block: &[f32]) -> f32 {
    let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    if absmax == 0.0 {
        return 0.0;
    }
    let sse = |s: f32| -> f32 {
        block
            .iter()
            .map(|v| {
                let e = v - (v / s).round().clamp(-8.0, 7.0) * s;
                e * e
            })
            .sum()
    };
    (0..=8)
        .map(|i| absmax / (7.0 + 0.25 * i as f32))
        .map(|s| (sse(s), s))
        .fold((f32::INFINITY, absmax / 7.0), |best, c| {
            if c.0 < best.0 {
                c
            } else {
                best
            }
        })
        .1
}

/// Which dot product runs: chosen once per process from the CPU's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512,
    Portable,
}

impl Isa {
    fn detect() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            Isa::Portable
        })
    }
}

/// `Σ x[t] · w[t]` with `w` widened from int8.
fn dot_i8(isa: Isa, x: &[f32], w: &[i8]) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only chosen when the CPU has AVX-512F; the slices have
        // equal lengths (asserted by the callers' shapes).
        Isa::Avx512 => unsafe { avx512::dot_i8(x, w) },
        _ => dot_i8_portable(x, w),
    }
}

/// Sixteen partial sums (the AVX-512 kernel's lanes), then their sum.
fn dot_i8_portable(x: &[f32], w: &[i8]) -> f32 {
    let mut acc = [0f32; 16];
    let mut xs = x.chunks_exact(16);
    let mut ws = w.chunks_exact(16);
    for (xc, wc) in (&mut xs).zip(&mut ws) {
        for l in 0..16 {
            acc[l] += xc[l] * f32::from(wc[l]);
        }
    }
    for (l, (&xv, &wv)) in xs.remainder().iter().zip(ws.remainder()).enumerate() {
        acc[l] += xv * f32::from(wv);
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512F, and `x.len() == w.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_i8(x: &[f32], w: &[i8]) -> f32 {
        let k = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = _mm512_setzero_ps();
        let mut t = 0;
        while t + 16 <= k {
            // SAFETY: `t + 16 <= k`: 16 floats of `x` and 16 bytes of `w` are in bounds.
            unsafe {
                let wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    wp.add(t).cast::<__m128i>(),
                )));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(t)), wv, acc);
            }
            t += 16;
        }
        if t < k {
            let rest = k - t;
            let mask: __mmask16 = (1u32 << rest).wrapping_sub(1) as __mmask16;
            // The masked loads read only the `rest` elements left; the byte load goes
            // through a small copy (AVX-512F has no masked byte load).
            let mut tail = [0i8; 16];
            tail[..rest].copy_from_slice(&w[t..k]);
            // SAFETY: the masked load touches only the `rest` floats in bounds; `tail` is 16
            // bytes.
            unsafe {
                let wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    tail.as_ptr().cast::<__m128i>(),
                )));
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(t));
                acc = _mm512_fmadd_ps(xv, wv, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn int8_rows_round_trip_within_half_a_step() {
        let (n, k) = (7, 45);
        let w = lcg(1, n * k);
        let q = Int8Rows::quantize(&w, n, k);
        let mut row = vec![0f32; k];
        for r in 0..n {
            q.row_into(r, &mut row);
            let s = q.scales()[r];
            for (a, b) in row.iter().zip(&w[r * k..(r + 1) * k]) {
                assert!((a - b).abs() <= 0.5 * s + 1e-7, "{a} vs {b} (step {s})");
            }
        }
        assert_eq!(q.bytes(), n * k + 4 * n);
    }

    #[test]
    fn int8_matmul_equals_the_dequantized_product_and_rows_are_independent() {
        // k = 45 exercises the masked tail; n large enough to split over the team.
        for (m, n, k) in [(1, 9, 45), (5, 300, 96), (3, 2048, 300)] {
            let w = Int8Rows::quantize(&lcg(2, n * k), n, k);
            let x = lcg(3, m * k);
            let mut deq = vec![0f32; n * k];
            for r in 0..n {
                w.row_into(r, &mut deq[r * k..(r + 1) * k]);
            }
            for isa in [Isa::detect(), Isa::Portable] {
                let got = w.matmul_on(isa, &x, m);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| f64::from(x[i * k + t]) * f64::from(deq[j * k + t]))
                            .sum();
                        let g = got[i * n + j];
                        assert!(
                            (f64::from(g) - want).abs() < 1e-4,
                            "[{i},{j}] {g} vs {want}"
                        );
                    }
                    // The same row alone gives the same bits.
                    let solo = w.matmul_on(isa, &x[i * k..(i + 1) * k], 1);
                    assert_eq!(solo, got[i * n..(i + 1) * n].to_vec(), "{isa:?} row {i}");
                }
            }
        }
    }

    #[test]
    fn int8_from_parts_checks_lengths_and_scales() {
        assert!(Int8Rows::from_parts(vec![0; 6], vec![1.0; 2], 2, 3).is_ok());
        assert!(Int8Rows::from_parts(vec![0; 5], vec![1.0; 2], 2, 3).is_err());
        assert!(Int8Rows::from_parts(vec![0; 6], vec![1.0, f32::NAN], 2, 3).is_err());
    }

    #[test]
    fn q4_blocks_beat_plain_absmax_rounding_and_keep_exact_values() {
        let (n, k) = (5, 70); // two full blocks and a partial one, odd nibble count per row
        let w = lcg(4, n * k);
        let q = Q4Blocks::quantize(&w, n, k);
        assert_eq!(q.packed().len(), n * 35);
        assert_eq!(q.scales().len(), n * 3);
        let mut row = vec![0f32; k];
        for r in 0..n {
            q.row_into(r, &mut row);
            for (b, (got, want)) in row
                .chunks(Q4_BLOCK)
                .zip(w[r * k..(r + 1) * k].chunks(Q4_BLOCK))
                .enumerate()
            {
                // Never worse than every value rounded on the step absmax / 7.
                let s7 = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 7.0;
                let plain: f32 = want
                    .iter()
                    .map(|v| (v - (v / s7).round() * s7).powi(2))
                    .sum();
                let ours: f32 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
                assert!(
                    ours <= plain * (1.0 + 1e-5) + 1e-12,
                    "[{r}, block {b}] {ours} > {plain}"
                );
            }
        }
        // Values on a grid of the step come back exactly.
        let grid: Vec<f32> = (0..32).map(|i| 0.5 * ((i % 16) as f32 - 8.0)).collect();
        let g = Q4Blocks::quantize(&grid, 1, 32);
        let mut back = vec![0f32; 32];
        g.row_into(0, &mut back);
        assert_eq!(back, grid);
        let again = Q4Blocks::from_parts(q.packed().to_vec(), q.scales().to_vec(), n, k)
            .expect("valid parts");
        assert_eq!(again, q);
        assert!(Q4Blocks::from_parts(vec![0; 3], vec![1.0], 1, 7).is_err());
    }
}
