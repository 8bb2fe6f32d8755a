//! The portable flavour of the per-block steps: plain slice code for any CPU and head size,
//! written to auto-vectorise (see the parent module on why results do not depend on the
//! target's vector width).

use super::geometry::Geometry;
use super::walk::{BlockSteps, Rows, Running, Task};

/// The plain slice code below, for any CPU and head size.
pub(super) struct Portable;

impl BlockSteps for Portable {
    fn score(keys: &Rows<'_>, geo: &Geometry, slots: usize, task: &Task<'_>, scores: &mut [f32]) {
        score_block(keys, geo, slots, task, scores);
    }

    fn softmax(
        geo: &Geometry,
        slots: usize,
        out: &mut [f32],
        scores: &mut [f32],
        run: &mut Running,
    ) {
        rescale(geo, slots, out, scores, run);
    }

    fn accumulate(
        values: &Rows<'_>,
        geo: &Geometry,
        slots: usize,
        out: &mut [f32],
        scores: &[f32],
    ) {
        accumulate_values(values, geo, slots, out, scores);
    }

    fn normalise(geo: &Geometry, out: &mut [f32], sums: &[f32]) {
        for (head_out, &sum) in out.chunks_exact_mut(geo.head_dim).zip(sums) {
            let inv = 1.0 / sum;
            head_out.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// Fills `scores[g * block_size + j]` with the scaled score of head `g` against key `j`.
fn score_block(keys: &Rows<'_>, geo: &Geometry, slots: usize, task: &Task<'_>, scores: &mut [f32]) {
    for j in 0..slots {
        let key = keys.row(j, geo.head_dim);
        for (g, q) in task.q.chunks_exact(geo.head_dim).enumerate() {
            scores[g * geo.block_size + j] = dot(q, key) * task.scale;
        }
    }
}

/// Folds the block's scores into the running max and sum, rescales the partial outputs to
/// the new max, and turns the scores into unnormalised weights `exp(score - max)`.
fn rescale(geo: &Geometry, slots: usize, out: &mut [f32], scores: &mut [f32], run: &mut Running) {
    let heads = scores.chunks_exact_mut(geo.block_size);
    let outs = out.chunks_exact_mut(geo.head_dim);
    for (((scores, head_out), max), sum) in heads.zip(outs).zip(&mut run.max).zip(&mut run.sum) {
        let scores = &mut scores[..slots];
        let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let new_max = max.max(block_max);
        // exp(-inf - finite) is 0, which also clears the zero-initialised state on block 0.
        let alpha = (*max - new_max).exp();
        if alpha != 1.0 {
            *sum *= alpha;
            head_out.iter_mut().for_each(|x| *x *= alpha);
        }
        *max = new_max;
        for x in scores.iter_mut() {
            *x = (*x - new_max).exp();
        }
        *sum += scores.iter().sum::<f32>();
    }
}

/// Adds `weight * value` for every slot of the block to each head's partial output, four
/// slots per pass so each output element is loaded and stored a quarter as often.
fn accumulate_values(
    values: &Rows<'_>,
    geo: &Geometry,
    slots: usize,
    out: &mut [f32],
    scores: &[f32],
) {
    let hd = geo.head_dim;
    let quads = slots / 4 * 4;
    for j in (0..quads).step_by(4) {
        let rows = [0, 1, 2, 3].map(|i| values.row(j + i, hd));
        for (head_out, w) in out
            .chunks_exact_mut(hd)
            .zip(scores.chunks_exact(geo.block_size))
        {
            let w = [w[j], w[j + 1], w[j + 2], w[j + 3]];
            let lanes = rows[0].iter().zip(rows[1]).zip(rows[2]).zip(rows[3]);
            for (o, (((a, b), c), d)) in head_out.iter_mut().zip(lanes) {
                *o += (w[0] * a + w[1] * b) + (w[2] * c + w[3] * d);
            }
        }
    }
    for j in quads..slots {
        let row = values.row(j, hd);
        for (head_out, w) in out
            .chunks_exact_mut(hd)
            .zip(scores.chunks_exact(geo.block_size))
        {
            let w = w[j];
            for (o, &x) in head_out.iter_mut().zip(row) {
                *o += w * x;
            }
        }
    }
}

/// Dot product with sixteen independent partial sums, so the loop vectorises without
/// reassociating additions. The order of every addition is fixed by the code, hence the
/// result is deterministic. Kept out of line: inlined into the score loop, the compiler
/// re-vectorised it with shuffles, where on its own it compiles to plain 4-wide loads and
/// multiply-adds.
#[inline(never)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let (a16, b16) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0.0f32; LANES];
    for (xa, xb) in a16.zip(b16) {
        // Fixed-length views let the compiler unroll into full-width vector code; the
        // conversions cannot fail on `chunks_exact` chunks.
        if let (Ok(xa), Ok(xb)) = (<&[f32; LANES]>::try_from(xa), <&[f32; LANES]>::try_from(xb)) {
            for ((s, x), y) in acc.iter_mut().zip(xa).zip(xb) {
                *s += x * y;
            }
        }
    }
    // Fold as four 4-wide vectors, then across: this shape keeps the loop above 4 lanes
    // wide (a halving fold makes the compiler pair lanes instead).
    let quad: [f32; 4] =
        std::array::from_fn(|i| (acc[i] + acc[i + 4]) + (acc[i + 8] + acc[i + 12]));
    (quad[0] + quad[1]) + (quad[2] + quad[3]) + tail
}
