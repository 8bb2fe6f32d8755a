//! The Llama model configuration, read from an HF `config.json` or from GGUF metadata.
//!
//! [`LlamaConfig`] is the validated form: once built, every field is consistent (heads divide
//! evenly, the head dimension is even, the rotary scaling is one Tandem implements). Loaders
//! read a format-specific raw form and turn it into this one, so that layer code never has to
//! second-guess the numbers it is given.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Llama 3.x frequency-dependent rotary scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// How the rotary inverse frequencies deviate from the plain `theta^(-2i/d)` ladder.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// The Llama 3.x rule, as written in HF configs.
    Llama3(Llama3RopeScaling),
    /// Per-frequency divisors, as llama.cpp stores them in GGUF (`rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// A validated Llama configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every token id that ends a generation (Llama 3 lists several).
    pub eos_token_ids: Vec<u32>,
}

/// The fields of an HF `config.json` that matter to a Llama model.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f32,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![id],
            Self::Many(ids) => ids,
        }
    }
}

fn default_rope_theta() -> f32 {
    10_000.0
}

fn default_max_positions() -> usize {
    4096
}

impl LlamaConfig {
    /// Reads and validates an HF `config.json`. A `generation_config.json` beside it, when
    /// present, adds its eos ids (chat models often list their end-of-turn token only there).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let mut cfg = Self::from_hf_json(&text, path)?;
        if let Some(dir) = path.parent() {
            let gen_path = dir.join("generation_config.json");
            if gen_path.is_file() {
                let text =
                    std::fs::read_to_string(&gen_path).map_err(|e| ModelError::io(&gen_path, e))?;
                #[derive(Deserialize)]
                struct GenConfig {
                    eos_token_id: Option<OneOrMany>,
                }
                let gen: GenConfig =
                    serde_json::from_str(&text).map_err(|e| ModelError::Format {
                        path: gen_path.clone(),
                        format: "JSON",
                        reason: e.to_string(),
                    })?;
                for id in gen
                    .eos_token_id
                    .map(OneOrMany::into_vec)
                    .unwrap_or_default()
                {
                    if !cfg.eos_token_ids.contains(&id) {
                        cfg.eos_token_ids.push(id);
                    }
                }
            }
        }
        Ok(cfg)
    }

    /// Parses HF `config.json` text; `path` is only used in error messages.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| ModelError::Config {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| ModelError::Config {
            path: path.into(),
            reason,
        };
        let arch_ok = raw.model_type.as_deref().is_none_or(|t| t == "llama")
            && raw
                .architectures
                .iter()
                .all(|a| a == "LlamaForCausalLM" || a == "LlamaModel");
        if !arch_ok {
            let arch = raw
                .model_type
                .clone()
                .or_else(|| raw.architectures.first().cloned())
                .unwrap_or_default();
            return Err(ModelError::UnsupportedArchitecture {
                path: path.into(),
                arch,
            });
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err(bad("attention_bias / mlp_bias are not supported".into()));
        }
        let rope_scaling = match raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => parse_hf_rope_scaling(v).map_err(bad)?,
        };
        let heads = raw.num_attention_heads;
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if heads > 0 => raw.hidden_size / heads,
            None => 0,
        };
        let cfg = Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            vocab_size: raw.vocab_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Builds the configuration from GGUF metadata (architecture `llama`).
    ///
    /// `rope_factors` is the content of the optional `rope_freqs.weight` tensor, which llama.cpp
    /// uses to store Llama 3.x rotary scaling. `has_output` says whether the file has a separate
    /// `output.weight` (when it does not, the embedding is tied).
    pub fn from_gguf(
        content: &gguf_file::Content,
        path: &Path,
        rope_factors: Option<Vec<f32>>,
    ) -> Result<Self> {
        let md = GgufMeta { content, path };
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| md.bad("missing `general.architecture`".into()))?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.into(),
                arch,
            });
        }
        let hidden_size = md.need_uint("llama.embedding_length")?;
        let heads = md.need_uint("llama.attention.head_count")?;
        let vocab_size = md.vocab_size()?;
        let head_dim = match md.uint("llama.attention.key_length")? {
            Some(d) => d,
            None if heads > 0 => hidden_size / heads,
            None => 0,
        };
        let bos = md.uint("tokenizer.ggml.bos_token_id")?.map(|v| v as u32);
        let eos_token_ids = md.eos_token_ids()?;
        let cfg = Self {
            hidden_size,
            intermediate_size: md.need_uint("llama.feed_forward_length")?,
            vocab_size,
            num_hidden_layers: md.need_uint("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: md.uint("llama.attention.head_count_kv")?.unwrap_or(heads),
            head_dim,
            rms_norm_eps: md
                .float("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            rope_theta: md.float("llama.rope.freq_base")?.unwrap_or(10_000.0) as f32,
            rope_scaling: rope_factors.map(RopeScaling::Factors),
            max_position_embeddings: md.uint("llama.context_length")?.unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            bos_token_id: bos,
            eos_token_ids,
        };
        cfg.validate().map_err(|reason| md.bad(reason))?;
        Ok(cfg)
    }

    /// Checks that the numbers fit together; returns a human-readable reason when not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for rotary",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err("rms_norm_eps must be positive".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err("rope_theta must be positive".into());
        }
        if let Some(RopeScaling::Factors(f)) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return Err(format!(
                    "rope_freqs has {} entries, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        for &id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if id as usize >= self.vocab_size {
                return Err(format!(
                    "special token id {id} is outside the vocabulary ({})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Query/output projection width: `heads * head_dim` (not always `hidden_size`).
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Key/value projection width: `kv_heads * head_dim`.
    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The rotary inverse frequencies, one per pair of head dimensions, scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / self.rope_theta.powf(i as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Factors(f)) => base.iter().zip(f).map(|(b, f)| b / f).collect(),
            Some(RopeScaling::Llama3(s)) => {
                let orig = s.original_max_position_embeddings as f32;
                let low_wavelen = orig / s.low_freq_factor;
                let high_wavelen = orig / s.high_freq_factor;
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2. * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / s.factor
                        } else {
                            let smooth = (orig / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1. - smooth) * freq / s.factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }

    /// The configuration as an HF `config.json` object, which [`Self::from_hf_json`] reads back
    /// to an equal value (GGUF rope factors are written as `rope_freqs` so nothing is lost).
    pub fn to_hf_json(&self, torch_dtype: &str) -> serde_json::Value {
        let rope_scaling = match &self.rope_scaling {
            None => serde_json::Value::Null,
            Some(RopeScaling::Llama3(s)) => serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
            Some(RopeScaling::Factors(f)) => serde_json::json!({
                "rope_type": "tandem_factors",
                "factors": f,
            }),
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": torch_dtype,
        })
    }
}

fn parse_hf_rope_scaling(v: serde_json::Value) -> std::result::Result<Option<RopeScaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default")
        .to_string();
    match kind.as_str() {
        "default" => Ok(None),
        "llama3" => serde_json::from_value::<Llama3RopeScaling>(v)
            .map(|s| Some(RopeScaling::Llama3(s)))
            .map_err(|e| format!("rope_scaling: {e}")),
        "tandem_factors" => {
            let factors: Vec<f32> = v
                .get("factors")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| format!("rope_scaling.factors: {e}"))?
                .ok_or("rope_scaling.factors missing")?;
            Ok(Some(RopeScaling::Factors(factors)))
        }
        other => Err(format!("rope_scaling type `{other}` is not supported")),
    }
}

