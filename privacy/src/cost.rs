//! What the device pays for a split depth `k`: weight memory, KV-cache memory per token, and
//! arithmetic per token. Counted from the configuration, not measured.
//!
//! - Weights: the embedding matrix (`V × d`) plus, per edge layer, the Q/K/V/O projections,
//!   the three MLP matrices and the two norm vectors.
//! - KV per token: `k × 2 × kv_heads × head_dim` values.
//! - FLOPs per token: `2 ×` the edge layers' matrix parameters (one multiply-add each), plus
//!   attention over a context of `c` positions: `k × 2 × 2 × heads × head_dim × c` (scores and
//!   the weighted sum). The embedding is a lookup. Norms, rotary and activations are left out
//!   (under 1% here).

use serde::Serialize;
use tandem_model::LlamaConfig;

/// The edge's costs at one split depth.
#[derive(Clone, Debug, Serialize)]
pub struct EdgeCost {
    pub edge_layers: usize,
    /// Parameters held on the device (embedding included).
    pub params: u64,
    pub weights_bytes_f32: u64,
    pub weights_bytes_bf16: u64,
    /// Of which the embedding matrix.
    pub embedding_params: u64,
    pub kv_bytes_per_token_f32: u64,
    pub kv_bytes_per_token_bf16: u64,
    /// Context length the attention FLOPs are counted at.
    pub context: usize,
    pub flops_per_token: u64,
}

/// The costs of running the embedding and layers `[0, k)` of `cfg`.
pub fn edge_cost(cfg: &LlamaConfig, k: usize, context: usize) -> EdgeCost {
    let (h, f) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (q, kv) = (cfg.q_size() as u64, cfg.kv_size() as u64);
    let layer_matrix = h * q + 2 * h * kv + q * h + 3 * h * f;
    let layer_params = layer_matrix + 2 * h;
    let embedding = cfg.vocab_size as u64 * h;
    let params = embedding + k as u64 * layer_params;
    let kv_values = k as u64 * 2 * kv;
    let attention = 2 * 2 * cfg.num_attention_heads as u64 * cfg.head_dim as u64 * context as u64;
    EdgeCost {
        edge_layers: k,
        params,
        weights_bytes_f32: params * 4,
        weights_bytes_bf16: params * 2,
        embedding_params: embedding,
        kv_bytes_per_token_f32: kv_values * 4,
        kv_bytes_per_token_bf16: kv_values * 2,
        context,
        flops_per_token: k as u64 * (2 * layer_matrix + attention),
    }
}

/// A plain-text table of `costs`.
pub fn render(costs: &[EdgeCost]) -> String {
    let mut s = String::from(
        "edge k | params | weights f32 | weights bf16 | KV/token f32 | KV/token bf16 | MFLOPs/token (ctx)\n",
    );
    for c in costs {
        s.push_str(&format!(
            "{:>6} | {:>6.1}M | {:>8.1} MiB | {:>9.1} MiB | {:>9.1} KiB | {:>10.1} KiB | {:>8.1} ({})\n",
            c.edge_layers,
            c.params as f64 / 1e6,
            c.weights_bytes_f32 as f64 / 1048576.0,
            c.weights_bytes_bf16 as f64 / 1048576.0,
            c.kv_bytes_per_token_f32 as f64 / 1024.0,
            c.kv_bytes_per_token_bf16 as f64 / 1024.0,
            c.flops_per_token as f64 / 1e6,
            c.context
        ));
    }
    s
}
