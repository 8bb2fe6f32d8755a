//! The `tandem-edge` command: try the device side against a running `tandem serve`.
//!
//! `tandem-edge run` loads an edge checkpoint, a profile and the default sanitizer,
//! assembles the prompt with the model's chat template, streams the output text to stdout
//! as it arrives, and prints the transparency record (`--show-transparency`) or one JSON
//! object (`--json`).
//!
//! `tandem-edge serve-openai` answers OpenAI API requests on the device's loopback (see
//! [`crate::openai`]), with the same model and wire options.
//!
//! `tandem-edge inbox` lists the prompts partners sent to the user and answers or declines
//! them (see [`InboxArgs`] for who decides what); each answer streams like `run`'s output.
//! Both take the same model and wire options ([`ModelArgs`]).
//!
//! Status lines go to stderr; an error is one `error: …` line with its causes, and exit
//! code 1. The logic lives here, not in the binary, so tests can run it in-process ([`run`],
//! [`inbox()`]).

mod inbox;
mod info;
mod serve_openai;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tandem_model::privacy::{DpConfig, GaussianMechanism};
use tandem_protocol::{DoneReason, HiddenDtype, SamplingParams};

pub use self::inbox::{inbox, Console, InboxArgs, InboxReport};
pub use self::serve_openai::{serve_openai, ServeOpenAiArgs};
use crate::client::{ClientConfig, EdgeClient, Event, Finished, GenerateRequest, Generation};
use crate::prompt::{assemble, Profile, PromptTemplate};
use crate::sanitize::Sanitizer;
use crate::transparency::TransparencyRecord;
use crate::transport::ServerList;
use crate::EdgeBundle;

#[derive(Debug, Parser)]
#[command(
    name = "tandem-edge",
    version,
    about = "The device side of Tandem split inference"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one generation against a Tandem server.
    Run(RunArgs),
    /// List the prompts partners sent to this user, and answer or decline them.
    Inbox(InboxArgs),
    /// Answer OpenAI API requests (chat completions, completions, models) on this device's
    /// loopback, with split inference underneath.
    ServeOpenai(ServeOpenAiArgs),
    /// Load an edge checkpoint and report what it holds in memory (weights, embedding
    /// format, resident memory), as JSON.
    Info(info::InfoArgs),
}

/// Element type of the hidden states on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WireDtype {
    F32,
    F16,
    Bf16,
    Int8,
    /// 4-bit groups of 32 with each row's 8 largest values in f16 (about 0.29× f16's bytes).
    Int4,
}

impl From<WireDtype> for HiddenDtype {
    fn from(d: WireDtype) -> Self {
        match d {
            WireDtype::F32 => HiddenDtype::F32,
            WireDtype::F16 => HiddenDtype::F16,
            WireDtype::Bf16 => HiddenDtype::Bf16,
            WireDtype::Int8 => HiddenDtype::Int8,
            WireDtype::Int4 => HiddenDtype::Int4,
        }
    }
}

/// The edge checkpoint and how to reach the cloud: shared by `run` and `inbox`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The edge checkpoint (`edge/` written by `tandem split`, or the split directory).
    #[arg(long)]
    pub edge: PathBuf,
    /// Server WebSocket URL (`ws://HOST:PORT/v1/edge/ws`); repeat to give fallbacks. Needed
    /// for every generation (not by `inbox --list`).
    #[arg(long = "server")]
    pub servers: Vec<String>,
    /// A PEM file of certificate authorities to trust for wss:// and https:// besides the web's public
    /// roots (a private CA).
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Element type of the hidden states on the wire.
    #[arg(long, value_enum, default_value_t = WireDtype::F32)]
    pub dtype: WireDtype,
    /// The edge weights' dtype on this device: auto (bf16 where the CPU has AMX or
    /// AVX512-BF16, else f32), f32, bf16 or f16 (default: as stored in the checkpoint).
    #[arg(long)]
    pub compute_dtype: Option<tandem_model::weights::DtypeName>,
    /// Most prompt tokens per hidden-state message.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: usize,
    /// Speculation: the most tokens drafted on the device (prompt lookup) and sent with each
    /// decode step, so that one round trip can confirm several; the output is the same with
    /// any value. 0 turns it off; the cloud caps it by its load (docs/protocol.md §6).
    #[arg(long, default_value_t = crate::client::DEFAULT_MAX_DRAFT_TOKENS as u64,
          value_parser = clap::value_parser!(u64).range(0..=16))]
    pub max_draft_tokens: u64,
    /// Differential-privacy noise on every hidden-state row: the per-row epsilon (needs
    /// --dp-clip; `inf` clips without noise). See docs/privacy.md for what it buys and costs.
    #[arg(long, requires = "dp_clip")]
    pub dp_epsilon: Option<f64>,
    /// Per-row delta of the noise.
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// L2 norm each hidden-state row is clipped to before the noise is added.
    #[arg(long, requires = "dp_epsilon")]
    pub dp_clip: Option<f32>,
    /// The device token the provider issued (`tdv_…`): sent on every connection to the
    /// cloud (a server that requires credentials refuses sessions without it) and on the
    /// inbox calls.
    #[arg(
        long,
        env = "TANDEM_DEVICE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub device_token: Option<crate::inbox::DeviceToken>,
}

