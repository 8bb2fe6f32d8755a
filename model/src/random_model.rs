//! Random-weight bf16 checkpoints with the exact shapes of real Llama models (Llama-3.2-1B,
//! Llama-3.2-3B, Llama-3.1-8B): layers, hidden and intermediate sizes, GQA heads, the
//! 128,256-token vocabulary, llama3 rope scaling, tied or untied heads as the real ones are.
//!
//! They exist to measure the engine at real scale (load time, resident memory, tokens/s)
//! without the real weights, which this project never downloads: the cost of a forward pass
//! depends on the shapes, not on the values. The tokenizer is the tests' byte-level one with
//! its vocabulary padded to the model's ([`crate::synthetic::write_tokenizer_sized`]), so every
//! sampled id decodes. Generated on demand (seconds per GB, in parallel), never committed.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::DType;

use crate::error::{ModelError, Result};
use crate::layers::layer_tensor_specs;
use crate::synthetic::Rng;
use crate::weights::start_safetensors;

/// The shape of a real model.
#[derive(Clone, Debug, PartialEq)]
pub struct RealShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    /// llama3 rope scaling factor.
    pub rope_factor: f64,
}

/// The shapes this module writes (from the models' published `config.json`).
pub const SHAPES: [RealShape; 4] = [
    RealShape {
        name: "llama-3.2-1b",
        hidden: 2048,
        intermediate: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        vocab: 128_256,
        tied: true,
        rope_factor: 32.0,
    },
    RealShape {
        name: "llama-3.2-3b",
        hidden: 3072,
        intermediate: 8192,
        layers: 28,
        heads: 24,
        kv_heads: 8,
        vocab: 128_256,
        tied: true,
        rope_factor: 32.0,
    },
    RealShape {
        name: "llama-3.1-8b",
        hidden: 4096,
        intermediate: 14_336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        vocab: 128_256,
        tied: false,
        rope_factor: 8.0,
    },
    // Not a published model: Llama's layout at a size that loads in a second, for checking
    // one device against another (`tandem device-check`, scripts/gpu-check.sh).
    RealShape {
        name: "tiny",
        hidden: 512,
        intermediate: 1408,
        layers: 4,
        heads: 8,
        kv_heads: 2,
        vocab: 4096,
        tied: false,
        rope_factor: 8.0,
    },
];

impl RealShape {
    /// A shape by name (`llama-3.2-1b`, `llama-3.2-3b`, `llama-3.1-8b`, `tiny`).
    pub fn named(name: &str) -> Result<&'static RealShape> {
        SHAPES.iter().find(|s| s.name == name).ok_or_else(|| {
            ModelError::Input(format!(
                "unknown shape `{name}` (one of {})",
                SHAPES.map(|s| s.name).join(", ")
            ))
        })
    }

    /// Parameters in the checkpoint.
    pub fn parameters(&self) -> usize {
        let (h, f) = (self.hidden, self.intermediate);
        let d = h / self.heads;
        let (q, kv) = (self.heads * d, self.kv_heads * d);
        let layer = 2 * h + h * (q + 2 * kv) + q * h + 3 * h * f;
        self.vocab * h * if self.tied { 1 } else { 2 } + h + self.layers * layer
    }

    /// The HF `config.json`.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden / self.heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3", "factor": self.rope_factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": self.tied,
            "bos_token_id": 1,
            "eos_token_id": [2, 3],
            "torch_dtype": "bfloat16",
        })
    }

    /// Every tensor's HF name and shape, in file order.
    fn specs(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let cfg = crate::LlamaConfig::from_hf_json(
            &self.config_json().to_string(),
            Path::new("config.json"),
        )?;
        let h = self.hidden;
        let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for i in 0..self.layers {
            specs.extend(layer_tensor_specs(&cfg, i));
        }
        specs.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            specs.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        Ok(specs)
    }
}

/// Writes `shape` with random bf16 weights (seeded) as an HF directory: `config.json`,
/// `model.safetensors`, a tokenizer. `progress(done, total)` is called after each tensor
/// with bytes written. Returns the safetensors file's size.
pub fn write(
    dir: &Path,
    shape: &RealShape,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config = dir.join("config.json");
    let text = serde_json::to_string_pretty(&shape.config_json())
        .map_err(|e| ModelError::Input(e.to_string()))?;
    std::fs::write(&config, text).map_err(|e| ModelError::io(&config, e))?;
    crate::synthetic::write_tokenizer_sized(dir, shape.vocab)?;
    let specs = shape.specs()?;
    let path = dir.join("model.safetensors");
    let (mut w, total) = start_safetensors(&path, &specs, DType::BF16, &HashMap::new())?;
    let mut done = 0u64;
    for (i, (name, dims)) in specs.iter().enumerate() {
        let bytes = random_bf16(name, dims, seed.wrapping_add(i as u64));
        w.write_all(&bytes).map_err(|e| ModelError::io(&path, e))?;
        done += bytes.len() as u64;
        progress(done, total);
    }
    w.flush().map_err(|e| ModelError::io(&path, e))?;
    Ok(total)
}

/// One tensor's little-endian bf16 bytes: norms are 1 ± 0.1; the embedding ±0.05; a
/// projection `[out, in]` uniform in ±√(3 / in) (unit-variance outputs for unit inputs).
/// Generated in parallel, 1 Mi values per seeded piece.
fn random_bf16(name: &str, dims: &[usize], seed: u64) -> Vec<u8> {
    use rayon::prelude::*;
    let n: usize = dims.iter().product();
    let (scale, offset) = if dims.len() == 1 {
        (0.1, 1.0)
    } else if name.contains("embed_tokens") {
        (0.05, 0.0)
    } else {
        ((3.0 / dims[1] as f32).sqrt(), 0.0)
    };
    let mut bytes = vec![0u8; 2 * n];
    const PIECE: usize = 1 << 21;
    bytes
        .par_chunks_mut(PIECE)
        .enumerate()
        .for_each(|(piece, out)| {
            let mut rng = Rng::new(seed.wrapping_mul(1 << 20).wrapping_add(piece as u64));
            for v in out.chunks_exact_mut(2) {
                let x = offset + scale * rng.unit();
                v.copy_from_slice(&tandem_kernels::gemm_bf16::bf16_bits(x).to_le_bytes());
            }
        });
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_published_parameter_counts() {
        // Llama-3.2-1B: 1.24 B; 3.2-3B: 3.21 B; 3.1-8B: 8.03 B.
        let want = [1.235_814_4e9, 3.212_749_8e9, 8.030_261_2e9];
        for (s, want) in SHAPES.iter().zip(want) {
            let got = s.parameters() as f64;
            assert!(
                (got - want).abs() / want < 1e-3,
                "{}: {got} parameters",
                s.name
            );
        }
        for s in &SHAPES {
            let from_specs: usize = s
                .specs()
                .expect("specs")
                .iter()
                .map(|(_, d)| d.iter().product::<usize>())
                .sum();
            assert_eq!(from_specs, s.parameters(), "{}", s.name);
        }
        assert!(RealShape::named("llama-3.1-8b").is_ok());
        assert!(RealShape::named("gpt-5").is_err());
    }
}
