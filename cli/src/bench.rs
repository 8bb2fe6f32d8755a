//! `tandem bench` (the engine's throughput on a model) and `tandem device-check` (the cloud
//! part on an accelerator against the CPU): JSON reports on stdout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};
use tandem_model::weights::dtype_user_name;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// An HF model directory, a .gguf file, or a split directory.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub edge_layers: usize,
    /// Session counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub sessions: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// decode-first or prefill-first.
    #[arg(long, default_value = "decode-first")]
    pub policy: String,
    #[arg(long, default_value_t = 256)]
    pub max_batch_tokens: usize,
    /// As `tandem serve --prefill-slack` (`inf`: no cap).
    #[arg(long, default_value_t = 0.5)]
    pub prefill_slack: f64,
    /// As `tandem serve --decode-wait-ms`. The simulated devices answer each token in
    /// rounds (all of them, then all the answers at once), so a wait longer than a round
    /// (e.g. 200) makes every decode step carry every session: the cloud step alone.
    #[arg(long, default_value_t = 5.0)]
    pub decode_wait_ms: f64,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV cache size in GiB (in the KV dtype, which follows --dtype).
    #[arg(long, default_value_t = 2.0)]
    pub kv_cache_gib: f64,
    /// Weight dtype: auto (bf16 where the CPU has AMX or AVX512-BF16, else f32), f32, bf16
    /// or f16; the KV cache follows it.
    #[arg(long, default_value = "f32")]
    pub dtype: tandem_model::weights::DtypeName,
    /// Where the cloud layers and KV cache run: cpu or cuda[:N] (a build with
    /// `--features cuda`; `--dtype auto` is bf16 there). The edge layers stay on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: tandem_model::device::DeviceName,
    /// Also measure the machine's memory bandwidth and the kernel's peak, and report each
    /// figure as a fraction of its roofline.
    #[arg(long)]
    pub roofline: bool,
    /// Mixed run: sessions decoding while prompts arrive (0 skips the run).
    #[arg(long, default_value_t = 16)]
    pub mixed_decoders: usize,
    /// Mixed run: prompts arriving.
    #[arg(long, default_value_t = 4)]
    pub mixed_prompts: usize,
    /// Mixed run: tokens per arriving prompt.
    #[arg(long, default_value_t = 512)]
    pub mixed_prompt_tokens: usize,
    /// Prefix run: sessions sharing one system prompt (0 skips the run).
    #[arg(long, default_value_t = 32)]
    pub prefix_sessions: usize,
    /// Prefix run: tokens of the shared system prompt.
    #[arg(long, default_value_t = 200)]
    pub prefix_tokens: usize,
}

#[derive(Args, Debug)]
pub struct DeviceCheckArgs {
    /// A whole model (HF directory or .gguf) or a split directory.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub edge_layers: Option<usize>,
    /// The device to check: cuda[:N] (cpu checks the CPU against itself).
    #[arg(long, default_value = "cuda")]
    pub device: tandem_model::device::DeviceName,
    /// The device's dtype: f32 (logits must agree within --tolerance) or bf16 (agreement
    /// reported, at least --min-agreement of the greedy tokens).
    #[arg(long, default_value = "f32")]
    pub dtype: tandem_model::weights::DtypeName,
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub tolerance: f32,
    #[arg(long, default_value_t = 0.9)]
    pub min_agreement: f64,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    use tandem_kvcache::KvLayout;
    use tandem_scheduler::{Policy, SchedulerConfig};
    let policy = match a.policy.as_str() {
        "decode-first" => Policy::DecodeFirst,
        "prefill-first" => Policy::PrefillFirst,
        other => anyhow::bail!("unknown policy `{other}` (decode-first or prefill-first)"),
    };
    let dtype = a.device.resolve_dtype(a.dtype);
    let load_started = Instant::now();
    let model = LocalSplit::load(
        &a.model,
        &LocalSplitOptions {
            edge_layers: Some(a.edge_layers),
            dtype: Some(dtype),
            device: a.device.open()?,
        },
    )
    .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = load_started.elapsed().as_secs_f64();
    let kv_dtype = tandem_serve::server::kv_dtype_for(dtype);
    let c = model.cloud.config();
    let range = model.cloud.split().cloud_range();
    let layout = KvLayout {
        first_layer: range.start,
        num_layers: range.len(),
        num_blocks: 0,
        block_size: a.block_size,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        dtype: kv_dtype,
    };
    let kv_blocks = layout.blocks_for_budget((a.kv_cache_gib * (1u64 << 30) as f64) as usize);
    let cfg = tandem_engine::EngineConfig {
        scheduler: SchedulerConfig {
            policy,
            max_batch_tokens: a.max_batch_tokens,
            max_batch_seqs: 256,
            max_sessions: 4096,
            max_queued_tokens: 1 << 20,
            max_context: c.max_position_embeddings,
            prefill_slack: Some(a.prefill_slack),
        },
        block_size: a.block_size,
        kv_blocks,
        kv_dtype,
        prefix_sharing: true,
        decode_wait: {
            anyhow::ensure!(
                a.decode_wait_ms.is_finite() && (0.0..=10_000.0).contains(&a.decode_wait_ms),
                "--decode-wait-ms must be within 0..=10000, got {}",
                a.decode_wait_ms
            );
            std::time::Duration::from_secs_f64(a.decode_wait_ms / 1000.0)
        },
        max_draft_tokens: tandem_engine::MAX_DRAFT_CAP,
    };
    let plan = tandem_engine::bench::BenchPlan {
        sessions: a.sessions,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        prefill_tokens: a.prefill_tokens,
        mixed_decoders: a.mixed_decoders,
        mixed_prompts: a.mixed_prompts,
        mixed_prompt_tokens: a.mixed_prompt_tokens,
        prefix_sessions: a.prefix_sessions,
        prefix_tokens: a.prefix_tokens,
        roofline: a.roofline,
    };
    eprintln!(
        "loaded {} as {} in {load_s:.1}s ({:.0} MiB of cloud weights, resident {:.0} MiB)",
        a.model.display(),
        dtype_user_name(dtype),
        model.cloud.weight_bytes() as f64 / (1u64 << 20) as f64,
        tandem_engine::bench::memory_mib("VmRSS").unwrap_or(0.0)
    );
    let report = tandem_engine::bench::run(model, cfg, &plan)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

pub fn device_check(a: DeviceCheckArgs) -> Result<()> {
    anyhow::ensure!(
        (1..=64).contains(&a.sessions) && (1..=1024).contains(&a.steps),
        "--sessions must be 1..=64 and --steps 1..=1024"
    );
    let plan = tandem_engine::devcheck::CheckPlan {
        device: a.device,
        dtype: a.device.resolve_dtype(a.dtype),
        sessions: a.sessions,
        steps: a.steps,
        tolerance: a.tolerance,
        min_agreement: a.min_agreement,
    };
    let report = tandem_engine::devcheck::run(&a.model, a.edge_layers, &plan)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report["passed"] != serde_json::Value::Bool(true) {
        anyhow::bail!("the device check failed (see the report above)");
    }
    Ok(())
}
