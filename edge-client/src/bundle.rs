//! Loading the device's part of a split: an `edge/` directory written by `tandem split`.
//!
//! An [`EdgeBundle`] is what a device needs to take part in a session: the edge model
//! (embedding + layers `[0, k)`), its manifest (whose `pair_id` the cloud checks in `Open`),
//! and the tokenizer and chat template for prompt assembly. Loading reads the weights once
//! (memory: the edge weights); the model is shared behind an `Arc` by every session.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use tandem_model::chat::ChatTemplate;
use tandem_model::checkpoint::Checkpoint;
use tandem_model::manifest::{Manifest, Part, MANIFEST_FILE};
use tandem_model::split::LoadOptions;
use tandem_model::tokenizer::TextTokenizer;
use tandem_model::{EdgeModel, ModelError, SplitPoint};

use crate::transparency::ModelInfo;

/// The edge part of a split, loaded. See the module doc.
#[derive(Debug)]
pub struct EdgeBundle {
    pub model: Arc<EdgeModel>,
    pub manifest: Manifest,
    pub tokenizer: Option<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
}

impl EdgeBundle {
    /// Loads `dir`, which is either an `edge/` part or a split directory holding `edge/`.
    /// The weights keep their stored dtype and run on the CPU.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_as(dir, None)
    }

    /// [`Self::load`] with the weights converted to `dtype` (`None`: as stored). bf16 runs on
    /// the model's bf16 kernels (AMX or AVX512-BF16 where the CPU has them) with f32 hidden
    /// states, so the wire format (`--dtype`) is unaffected.
    pub fn load_as(dir: &Path, dtype: Option<candle_core::DType>) -> Result<Self, ModelError> {
        let part_dir = if dir.join("edge").join(MANIFEST_FILE).is_file() {
            dir.join("edge")
        } else {
            dir.to_path_buf()
        };
        let mut ck = Checkpoint::open_part(&part_dir, Part::Edge)?;
        let manifest = ck
            .manifest
            .take()
            .ok_or_else(|| ModelError::Input(format!("{} has no manifest", part_dir.display())))?;
        let split = SplitPoint::new(manifest.edge_layers, ck.config.num_hidden_layers)?;
        let opts = LoadOptions {
            dtype: dtype.unwrap_or(ck.stored_dtype),
            device: &Device::Cpu,
        };
        let model = EdgeModel::load(ck.tensors.as_ref(), &ck.config, split, opts)?;
        Ok(Self {
            model: Arc::new(model),
            manifest,
            tokenizer: ck.tokenizer.take(),
            chat_template: ck.chat_template.take(),
        })
    }

    /// The id of the edge/cloud pair, sent in `Open`.
    pub fn pair_id(&self) -> &str {
        &self.manifest.pair_id
    }

    /// The split and shapes, for the transparency record.
    pub fn model_info(&self) -> ModelInfo {
        ModelInfo::from_edge(&self.model, self.pair_id())
    }
}
