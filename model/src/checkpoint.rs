//! Opening checkpoints and writing split parts.
//!
//! A [`Checkpoint`] is a whole model (an HF directory or a GGUF file) or one split part (a
//! directory written by [`write_split`]), with its configuration, tensors, tokenizer and chat
//! template. [`write_split`] cuts a whole checkpoint into `out/edge` and `out/cloud`:
//!
//! ```text
//! out/edge/   model.safetensors (embedding + layers [0,k))  config.json  manifest.json
//!             tokenizer.json  tokenizer_config.json (chat template, bos/eos)
//! out/cloud/  model.safetensors (layers [k,n) + final norm + LM head)  (same other files)
//! ```
//!
//! Tensors keep their HF names and global layer numbers, so a part is an ordinary (partial)
//! HF checkpoint. Each part is written into a temporary directory and renamed into place when
//! complete: an interrupted split never leaves a part that looks whole. Writing streams one
//! tensor at a time, so memory stays at one tensor plus the mapped source.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::chat::ChatTemplate;
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::layers::layer_tensor_specs;
use crate::manifest::{Manifest, Part, SourceModel, WeightsFile, MANIFEST_FILE, MANIFEST_FORMAT};
use crate::split::{SplitPoint, EMBED, FINAL_NORM, LM_HEAD};
use crate::tokenizer::TextTokenizer;
use crate::weights::{
    dtype_names, scale_name, start_safetensors_mixed, tensor_le_bytes, write_safetensors,
    GgufSource, SafetensorsSource, StSpec, TensorSource,
};
use tandem_kernels::quant::{Int8Rows, Q4Blocks, Q4_BLOCK};

/// What kind of checkpoint was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// An HF directory: `config.json` and `*.safetensors`.
    HfDir,
    /// A GGUF file.
    Gguf,
    /// One part of a Tandem split.
    Part(Part),
}

/// A model checkpoint, opened (tensors are read on demand).
pub struct Checkpoint {
    pub path: PathBuf,
    pub kind: CheckpointKind,
    pub config: LlamaConfig,
    pub tensors: Box<dyn TensorSource>,
    /// The dtype the weights are stored in (f32 for GGUF, which is dequantized to f32).
    pub stored_dtype: DType,
    pub tokenizer: Option<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// Present for split parts.
    pub manifest: Option<Manifest>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

const WEIGHTS_FILE: &str = "model.safetensors";

/// Whether `path` is a directory holding a Tandem split (`edge/` and `cloud/` with manifests).
pub fn is_split_dir(path: &Path) -> bool {
    path.join("edge").join(MANIFEST_FILE).is_file()
        && path.join("cloud").join(MANIFEST_FILE).is_file()
}

impl Checkpoint {
    /// Opens a whole model: a `.gguf` file or an HF directory.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Self::open_gguf(path);
        }
        if !path.is_dir() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        if path.join(MANIFEST_FILE).is_file() {
            return Err(ModelError::Input(format!(
                "{} is one part of a split; pass the directory that holds edge/ and cloud/",
                path.display()
            )));
        }
        Self::open_hf_dir(path, CheckpointKind::HfDir)
    }

    /// Opens one part of a split and checks its manifest against its files.
    pub fn open_part(dir: &Path, part: Part) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let mut ck = Self::open_hf_dir(dir, CheckpointKind::Part(part))?;
        manifest.check_part(part, &ck.config, dir)?;
        let want = match manifest.edge_weights.as_deref() {
            None => crate::weights::parse_dtype(&manifest.dtype)?,
            Some(name) => match name.parse::<EdgeWeights>().map_err(ModelError::Input)? {
                EdgeWeights::Bf16 => DType::BF16,
                // Norms in f32, the rest int8 or 4-bit (checked as each tensor loads).
                _ => DType::F32,
            },
        };
        if want != ck.stored_dtype {
            return Err(ModelError::Manifest {
                path: dir.join(MANIFEST_FILE),
                reason: format!(
                    "dtype is {} but the weights are stored as {:?}",
                    manifest.dtype, ck.stored_dtype
                ),
            });
        }
        ck.manifest = Some(manifest);
        Ok(ck)
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let (src, config) = GgufSource::open(path)?;
        let content = src.content();
        let tokenizer = if content.metadata.contains_key("tokenizer.ggml.tokens") {
            Some(TextTokenizer::from_gguf(content, path)?)
        } else {
            None
        };
        let chat_template = ChatTemplate::from_gguf(content)?;
        Ok(Self {
            path: path.into(),
            kind: CheckpointKind::Gguf,
            config,
            tensors: Box::new(src),
            stored_dtype: DType::F32,
            tokenizer,
            chat_template,
            manifest: None,
        })
    }

    fn open_hf_dir(dir: &Path, kind: CheckpointKind) -> Result<Self> {
        let config = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
        let src = SafetensorsSource::open_dir(dir)?;
        let stored_dtype = src.dtype_of_any().unwrap_or(DType::F32);
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            Some(TextTokenizer::from_file(&tok_path)?)
        } else {
            None
        };
        let chat_template =
            ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        Ok(Self {
            path: dir.into(),
            kind,
            config,
            tensors: Box::new(src),
            stored_dtype,
            tokenizer,
            chat_template,
            manifest: None,
        })
    }

    fn source_files(&self) -> Result<Vec<PathBuf>> {
        match self.kind {
            CheckpointKind::Gguf => Ok(vec![self.path.clone()]),
            _ => {
                let mut files = vec![self.path.join("config.json")];
                files.extend(crate::weights::safetensors_files(&self.path)?);
                Ok(files)
            }
        }
    }
}

