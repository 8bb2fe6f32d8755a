//! [`run`]: a whole load run, from loading the edge checkpoint to the report.
//!
//! Order: load the edge model; draw the workload; with replayed compute, run the edge over
//! every prompt of the workload (before the clock starts; with real compute each generation
//! runs its own); scrape the server's metrics; start one task per device
//! (each waits for its arrival offset, then runs its generations one after the other, with
//! the think time between them); wait until every device is done, the deadline passes or
//! the run is stopped ([`run_until`]), then abort what still runs; scrape again; build the
//! report.
//!
//! Records of ended generations come back over a channel as they end, so a hard stop loses
//! only the generations still in flight (counted as cut by the deadline).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tandem_edge::EdgeBundle;
use tandem_protocol::{ManifestId, Open, SamplingParams};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::compute::Compute;
use crate::config::{DeviceCompute, FixedPrompts, LoadConfig};
use crate::device::{self, DeviceContext, GenerationRecord, Job, Outcome};
use crate::live::{self, Live};
use crate::netem;
use crate::replay::Replay;
use crate::report::{ModelSummary, Report, ResumeCounts, RunFacts, RunSettings, StopReason};
use crate::scrape::{self, Exposition, ServerMetrics};
use crate::workload::{DevicePlan, Vocabulary, Workload};

/// A run's report and the records it was built from (every ended generation, with its
/// token ids: what the tests compare and what the PNG's distributions are drawn from).
#[derive(Debug)]
pub struct RunOutput {
    pub report: Report,
    pub records: Vec<GenerationRecord>,
}

/// Runs the load described by `cfg` and reports on it. Fails only when the run cannot start
/// (bad settings, an unreadable checkpoint, an unreachable `--metrics-url`); what goes wrong
/// during the run is counted in the report.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<Report> {
    Ok(run_detailed(cfg).await?.report)
}

/// [`run`], keeping the records.
pub async fn run_detailed(cfg: LoadConfig) -> anyhow::Result<RunOutput> {
    run_until(cfg, std::future::pending()).await
}

