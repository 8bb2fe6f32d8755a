//! `tandem-loadtest`: simulated devices against a running Tandem server (see the library
//! doc of `tandem_loadtest`).
//!
//! ```text
//! tandem-loadtest run --server ws://HOST:PORT/v1/edge/ws --edge SPLIT/edge --devices N \
//!     [--arrival all|poisson:RATE_PER_S] [--prompt-tokens fixed:N|uniform:A-B] \
//!     [--output-tokens fixed:N|uniform:A-B] [--think-ms MS] [--generations-per-device G] \
//!     [--duration-s S] [--dtype f32|f16|bf16|int8] [--prompt-pool P] [--seed S] \
//!     [--report out.json] [--metrics-url http://HOST:PORT/metrics] [--quiet] \
//!     [--trace lengths.json] [--device-compute replay|real] [--max-reconnects N] \
//!     [--silence-timeout-s S] [--plot out.png] [--plot-font FONT.ttf] \
//!     [--rtt-ms MS] [--rtt-spread-ms MS] [--jitter-ms MS] [--uplink-mbit R] [--downlink-mbit R] \
//!     [--links N] [--prompt-file FILE [--profile JSON]] [--max-draft-tokens N]
//! tandem-loadtest tiny-model --out DIR [--seed S] [--edge-layers K] [--context N] [--force]
//! tandem-loadtest proxy --listen HOST:PORT --upstream HOST:PORT [--rtt-ms MS] [--jitter-ms MS] \
//!     [--uplink-mbit R] [--downlink-mbit R] [--seed S]
//! ```
//!
//! `SIGINT` or `SIGTERM` stops a run early: what still runs is cut, and the report is
//! written as at the deadline (`stopped_by: interrupted`).

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tandem_loadtest::config::DEFAULT_MAX_RECONNECTS;
use tandem_loadtest::device::DEFAULT_SILENCE_TIMEOUT;
use tandem_loadtest::{parse_dtype, Arrival, DeviceCompute, LengthDist, LoadConfig, Trace};
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
    Run(Box<RunArgs>),
    /// Writes a tiny random-weight model (DIR/hf) and its split (DIR/edge, DIR/cloud), for
    /// load tests with many sessions: `tandem serve --cloud DIR/cloud`, `--edge DIR/edge`.
    TinyModel(TinyModelArgs),
    /// Relays TCP connections to an upstream with a round trip, jitter and rate caps added
    /// (`tandem_loadtest::netem`), until SIGINT or SIGTERM.
    Proxy(ProxyArgs),
}