/// SHA-256 (hex) over a checkpoint's source files: for each file in order, its name then its
/// bytes. `progress` advances by bytes read.
pub fn hash_source(ck: &Checkpoint, progress: &ProgressBar) -> Result<String> {
    let files = ck.source_files()?;
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    progress.set_length(total);
    progress.set_position(0);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update(name.as_bytes());
        let mut file = std::fs::File::open(f).map_err(|e| ModelError::io(f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| ModelError::io(f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            progress.inc(n as u64);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Options of [`write_split`].
#[derive(Clone, Debug)]
pub struct SplitOptions {
    pub edge_layers: usize,
    /// Dtype of the parts' weights (and so of the hidden states on the wire).
    pub dtype: DType,
    /// Replace existing parts in the output directory.
    pub force: bool,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

/// How `tandem split --edge-dtype` stores the edge part: a light edge for a device that cannot
/// hold the weights in the split's dtype. The cloud part and the hidden states are unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EdgeWeights {
    /// Like the cloud part ([`SplitOptions::dtype`]).
    #[default]
    AsSplit,
    /// Every weight in bf16 (the device computes on its bf16 kernels, f32 activations).
    Bf16,
    /// Projections and the embedding table in int8, one absmax scale per row; norms in f32.
    Int8,
    /// Projections in int8 (per row) and the embedding table in 4-bit blocks of 32 values
    /// with one scale each; norms in f32.
    Q4Embed,
}

impl EdgeWeights {
    /// The name `--edge-dtype` takes and the manifest records (`None` for [`Self::AsSplit`]).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::AsSplit => None,
            Self::Bf16 => Some("bf16"),
            Self::Int8 => Some("int8"),
            Self::Q4Embed => Some("q4-embed"),
        }
    }
}

impl std::str::FromStr for EdgeWeights {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "int8" => Ok(Self::Int8),
            "q4-embed" => Ok(Self::Q4Embed),
            other => Err(format!(
                "unknown edge dtype `{other}` (use bf16, int8 or q4-embed)"
            )),
        }
    }
}

