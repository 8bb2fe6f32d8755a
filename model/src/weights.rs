//! Where a model's tensors come from.
//!
//! Everything above this module names tensors the HF way (`model.layers.3.mlp.up_proj.weight`)
//! and asks for an exact shape; a [`TensorSource`] finds the bytes, checks the shape and hands
//! back a tensor in the requested dtype. Two sources exist:
//!
//! - [`SafetensorsSource`]: one or several `*.safetensors` files (an HF directory, sharded or
//!   not, or a Tandem split part), memory-mapped; f32, f16 and bf16 are read as stored and
//!   converted on load.
//! - [`GgufSource`]: a GGUF file. Tensors are dequantized to the compute dtype, GGUF names
//!   are mapped to HF names, and the query/key rows that llama.cpp permutes for its
//!   interleaved rotary layout are put back in HF order, so the same layer code serves both.
//!   The loader keeps the quantized [`QTensor`] in hand until the last moment, which is where a
//!   quantized matmul path would take over.
//!
//! Every error names the file and, where there is one, the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

use tandem_kernels::mmap::map_readonly;
use tandem_kernels::quant::{Int8Rows, Q4Blocks};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// Name of the embedding matrix.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Name of the final norm.
pub const FINAL_NORM: &str = "model.norm.weight";
/// Name of the LM head.
pub const LM_HEAD: &str = "lm_head.weight";

/// A read-only store of named tensors.
pub trait TensorSource: Send + Sync {
    /// The file or directory the tensors come from (for messages).
    fn path(&self) -> &Path;

    /// Loads tensor `name` (HF naming), checks it has exactly `shape`, converts it to `dtype`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;

    /// Whether `name` (HF naming) is present.
    fn contains(&self, name: &str) -> bool;

    /// Tensor `name` when it is stored quantized (a light edge written by `tandem split
    /// --edge-dtype int8|q4-embed`), checked against its logical `shape`; `None` when it is
    /// stored as floats (then [`Self::load`] reads it).
    fn load_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<Quantized>> {
        let _ = (name, shape);
        Ok(None)
    }
}

/// A quantized weight as stored in a light edge part. See [`tandem_kernels::quant`].
#[derive(Clone, Debug, PartialEq)]
pub enum Quantized {
    Int8(Int8Rows),
    Q4(Q4Blocks),
}

/// Name of the scales that go with quantized tensor `name`.
pub fn scale_name(name: &str) -> String {
    format!("{name}.scale")
}

struct StEntry {
    file: usize,
    info: safetensors::tensor::TensorInfo,
}

/// Tensors from one or more memory-mapped safetensors files.
pub struct SafetensorsSource {
    root: PathBuf,
    files: Vec<(PathBuf, Mmap, usize)>, // path, map, data start
    index: HashMap<String, StEntry>,
}

impl SafetensorsSource {
    /// Opens the given files; a tensor name that occurs in two files is an error.
    pub fn open(root: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // The map lives as long as `self`; like every mmap-based loader we rely on nobody
            // truncating a checkpoint while it is being served (`map_readonly`'s contract).
            let mmap = map_readonly(&file).map_err(|e| ModelError::io(path, e))?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Format {
                    path: path.clone(),
                    format: "safetensors",
                    reason: e.to_string(),
                })?;
            for (name, info) in meta.tensors() {
                if let Some(prev) = index.insert(
                    name.clone(),
                    StEntry {
                        file: i,
                        info: info.clone(),
                    },
                ) {
                    let other: &PathBuf = &paths[prev.file];
                    return Err(ModelError::Format {
                        path: path.clone(),
                        format: "safetensors",
                        reason: format!("tensor `{name}` also appears in {}", other.display()),
                    });
                }
            }
            files.push((path.clone(), mmap, 8 + header_len));
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
            index,
        })
    }

    /// Opens every `*.safetensors` file of `dir` (sorted by name, so shards load in order).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let paths = safetensors_files(dir)?;
        if paths.is_empty() {
            return Err(ModelError::Format {
                path: dir.into(),
                format: "model directory",
                reason: "no *.safetensors files".into(),
            });
        }
        Self::open(dir, &paths)
    }

    /// The stored dtype of some tensor (the embedding when present): the checkpoint's dtype.
    pub fn dtype_of_any(&self) -> Option<DType> {
        let entry = self
            .index
            .get(EMBED)
            .or_else(|| self.index.values().next())?;
        st_dtype(entry.info.dtype)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }
}