/// The GGUF metadata [`LlamaConfig::from_gguf`] reads, with errors that name the file.
struct GgufMeta<'a> {
    content: &'a gguf_file::Content,
    path: &'a Path,
}

impl GgufMeta<'_> {
    fn bad(&self, reason: String) -> ModelError {
        ModelError::Config {
            path: self.path.into(),
            reason,
        }
    }

    /// An unsigned integer; `None` when the key is absent.
    fn uint(&self, key: &str) -> Result<Option<usize>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => gguf_uint(v)
                .map(Some)
                .ok_or_else(|| self.bad(format!("`{key}` is not an unsigned integer"))),
        }
    }

    /// An unsigned integer that must be present.
    fn need_uint(&self, key: &str) -> Result<usize> {
        self.uint(key)?
            .ok_or_else(|| self.bad(format!("missing `{key}`")))
    }

    /// A float; `None` when the key is absent.
    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            // GGUF stores f32; go through the shortest decimal form so that 1e-5 stays
            // 1e-5 in f64 and the config compares equal to the HF one.
            Some(v) => v
                .to_f32()
                .map(|x| x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
                .or_else(|_| v.to_f64())
                .map(Some)
                .map_err(|_| self.bad(format!("`{key}` is not a float"))),
        }
    }

    /// `llama.vocab_size`, else the length of the token list, else the rows of the
    /// embedding table.
    fn vocab_size(&self) -> Result<usize> {
        Ok(match self.uint("llama.vocab_size")? {
            Some(v) => v,
            None => match self
                .content
                .metadata
                .get("tokenizer.ggml.tokens")
                .map(|v| v.to_vec())
            {
                Some(Ok(tokens)) => tokens.len(),
                _ => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| self.bad("cannot tell the vocabulary size".into()))?,
            },
        })
    }

    /// The EOS id, then the end-of-turn id when it differs.
    fn eos_token_ids(&self) -> Result<Vec<u32>> {
        let mut eos_token_ids: Vec<u32> = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = self.uint(key)? {
                let id = id as u32;
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        Ok(eos_token_ids)
    }
}

