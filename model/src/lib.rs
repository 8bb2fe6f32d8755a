//! `tandem-model`: a Llama-family model that can be cut in two.
//!
//! The edge part ([`EdgeModel`]) holds the token embedding and decoder layers `[0, k)`; the
//! cloud part ([`CloudModel`]) holds layers `[k, n)`, the final norm and the LM head. Both are
//! built from the same [`layers::DecoderLayer`] code, so running the edge then the cloud is the
//! whole model, not an approximation of it.
//!
//! # Layout
//! - [`config`]: [`LlamaConfig`] from HF `config.json` or GGUF metadata.
//! - [`weights`]: where tensors come from: an HF safetensors directory (sharded or not), a GGUF
//!   file (dequantized, Q/K rows un-permuted), or a split part. Shapes are checked on load.
//! - [`layers`]: RMSNorm, rotary embedding, attention, MLP, the decoder layer, and the
//!   [`KvView`] trait through which a layer reads and writes its KV cache.
//! - [`kv`]: [`ContiguousKv`], the simple per-sequence cache used by the edge and by tests.
//! - [`split`]: [`EdgeModel`], [`CloudModel`], [`SplitPoint`].
//! - [`manifest`], [`checkpoint`]: the on-disk split checkpoints and the manifest check.
//! - [`tokenizer`], [`chat`]: tokenizer (from `tokenizer.json` or GGUF) and chat template.
//! - [`sampling`]: turning logits into the next token.
//! - [`pipeline`]: one-process split generation (edge then cloud, token by token).
//! - [`privacy`]: differential-privacy clipping and Gaussian noise on hidden-state rows, its
//!   calibration and its accounting (used by the device and by the privacy audit).
//!
//! # Invariants
//! - Weights are immutable after load; all mutable state lives in the KV cache passed in.
//! - Hidden states travel as `[tokens, hidden]` (a flat, varlen layout: no batch padding).
//! - Attention and softmax are computed in f32 whatever the weight dtype.

// Unsafe code lives in tandem-kernels, mapping weight files included
// (`tandem_kernels::mmap`).
#![forbid(unsafe_code)]

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod device;
pub mod error;
pub mod kv;
pub mod layers;
pub mod manifest;
pub mod pipeline;
pub mod privacy;
pub mod random_model;
pub mod sampling;
pub mod split;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use kv::ContiguousKv;
pub use layers::{ForwardCtx, KvView};
pub use split::{CloudModel, EdgeModel, SplitPoint};