/// One tensor of a light edge as written: its safetensors entries (the values, and for a
/// quantized tensor its scales) and how to make their bytes from the source tensor.
fn light_entries(name: &str, shape: &[usize], edge: EdgeWeights) -> Vec<StSpec> {
    let spec = |name: String, dtype: &'static str, elem: usize, shape: Vec<usize>| StSpec {
        name,
        dtype,
        elem,
        shape,
    };
    match (edge, shape) {
        (EdgeWeights::Q4Embed, &[n, k]) if name == EMBED => vec![
            spec(name.into(), "U8", 1, vec![n, k.div_ceil(2)]),
            spec(scale_name(name), "F32", 4, vec![n, k.div_ceil(Q4_BLOCK)]),
        ],
        (EdgeWeights::Int8 | EdgeWeights::Q4Embed, &[n, k]) => vec![
            spec(name.into(), "I8", 1, vec![n, k]),
            spec(scale_name(name), "F32", 4, vec![n]),
        ],
        (EdgeWeights::Bf16, _) => vec![spec(name.into(), "BF16", 2, shape.to_vec())],
        _ => vec![spec(name.into(), "F32", 4, shape.to_vec())],
    }
}

/// The bytes of `light_entries`' entries for source tensor `t`, in order.
fn light_bytes(t: &Tensor, entries: &[StSpec]) -> Result<Vec<Vec<u8>>> {
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    Ok(match entries[0].dtype {
        "BF16" => vec![tensor_le_bytes(&t.to_dtype(DType::BF16)?)?],
        "F32" => vec![tensor_le_bytes(&t.to_dtype(DType::F32)?)?],
        kind => {
            let (n, k) = t.dims2()?;
            let w = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if kind == "I8" {
                let q = Int8Rows::quantize(&w, n, k);
                vec![
                    q.values().iter().map(|&v| v as u8).collect(),
                    f32_bytes(q.scales()),
                ]
            } else {
                let q = Q4Blocks::quantize(&w, n, k);
                vec![q.packed().to_vec(), f32_bytes(q.scales())]
            }
        }
    })
}

/// The tensors of each part, by HF name and shape, and where each comes from in the source.
pub fn part_tensor_specs(
    cfg: &LlamaConfig,
    split: SplitPoint,
    part: Part,
    src: &dyn TensorSource,
) -> Vec<(String, String, Vec<usize>)> {
    let emb = vec![cfg.vocab_size, cfg.hidden_size];
    let mut specs = Vec::new();
    let layers = match part {
        Part::Edge => split.edge_range(),
        Part::Cloud => split.cloud_range(),
    };
    if part == Part::Edge {
        specs.push((EMBED.to_string(), EMBED.to_string(), emb.clone()));
    }
    for i in layers {
        for (name, shape) in layer_tensor_specs(cfg, i) {
            specs.push((name.clone(), name, shape));
        }
    }
    if part == Part::Cloud {
        specs.push((FINAL_NORM.into(), FINAL_NORM.into(), vec![cfg.hidden_size]));
        let head_src = if src.contains(LM_HEAD) || !cfg.tie_word_embeddings {
            LM_HEAD
        } else {
            EMBED
        };
        specs.push((LM_HEAD.into(), head_src.into(), emb));
    }
    specs
}

fn bar(enabled: bool, len: u64, msg: &str, bytes: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let tmpl = if bytes {
        "{msg:>14} [{bar:40}] {bytes}/{total_bytes} ({eta})"
    } else {
        "{msg:>14} [{bar:40}] {pos}/{len} tensors ({eta})"
    };
    if let Ok(style) = ProgressStyle::with_template(tmpl) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_string());
    pb
}

/// Cuts `ck` at `opts.edge_layers` and writes `out/edge` and `out/cloud`. Returns the two
/// manifests (edge, cloud).
pub fn write_split(
    ck: &Checkpoint,
    out: &Path,
    opts: &SplitOptions,
) -> Result<(Manifest, Manifest)> {
    write_split_as(ck, out, opts, EdgeWeights::AsSplit)
}

