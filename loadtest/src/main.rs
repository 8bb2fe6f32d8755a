//! `tandem-loadtest`: simulated devices against a running Tandem server (see the library
//! doc of `tandem_loadtest`).
//!
//! ```text
//! tandem-loadtest run --server ws://HOST:PORT/v1/edge/ws --edge SPLIT/edge --devices N \
//!     [--arrival all|poisson:RATE_PER_S] [--prompt-tokens fixed:N|uniform:A-B] \
//!     [--output-tokens fixed:N|uniform:A-B] [--think-ms MS] [--generations-per-device G] \
//!     [--duration-s S] [--dtype f32|f16|bf16|int8] [--prompt-pool P] [--seed S] \
//!     [--report out.json] [--metrics-url http://HOST:PORT/metrics] [--quiet]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tandem_loadtest::{parse_dtype, Arrival, LengthDist, LoadConfig};
use tandem_protocol::HiddenDtype;

#[derive(Parser, Debug)]
#[command(
    name = "tandem-loadtest",
    version,
    about = "Simulated devices against a Tandem server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs simulated devices against a server and writes a JSON report.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The server's WebSocket URL: ws://HOST:PORT/v1/edge/ws.
    #[arg(long)]
    server: String,
    /// The edge checkpoint of the split the server serves (SPLIT/edge, or SPLIT).
    #[arg(long)]
    edge: PathBuf,
    /// Simulated devices.
    #[arg(long, default_value_t = 16)]
    devices: usize,
    /// When devices start: `all` at once, or `poisson:RATE` devices per second.
    #[arg(long, default_value = "all")]
    arrival: Arrival,
    /// Prompt length: fixed:N or uniform:MIN-MAX (one draw per pool prompt).
    #[arg(long, default_value = "fixed:64")]
    prompt_tokens: LengthDist,
    /// max_tokens per generation: fixed:N or uniform:MIN-MAX.
    #[arg(long, default_value = "fixed:32")]
    output_tokens: LengthDist,
    /// Pause of a device between its generations, in milliseconds.
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Generations each device runs, one after the other.
    #[arg(long, default_value_t = 1)]
    generations_per_device: u32,
    /// Hard stop, in seconds: generations still running are cut and counted.
    #[arg(long, default_value_t = 60.0)]
    duration_s: f64,
    /// Hidden-state encoding on the wire.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: HiddenDtype,
    /// Distinct prompts (random token ids) the generations draw from.
    #[arg(long, default_value_t = 8)]
    prompt_pool: usize,
    /// Seed of the prompts, lengths and arrivals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the JSON report (default: standard output).
    #[arg(long)]
    report: Option<PathBuf>,
    /// The server's Prometheus endpoint, scraped before and after the run.
    #[arg(long)]
    metrics_url: Option<String>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<LoadConfig> {
        anyhow::ensure!(
            self.duration_s.is_finite() && self.duration_s > 0.0,
            "--duration-s must be a positive number of seconds"
        );
        Ok(LoadConfig {
            arrival: self.arrival,
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            think: Duration::from_millis(self.think_ms),
            generations_per_device: self.generations_per_device,
            duration: Duration::from_secs_f64(self.duration_s),
            dtype: self.dtype,
            prompt_pool: self.prompt_pool,
            seed: self.seed,
            metrics_url: self.metrics_url,
            progress: !self.quiet,
            ..LoadConfig::new(self.server, self.edge, self.devices)
        })
    }
}

fn main() -> ExitCode {
    let Command::Run(args) = Cli::parse().command;
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let report_path = args.report.clone();
    let cfg = args.into_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(tandem_loadtest::run(cfg))?;
    let json = serde_json::to_string_pretty(&report)?;
    match report_path {
        Some(path) => {
            std::fs::write(&path, json + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            eprint!("{}", report.summary());
            eprintln!("report: {}", path.display());
        }
        None => {
            eprint!("{}", report.summary());
            println!("{json}");
        }
    }
    Ok(())
}
