//! `tandem generate`: a split model run in one process, the edge part then the cloud part,
//! token by token (streamed text, or one JSON object).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tandem_model::pipeline::{GenerateRequest, LocalSplit, LocalSplitOptions};
use tandem_model::weights::parse_dtype;
use tandem_protocol::SamplingParams;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// An HF model directory, a .gguf file, or a directory written by `tandem split`.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: PathBuf,
    /// Decoder layers on the device (default 1 for a whole model; a split directory knows its own).
    #[arg(long, env = "TANDEM_EDGE_LAYERS")]
    pub edge_layers: Option<usize>,
    /// The user's prompt.
    #[arg(long)]
    pub prompt: String,
    /// A system message (needs --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Apply the model's chat template to the system and user messages.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Stop when the output contains this text (repeatable); the text is not shown.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Weight dtype: auto (bf16 where the CPU has AMX or AVX512-BF16, else f32), f32, f16 or
    /// bf16 (default: the checkpoint's; f32 for GGUF). bf16 runs on the bf16 kernels with f32
    /// activations.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Where the cloud layers run: cpu [default] or cuda[:N] (a build with `--features
    /// cuda`; `--dtype auto` is bf16 there). The edge layers stay on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: tandem_model::device::DeviceName,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
    }
    .validate()?;
    let dtype = match a.dtype.as_deref() {
        Some(d) if d.eq_ignore_ascii_case("auto") => Some(a.device.auto_dtype()),
        Some(d) => Some(parse_dtype(d)?),
        None => None,
    };
    let load_started = Instant::now();
    let edge_layers = if tandem_model::checkpoint::is_split_dir(&a.model) {
        a.edge_layers
    } else {
        Some(a.edge_layers.unwrap_or(1))
    };
    let model = LocalSplit::load(
        &a.model,
        &LocalSplitOptions {
            edge_layers,
            dtype,
            device: a.device.open()?,
        },
    )
    .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = load_started.elapsed().as_secs_f64();
    let prompt_ids = model.prompt_ids(&a.prompt, a.system.as_deref(), a.chat)?;
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: a.max_tokens,
        sampling,
        stop_strings: a.stop.clone(),
        eos_ids: None,
    };
    let k = model.edge.split().edge_layers();
    let n = model.edge.split().num_layers();
    let stdout = std::io::stdout();
    let gen = if a.json {
        model.generate(&req, &mut |_| {})?
    } else {
        let mut lock = stdout.lock();
        let g = model.generate(&req, &mut |piece| {
            let _ = lock.write_all(piece.as_bytes());
            let _ = lock.flush();
        })?;
        let _ = writeln!(lock);
        let _ = lock.flush();
        g
    };
    report(&gen, a.json, (k, n), load_s);
    Ok(())
}

/// The generation's figures: one JSON object on stdout (`--json`), or a line on stderr after
/// the streamed text.
fn report(
    gen: &tandem_model::pipeline::Generation,
    json: bool,
    (k, n): (usize, usize),
    load_s: f64,
) {
    let decode_tokens = gen.output_ids.len().saturating_sub(1);
    let decode_s = gen.total_s - gen.time_to_first_token_s;
    if json {
        let obj = serde_json::json!({
            "prompt_ids": gen.prompt_ids,
            "output_ids": gen.output_ids,
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "edge_layers": k,
            "num_layers": n,
            "load_s": load_s,
            "time_to_first_token_s": gen.time_to_first_token_s,
            "total_s": gen.total_s,
        });
        println!("{obj}");
    } else {
        eprintln!(
            "[edge layers {k}/{n}] {} prompt + {} output tokens, finish: {}, load {:.2}s, first token {:.2}s, {:.1} tokens/s after",
            gen.prompt_ids.len(),
            gen.output_ids.len(),
            gen.finish_reason,
            load_s,
            gen.time_to_first_token_s,
            if decode_s > 0.0 { decode_tokens as f64 / decode_s } else { 0.0 }
        );
    }
}