/// [`run_detailed`], stopped early when `stop` completes (the command passes `SIGINT` and
/// `SIGTERM`): generations still running are aborted, their connections close, and the report
/// counts them as at the deadline, with [`StopReason::Interrupted`].
pub async fn run_until(
    cfg: LoadConfig,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<RunOutput> {
    let setup = Setup::new(cfg).await?;
    let cfg = &setup.cfg;
    let before = match &cfg.metrics_url {
        Some(url) => Some(Exposition::parse(
            &scrape::fetch(url)
                .await
                .context("scraping before the run")?,
        )),
        None => None,
    };
    let proxies = start_proxies(cfg).await?;
    let links = proxy_links(&cfg.server, &proxies);
    let live = Arc::new(Live::default());
    let ctx = Arc::new(setup.device_context(links, live.clone())?);
    let driven = drive(cfg, &setup.workload, ctx, &live, stop).await;
    for p in proxies {
        p.shutdown().await;
    }
    let server_metrics = match (&cfg.metrics_url, &before) {
        (Some(url), Some(before)) => Some(match scrape::fetch(url).await {
            Ok(text) => Exposition::parse(&text).since(before),
            Err(e) => ServerMetrics {
                error: Some(format!("{e:#}")),
                ..ServerMetrics::default()
            },
        }),
        _ => None,
    };
    Ok(setup.output(driven, &live, server_metrics))
}

/// What a run has before its devices start: checked settings, the edge model, the workload
/// and the edge compute over it.
struct Setup {
    cfg: LoadConfig,
    bundle: EdgeBundle,
    /// `--prompt-file` as given, for the report (a text prompt is assembled into ids).
    prompts_given: Option<String>,
    workload: Workload,
    compute: Arc<Compute>,
}

impl Setup {
    /// Checks `cfg`, loads the edge checkpoint, assembles a text prompt, draws the workload
    /// and, with replayed compute, runs the edge over every prompt of it.
    async fn new(mut cfg: LoadConfig) -> anyhow::Result<Self> {
        cfg.check().map_err(anyhow::Error::msg)?;
        let edge_dir = cfg.edge.clone();
        let bundle = tokio::task::spawn_blocking(move || EdgeBundle::load(&edge_dir))
            .await?
            .with_context(|| format!("loading the edge checkpoint {}", cfg.edge.display()))?;
        let prompts_given = cfg.prompts.as_ref().map(FixedPrompts::describe);
        if let Some(FixedPrompts::Text { file, profile }) = &cfg.prompts {
            let ids = assemble_text_prompt(&bundle, file, profile.as_deref())?;
            cfg.prompts = Some(FixedPrompts::Ids(vec![ids]));
        }
        let model_cfg = bundle.model.config();
        let context = model_cfg.max_position_embeddings;
        let longest = cfg.max_sequence_tokens();
        anyhow::ensure!(
            longest <= context as u64,
            "a prompt plus its output tokens reaches {longest} tokens, beyond the model's context of {context}",
        );
        let workload = Workload::draw(
            &cfg,
            &Vocabulary {
                size: model_cfg.vocab_size as u32,
                excluded: model_cfg.eos_token_ids.clone(),
            },
        );
        let compute = Arc::new(edge_compute(&cfg, &bundle, &workload).await?);
        Ok(Self {
            cfg,
            bundle,
            prompts_given,
            workload,
            compute,
        })
    }

    /// What every device shares; `links`: the delay proxies' URLs (if any).
    fn device_context(&self, links: Vec<String>, live: Arc<Live>) -> anyhow::Result<DeviceContext> {
        let (cfg, bundle) = (&self.cfg, &self.bundle);
        let model_cfg = bundle.model.config();
        Ok(DeviceContext {
            server: cfg.server.clone(),
            links,
            open: Open {
                manifest: ManifestId::try_from(bundle.pair_id())?,
                split: bundle.model.split().edge_layers() as u32,
                hidden_size: model_cfg.hidden_size as u32,
                dtype: cfg.dtype,
                sampling: SamplingParams::default(), // greedy: devices on one prompt share work
                max_tokens: 1,
                stop: Vec::new(),
                prompt_id: None,
                traceparent: None,
            },
            compute: self.compute.clone(),
            eos: model_cfg.eos_token_ids.clone(),
            live,
            max_reconnects: cfg.max_reconnects,
            step_delay: cfg.step_delay,
            silence_timeout: cfg.silence_timeout,
            max_draft_tokens: cfg.max_draft_tokens,
            device_tokens: cfg.device_tokens.clone(),
        })
    }

    /// The report on what [`drive`] saw, and its records in device order.
    fn output(
        &self,
        driven: Driven,
        live: &Live,
        server_metrics: Option<ServerMetrics>,
    ) -> RunOutput {
        let (cfg, bundle) = (&self.cfg, &self.bundle);
        let model_cfg = bundle.model.config();
        let snapshot = live.snapshot();
        let mut run_settings = settings(cfg);
        run_settings.prompts = self.prompts_given.clone();
        let facts = RunFacts {
            settings: run_settings,
            model: ModelSummary {
                pair_id: bundle.pair_id().to_owned(),
                edge_layers: bundle.model.split().edge_layers(),
                hidden_size: model_cfg.hidden_size,
                max_position_embeddings: model_cfg.max_position_embeddings,
            },
            stopped_by: driven.stopped_by,
            wall: driven.wall,
            timeline: driven.timeline,
            devices: cfg.devices,
            planned: self.workload.generations() as u64,
            started: snapshot.started,
            tokens: snapshot.tokens,
            resume: ResumeCounts {
                reconnects: snapshot.reconnects,
                resumes: snapshot.resumes,
                replays: snapshot.replays,
                reopens: driven.records.iter().map(|r| u64::from(r.reopens)).sum(),
                ..ResumeCounts::default()
            },
            device_compute: self.compute.mode(),
            replay: self.compute.stats(),
            server_metrics,
        };
        let mut records = driven.records;
        records.sort_by_key(|r| (r.device, r.generation));
        RunOutput {
            report: Report::build(facts, &records),
            records,
        }
    }
}

/// The device-side edge compute: replayed (the edge run over every prompt of the workload
/// now, before the clock starts) or real (each generation runs its own).
async fn edge_compute(
    cfg: &LoadConfig,
    bundle: &EdgeBundle,
    workload: &Workload,
) -> anyhow::Result<Compute> {
    Ok(match cfg.device_compute {
        DeviceCompute::Replay => {
            let replay = Arc::new(Replay::new(bundle.model.clone(), cfg.dtype));
            let roots = {
                let (replay, prompts) = (replay.clone(), workload.prompts.clone());
                tokio::task::spawn_blocking(move || {
                    prompts
                        .iter()
                        .map(|p| replay.prompt(p))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .await?
                .context("running the edge over the prompts")?
            };
            Compute::replay(replay, roots)
        }
        DeviceCompute::Real => {
            Compute::real(bundle.model.clone(), cfg.dtype, workload.prompts.clone())
        }
    })
}

/// Network conditions: delay proxies in front of the server, alive for the run (none
/// without `cfg.network`).
async fn start_proxies(cfg: &LoadConfig) -> anyhow::Result<Vec<netem::ProxyHandle>> {
    let mut proxies = Vec::new();
    let Some(net) = cfg.network else {
        return Ok(proxies);
    };
    let rest = cfg
        .server
        .split_once("://")
        .map_or(cfg.server.as_str(), |(_, r)| r);
    let (host, _path) = rest.split_once('/').unwrap_or((rest, ""));
    for k in 0..net.links.max(1) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let handle = netem::spawn(
            listener,
            netem::ProxyConfig {
                upstream: host.to_owned(),
                conditions: netem::LinkConditions {
                    rtt: net.rtt_of(k),
                    jitter: net.jitter,
                    uplink: net.uplink,
                    downlink: net.downlink,
                },
                seed: cfg.seed.wrapping_add(k as u64),
            },
        )?;
        proxies.push(handle);
    }
    anyhow::ensure!(
        cfg.server.starts_with("ws://"),
        "network conditions need a ws:// server (the proxies relay plain TCP)"
    );
    Ok(proxies)
}

/// The URLs the devices connect to through `proxies`: the server's path on each proxy.
fn proxy_links(server: &str, proxies: &[netem::ProxyHandle]) -> Vec<String> {
    proxies
        .iter()
        .map(|p| {
            let rest = server.trim_start_matches("ws://");
            let path = rest.split_once('/').map_or("", |(_, p)| p);
            format!("ws://{}/{path}", p.local_addr())
        })
        .collect()
}

/// What [`drive`] saw.
struct Driven {
    stopped_by: StopReason,
    wall: Duration,
    records: Vec<GenerationRecord>,
    timeline: Vec<live::TimelineSample>,
}

/// Starts the devices and waits for them, the deadline or `stop`.
async fn drive(
    cfg: &LoadConfig,
    workload: &Workload,
    ctx: Arc<DeviceContext>,
    live: &Arc<Live>,
    stop: impl Future<Output = ()>,
) -> Driven {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let (stop_sampler, stopped) = oneshot::channel();
    let how = live::Sampling {
        period: Duration::from_secs(1),
        print: cfg.progress,
    };
    let sampler = tokio::spawn(live::sample(live.clone(), start, how, stopped));
    let mut devices = JoinSet::new();
    for (index, plan) in workload.devices.iter().enumerate() {
        devices.spawn(device_loop(
            ctx.clone(),
            index,
            plan.clone(),
            start,
            tx.clone(),
        ));
    }
    drop(tx);
    let deadline = tokio::time::Instant::from_std(start + cfg.duration);
    let all_done = async { while devices.join_next().await.is_some() {} };
    let stopped_by = tokio::select! {
        finished = tokio::time::timeout_at(deadline, all_done) => match finished {
            Ok(()) => StopReason::AllFinished,
            Err(_) => StopReason::Deadline,
        },
        () = stop => StopReason::Interrupted,
    };
    let wall = start.elapsed();
    devices.shutdown().await;
    let _ = stop_sampler.send(());
    let timeline = sampler.await.unwrap_or_default();
    let mut records = Vec::new();
    while let Ok(r) = rx.try_recv() {
        records.push(r);
    }
    Driven {
        stopped_by,
        wall,
        records,
        timeline,
    }
}

/// One device: wait for its arrival, then its generations in turn (each after its think
/// time).
async fn device_loop(
    ctx: Arc<DeviceContext>,
    device: usize,
    plan: DevicePlan,
    start: Instant,
    records: mpsc::UnboundedSender<GenerationRecord>,
) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(start + plan.start)).await;
    for (generation, g) in plan.generations.iter().enumerate() {
        if !g.think.is_zero() {
            tokio::time::sleep(g.think).await;
        }
        ctx.live.generation_started();
        let job = Job {
            device,
            generation,
            prompt: g.prompt,
            max_tokens: g.max_tokens,
        };
        let record = device::generate(&ctx, job).await;
        ctx.live
            .generation_ended(matches!(record.outcome, Outcome::Done { .. }));
        let _ = records.send(record);
    }
}