/// The `*.safetensors` files of a directory, sorted by name.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let entry = entry.map_err(|e| ModelError::io(dir, e))?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            paths.push(p);
        }
    }
    paths.sort();
    Ok(paths)
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        _ => return None,
    })
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.root
    }

    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.root.clone(),
                tensor: name.into(),
            })?;
        let (path, mmap, start) = &self.files[entry.file];
        if entry.info.shape != shape {
            return Err(ModelError::TensorShape {
                path: path.clone(),
                tensor: name.into(),
                expected: shape.to_vec(),
                actual: entry.info.shape.clone(),
            });
        }
        let stored = st_dtype(entry.info.dtype).ok_or_else(|| ModelError::TensorDtype {
            path: path.clone(),
            tensor: name.into(),
            dtype: format!("{:?}", entry.info.dtype),
        })?;
        let (a, b) = entry.info.data_offsets;
        let bytes = &mmap[start + a..start + b];
        let t = Tensor::from_raw_buffer(bytes, stored, shape, device)?;
        Ok(t.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<Quantized>> {
        use safetensors::Dtype as S;
        let Some(entry) = self.index.get(name) else {
            return Ok(None);
        };
        let kind = entry.info.dtype;
        if !matches!(kind, S::I8 | S::U8) {
            return Ok(None);
        }
        let path = &self.files[entry.file].0;
        let bad = |reason: String| ModelError::Format {
            path: path.clone(),
            format: "safetensors",
            reason: format!("quantized tensor `{name}`: {reason}"),
        };
        let [n, k] = *shape else {
            return Err(bad(format!(
                "expected a matrix, the model wants shape {shape:?}"
            )));
        };
        let bytes_of = |e: &StEntry| {
            let (_, mmap, start) = &self.files[e.file];
            let (a, b) = e.info.data_offsets;
            &mmap[start + a..start + b]
        };
        let scale_entry = self
            .index
            .get(&scale_name(name))
            .ok_or_else(|| bad("its `.scale` tensor is missing".into()))?;
        if scale_entry.info.dtype != S::F32 {
            return Err(bad(format!(
                "scales stored as {:?}, not F32",
                scale_entry.info.dtype
            )));
        }
        let scales: Vec<f32> = bytes_of(scale_entry)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let data = bytes_of(entry);
        let stored = entry.info.shape.clone();
        let q = match kind {
            S::I8 => {
                if stored != [n, k] {
                    return Err(bad(format!(
                        "stored as {stored:?}, the model wants [{n}, {k}]"
                    )));
                }
                let values = data.iter().map(|&b| b as i8).collect();
                Quantized::Int8(Int8Rows::from_parts(values, scales, n, k).map_err(bad)?)
            }
            _ => {
                if stored != [n, k.div_ceil(2)] {
                    return Err(bad(format!(
                        "stored as {stored:?}, a 4-bit [{n}, {k}] is [{n}, {}]",
                        k.div_ceil(2)
                    )));
                }
                Quantized::Q4(Q4Blocks::from_parts(data.to_vec(), scales, n, k).map_err(bad)?)
            }
        };
        Ok(Some(q))
    }
}

/// Tensors from a GGUF file, presented under HF names and layout.
pub struct GgufSource {
    path: PathBuf,
    content: gguf_file::Content,
    heads: usize,
    kv_heads: usize,
}

/// The GGUF name of an HF tensor name, if it has one.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let g = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}"))
}

