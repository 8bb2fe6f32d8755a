//! Synthetic random-weight Llama checkpoints, generated on the spot (no network, no download).
//!
//! Weights come from a seeded xorshift generator, so a spec always builds the same model.
//! Used at run time by `tandem-loadtest tiny-model` (a checkpoint for load tests with
//! thousands of sessions) and by [`crate::random_model`] (8B-shaped models for `tandem
//! bench`), and by every test of the workspace through `tandem-testkit`'s `tiny` module. The weights are random: the models generate noise, at
//! the speed and memory cost of a real model of their shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// The shape of a tiny model.
#[derive(Clone, Debug)]
pub struct TinySpec {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
    pub llama3_rope: bool,
    /// Split the weights over this many safetensors files.
    pub shards: usize,
    pub seed: u64,
}

impl TinySpec {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// Several shapes: GQA and not, tied and untied, sharded, Llama 3 rotary scaling.
pub fn specs() -> Vec<TinySpec> {
    vec![
        TinySpec {
            name: "gqa-tied",
            hidden: 64,
            intermediate: 128,
            vocab: 300,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            tied: true,
            llama3_rope: false,
            shards: 1,
            seed: 1,
        },
        TinySpec {
            name: "mha-untied-sharded",
            hidden: 48,
            intermediate: 96,
            vocab: 280,
            layers: 3,
            heads: 4,
            kv_heads: 4,
            tied: false,
            llama3_rope: false,
            shards: 3,
            seed: 2,
        },
        TinySpec {
            name: "gqa8-llama3-rope",
            hidden: 64,
            intermediate: 160,
            vocab: 290,
            layers: 5,
            heads: 8,
            kv_heads: 2,
            tied: false,
            llama3_rope: true,
            shards: 2,
            seed: 3,
        },
    ]
}

/// Deterministic pseudo-random numbers (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
}

fn uniform(rng: &mut Rng, shape: &[usize], scale: f32, offset: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| offset + scale * rng.unit()).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The HF `config.json` text of a spec.
pub fn config_json(s: &TinySpec) -> serde_json::Value {
    let mut cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "vocab_size": s.vocab,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": s.tied,
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
        "torch_dtype": "float32",
    });
    if s.llama3_rope {
        cfg["rope_theta"] = serde_json::json!(500000.0);
        cfg["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64
        });
    }
    cfg
}

/// All tensors of a spec, HF names, f32.
pub fn tensors(s: &TinySpec) -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng::new(s.seed);
    let (h, f, d) = (s.hidden, s.intermediate, s.head_dim());
    let (q, kv) = (s.heads * d, s.kv_heads * d);
    let wh = 2.5 / (h as f32).sqrt();
    let wf = 2.5 / (f as f32).sqrt();
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        uniform(&mut rng, &[s.vocab, h], 0.3, 0.0)?,
    )];
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            uniform(&mut rng, &[h], 0.2, 1.0)?,
        ));
        out.push((
            format!("{p}.self_attn.q_proj.weight"),
            uniform(&mut rng, &[q, h], wh, 0.0)?,
        ));
        out.push((
            format!("{p}.self_attn.k_proj.weight"),
            uniform(&mut rng, &[kv, h], wh, 0.0)?,
        ));
        out.push((
            format!("{p}.self_attn.v_proj.weight"),
            uniform(&mut rng, &[kv, h], wh, 0.0)?,
        ));
        out.push((
            format!("{p}.self_attn.o_proj.weight"),
            uniform(&mut rng, &[h, q], wh, 0.0)?,
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            uniform(&mut rng, &[h], 0.2, 1.0)?,
        ));
        out.push((
            format!("{p}.mlp.gate_proj.weight"),
            uniform(&mut rng, &[f, h], wh, 0.0)?,
        ));
        out.push((
            format!("{p}.mlp.up_proj.weight"),
            uniform(&mut rng, &[f, h], wh, 0.0)?,
        ));
        out.push((
            format!("{p}.mlp.down_proj.weight"),
            uniform(&mut rng, &[h, f], wf, 0.0)?,
        ));
    }
    out.push((
        "model.norm.weight".to_string(),
        uniform(&mut rng, &[h], 0.2, 1.0)?,
    ));
    if !s.tied {
        out.push((
            "lm_head.weight".to_string(),
            uniform(&mut rng, &[s.vocab, h], wh * 2.0, 0.0)?,
        ));
    }
    Ok(out)
}

/// Writes a spec as an HF directory under `dir` (config.json + safetensors shards).
/// Returns the safetensors files written.
pub fn write_hf(dir: &Path, s: &TinySpec) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_json(&dir.join("config.json"), &config_json(s), true)?;
    let all = tensors(s)?;
    let per = all.len().div_ceil(s.shards.max(1));
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in all.chunks(per).enumerate() {
        let name = if s.shards <= 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, s.shards)
        };
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        for k in map.keys() {
            weight_map.insert(k.clone(), name.clone().into());
        }
        let path = dir.join(&name);
        candle_core::safetensors::save(&map, &path)?;
        files.push(path);
    }
    if s.shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index, false)?;
    }
    Ok(files)
}

/// Writes `value` as JSON, indented or compact.
fn write_json(path: &Path, value: &serde_json::Value, pretty: bool) -> Result<()> {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    }
    .map_err(|e| ModelError::Input(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// A deterministic prompt of `len` token ids in `[4, vocab)`.
pub fn prompt(s: &TinySpec, len: usize) -> Vec<u32> {
    let mut rng = Rng::new(s.seed + 100);
    (0..len)
        .map(|_| 4 + rng.below(s.vocab as u32 - 4))
        .collect()
}

/// GPT-2's byte → printable-character map used by byte-level BPE vocabularies.
pub fn byte_chars() -> Vec<char> {
    let mut direct: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut out = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if direct.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        // `c` is below 256 + 256: always a valid scalar value.
        out[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    direct.clear();
    out
}

/// Special tokens of the tiny tokenizer, at ids 0..4.
pub const SPECIALS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"];

/// A ChatML template like SmolLM2's.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Writes `tokenizer.json` (byte-level BPE: 4 special tokens then the 256 bytes, a few merges)
/// and `tokenizer_config.json` (ChatML template) into `dir`. Needs a vocabulary of >= 264.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    write_tokenizer_sized(dir, 0)
}

/// [`write_tokenizer`] with the vocabulary padded to `vocab` entries (when larger) by
/// three-letter ASCII tokens, so that every id a model of that vocabulary samples decodes
/// to text (random-weight models at real shapes sample all over their vocabulary).
pub fn write_tokenizer_sized(dir: &Path, vocab_size: usize) -> Result<()> {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (SPECIALS.len() + b).into());
    }
    let merges = [("h", "e"), ("l", "l"), ("he", "ll")];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), (SPECIALS.len() + 256 + i).into());
    }
    let letters: Vec<char> = ('a'..='z').chain('A'..='Z').collect();
    let mut extra = (0..).map(|i: usize| {
        let l = letters.len();
        [i / (l * l) % l, i / l % l, i % l]
            .iter()
            .map(|&j| letters[j])
            .collect::<String>()
    });
    while vocab.len() < vocab_size.min(letters.len().pow(3)) {
        let id = vocab.len();
        vocab.insert(extra.next().unwrap_or_default(), id.into());
    }
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    });
    write_json(&dir.join("tokenizer.json"), &tok, false)?;
    let cfg = serde_json::json!({"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"});
    write_json(&dir.join("tokenizer_config.json"), &cfg, false)
}
