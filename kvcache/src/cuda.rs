//! The paged cache on a CUDA device, behind the `cuda` feature: the same [`KvView`] interface
//! as [`crate::PagedKv`], backed by this crate's own kernels (`cuda/paged_attention.cu`,
//! compiled to PTX by `build.rs` for `CUDA_COMPUTE_CAP`, loaded once per device).
//!
//! **Status:** compiled in CI on machines without a GPU; checked against the CPU engine on a
//! GPU only by `scripts/gpu-check.sh`, when a GPU machine is lent (see `docs/performance.md`).
//!
//! Layout: per layer, K and V are one device tensor each, `[num_blocks * block_size,
//! kv_heads * head_dim]`, in bf16 or f32 (the CPU cache's layout: slot
//! `block * block_size + pos % block_size` holds position `pos`).
//!
//! Per layer and step: (1) one launch of `write_kv` stores the batch's new keys and values in
//! their slots; (2) one launch of `paged_attention` over the whole varlen batch, causal: query
//! row `r` of a sequence at position `p` sees that sequence's keys `0..=p` through its block
//! table (prefill chunks and decode rows in the same launch). Nothing is gathered.

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{DType, Device, Layout, Storage, Tensor};
use tandem_model::{ForwardCtx, KvView, ModelError};

use crate::block::BlockTable;
use crate::block::CopyOp;
use crate::storage::{KvDtype, KvLayout};

/// The kernels, as PTX for the compute capability the build named.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "tandem_paged_attention";
/// One warp per query head of a group; a block holds at most 32 warps.
const MAX_GROUP: usize = 32;
/// The kernel keeps `head_dim / 32` elements per lane, at most 8.
const MAX_HEAD_DIM: usize = 256;

fn cache_err(msg: impl Into<String>) -> ModelError {
    ModelError::Cache(msg.into())
}

fn cuda_err(e: candle_core::Error) -> ModelError {
    ModelError::Cache(format!("CUDA: {e}"))
}