/// llama.cpp's row permutation of a Q or K projection (`[heads * d, in]`), HF → GGUF order.
/// Within each head, HF keeps the two rotary halves apart; GGUF interleaves them.
pub fn permute_qk_for_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

/// The inverse of [`permute_qk_for_gguf`]: GGUF → HF order.
pub fn unpermute_qk_from_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

impl GgufSource {
    /// Reads the GGUF header (metadata and tensor index; tensor data is read on demand).
    pub fn open(path: &Path) -> Result<(Self, LlamaConfig)> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Format {
            path: path.into(),
            format: "GGUF",
            reason: e.to_string(),
        })?;
        let rope_factors = match content.tensor_infos.get("rope_freqs.weight") {
            None => None,
            Some(_) => {
                let q = read_qtensor(&content, path, "rope_freqs.weight")?;
                let t = q.dequantize(&Device::Cpu)?;
                Some(t.flatten_all()?.to_vec1::<f32>()?)
            }
        };
        let cfg = LlamaConfig::from_gguf(&content, path, rope_factors)?;
        Ok((
            Self {
                path: path.into(),
                content,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
            },
            cfg,
        ))
    }

    /// The parsed GGUF header (metadata such as the tokenizer).
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }
}

fn read_qtensor(content: &gguf_file::Content, path: &Path, name: &str) -> Result<QTensor> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    content
        .tensor(&mut file, name, &Device::Cpu)
        .map_err(|e| ModelError::Format {
            path: path.into(),
            format: "GGUF",
            reason: format!("tensor `{name}`: {e}"),
        })
}

impl TensorSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let missing = || ModelError::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
        };
        let gname = gguf_name(name).ok_or_else(missing)?;
        let info = self.content.tensor_infos.get(&gname).ok_or_else(missing)?;
        if info.shape.dims() != shape {
            return Err(ModelError::TensorShape {
                path: self.path.clone(),
                tensor: gname,
                expected: shape.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        let q = read_qtensor(&self.content, &self.path, &gname)?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if name.ends_with("self_attn.q_proj.weight") {
            t = unpermute_qk_from_gguf(&t, self.heads)?;
        } else if name.ends_with("self_attn.k_proj.weight") {
            t = unpermute_qk_from_gguf(&t, self.kv_heads)?;
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }
}

/// Name of a dtype as safetensors headers and HF `torch_dtype` spell it.
pub fn dtype_names(dtype: DType) -> Option<(&'static str, &'static str)> {
    Some(match dtype {
        DType::F32 => ("F32", "float32"),
        DType::F16 => ("F16", "float16"),
        DType::BF16 => ("BF16", "bfloat16"),
        _ => return None,
    })
}

/// The user-facing name of a dtype (`f32`, `f16`, `bf16`).
pub fn dtype_user_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "unsupported",
    }
}

/// Parses a user-facing dtype name (`f32`, `f16`, `bf16`, or `auto`: [`auto_dtype`]).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(auto_dtype()),
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(ModelError::Input(format!(
            "unsupported dtype `{other}` (use auto, f32, f16 or bf16)"
        ))),
    }
}

/// A dtype as settings spell it (`auto`, `f32`, `f16`, `bf16`), resolved to a [`DType`] on
/// this machine by [`DtypeName::resolve`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeName {
    /// bf16 where the CPU has bf16 matrix or vector units, else f32 ([`auto_dtype`]).
    Auto,
    #[default]
    F32,
    F16,
    Bf16,
}

impl DtypeName {
    pub fn resolve(self) -> DType {
        match self {
            Self::Auto => auto_dtype(),
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for DtypeName {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "unsupported dtype `{other}` (use auto, f32, f16 or bf16)"
            )),
        }
    }
}