/// [`write_split`] with the edge part stored as `edge` (a light edge, see [`EdgeWeights`]).
pub fn write_split_as(
    ck: &Checkpoint,
    out: &Path,
    opts: &SplitOptions,
    edge: EdgeWeights,
) -> Result<(Manifest, Manifest)> {
    if ck.manifest.is_some() {
        return Err(ModelError::Input(
            "cannot split a part of a split; split the whole model".into(),
        ));
    }
    let split = SplitPoint::new(opts.edge_layers, ck.config.num_hidden_layers)?;
    let (_, torch_dtype) = dtype_names(opts.dtype)
        .ok_or_else(|| ModelError::Input(format!("cannot write dtype {:?}", opts.dtype)))?;
    prepare_out_dir(out, opts.force)?;
    let job = SplitJob {
        ck,
        out,
        opts,
        edge,
        split,
        torch_dtype,
        source: source_model(ck, opts.progress)?,
    };
    let edge = job.write_part(Part::Edge)?;
    let cloud = job.write_part(Part::Cloud)?;
    Ok((edge, cloud))
}

/// Creates `out`; existing `out/edge` and `out/cloud` are an error unless `force`, then they
/// are removed.
fn prepare_out_dir(out: &Path, force: bool) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    for part in ["edge", "cloud"] {
        let p = out.join(part);
        if p.exists() {
            if !force {
                return Err(ModelError::Input(format!(
                    "{} already exists (pass --force to replace it)",
                    p.display()
                )));
            }
            std::fs::remove_dir_all(&p).map_err(|e| ModelError::io(&p, e))?;
        }
    }
    Ok(())
}

/// What the manifests record of the source: its name, format and hash.
fn source_model(ck: &Checkpoint, progress: bool) -> Result<SourceModel> {
    let pb = bar(progress, 0, "hashing", true);
    let sha256 = hash_source(ck, &pb)?;
    pb.finish_and_clear();
    Ok(SourceModel {
        name: ck
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format: match ck.kind {
            CheckpointKind::Gguf => "gguf".into(),
            _ => "safetensors".into(),
        },
        sha256,
    })
}

/// One split being written: what both parts share.
struct SplitJob<'a> {
    ck: &'a Checkpoint,
    out: &'a Path,
    opts: &'a SplitOptions,
    edge: EdgeWeights,
    split: SplitPoint,
    /// The HF name of `opts.dtype`.
    torch_dtype: &'static str,
    source: SourceModel,
}