impl ModelArgs {
    /// Loads the checkpoint, which must carry a tokenizer.
    pub fn load(&self) -> anyhow::Result<EdgeBundle> {
        let dtype = self.compute_dtype.map(|d| d.resolve());
        let bundle = EdgeBundle::load_as(&self.edge, dtype)
            .with_context(|| format!("cannot load the edge checkpoint {}", self.edge.display()))?;
        if bundle.tokenizer.is_none() {
            bail!("the edge checkpoint has no tokenizer.json");
        }
        Ok(bundle)
    }

    /// The client settings these options give; fails without a `--server`.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        if self.servers.is_empty() {
            bail!("give the server's WebSocket URL with --server ws://HOST:PORT/v1/edge/ws");
        }
        let mut cfg = ClientConfig::new(ServerList::new(self.servers.clone()));
        cfg.device_token = self.device_token.clone();
        cfg.dtype = self.dtype.into();
        cfg.prompt_chunk_tokens = self.chunk_tokens;
        cfg.max_draft_tokens = self.max_draft_tokens as usize;
        if let Some(path) = &self.ca_cert {
            cfg.ca_certs = crate::tls::read_ca_file(path).map_err(anyhow::Error::msg)?;
        }
        if let (Some(epsilon), Some(clip)) = (self.dp_epsilon, self.dp_clip) {
            let dp = DpConfig::new(epsilon, self.dp_delta, clip);
            cfg.noise = Some(GaussianMechanism::new(dp).context("--dp-epsilon/--dp-clip")?);
        }
        Ok(cfg)
    }

    fn dtype_name(&self) -> String {
        self.dtype
            .to_possible_value()
            .map_or("?".into(), |v| v.get_name().to_owned())
    }

    /// The status line before a generation starts.
    fn describe(
        &self,
        err: &mut (dyn Write + Send),
        req: &GenerateRequest,
        bundle: &EdgeBundle,
    ) -> std::io::Result<()> {
        writeln!(
            err,
            "prompt: {} tokens ({} shared system prefix); split after layer {} of {}; wire dtype {}",
            req.prompt.len(),
            req.system_prefix_len,
            bundle.manifest.edge_layers,
            bundle.manifest.num_layers,
            self.dtype_name(),
        )
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user's profile (a JSON object).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// The prompt: plain text or a template over profile fields (`{{ city }}`).
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt template from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// The provider's system prompt.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// The provider prompt id, if the template came from an inbox (`tandem-edge inbox`
    /// accepts and answers inbox prompts itself).
    #[arg(long)]
    pub prompt_id: Option<String>,
    /// Print one JSON object (output, finish reason, usage, timings, transparency record)
    /// instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Print what was used and what left the device after the output.
    #[arg(long)]
    pub show_transparency: bool,
}