/// What `--dtype auto` means on this machine: bf16 where the CPU has a bf16 kernel faster than
/// the portable one: AMX-BF16 or AVX512-BF16 (twice the f32 path's decode speed or more, on
/// half the memory), or AVX2 with FMA (x86-64 CPUs without AVX-512, such as AMD's Zen 1–3:
/// twice f32's speed where decoding is bound by memory, within a few percent of it where it
/// is bound by arithmetic, on half the memory); else f32 (bf16 would run on the portable
/// kernel, slower than f32).
pub fn auto_dtype() -> DType {
    use tandem_kernels::gemm_bf16::Bf16Kernel;
    let fast = [Bf16Kernel::Amx, Bf16Kernel::Avx512Bf16, Bf16Kernel::Avx2];
    if fast.into_iter().any(Bf16Kernel::is_available) {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Writes a safetensors file one tensor at a time, so that a part bigger than memory can be
/// written: `produce(i)` is called once per spec, in order, and must return that tensor.
pub fn write_safetensors(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    dtype: DType,
    metadata: &HashMap<String, String>,
    mut produce: impl FnMut(usize) -> Result<Tensor>,
) -> Result<u64> {
    let (mut w, total) = start_safetensors(path, specs, dtype, metadata)?;
    let io = |e| ModelError::io(path, e);
    for (i, (name, shape)) in specs.iter().enumerate() {
        let t = produce(i)?.to_dtype(dtype)?;
        if t.dims() != shape.as_slice() {
            return Err(ModelError::TensorShape {
                path: path.into(),
                tensor: name.clone(),
                expected: shape.clone(),
                actual: t.dims().to_vec(),
            });
        }
        w.write_all(&tensor_le_bytes(&t)?).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(total)
}

/// One tensor of a safetensors header: name, stored dtype (`F32`, `BF16`, `I8`, `U8`…), bytes
/// per element and shape.
#[derive(Clone, Debug)]
pub struct StSpec {
    pub name: String,
    pub dtype: &'static str,
    pub elem: usize,
    pub shape: Vec<usize>,
}

/// [`start_safetensors`] for tensors of different dtypes.
pub fn start_safetensors_mixed(
    path: &Path,
    specs: &[StSpec],
    metadata: &HashMap<String, String>,
) -> Result<(std::io::BufWriter<File>, u64)> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut offset = 0usize;
    for s in specs {
        let bytes = s.shape.iter().product::<usize>() * s.elem;
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let io = |e| ModelError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&text).map_err(io)?;
    Ok((w, (8 + text.len() + offset) as u64))
}

/// Creates a safetensors file and writes its header for `specs` (every tensor in `dtype`):
/// the writer is positioned at the first tensor's data, which must follow in spec order.
/// Returns the writer and the file's final size.
pub fn start_safetensors(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    dtype: DType,
    metadata: &HashMap<String, String>,
) -> Result<(std::io::BufWriter<File>, u64)> {
    let (st_name, _) = dtype_names(dtype)
        .ok_or_else(|| ModelError::Input(format!("cannot write dtype {dtype:?}")))?;
    let specs: Vec<StSpec> = specs
        .iter()
        .map(|(name, shape)| StSpec {
            name: name.clone(),
            dtype: st_name,
            elem: dtype.size_in_bytes(),
            shape: shape.clone(),
        })
        .collect();
    start_safetensors_mixed(path, &specs, metadata)
}

/// The little-endian bytes of a f32/f16/bf16 tensor, row-major.
pub fn tensor_le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        other => {
            return Err(ModelError::Input(format!(
                "cannot serialise dtype {other:?}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_cover_every_layer_tensor() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(),
            Some("blk.12.attn_k.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.1.mlp.up_proj.bias"), None);
    }

    #[test]
    fn qk_permutation_round_trips_and_moves_rows() -> anyhow::Result<()> {
        let heads = 2;
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)?.reshape((8, 3))?;
        let p = permute_qk_for_gguf(&w, heads)?;
        // head 0 has rows 0..4 = halves [0,1] and [2,3]; interleaved: 0,2,1,3.
        let first_col: Vec<f32> = p.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(first_col, vec![0., 6., 3., 9., 12., 18., 15., 21.]);
        let back = unpermute_qk_from_gguf(&p, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