fn gguf_uint(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x as usize),
        V::U16(x) => Some(x as usize),
        V::U32(x) => Some(x as usize),
        V::U64(x) => usize::try_from(x).ok(),
        V::I8(x) => usize::try_from(x).ok(),
        V::I16(x) => usize::try_from(x).ok(),
        V::I32(x) => usize::try_from(x).ok(),
        V::I64(x) => usize::try_from(x).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(extra: &str) -> String {
        format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "vocab_size": 100,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 256 {extra}}}"#
        )
    }

    #[test]
    fn reads_hf_config_with_defaults() {
        let cfg = LlamaConfig::from_hf_json(&json(""), Path::new("c.json")).expect("valid");
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.rope_theta, 10_000.0);
        assert!(!cfg.tie_word_embeddings);
        assert!(cfg.eos_token_ids.is_empty());
        assert_eq!(cfg.kv_size(), 32);
    }

    #[test]
    fn eos_list_and_explicit_head_dim() {
        let cfg = LlamaConfig::from_hf_json(
            &json(r#", "eos_token_id": [7, 9], "head_dim": 32, "tie_word_embeddings": true"#),
            Path::new("c.json"),
        )
        .expect("valid");
        assert_eq!(cfg.eos_token_ids, vec![7, 9]);
        assert_eq!(cfg.head_dim, 32);
        assert_eq!(cfg.q_size(), 128);
        assert!(cfg.tie_word_embeddings);
    }

    #[test]
    fn llama3_rope_scaling_changes_low_frequencies_only() {
        let cfg = LlamaConfig::from_hf_json(
            &json(
                r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}"#,
            ),
            Path::new("c.json"),
        )
        .expect("valid");
        let mut plain = cfg.clone();
        plain.rope_scaling = None;
        let (scaled, base) = (cfg.rope_inv_freq(), plain.rope_inv_freq());
        assert_eq!(scaled[0], base[0], "highest frequency untouched");
        let last = base.len() - 1;
        assert!(
            (scaled[last] - base[last] / 8.0).abs() < 1e-12,
            "lowest divided by factor"
        );
    }

    #[test]
    fn rejects_bad_configs_with_reasons() {
        let path = Path::new("c.json");
        let e = LlamaConfig::from_hf_json(&json(r#", "model_type": "mistral""#), path)
            .expect_err("wrong arch");
        assert!(
            matches!(e, ModelError::UnsupportedArchitecture { ref arch, .. } if arch == "mistral")
        );
        let e = LlamaConfig::from_hf_json(&json(r#", "num_key_value_heads": 3"#), path);
        assert!(e.is_err());
        let e = LlamaConfig::from_hf_json(
            &json(r#", "rope_scaling": {"type": "yarn", "factor": 4.0}"#),
            path,
        )
        .expect_err("yarn");
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = LlamaConfig::from_hf_json(&json(r#", "eos_token_id": 100"#), path);
        assert!(e.is_err(), "eos outside vocab");
        let e = LlamaConfig::from_hf_json("{", path).expect_err("bad json");
        assert!(e.to_string().contains("c.json"), "{e}");
    }

    #[test]
    fn hf_json_round_trip() {
        let cfg = LlamaConfig::from_hf_json(
            &json(r#", "eos_token_id": [1, 2], "bos_token_id": 0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}"#),
            Path::new("c.json"),
        )
        .expect("valid");
        let text = cfg.to_hf_json("float32").to_string();
        let back = LlamaConfig::from_hf_json(&text, Path::new("c.json")).expect("valid");
        assert_eq!(cfg, back);
        let mut factors = cfg.clone();
        factors.rope_scaling = Some(RopeScaling::Factors(vec![
            1.0, 2.0, 4.0, 8.0, 1.0, 1.0, 1.0, 1.0,
        ]));
        let text = factors.to_hf_json("float32").to_string();
        let back = LlamaConfig::from_hf_json(&text, Path::new("c.json")).expect("valid");
        assert_eq!(factors, back);
    }
}
