//! The rows the audit works on: the noise-free reference run of a prompt, rows released
//! through noise and the wire, the cloud's logits over them, the learned attacker's training
//! sequences, and the seeds of every random stream.
//!
//! Every random stream is seeded with [`mix`] from the run's seed and a coordinate (cell,
//! prompt, purpose), so a cell's results do not depend on which other cells run.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_model::layers::ForwardCtx;
use tandem_model::privacy::RowNoiser;
use tandem_model::{CloudModel, ContiguousKv, EdgeModel};
use tandem_protocol::{f32_to_hidden, hidden_to_f32, HiddenDtype};

use super::settings::AuditSettings;
use crate::prompts::AuditPrompt;

/// The noise-free reference for one prompt at one depth.
pub(super) struct Reference {
    /// Edge rows of the prompt followed by the teacher-forced output tokens.
    pub(super) rows: Vec<f32>,
    /// Argmax tokens and logits of each step.
    pub(super) tokens: Vec<u32>,
    pub(super) logits: Vec<Vec<f32>>,
}

/// A reproducible stream seed from the run seed and a cell/prompt coordinate.
pub(super) fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        x = x.wrapping_add(p).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 29;
    }
    x
}

/// Clip and noise (when `noiser`), then the wire's encode/decode round trip.
pub(super) fn release(
    rows: &[f32],
    d: usize,
    noiser: Option<&mut RowNoiser>,
    wire: HiddenDtype,
) -> Result<Vec<f32>> {
    let mut v = rows.to_vec();
    if let Some(n) = noiser {
        n.apply(&mut v, d)?;
    }
    let n = v.len() / d;
    let mut payload = Vec::new();
    f32_to_hidden(wire, n, d, &v, &mut payload)?;
    let mut out = Vec::new();
    hidden_to_f32(wire, n, d, &payload, &mut out)?;
    Ok(out)
}

/// Logits `[rows, V]` of the cloud over all of `rows` (one sequence from position 0).
pub(super) fn cloud_logits(cloud: &CloudModel, rows: &[f32], d: usize) -> Result<Vec<Vec<f32>>> {
    let n = rows.len() / d;
    let cfg = cloud.config();
    let mut kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
    let ctx = ForwardCtx::single(0, n);
    let h = Tensor::from_slice(rows, (n, d), &Device::Cpu)?.to_dtype(cloud.dtype())?;
    let x = cloud.forward_layers(&h, &ctx, &mut kv)?;
    Ok(cloud.logits(&x)?.to_vec2()?)
}

pub(super) fn argmax(v: &[f32]) -> u32 {
    tandem_model::sampling::argmax(v)
}

/// Token sequences for training the learned attacker: the generic text in pieces, then
/// random tokens; each starts with BOS when there is one.
pub(super) fn training_sequences(
    generic: &[u32],
    bos: Option<u32>,
    settings: &AuditSettings,
    vocab: usize,
    excluded: &[u32],
) -> Vec<Vec<u32>> {
    let len = settings.train_seq_len.max(2);
    let body = len - usize::from(bos.is_some());
    let mut out = Vec::new();
    for piece in generic.chunks(body) {
        out.push(bos.into_iter().chain(piece.iter().copied()).collect());
    }
    let mut rng = StdRng::seed_from_u64(mix(settings.seed, &[0xDA7A]));
    for _ in 0..settings.random_sequences {
        let mut s: Vec<u32> = bos.into_iter().collect();
        while s.len() < len {
            let t = rng.random_range(0..vocab as u32);
            if !excluded.contains(&t) {
                s.push(t);
            }
        }
        out.push(s);
    }
    out
}

pub(super) fn median_norm(rows: &[f32], d: usize) -> f32 {
    let mut norms: Vec<f32> = rows
        .chunks_exact(d)
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    if norms.is_empty() {
        return 1.0;
    }
    norms.sort_by(f32::total_cmp);
    norms[norms.len() / 2]
}

/// The noise-free f32 run: greedy tokens from the prompt, then the edge rows of the prompt
/// followed by those tokens (what the device sends under teacher forcing).
pub(super) fn reference(
    edge: &EdgeModel,
    cloud: &CloudModel,
    p: &AuditPrompt,
    steps: usize,
) -> Result<Reference> {
    let d = edge.config().hidden_size;
    let n = edge.config().num_hidden_layers;
    let max = edge.config().max_position_embeddings;
    let (mut ekv, mut ckv) = (ContiguousKv::new(n, max), ContiguousKv::new(n, max));
    let mut input = p.ids.clone();
    let mut pos = 0;
    let mut rows: Vec<f32> = Vec::new();
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..steps.max(1) {
        let ctx = ForwardCtx::single(pos, input.len());
        let h = edge.forward(&input, &ctx, &mut ekv)?;
        rows.extend(h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        let l: Vec<f32> = cloud.forward(&h, &ctx, &mut ckv)?.squeeze(0)?.to_vec1()?;
        pos += input.len();
        let t = argmax(&l);
        tokens.push(t);
        logits.push(l);
        input = vec![t];
    }
    debug_assert_eq!(rows.len() / d, p.ids.len() + steps.max(1) - 1);
    Ok(Reference {
        rows,
        tokens,
        logits,
    })
}