impl SplitJob<'_> {
    /// Writes `part` into a temporary directory and renames it into place once complete.
    fn write_part(&self, part: Part) -> Result<Manifest> {
        let final_dir = self.out.join(part.to_string());
        let tmp_dir = self.out.join(format!(".{part}.partial"));
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir).map_err(|e| ModelError::io(&tmp_dir, e))?;
        }
        std::fs::create_dir_all(&tmp_dir).map_err(|e| ModelError::io(&tmp_dir, e))?;
        let light = part == Part::Edge && self.edge != EdgeWeights::AsSplit;
        let weights = self.write_weights(part, light, &tmp_dir)?;
        self.write_config(light, &tmp_dir)?;
        write_tokenizer_files(self.ck, &tmp_dir)?;
        let mut m = self.manifest(part, light, weights);
        m.pair_id = m.compute_pair_id();
        m.write(&tmp_dir)?;
        std::fs::rename(&tmp_dir, &final_dir).map_err(|e| ModelError::io(&final_dir, e))?;
        Ok(m)
    }

    /// Writes the part's tensors into `dir`'s weights file, one tensor at a time.
    fn write_weights(&self, part: Part, light: bool, dir: &Path) -> Result<WeightsFile> {
        let ck = self.ck;
        let specs = part_tensor_specs(&ck.config, self.split, part, ck.tensors.as_ref());
        let pb = bar(
            self.opts.progress,
            specs.len() as u64,
            &format!("writing {part}"),
            false,
        );
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("tandem_part".to_string(), part.to_string());
        let path = dir.join(WEIGHTS_FILE);
        let (bytes, tensors) = if light {
            self.write_light_tensors(&specs, &path, &meta, &pb)?
        } else {
            self.write_tensors(&specs, &path, &meta, &pb)?
        };
        pb.finish_and_clear();
        Ok(WeightsFile {
            file: WEIGHTS_FILE.into(),
            bytes,
            tensors,
        })
    }

    /// A light edge's tensors (see [`EdgeWeights`]): returns the bytes and the number of
    /// safetensors entries written (a quantized tensor has two).
    fn write_light_tensors(
        &self,
        specs: &[(String, String, Vec<usize>)],
        path: &Path,
        meta: &std::collections::HashMap<String, String>,
        pb: &ProgressBar,
    ) -> Result<(u64, usize)> {
        let entries: Vec<Vec<StSpec>> = specs
            .iter()
            .map(|(n, _, s)| light_entries(n, s, self.edge))
            .collect();
        let flat: Vec<StSpec> = entries.iter().flatten().cloned().collect();
        let (mut w, total) = start_safetensors_mixed(path, &flat, meta)?;
        for ((_, src_name, shape), entries) in specs.iter().zip(&entries) {
            let t = self
                .ck
                .tensors
                .load(src_name, shape, DType::F32, &Device::Cpu)?;
            for b in light_bytes(&t, entries)? {
                w.write_all(&b).map_err(|e| ModelError::io(path, e))?;
            }
            pb.inc(1);
        }
        w.flush().map_err(|e| ModelError::io(path, e))?;
        Ok((total, flat.len()))
    }

    /// The part's tensors in the split's dtype: returns the bytes and the number of tensors.
    fn write_tensors(
        &self,
        specs: &[(String, String, Vec<usize>)],
        path: &Path,
        meta: &std::collections::HashMap<String, String>,
        pb: &ProgressBar,
    ) -> Result<(u64, usize)> {
        let names: Vec<(String, Vec<usize>)> = specs
            .iter()
            .map(|(n, _, s)| (n.clone(), s.clone()))
            .collect();
        let bytes = write_safetensors(path, &names, self.opts.dtype, meta, |i| {
            let (_, src_name, shape) = &specs[i];
            let t = self
                .ck
                .tensors
                .load(src_name, shape, self.opts.dtype, &Device::Cpu);
            pb.inc(1);
            t
        })?;
        Ok((bytes, specs.len()))
    }

    /// Writes the part's `config.json`, with the dtype its weights are stored in.
    fn write_config(&self, light: bool, dir: &Path) -> Result<()> {
        let cfg_path = dir.join("config.json");
        let part_torch_dtype = match (light, self.edge) {
            (true, EdgeWeights::Bf16) => "bfloat16",
            (true, _) => "float32",
            _ => self.torch_dtype,
        };
        let cfg_text = serde_json::to_string_pretty(&self.ck.config.to_hf_json(part_torch_dtype))
            .unwrap_or_default();
        std::fs::write(&cfg_path, cfg_text + "\n").map_err(|e| ModelError::io(&cfg_path, e))
    }

    /// The part's manifest, without its pair id.
    fn manifest(&self, part: Part, light: bool, weights: WeightsFile) -> Manifest {
        let (cfg, split) = (&self.ck.config, self.split);
        let layers = match part {
            Part::Edge => [0, split.edge_layers()],
            Part::Cloud => [split.edge_layers(), split.num_layers()],
        };
        Manifest {
            format: MANIFEST_FORMAT.into(),
            part,
            source: self.source.clone(),
            edge_layers: split.edge_layers(),
            num_layers: split.num_layers(),
            layers,
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            dtype: crate::weights::dtype_user_name(self.opts.dtype).into(),
            edge_weights: if light {
                self.edge.name().map(str::to_string)
            } else {
                None
            },
            weights,
            pair_id: String::new(),
        }
    }
}

fn write_tokenizer_files(ck: &Checkpoint, dir: &Path) -> Result<()> {
    let Some(tok) = &ck.tokenizer else {
        return Ok(());
    };
    tok.save(&dir.join("tokenizer.json"))?;
    let token_text = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let mut tc = serde_json::Map::new();
    if let Some(b) = token_text(ck.config.bos_token_id) {
        tc.insert("bos_token".into(), b.into());
    }
    if let Some(e) = token_text(ck.config.eos_token_ids.first().copied()) {
        tc.insert("eos_token".into(), e.into());
    }
    if let Some(t) = &ck.chat_template {
        tc.insert("chat_template".into(), t.source().into());
    }
    let path = dir.join("tokenizer_config.json");
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(tc)).unwrap_or_default();
    std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))
}