#[derive(clap::Args, Debug)]
struct ProxyArgs {
    /// Address to listen on (port 0: any free port; the line printed says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where connections go: HOST:PORT.
    #[arg(long)]
    upstream: String,
    /// Round trip added, in milliseconds: each direction is delayed by half of it.
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// Jitter on each direction's delay, in milliseconds: a uniform draw from ±this per chunk.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Client-to-upstream rate cap per connection, in Mbit/s (0: none).
    #[arg(long, default_value_t = 0.0)]
    uplink_mbit: f64,
    /// Upstream-to-client rate cap per connection, in Mbit/s (0: none).
    #[arg(long, default_value_t = 0.0)]
    downlink_mbit: f64,
    /// Seed of the jitter draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct TinyModelArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Decoder layers on the edge (of 5).
    #[arg(long, default_value_t = 2)]
    edge_layers: usize,
    /// The model's context (max_position_embeddings).
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Replace DIR/edge and DIR/cloud if they exist.
    #[arg(long)]
    force: bool,
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
    /// Pause of a device before it sends each decode step's hidden state, in milliseconds
    /// (a slow device, or sessions kept open while mostly idle).
    #[arg(long, default_value_t = 0)]
    step_delay_ms: u64,
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
    /// Generation lengths from a JSON file: an array of
    /// {"prompt_tokens": N, "output_tokens": N, "think_ms": MS (optional)}, taken in order and
    /// cycled (instead of --prompt-tokens and --output-tokens).
    #[arg(long, conflicts_with_all = ["prompt_tokens", "output_tokens"])]
    trace: Option<PathBuf>,
    /// Hidden states replayed from a shared tree, or computed by every device itself.
    #[arg(long, default_value = "replay")]
    device_compute: DeviceCompute,
    /// Consecutive failed reconnection attempts before a generation is given up as lost
    /// (0: a dropped connection fails the generation).
    #[arg(long, default_value_t = DEFAULT_MAX_RECONNECTS)]
    max_reconnects: u32,
    /// Seconds the server may stay silent while a device waits for it (for `Opened`, a token
    /// or `Done`) before the connection counts as lost. The device's own pauses
    /// (--step-delay-ms, --think-ms) never count.
    #[arg(long, default_value_t = DEFAULT_SILENCE_TIMEOUT.as_secs_f64())]
    silence_timeout_s: f64,
    /// Network conditions: a round trip added between every device and the server, in
    /// milliseconds (in-process delay proxies; see `tandem-loadtest proxy`). 0 with no other
    /// network flag: devices connect directly.
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// The devices' round trips spread evenly over RTT ± this, over --links proxies.
    #[arg(long, default_value_t = 0)]
    rtt_spread_ms: u64,
    /// Jitter on each direction's delay, per chunk, in milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Each device's uplink cap in Mbit/s (0: none).
    #[arg(long, default_value_t = 0.0)]
    uplink_mbit: f64,
    /// Each device's downlink cap in Mbit/s (0: none).
    #[arg(long, default_value_t = 0.0)]
    downlink_mbit: f64,
    /// Distinct links (proxies) the devices are spread over.
    #[arg(long, default_value_t = 16)]
    links: usize,
    /// One prompt for every generation, as `tandem-edge run --prompt-file` builds it: the
    /// file (a template over --profile's fields) in the edge checkpoint's chat template,
    /// tokenized (e.g. examples/extraction-prompt.txt, whose answer repeats spans of it, or
    /// examples/gift-prompt-short.txt with examples/profile.json: open generation). Instead
    /// of --prompt-tokens and --prompt-pool.
    #[arg(long, conflicts_with_all = ["prompt_tokens", "trace"])]
    prompt_file: Option<PathBuf>,
    /// The profile (a JSON object) the --prompt-file template reads.
    #[arg(long, requires = "prompt_file")]
    profile: Option<PathBuf>,
    /// Speculation across the split, as `tandem-edge run --max-draft-tokens`: each device
    /// drafts up to N tokens per decode step (prompt lookup, adaptive length, within the
    /// cloud's cap) and sends their rows with the token it received. 0: off. Needs
    /// --device-compute real: replayed devices never draft (their shared tree holds one
    /// row per step).
    #[arg(long, default_value_t = 0)]
    max_draft_tokens: usize,
    /// Device tokens for a server that requires them (one `tdv_…` per line, from `tandem
    /// admin device-token` or `POST /v1/admin/device-tokens`): device i presents line
    /// i mod n as `Authorization: Bearer` on its WebSocket upgrade.
    #[arg(long, env = "TANDEM_LOADTEST_DEVICE_TOKENS")]
    device_token_file: Option<PathBuf>,
    /// Also write a PNG: latency CDFs and throughput over time.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// TrueType font for the PNG's text (default: DejaVu Sans where installed; without
    /// one the chart has no text).
    #[arg(long, requires = "plot")]
    plot_font: Option<PathBuf>,
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<LoadConfig> {
        anyhow::ensure!(
            self.duration_s.is_finite() && self.duration_s > 0.0,
            "--duration-s must be a positive number of seconds"
        );
        anyhow::ensure!(
            self.silence_timeout_s.is_finite() && self.silence_timeout_s > 0.0,
            "--silence-timeout-s must be a positive number of seconds"
        );
        Ok(LoadConfig {
            arrival: self.arrival,
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            think: Duration::from_millis(self.think_ms),
            step_delay: Duration::from_millis(self.step_delay_ms),
            generations_per_device: self.generations_per_device,
            duration: Duration::from_secs_f64(self.duration_s),
            dtype: self.dtype,
            prompt_pool: self.prompt_pool,
            seed: self.seed,
            metrics_url: self.metrics_url,
            progress: !self.quiet,
            trace: match &self.trace {
                Some(path) => Some(Trace::load(path).map_err(anyhow::Error::msg)?),
                None => None,
            },
            device_compute: self.device_compute,
            prompts: self
                .prompt_file
                .map(|file| tandem_loadtest::FixedPrompts::Text {
                    file,
                    profile: self.profile,
                }),
            max_draft_tokens: self.max_draft_tokens,
            device_tokens: match &self.device_token_file {
                Some(path) => {
                    tandem_loadtest::config::read_device_tokens(path).map_err(anyhow::Error::msg)?
                }
                None => Vec::new(),
            },
            max_reconnects: self.max_reconnects,
            silence_timeout: Duration::from_secs_f64(self.silence_timeout_s),
            network: {
                let any = self.rtt_ms > 0
                    || self.rtt_spread_ms > 0
                    || self.jitter_ms > 0
                    || self.uplink_mbit > 0.0
                    || self.downlink_mbit > 0.0;
                if any {
                    anyhow::ensure!(self.links >= 1, "--links must be at least 1");
                    Some(tandem_loadtest::config::Network {
                        rtt: Duration::from_millis(self.rtt_ms),
                        rtt_spread: Duration::from_millis(self.rtt_spread_ms),
                        jitter: Duration::from_millis(self.jitter_ms),
                        uplink: tandem_loadtest::netem::Rate::from_mbit(self.uplink_mbit)?,
                        downlink: tandem_loadtest::netem::Rate::from_mbit(self.downlink_mbit)?,
                        links: self.links,
                    })
                } else {
                    None
                }
            },
            ..LoadConfig::new(self.server, self.edge, self.devices)
        })
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(args) => run(*args),
        Command::TinyModel(args) => tiny_model(args),
        Command::Proxy(args) => proxy(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let report_path = args.report.clone();
    let plot = args.plot.clone().map(|p| (p, args.plot_font.clone()));
    let cfg = args.into_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let out = runtime.block_on(async {
        let stop = interrupted().context("listening for SIGINT and SIGTERM")?;
        tandem_loadtest::run_until(cfg, stop).await
    })?;
    let report = &out.report;
    let json = serde_json::to_string_pretty(report)?;
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
    if let Some((path, font)) = plot {
        let text = tandem_loadtest::plot::write_png(report, &out.records, &path, font.as_deref())?;
        if !text {
            eprintln!(
                "plot: no font found (give one with --plot-font FILE.ttf); drawn without text"
            );
        }
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

/// Completes on the first `SIGINT` or `SIGTERM`. Registering the handlers here also undoes
/// the `SIGINT` that a shell script's `tandem-loadtest run … &` starts with ignored, so the
/// scenarios' `kill -INT` stops a background run instead of leaving it to its deadline.
#[cfg(unix)]
fn interrupted() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn interrupted() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

fn proxy(args: ProxyArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use tandem_loadtest::netem::{self, LinkConditions, ProxyConfig, Rate};

    let conditions = LinkConditions {
        rtt: Duration::from_millis(args.rtt_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        uplink: Rate::from_mbit(args.uplink_mbit).context("--uplink-mbit")?,
        downlink: Rate::from_mbit(args.downlink_mbit).context("--downlink-mbit")?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let stop = interrupted().context("listening for SIGINT and SIGTERM")?;
        let listener = tokio::net::TcpListener::bind(args.listen.as_str())
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let config = ProxyConfig {
            upstream: args.upstream.clone(),
            conditions,
            seed: args.seed,
        };
        let handle = netem::spawn(listener, config)?;
        // Scripts read the address from this line.
        println!(
            "proxy listening on {} -> {} ({conditions})",
            handle.local_addr(),
            args.upstream
        );
        std::io::stdout().flush()?;
        stop.await;
        handle.shutdown().await;
        Ok(())
    })
}

fn tiny_model(args: TinyModelArgs) -> anyhow::Result<()> {
    use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
    use tandem_model::synthetic;

    let spec = synthetic::TinySpec {
        seed: args.seed,
        ..synthetic::specs()[2].clone()
    };
    anyhow::ensure!(
        (1..spec.layers).contains(&args.edge_layers),
        "--edge-layers must be between 1 and {}",
        spec.layers - 1
    );
    anyhow::ensure!(args.context >= 16, "--context must be at least 16");
    let hf = args.out.join("hf");
    synthetic::write_hf(&hf, &spec)?;
    synthetic::write_tokenizer(&hf)?;
    // The spec's context is 512; a load test may want longer prompts.
    let config_path = hf.join("config.json");
    let mut config = synthetic::config_json(&spec);
    config["max_position_embeddings"] = args.context.into();
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let ck = Checkpoint::open(&hf).with_context(|| format!("opening {}", hf.display()))?;
    let opts = SplitOptions {
        edge_layers: args.edge_layers,
        dtype: ck.stored_dtype,
        force: args.force,
        progress: false,
    };
    let (edge, _cloud) = write_split(&ck, &args.out, &opts)?;
    println!(
        "tiny model `{}` (seed {}, {} layers, hidden {}, vocab {}, context {}): {}",
        spec.name,
        spec.seed,
        spec.layers,
        spec.hidden,
        spec.vocab,
        args.context,
        hf.display()
    );
    println!(
        "split after {} layers: {} and {} (pair {})",
        args.edge_layers,
        args.out.join("edge").display(),
        args.out.join("cloud").display(),
        edge.pair_id
    );
    Ok(())
}
