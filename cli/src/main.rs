//! `tandem`: the command-line front of Tandem.
//!
//! Subcommands so far:
//! - `tandem split`: cut a checkpoint into an edge part and a cloud part;
//! - `tandem generate`: run a split model in one process (edge then cloud), token by token;
//! - `tandem bench`: engine throughput;
//! - `tandem serve`: the cloud server devices connect to over WebSocket;
//! - `tandem admin`: tenants, API keys, quotas and device tokens on a running server;
//! - `tandem audit-privacy`: the privacy audit (docs/privacy.md).

use clap::{Parser, Subcommand};
use tandem_cli::{admin, bench, generate, serve, split};

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Split-inference serving for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Cut a model into DIR/edge (embedding + layers [0,K)) and DIR/cloud (layers [K,n) + head).
    Split(split::SplitArgs),
    /// Generate text with the edge part and the cloud part run one after the other.
    Generate(generate::GenerateArgs),
    /// Measure the cloud engine's throughput on a model (JSON on stdout).
    Bench(bench::BenchArgs),
    /// Serve the cloud part to devices over WebSocket (ws://ADDR/v1/edge/ws).
    Serve(Box<serve::ServeArgs>),
    /// The provider's administration of a running server: tenants, API keys, quotas,
    /// device tokens (over its /v1/admin routes).
    Admin(admin::AdminArgs),
    /// Play the server as an attacker: how much of a prompt the hidden states give away at
    /// each split depth, wire encoding and noise level, beside the quality cost.
    AuditPrivacy(Box<tandem_privacy::AuditArgs>),
    /// Write a random-weight bf16 checkpoint with the exact shapes of a real Llama model
    /// (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b), to measure the engine at real scale, or
    /// a tiny one (`tiny`) for device checks.
    RandomModel(split::RandomModelArgs),
    /// Check the cloud part on an accelerator (--device cuda) against the CPU on one model:
    /// logits, greedy tokens, batched against solo, and the engine end to end (JSON on
    /// stdout; exit status 1 when a check fails).
    DeviceCheck(bench::DeviceCheckArgs),
}

fn main() -> std::process::ExitCode {
    // Logs go to stderr, filtered by RUST_LOG (default `warn`); TANDEM_LOG_FORMAT=json
    // writes one JSON object per line (for log collectors). `serve` also exports OTLP
    // traces and metrics when the OTEL_* variables ask (tandem_serve::telemetry).
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        tandem_serve::telemetry::init_logs();
    }
    let result = match cli.command {
        Command::Split(a) => split::split(a),
        Command::Generate(a) => generate::generate(a),
        Command::Bench(a) => bench::bench(a),
        Command::Serve(a) => serve::serve(*a),
        Command::AuditPrivacy(a) => tandem_privacy::run_cli(*a),
        Command::RandomModel(a) => split::random_model(a),
        Command::DeviceCheck(a) => bench::device_check(a),
        Command::Admin(a) => match admin::run(a) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
