//! `tandem-edge info`: what an edge checkpoint costs this device once loaded (JSON on stdout).
//!
//! Reads the checkpoint as `run` does and reports the weights held in memory, the embedding
//! table's format, the files' size, and this process's resident memory after loading
//! (`VmRSS`, and its peak `VmHWM`, from `/proc/self/status` where there is one). The figures
//! are for the model alone: no session, KV cache or runtime is started.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::bundle::EdgeBundle;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// An edge checkpoint (`edge/` of a split, or the split directory).
    #[arg(long, env = "TANDEM_EDGE")]
    pub edge: PathBuf,
    /// Load the weights in this dtype, as `run --compute-dtype` would (default: as stored).
    #[arg(long)]
    pub compute_dtype: Option<tandem_model::weights::DtypeName>,
}

/// Loads the checkpoint and describes it.
pub fn info(args: &InfoArgs) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let bundle = EdgeBundle::load_as(&args.edge, args.compute_dtype.map(|d| d.resolve()))
        .with_context(|| format!("cannot load the edge checkpoint {}", args.edge.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    let part_dir = if args.edge.join("edge").is_dir() {
        args.edge.join("edge")
    } else {
        args.edge.clone()
    };
    let m = &bundle.manifest;
    let status = proc_status_kib();
    Ok(serde_json::json!({
        "edge": part_dir.display().to_string(),
        "edge_layers": m.edge_layers,
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "vocab_size": m.vocab_size,
        "stored": m.edge_weights.clone().unwrap_or_else(|| m.dtype.clone()),
        "embedding": bundle.model.embedding_format(),
        "weights_file_bytes": file_len(&part_dir.join(&m.weights.file)),
        "weights_in_memory_bytes": bundle.model.weight_bytes(),
        "rss_kib": status.0,
        "peak_rss_kib": status.1,
        "load_seconds": load_s,
    }))
}

fn file_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// `VmRSS` and `VmHWM` in KiB, where the OS reports them.
fn proc_status_kib() -> (Option<u64>, Option<u64>) {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    };
    (field("VmRSS:"), field("VmHWM:"))
}
