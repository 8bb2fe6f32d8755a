//! The tiny model the REST and operations tests serve: `common::specs()[2]` with a
//! tokenizer, written as a Hugging Face directory and split after 2 edge layers.

use std::path::{Path, PathBuf};

use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};

use crate::common;

/// Writes the model under `dir` and answers the split directory (`edge/`, `cloud/`).
pub fn write_tiny_split(dir: &Path) -> PathBuf {
    let hf = dir.join("hf");
    common::write_hf(&hf, &common::specs()[2]);
    common::write_tokenizer(&hf);
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