/// Parses the command line, runs, and reports an error as one line on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let mut stdout = std::io::stdout();
        let mut stderr = std::io::stderr();
        match cli.command {
            Command::Run(args) => run(args, &mut stdout, &mut stderr)
                .await
                .map(|_| ExitCode::SUCCESS),
            Command::ServeOpenai(args) => {
                let ctrl_c = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                serve_openai(args, &mut stdout, &mut stderr, ctrl_c)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::Info(args) => info::info(&args).and_then(|v| {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
                Ok(ExitCode::SUCCESS)
            }),
            Command::Inbox(args) => {
                // Ask only a person: with stdin not a terminal, nobody is there to answer.
                let mut stdin = std::io::BufReader::new(std::io::stdin());
                let answers = if std::io::stdin().is_terminal() {
                    Some(&mut stdin as &mut (dyn BufRead + Send))
                } else {
                    None
                };
                let console = Console {
                    out: &mut stdout,
                    err: &mut stderr,
                    answers,
                };
                inbox::inbox(args, console).await.map(|report| {
                    if report.failed == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                })
            }
        }
    });
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one generation as `tandem-edge run` does, writing to `out` and `err`.
pub async fn run(
    args: RunArgs,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> anyhow::Result<Finished> {
    let cfg = args.model.client_config()?;
    let bundle = args.model.load()?;
    let tokenizer = bundle
        .tokenizer
        .as_ref()
        .context("the edge checkpoint has no tokenizer.json")?;
    let profile = match &args.profile {
        Some(p) => Profile::from_file(p)?,
        None => Profile::default(),
    };
    let template = match (&args.prompt, &args.prompt_file) {
        (Some(text), None) => PromptTemplate::new(text.clone())?,
        (None, Some(path)) => PromptTemplate::from_file(path)?,
        _ => bail!("give the prompt with --prompt or --prompt-file"),
    };
    let system = args.system.as_deref();
    let prompt = assemble(
        system,
        &template,
        &profile,
        &Sanitizer::default(),
        bundle.chat_template.as_ref(),
        tokenizer,
    )
    .context("cannot assemble the prompt")?;
    let record = TransparencyRecord::new(bundle.model_info(), system, &template, &prompt);

    let client = EdgeClient::from_bundle(&bundle, cfg)?;
    let mut req = GenerateRequest::from_assembled(&prompt);
    req.sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        ..SamplingParams::default()
    };
    req.max_tokens = args.max_tokens;
    req.stop = args.stop.clone();
    req.prompt_id = args.prompt_id.clone();
    req.record = Some(record);
    args.model.describe(err, &req, &bundle)?;

    let generation = client.generate(req)?;
    let stream = if args.json { None } else { Some(&mut *out) };
    let finished = drive(generation, stream, err).await?;

    if args.json {
        let obj = json!({
            "output": finished.text,
            "finish_reason": reason_name(finished.reason),
            "usage": finished.usage,
            "session": finished.session.to_string(),
            "timings": {
                "time_to_first_token_s": finished.timings.time_to_first_token_s,
                "total_s": finished.timings.total_s,
                "tokens_per_s": finished.timings.decode_tokens_per_s,
                "edge_prompt_s": finished.timings.edge_prompt_s,
                "edge_decode_ms_per_token": finished.timings.edge_decode_ms_per_token,
            },
            "wire": finished.wire,
            "transparency": finished.record,
        });
        writeln!(out, "{}", serde_json::to_string(&obj)?)?;
    } else {
        writeln!(out)?;
        if args.show_transparency {
            if let Some(r) = &finished.record {
                writeln!(out, "\n{}", r.render_text())?;
            }
        }
    }
    writeln!(err, "{}", summary(&finished))?;
    Ok(finished)
}

/// Follows a generation to its end: status lines to `err`, the text to `stream` as it
/// arrives (when given). Ctrl-C cancels the generation, which then ends as `cancelled`.
async fn drive(
    mut generation: Generation,
    mut stream: Option<&mut (dyn Write + Send + '_)>,
    err: &mut (dyn Write + Send),
) -> anyhow::Result<Finished> {
    loop {
        let event = tokio::select! {
            e = generation.next() => e,
            _ = tokio::signal::ctrl_c() => {
                writeln!(err, "cancelling")?;
                generation.cancel();
                continue;
            }
        };
        match event.context("the generation ended without a result")? {
            Event::Opened { session } => writeln!(err, "session {session} opened")?,
            Event::Token { text, .. } => {
                if let Some(out) = stream.as_deref_mut() {
                    if !text.is_empty() {
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                    }
                }
            }
            Event::Reconnecting {
                attempt,
                delay,
                cause,
            } => writeln!(
                err,
                "connection lost ({cause}); reconnecting in {} ms (attempt {attempt})",
                delay.as_millis()
            )?,
            Event::Resumed {
                next_hidden_seq,
                resent,
            } => writeln!(
                err,
                "session resumed from hidden frame {next_hidden_seq} ({resent} resent)"
            )?,
            Event::Done(f) => return Ok(*f),
            Event::Error(e) => return Err(anyhow::Error::new(e).context("generation failed")),
        }
    }
}

/// The one-line summary after a generation.
fn summary(finished: &Finished) -> String {
    let w = &finished.wire;
    let speculation = if w.drafted_tokens > 0 {
        format!(
            "; {} decode round trips, {} drafts sent, {} confirmed",
            w.decode_rounds, w.drafted_tokens, w.accepted_drafts
        )
    } else {
        String::new()
    };
    format!(
        "finished: {} ({} output tokens, first token after {:.0} ms, {:.1} tokens/s; edge layers {:.1} ms per step{speculation})",
        reason_name(finished.reason),
        finished.usage.output_tokens,
        finished.timings.time_to_first_token_s * 1e3,
        finished.timings.decode_tokens_per_s,
        finished.timings.edge_decode_ms_per_token
    )
}

/// The snake_case name of a finish reason (`eos`, `stop_string`, `length`, `cancelled`).
pub fn reason_name(reason: DoneReason) -> String {
    match reason {
        DoneReason::Finished(r) => r.to_string(),
        DoneReason::Cancelled => "cancelled".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--dtype NAME` takes every wire dtype by its protocol name and maps it to that dtype.
    #[test]
    fn every_wire_dtype_is_a_dtype_flag() {
        for dtype in HiddenDtype::ALL {
            let flag = WireDtype::from_str(dtype.as_str(), false)
                .unwrap_or_else(|e| panic!("--dtype {dtype}: {e}"));
            assert_eq!(HiddenDtype::from(flag), dtype);
        }
        assert!(WireDtype::from_str("int3", false).is_err());
    }
}
