//! Tiny random-weight Llama checkpoints for tests (no network), and a few helpers.
//!
//! The generator itself is `tandem_model::synthetic` (also used at run time by
//! `tandem-loadtest tiny-model` and the 8B-shaped random models); this module re-exports it,
//! panicking instead of returning errors, as a test wants.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::LocalSplit;
pub use tandem_model::synthetic::{
    byte_chars, config_json, prompt, specs, Rng, TinySpec, CHATML, SPECIALS,
};

/// All tensors of a spec, HF names, f32.
pub fn tensors(s: &TinySpec) -> Vec<(String, Tensor)> {
    tandem_model::synthetic::tensors(s).expect("tiny tensors")
}

/// Writes a spec as an HF directory under `dir` (config.json + safetensors shards).
/// Returns the safetensors files written.
pub fn write_hf(dir: &Path, s: &TinySpec) -> Vec<PathBuf> {
    tandem_model::synthetic::write_hf(dir, s).expect("write the tiny HF checkpoint")
}

/// Writes the tiny byte-level BPE tokenizer and its ChatML config into `dir`.
pub fn write_tokenizer(dir: &Path) {
    tandem_model::synthetic::write_tokenizer(dir).expect("write the tiny tokenizer")
}

/// Max absolute difference of two equal-shape tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().expect("flat").to_vec1().expect("vec");
    let b: Vec<f32> = b.flatten_all().expect("flat").to_vec1().expect("vec");
    assert_eq!(a.len(), b.len(), "shape mismatch");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Where the demo model is, if present; panics when absent and `TANDEM_REQUIRE_DEMO=1`.
pub fn demo_model() -> Option<PathBuf> {
    let path = std::env::var_os("TANDEM_DEMO_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Every crate of the workspace sits one folder below its root, as this one does.
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("TANDEM_REQUIRE_DEMO").as_deref() == Ok("1") {
        panic!(
            "demo model missing at {} (run scripts/fetch-demo-model.sh)",
            path.display()
        );
    }
    eprintln!(
        "skipping: demo model not found at {} (run scripts/fetch-demo-model.sh)",
        path.display()
    );
    None
}

/// Runs a split model greedily for `steps` forward passes (the prompt, then one token each):
/// each pass's f32 logits and the greedy token chosen from them.
pub fn run_greedy(m: &LocalSplit, prompt: &[u32], steps: usize) -> (Vec<Tensor>, Vec<u32>) {
    let n = m.edge.config().num_hidden_layers;
    let max = m.edge.config().max_position_embeddings;
    let (mut ekv, mut ckv) = (ContiguousKv::new(n, max), ContiguousKv::new(n, max));
    let (mut input, mut pos) = (prompt.to_vec(), 0);
    let (mut logits, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let ctx = ForwardCtx::single(pos, input.len());
        let h = m
            .edge
            .forward(&input, &ctx, &mut ekv)
            .expect("edge forward");
        let l = m
            .cloud
            .forward(&h, &ctx, &mut ckv)
            .expect("cloud forward")
            .squeeze(0)
            .expect("squeeze");
        pos += input.len();
        let t = tandem_model::sampling::argmax(&l.to_vec1::<f32>().expect("logits"));
        tokens.push(t);
        input = vec![t];
        logits.push(l);
    }
    (logits, tokens)
}

/// The tiny model the server tests serve: `specs()[2]` with a tokenizer, written as a Hugging
/// Face directory under `dir` and split after 2 edge layers; answers the split directory
/// (`edge/`, `cloud/`).
pub fn write_tiny_split(dir: &Path) -> PathBuf {
    let hf = dir.join("hf");
    write_hf(&hf, &specs()[2]);
    write_tokenizer(&hf);
    let ck = Checkpoint::open(&hf).expect("open hf");
    let split_dir = dir.join("split");
    let opts = SplitOptions {
        edge_layers: 2,
        dtype: ck.stored_dtype,
        force: false,
        progress: false,
    };
    write_split(&ck, &split_dir, &opts).expect("split");
    split_dir
}
