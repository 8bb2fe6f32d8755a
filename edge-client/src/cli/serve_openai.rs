//! `tandem-edge serve-openai`: the OpenAI-compatible endpoint ([`crate::openai`]) on this
//! device's loopback, until Ctrl-C.
//!
//! Prints `listening on http://ADDR/v1` on stdout once the port is bound (scripts and tests
//! read the address from it; `--listen 127.0.0.1:0` picks a free port), status on stderr.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::ModelArgs;
use crate::openai::{self, OpenAiConfig};
use crate::prompt::Profile;

#[derive(Debug, Args)]
pub struct ServeOpenAiArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to listen. Loopback only, unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Allow a non-loopback --listen address: other hosts could then use this user's profile
    /// through the endpoint.
    #[arg(long)]
    pub allow_remote: bool,
    /// The user's profile (a JSON object) for `{{ field }}` templates in messages.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// The provider's system prompt, put before the app's messages.
    #[arg(long)]
    pub system: Option<String>,
    /// The model name requests must give (default: the source model's file name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long, env = "TANDEM_OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// max_tokens for requests that give none (capped by the context left).
    #[arg(long, default_value_t = 512)]
    pub default_max_tokens: u32,
    /// Completions running at once; more wait their turn.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
}

/// Runs the endpoint until `stop` resolves (Ctrl-C in the binary), then shuts it down.
pub async fn serve_openai(
    args: ServeOpenAiArgs,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = args.model.client_config()?;
    let bundle = args.model.load()?;
    let mut cfg = OpenAiConfig::new(args.listen);
    cfg.allow_remote = args.allow_remote;
    cfg.system_prompt = args.system;
    if let Some(path) = &args.profile {
        cfg.profile = Profile::from_file(path)?;
    }
    cfg.model_id = args.model_id;
    cfg.api_key = args.api_key;
    cfg.default_max_tokens = args.default_max_tokens;
    cfg.max_concurrent = args.max_concurrent;
    let handle = openai::serve(&bundle, client, cfg)
        .await
        .context("cannot start the OpenAI endpoint")?;
    writeln!(out, "listening on {}", handle.base_url())?;
    out.flush()?;
    writeln!(
        err,
        "model `{}`; split after layer {} of {}; Ctrl-C stops",
        handle.model_id(),
        bundle.manifest.edge_layers,
        bundle.manifest.num_layers
    )?;
    if !handle.addr().ip().is_loopback() {
        writeln!(
            err,
            "warning: listening on {}, reachable from other hosts",
            handle.addr()
        )?;
    }
    stop.await;
    writeln!(err, "stopping")?;
    handle.shutdown().await;
    Ok(())
}