/// K/V blocks of every cloud layer on one CUDA device.
#[derive(Debug)]
pub struct CudaKvStorage {
    layout: KvLayout,
    dtype: DType,
    device: CudaDevice,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl CudaKvStorage {
    /// Allocates `layout.num_blocks` blocks per layer on `device` in `layout.dtype` (bf16 or
    /// f32; the kernel has no f16 instance).
    pub fn new(layout: KvLayout, device: &Device) -> Result<Self, ModelError> {
        let Device::Cuda(cuda) = device else {
            return Err(cache_err(format!(
                "the CUDA cache needs a CUDA device, not {device:?}"
            )));
        };
        let dtype = match layout.dtype {
            KvDtype::BF16 => DType::BF16,
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => {
                return Err(cache_err("the CUDA paged cache holds bf16 or f32, not f16"));
            }
        };
        if layout.head_dim > MAX_HEAD_DIM || layout.head_dim == 0 {
            return Err(cache_err(format!(
                "the CUDA paged kernel takes head_dim 1..={MAX_HEAD_DIM}, not {}",
                layout.head_dim
            )));
        }
        let shape = (
            layout.num_blocks * layout.block_size,
            layout.kv_heads * layout.head_dim,
        );
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        // Load the module now, so a PTX the driver refuses fails at start, not at a step.
        cuda.get_or_load_custom_func(kernel_name("write_kv", dtype), MODULE, PTX)
            .map_err(cuda_err)?;
        Ok(Self {
            layout,
            dtype,
            device: cuda.clone(),
            k,
            v,
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of device memory the blocks take.
    pub fn bytes(&self) -> usize {
        2 * self.layout.num_layers
            * self.layout.num_blocks
            * self.layout.block_size
            * self.layout.row()
            * self.layout.dtype.size_in_bytes()
    }

    /// Copy-on-write: copies the first `len` slots of block `src` into block `dst`, every layer.
    pub fn copy(&mut self, op: CopyOp) -> Result<(), ModelError> {
        let bs = self.layout.block_size;
        for t in self.k.iter().chain(self.v.iter()) {
            let rows = t.narrow(0, op.src.0 as usize * bs, op.len)?.contiguous()?;
            t.slice_set(&rows, 0, op.dst.0 as usize * bs)?;
        }
        Ok(())
    }
}

fn kernel_name(base: &str, dtype: DType) -> &'static str {
    match (base, dtype) {
        ("write_kv", DType::BF16) => "write_kv_bf16",
        ("write_kv", _) => "write_kv_f32",
        (_, DType::BF16) => "paged_attention_bf16",
        _ => "paged_attention_f32",
    }
}

/// One forward pass's view of the CUDA cache (the counterpart of [`crate::PagedKv`]).
#[derive(Debug)]
pub struct CudaPagedKv<'a> {
    storage: &'a mut CudaKvStorage,
    tables: Vec<Vec<u32>>,
    /// The batch's index arrays on the device, uploaded at the first layer and shared by all.
    uploaded: Option<DeviceIndices>,
    /// When set ([`Self::timed`]), the seconds spent in [`KvView::attend`], measured with
    /// the device synchronised before and after each call (a diagnosis, not for serving).
    attend_s: Option<f64>,
}

/// [`Indices`] on the device.
#[derive(Debug)]
struct DeviceIndices {
    slots: CudaSlice<i64>,
    row_seq: CudaSlice<i32>,
    row_pos: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    rows: usize,
    max_blocks: usize,
}

impl<'a> CudaPagedKv<'a> {
    /// `tables[i]` belongs to the `i`-th sequence of the batch and holds its new positions.
    pub fn new(storage: &'a mut CudaKvStorage, tables: &[&BlockTable]) -> Self {
        let tables = tables
            .iter()
            .map(|t| t.blocks().iter().map(|b| b.0).collect())
            .collect();
        Self {
            storage,
            tables,
            uploaded: None,
            attend_s: None,
        }
    }

    /// As [`Self::new`], timing every [`KvView::attend`] call ([`Self::attend_seconds`]).
    pub fn timed(storage: &'a mut CudaKvStorage, tables: &[&BlockTable]) -> Self {
        Self {
            attend_s: Some(0.0),
            ..Self::new(storage, tables)
        }
    }

    /// Seconds spent in `attend` (K/V stores and attention, synchronised), when timed.
    pub fn attend_seconds(&self) -> Option<f64> {
        self.attend_s
    }
}

/// The batch's index arrays, on the host.
struct Indices {
    slots: Vec<i64>,
    row_seq: Vec<i32>,
    row_pos: Vec<i32>,
    tables: Vec<i32>,
    max_blocks: usize,
}

impl CudaPagedKv<'_> {
    fn indices(&self, ctx: &ForwardCtx) -> Result<Indices, ModelError> {
        let spans = ctx.seqs();
        if spans.len() != self.tables.len() {
            return Err(cache_err(format!(
                "{} sequences in the batch but {} block tables",
                spans.len(),
                self.tables.len()
            )));
        }
        let bs = self.storage.layout.block_size;
        let blocks = self.storage.layout.num_blocks;
        let rows = ctx.num_tokens();
        let mut ix = Indices {
            slots: Vec::with_capacity(rows),
            row_seq: Vec::with_capacity(rows),
            row_pos: Vec::with_capacity(rows),
            tables: Vec::new(),
            max_blocks: self.tables.iter().map(Vec::len).max().unwrap_or(0).max(1),
        };
        for (seq, (span, table)) in spans.iter().zip(&self.tables).enumerate() {
            if let Some(b) = table.iter().find(|&&b| b as usize >= blocks) {
                return Err(cache_err(format!("block {b} is outside the cache")));
            }
            for j in 0..span.len {
                let pos = span.past + j;
                let block = table
                    .get(pos / bs)
                    .copied()
                    .ok_or_else(|| cache_err(format!("position {pos} has no block reserved")))?;
                ix.slots.push(block as i64 * bs as i64 + (pos % bs) as i64);
                ix.row_seq.push(seq as i32);
                ix.row_pos
                    .push(i32::try_from(pos).map_err(|_| cache_err("position overflow"))?);
            }
            ix.tables.extend(table.iter().map(|&b| b as i32));
            ix.tables
                .extend(std::iter::repeat_n(0, ix.max_blocks - table.len()));
        }
        Ok(ix)
    }
}

/// The device buffer under a contiguous CUDA tensor, from its first element.
fn with_slice<T: CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(&candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>) -> Result<R, ModelError>,
) -> Result<R, ModelError> {
    let (storage, layout): (_, &Layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        return Err(cache_err("the CUDA paged kernel needs contiguous tensors"));
    }
    let Storage::Cuda(s) = &*storage else {
        return Err(cache_err("a tensor of the CUDA step is not on the GPU"));
    };
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>().map_err(cuda_err)?;
    f(&slice.slice(layout.start_offset()..))
}

