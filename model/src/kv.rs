//! [`ContiguousKv`]: the simplest KV cache, one growing tensor pair per layer for a single
//! sequence. The edge uses it (a device serves one user), and the tests use it as the
//! reference the paged cloud cache must agree with.
//!
//! Cost: appending `t` tokens re-copies the layer's whole cache (`Tensor::cat`), so a
//! generation of `n` tokens copies O(n²) values. That is fine for the edge's few layers and
//! short contexts; the cloud uses paged storage instead.

use candle_core::Tensor;

use crate::error::{ModelError, Result};
use crate::layers::{causal_attention, ForwardCtx, KvView};

/// Per-layer contiguous K/V for one sequence, indexed by global layer number.
#[derive(Clone, Debug, Default)]
pub struct ContiguousKv {
    layers: Vec<Option<(Tensor, Tensor)>>,
    max_len: usize,
}

impl ContiguousKv {
    /// An empty cache able to hold layers `0..num_layers` and up to `max_len` positions.
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            max_len,
        }
    }

    /// Positions cached for `layer` (0 when it has none).
    pub fn len(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Some((k, _))) => k.dims().first().copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether no layer holds anything.
    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(Option::is_none)
    }

    /// Keeps the first `len` positions of every layer (drafts the cloud did not confirm go).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let n = k.dims().first().copied().unwrap_or(0);
            if len < n {
                *k = k.narrow(0, 0, len)?;
                *v = v.narrow(0, 0, len)?;
            }
        }
        Ok(())
    }

    /// Drops everything cached.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }
}

impl KvView for ContiguousKv {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let [span] = ctx.seqs() else {
            return Err(ModelError::Input(format!(
                "a contiguous KV cache holds one sequence; the batch has {}",
                ctx.seqs().len()
            )));
        };
        let cached = self.len(layer);
        if span.past != cached {
            return Err(ModelError::Input(format!(
                "layer {layer}: batch continues at position {} but {cached} positions are cached",
                span.past
            )));
        }
        if cached + span.len > self.max_len {
            return Err(ModelError::Input(format!(
                "context of {} positions exceeds the limit of {}",
                cached + span.len,
                self.max_len
            )));
        }
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Input(format!("layer {layer} is outside this cache")))?;
        let (k_all, v_all) = match slot.as_ref() {
            None => (k.clone(), v.clone()),
            Some((ck, cv)) => (Tensor::cat(&[ck, k], 0)?, Tensor::cat(&[cv, v], 0)?),
        };
        let out = causal_attention(q, &k_all, &v_all);
        *slot = Some((k_all, v_all));
        out
    }
}
