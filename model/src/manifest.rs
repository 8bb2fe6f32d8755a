//! The manifest of a split part (`manifest.json`).
//!
//! A manifest says which model a part was cut from (name, format and a SHA-256 over the source
//! files), where it was cut, the shapes that the two sides must agree on, the dtype of the
//! hidden states, and the weights file the part ships with. The edge and the cloud each carry
//! one; [`Manifest::pair_id`] is a hash over exactly the fields they must share, and
//! [`check_pair`] refuses two parts whose manifests do not belong together, naming the first
//! field that differs.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// The manifest format this code writes and reads.
pub const MANIFEST_FORMAT: &str = "tandem-split/1";
/// File name of the manifest inside a part directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Which side of the split a part is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Edge,
    Cloud,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Edge => "edge",
            Self::Cloud => "cloud",
        })
    }
}

/// The model a part was cut from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceModel {
    /// File or directory name of the source checkpoint.
    pub name: String,
    /// `safetensors` or `gguf`.
    pub format: String,
    /// SHA-256 over the source files (see [`crate::checkpoint::hash_source`]).
    pub sha256: String,
}

/// The weights file a part ships with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsFile {
    pub file: String,
    pub bytes: u64,
    pub tensors: usize,
}

/// The manifest of one part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub part: Part,
    pub source: SourceModel,
    /// Layers on the edge (`k`).
    pub edge_layers: usize,
    /// Layers in the whole model (`n`).
    pub num_layers: usize,
    /// Global indices `[start, end)` of the layers this part holds.
    pub layers: [usize; 2],
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Weight and hidden-state dtype (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// How a light edge stores its weights when not in `dtype` (`tandem split --edge-dtype`:
    /// `bf16`, `int8`, `q4-embed`). Only the device reads it; not part of the pair id, since
    /// the cloud sees the same hidden states either way (within the quantization's error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_weights: Option<String>,
    pub weights: WeightsFile,
    /// Hash of the fields both parts must share; equal for a matching edge and cloud.
    pub pair_id: String,
}

/// The fields an edge and a cloud must agree on, in a fixed order.
#[derive(Serialize)]
struct PairFields<'a> {
    format: &'a str,
    source: &'a SourceModel,
    edge_layers: usize,
    num_layers: usize,
    hidden_size: usize,
    vocab_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    dtype: &'a str,
}

impl Manifest {
    fn pair_fields(&self) -> PairFields<'_> {
        PairFields {
            format: &self.format,
            source: &self.source,
            edge_layers: self.edge_layers,
            num_layers: self.num_layers,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            dtype: &self.dtype,
        }
    }

    /// SHA-256 (hex) of the shared fields.
    pub fn compute_pair_id(&self) -> String {
        let bytes = serde_json::to_vec(&self.pair_fields()).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }

    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let m: Self = serde_json::from_str(&text).map_err(|e| ModelError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(ModelError::Manifest {
                path,
                reason: format!("format `{}` is not `{MANIFEST_FORMAT}`", m.format),
            });
        }
        if m.pair_id != m.compute_pair_id() {
            return Err(ModelError::Manifest {
                path,
                reason: "pair_id does not match the manifest's fields (edited by hand?)".into(),
            });
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json` (pretty-printed).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| ModelError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))
    }

    /// Checks that this manifest describes a `part` of the model `cfg` describes, and that the
    /// weights file is there with the recorded size. `dir` is used in messages.
    pub fn check_part(&self, part: Part, cfg: &LlamaConfig, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let bad = |reason: String| ModelError::Manifest {
            path: path.clone(),
            reason,
        };
        if self.part != part {
            return Err(bad(format!(
                "this is the {} part, expected the {part} part",
                self.part
            )));
        }
        let expect_layers = match part {
            Part::Edge => [0, self.edge_layers],
            Part::Cloud => [self.edge_layers, self.num_layers],
        };
        if self.layers != expect_layers {
            return Err(bad(format!(
                "layers {:?} do not match a split at {} of {}",
                self.layers, self.edge_layers, self.num_layers
            )));
        }
        let checks = [
            ("num_layers", self.num_layers, cfg.num_hidden_layers),
            ("hidden_size", self.hidden_size, cfg.hidden_size),
            ("vocab_size", self.vocab_size, cfg.vocab_size),
            (
                "num_attention_heads",
                self.num_attention_heads,
                cfg.num_attention_heads,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                cfg.num_key_value_heads,
            ),
            ("head_dim", self.head_dim, cfg.head_dim),
        ];
        for (name, m, c) in checks {
            if m != c {
                return Err(bad(format!("{name} is {m} but config.json says {c}")));
            }
        }
        let weights = dir.join(&self.weights.file);
        let len = std::fs::metadata(&weights)
            .map_err(|e| ModelError::io(&weights, e))?
            .len();
        if len != self.weights.bytes {
            return Err(bad(format!(
                "{} is {len} bytes, the manifest recorded {} (truncated or replaced?)",
                weights.display(),
                self.weights.bytes
            )));
        }
        Ok(())
    }
}

/// Refuses an edge and a cloud manifest that were not cut from the same model at the same
/// point with the same shapes and dtype.
pub fn check_pair(edge: &Manifest, cloud: &Manifest) -> Result<()> {
    let bad = |reason: String| ModelError::Manifest {
        path: MANIFEST_FILE.into(),
        reason: format!("edge and cloud parts do not belong together: {reason}"),
    };
    if edge.part != Part::Edge || cloud.part != Part::Cloud {
        return Err(bad(format!(
            "got a {} part and a {} part",
            edge.part, cloud.part
        )));
    }
    let (e, c) = (
        serde_json::to_value(edge.pair_fields()).unwrap_or_default(),
        serde_json::to_value(cloud.pair_fields()).unwrap_or_default(),
    );
    if let (Some(e), Some(c)) = (e.as_object(), c.as_object()) {
        for (key, ev) in e {
            let cv = &c[key];
            if ev != cv {
                return Err(bad(format!("{key}: edge has {ev}, cloud has {cv}")));
            }
        }
    }
    if edge.pair_id != cloud.pair_id {
        return Err(bad(format!(
            "pair ids differ ({} vs {})",
            edge.pair_id, cloud.pair_id
        )));
    }
    Ok(())
}