impl KvView for CudaPagedKv<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor, ModelError> {
        let (rows, heads, head_dim) = q.dims3()?;
        let (_, kv_heads, _) = k.dims3()?;
        let layout = &self.storage.layout;
        if kv_heads != layout.kv_heads || head_dim != layout.head_dim || rows != ctx.num_tokens() {
            return Err(cache_err(format!(
                "q {:?} / k {:?} do not fit the cache ({} kv heads of {}) and {} batch rows",
                q.dims(),
                k.dims(),
                layout.kv_heads,
                layout.head_dim,
                ctx.num_tokens()
            )));
        }
        if kv_heads == 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP {
            return Err(cache_err(format!(
                "{heads} query heads over {kv_heads} kv heads: the CUDA kernel takes groups of 1..={MAX_GROUP}"
            )));
        }
        let l = layer
            .checked_sub(layout.first_layer)
            .filter(|l| *l < self.storage.k.len())
            .ok_or_else(|| cache_err(format!("layer {layer} is not in this cache")))?;
        if rows == 0 {
            return Ok(Tensor::zeros((0, heads * head_dim), q.dtype(), q.device())?);
        }
        if self.uploaded.as_ref().is_none_or(|u| u.rows != rows) {
            let ix = self.indices(ctx)?;
            let dev = &self.storage.device;
            self.uploaded = Some(DeviceIndices {
                slots: dev.clone_htod(&ix.slots).map_err(cuda_err)?,
                row_seq: dev.clone_htod(&ix.row_seq).map_err(cuda_err)?,
                row_pos: dev.clone_htod(&ix.row_pos).map_err(cuda_err)?,
                tables: dev.clone_htod(&ix.tables).map_err(cuda_err)?,
                rows,
                max_blocks: ix.max_blocks,
            });
        }
        let started = match self.attend_s {
            Some(_) => {
                self.storage.device.synchronize().map_err(cuda_err)?;
                Some(std::time::Instant::now())
            }
            None => None,
        };
        let dtype = self.storage.dtype;
        let row = kv_heads * head_dim;
        let kr = k.to_dtype(dtype)?.reshape((rows, row))?.contiguous()?;
        let vr = v.to_dtype(dtype)?.reshape((rows, row))?.contiguous()?;
        let qc = q.to_dtype(dtype)?.contiguous()?;
        let out = Tensor::zeros((rows, heads * head_dim), dtype, q.device())?;
        let ix = self.uploaded.as_ref().expect("uploaded above");
        match dtype {
            DType::BF16 => launch::<half::bf16>(self.storage, l, ix, &kr, &vr, &qc, &out, heads)?,
            _ => launch::<f32>(self.storage, l, ix, &kr, &vr, &qc, &out, heads)?,
        }
        let out = out.to_dtype(q.dtype())?;
        if let (Some(t0), Some(total)) = (started, self.attend_s.as_mut()) {
            self.storage.device.synchronize().map_err(cuda_err)?;
            *total += t0.elapsed().as_secs_f64();
        }
        Ok(out)
    }
}

