//! `tandem split` and `tandem random-model`: write checkpoints (a model cut into its edge and
//! cloud parts; a random-weight model with a real model's shapes).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tandem_model::checkpoint::{write_split_as, Checkpoint, EdgeWeights, SplitOptions};
use tandem_model::weights::{dtype_user_name, parse_dtype};

#[derive(Args, Debug)]
pub struct SplitArgs {
    /// An HF model directory (config.json + *.safetensors) or a .gguf file.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: PathBuf,
    /// Number of decoder layers that run on the device.
    #[arg(long, env = "TANDEM_EDGE_LAYERS")]
    pub edge_layers: usize,
    /// Output directory; edge/ and cloud/ are created inside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype of the parts: auto (bf16 where the CPU has AMX or AVX512-BF16, else
    /// f32), f32, f16 or bf16 (default: the source's; f32 for GGUF).
    #[arg(long)]
    pub dtype: Option<String>,
    /// A light edge part for devices: bf16, int8 (projections and embedding in int8, one
    /// scale per row) or q4-embed (int8 projections, the embedding in 4-bit blocks of 32).
    /// The cloud part is unchanged. Default: the edge like the cloud (--dtype).
    #[arg(long)]
    pub edge_dtype: Option<String>,
    /// Replace existing parts in the output directory.
    #[arg(long)]
    pub force: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct RandomModelArgs {
    /// llama-3.2-1b, llama-3.2-3b, llama-3.1-8b or tiny.
    #[arg(long)]
    pub shape: String,
    /// Output directory (an HF model directory: config.json, model.safetensors, tokenizer).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep only the first N decoder layers (the same shapes per layer): enough to measure an
    /// edge part cut at k < N without writing the whole model.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Replace an existing checkpoint in the output directory.
    #[arg(long)]
    pub force: bool,
}

pub fn split(a: SplitArgs) -> Result<()> {
    let started = Instant::now();
    let ck =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let dtype = match &a.dtype {
        Some(d) => parse_dtype(d)?,
        None => ck.stored_dtype,
    };
    let opts = SplitOptions {
        edge_layers: a.edge_layers,
        dtype,
        force: a.force,
        progress: !a.quiet,
    };
    let edge_weights = match &a.edge_dtype {
        Some(d) => d.parse::<EdgeWeights>().map_err(anyhow::Error::msg)?,
        None => EdgeWeights::AsSplit,
    };
    let (edge, cloud) = write_split_as(&ck, &a.out, &opts, edge_weights)?;
    eprintln!(
        "split {} at layer {} of {} ({}{}) in {:.1}s",
        a.model.display(),
        edge.edge_layers,
        edge.num_layers,
        dtype_user_name(dtype),
        edge.edge_weights
            .as_deref()
            .map(|w| format!(", edge {w}"))
            .unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    for (m, dir) in [(&edge, "edge"), (&cloud, "cloud")] {
        eprintln!(
            "  {}: layers [{}, {}), {} tensors, {:.1} MiB",
            a.out.join(dir).display(),
            m.layers[0],
            m.layers[1],
            m.weights.tensors,
            m.weights.bytes as f64 / (1024.0 * 1024.0)
        );
    }
    eprintln!("  pair id {}", edge.pair_id);
    Ok(())
}

pub fn random_model(a: RandomModelArgs) -> Result<()> {
    use tandem_model::random_model::{write, RealShape};
    let mut shape = RealShape::named(&a.shape)?.clone();
    if let Some(layers) = a.layers {
        anyhow::ensure!(
            (1..=shape.layers).contains(&layers),
            "--layers must be 1..={} for {}",
            shape.layers,
            shape.name
        );
        shape.layers = layers;
    }
    let shape = &shape;
    anyhow::ensure!(
        a.force || !a.out.join("model.safetensors").exists(),
        "{} already holds a checkpoint (--force replaces it)",
        a.out.display()
    );
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("writing {}", shape.name));
    let bytes = write(&a.out, shape, a.seed, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "{}: {:.2} B parameters, {:.2} GiB of bf16 in {} ({:.1}s)",
        shape.name,
        shape.parameters() as f64 / 1e9,
        bytes as f64 / (1u64 << 30) as f64,
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