fn settings(cfg: &LoadConfig) -> RunSettings {
    RunSettings {
        server: cfg.server.clone(),
        edge: display(&cfg.edge),
        devices: cfg.devices,
        arrival: cfg.arrival,
        prompt_tokens: cfg.prompt_tokens,
        output_tokens: cfg.output_tokens,
        think_ms: cfg.think.as_millis() as u64,
        step_delay_ms: cfg.step_delay.as_millis() as u64,
        silence_timeout_s: cfg.silence_timeout.as_secs_f64(),
        generations_per_device: cfg.generations_per_device,
        duration_s: cfg.duration.as_secs_f64(),
        dtype: cfg.dtype.as_str().to_owned(),
        prompt_pool: cfg.prompt_pool,
        seed: cfg.seed,
        metrics_url: cfg.metrics_url.clone(),
        trace: cfg.trace.as_ref().map(|t| t.path.clone()),
        trace_records: cfg.trace.as_ref().map(|t| t.records.len()),
        device_compute: cfg.device_compute,
        max_reconnects: cfg.max_reconnects,
        network: cfg.network.map(|n| {
            format!(
                "rtt {}±{} ms over {} links, jitter ±{} ms each way, uplink {}, downlink {}",
                n.rtt.as_millis(),
                n.rtt_spread.as_millis(),
                n.links,
                n.jitter.as_millis(),
                n.uplink,
                n.downlink
            )
        }),
        prompts: cfg.prompts.as_ref().map(FixedPrompts::describe),
        max_draft_tokens: cfg.max_draft_tokens,
    }
}

/// The token ids `tandem-edge run --prompt-file FILE [--profile P]` would send: the file as
/// a template over the profile, sanitized, in the checkpoint's chat template, tokenized.
fn assemble_text_prompt(
    bundle: &EdgeBundle,
    file: &Path,
    profile: Option<&Path>,
) -> anyhow::Result<Vec<u32>> {
    use tandem_edge::{assemble, Profile, PromptTemplate, Sanitizer};
    let tokenizer = bundle
        .tokenizer
        .as_ref()
        .context("the edge checkpoint has no tokenizer.json (needed by --prompt-file)")?;
    let profile = match profile {
        Some(p) => Profile::from_file(p)?,
        None => Profile::default(),
    };
    let template = PromptTemplate::from_file(file)?;
    let prompt = assemble(
        None,
        &template,
        &profile,
        &Sanitizer::default(),
        bundle.chat_template.as_ref(),
        tokenizer,
    )
    .with_context(|| format!("assembling the prompt of {}", file.display()))?;
    Ok(prompt.ids)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