/// Stores layer `l`'s new keys and values, then attends every query row of the batch.
#[allow(clippy::too_many_arguments)]
fn launch<T: CudaDType + DeviceRepr>(
    s: &CudaKvStorage,
    l: usize,
    ix: &DeviceIndices,
    k_new: &Tensor,
    v_new: &Tensor,
    q: &Tensor,
    out: &Tensor,
    heads: usize,
) -> Result<(), ModelError> {
    let dev = &s.device;
    let lay = &s.layout;
    let rows = ix.rows;
    let row = lay.kv_heads * lay.head_dim;
    let to_i32 = |n: usize| i32::try_from(n).map_err(|_| cache_err("size overflow"));
    let (slots, row_seq, row_pos, tables) = (&ix.slots, &ix.row_seq, &ix.row_pos, &ix.tables);
    let (row_elems, max_blocks, block_size) = (
        to_i32(row)?,
        to_i32(ix.max_blocks)?,
        to_i32(lay.block_size)?,
    );
    let (heads_i, kv_heads, head_dim) =
        (to_i32(heads)?, to_i32(lay.kv_heads)?, to_i32(lay.head_dim)?);
    let scale = 1.0f32 / (lay.head_dim as f32).sqrt();
    let grid_rows = u32::try_from(rows).map_err(|_| cache_err("too many rows"))?;

    with_slice::<T, _>(&s.k[l], |kc| {
        with_slice::<T, _>(&s.v[l], |vc| {
            with_slice::<T, _>(k_new, |kn| {
                with_slice::<T, _>(v_new, |vn| {
                    let f = dev
                        .get_or_load_custom_func(kernel_name("write_kv", s.dtype), MODULE, PTX)
                        .map_err(cuda_err)?;
                    let mut b = f.builder();
                    b.arg(kn).arg(vn).arg(slots).arg(kc).arg(vc).arg(&row_elems);
                    let cfg = LaunchConfig {
                        grid_dim: (grid_rows, 1, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: the kernel reads `rows` rows of `row_elems` from k_new/v_new
                    // (both `[rows, row]`, contiguous) and `rows` slots, each checked above
                    // to lie in a block of this cache, and writes only those slots.
                    unsafe { b.launch(cfg) }.w().map_err(cuda_err)?;
                    Ok(())
                })
            })?;
            with_slice::<T, _>(q, |qv| {
                with_slice::<T, _>(out, |ov| {
                    let f = dev
                        .get_or_load_custom_func(kernel_name("attention", s.dtype), MODULE, PTX)
                        .map_err(cuda_err)?;
                    let mut b = f.builder();
                    b.arg(ov).arg(qv).arg(kc).arg(vc).arg(row_seq).arg(row_pos);
                    b.arg(tables)
                        .arg(&max_blocks)
                        .arg(&block_size)
                        .arg(&heads_i);
                    b.arg(&kv_heads).arg(&head_dim).arg(&scale);
                    let group = (heads / lay.kv_heads) as u32;
                    let cfg = LaunchConfig {
                        grid_dim: (grid_rows, lay.kv_heads as u32, 1),
                        block_dim: (32 * group, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: q and out are `[rows, heads * head_dim]`; every row's
                    // sequence index and position come from `indices`, which checked that
                    // each position up to the row's own has a block of this cache in the
                    // sequence's (padded) table; head_dim <= 256 and group <= 32 were
                    // checked, the kernel's limits.
                    unsafe { b.launch(cfg) }.w().map_err(cuda_err)?;
                    Ok(())
                })
            })
        })
    })
}
