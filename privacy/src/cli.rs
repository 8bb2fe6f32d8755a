//! The `tandem audit-privacy` command: flags, loading, the printed table and the JSON.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_model::checkpoint::{is_split_dir, Checkpoint};
use tandem_protocol::HiddenDtype;

use crate::cost;
use crate::prompts::{self, AuditPrompt, EARLIER_REQUESTS, GENERIC_TEXT};
use crate::run::{audit, AuditInputs, AuditReport, AuditSettings, ExhaustiveSettings, NoiseLevel};

/// Flags of `tandem audit-privacy`.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// A whole model: an HF directory or a .gguf file (it is cut at each --edge-layers).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: PathBuf,
    /// Split depths to audit, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub edge_layers: Vec<usize>,
    /// Wire encodings of the hidden states, comma-separated: f32, f16, bf16, int8, int4.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub wire: Vec<String>,
    /// Noise levels, comma-separated: `none`, `inf` (clip only) or a per-row epsilon.
    #[arg(long, value_delimiter = ',', default_value = "none,inf,1000,100,10,1")]
    pub noise: Vec<NoiseLevel>,
    /// Per-row delta of the noise.
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Clip bound on each row's L2 norm [default: the median row norm of generic text at
    /// each depth].
    #[arg(long)]
    pub dp_clip: Option<f32>,
    /// More prompts, one per line, sensitive spans marked `[[like this]]`.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Shortlist size per source (embedding cosine, learned decoder) for the
    /// nearest-neighbour attack.
    #[arg(long, default_value_t = 64)]
    pub shortlist: usize,
    /// Skip the exhaustive attack (whole-vocabulary search per position).
    #[arg(long)]
    pub no_exhaustive: bool,
    /// Candidates per position the exhaustive attack tries at most on noise-free cells, which
    /// stop at the exact match: a number or `all`.
    #[arg(long, default_value = "all", value_parser = parse_budget)]
    pub exhaustive_budget: Budget,
    /// Candidates per position the exhaustive attack tries on noisy cells (the nearest wins):
    /// a number or `all`.
    #[arg(long, default_value = "1024", value_parser = parse_budget)]
    pub exhaustive_noisy_budget: Budget,
    /// The exhaustive attack's exact-match tolerance, relative to a row's norm (float
    /// round-off; the wire's rounding bound is added per row).
    #[arg(long, default_value_t = 1e-3)]
    pub match_tolerance: f64,
    /// Numbers of (output token, row) pairs the output-pairs attacker learns from,
    /// comma-separated (`0`: skip it).
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub output_pairs: Vec<usize>,
    /// Teacher-forced output steps compared for utility.
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Random-token sequences the learned attacker trains on, besides the generic text.
    #[arg(long, default_value_t = 24)]
    pub random_sequences: usize,
    /// Context length at which the edge's attention FLOPs are counted.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Only print the edge's memory and compute for each --edge-layers.
    #[arg(long)]
    pub cost_only: bool,
    /// Write a PNG of sensitive-token recovery and greedy agreement over the noise levels.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// TrueType font for the PNG's text [default: DejaVu Sans where installed].
    #[arg(long)]
    pub plot_font: Option<PathBuf>,
}

/// A number of candidates, or every one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    All,
    Candidates(usize),
}

impl Budget {
    fn limit(self) -> Option<usize> {
        match self {
            Self::All => None,
            Self::Candidates(n) => Some(n),
        }
    }
}

fn parse_budget(s: &str) -> std::result::Result<Budget, String> {
    match s.trim() {
        "all" => Ok(Budget::All),
        n => match n.parse::<usize>() {
            Ok(v) if v > 0 => Ok(Budget::Candidates(v)),
            _ => Err(format!("budget `{n}`: a positive number or `all`")),
        },
    }
}

fn parse_wire(s: &str) -> Result<HiddenDtype> {
    Ok(match s.trim() {
        "f32" => HiddenDtype::F32,
        "f16" => HiddenDtype::F16,
        "bf16" => HiddenDtype::Bf16,
        "int8" => HiddenDtype::Int8,
        "int4" => HiddenDtype::Int4,
        other => bail!("wire encoding `{other}`: f32, f16, bf16, int8 or int4"),
    })
}

/// Runs the command.
pub fn run_cli(a: AuditArgs) -> Result<()> {
    if is_split_dir(&a.model) {
        bail!(
            "{} is a split; the audit needs the whole model (it cuts it at each depth)",
            a.model.display()
        );
    }
    let ck =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let settings = a.settings()?;
    for &k in &settings.edge_layers {
        tandem_model::SplitPoint::new(k, ck.config.num_hidden_layers)?;
    }
    if a.cost_only {
        return print_costs(&ck, &settings, a.json);
    }
    let tokenized = Tokenized::new(&ck, a.prompts.as_deref())?;
    let started = std::time::Instant::now();
    let report = audit(&ck, &tokenized.inputs(), &settings, &mut |line| {
        eprintln!("[audit {:>6.1}s] {line}", started.elapsed().as_secs_f64());
    })?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", render(&report))?;
    }
    out.flush()?;
    if let Some(path) = &a.plot {
        let text = crate::plot::write_png(&report, path, a.plot_font.as_deref())?;
        eprintln!(
            "wrote {}{}",
            path.display(),
            if text {
                ""
            } else {
                " (no font found: drawn without text)"
            }
        );
    }
    Ok(())
}

impl AuditArgs {
    /// The audit's settings from the flags (a wire encoding is checked here).
    fn settings(&self) -> Result<AuditSettings> {
        Ok(AuditSettings {
            edge_layers: self.edge_layers.clone(),
            wire: self
                .wire
                .iter()
                .map(|w| parse_wire(w))
                .collect::<Result<_>>()?,
            noise: self.noise.clone(),
            delta: self.dp_delta,
            clip: self.dp_clip,
            shortlist: self.shortlist,
            exhaustive: (!self.no_exhaustive).then_some(ExhaustiveSettings {
                budget: self.exhaustive_budget.limit(),
                noisy_budget: self.exhaustive_noisy_budget.limit(),
                match_tolerance: self.match_tolerance,
            }),
            output_pairs: self
                .output_pairs
                .iter()
                .copied()
                .filter(|&n| n > 0)
                .collect(),
            gen_tokens: self.gen_tokens,
            random_sequences: self.random_sequences,
            context: self.context,
            seed: self.seed,
            ..AuditSettings::default()
        })
    }
}

/// `--cost-only`: the edge's memory and compute at each depth, as a table or JSON.
fn print_costs(ck: &Checkpoint, settings: &AuditSettings, json: bool) -> Result<()> {
    let costs: Vec<_> = settings
        .edge_layers
        .iter()
        .map(|&k| cost::edge_cost(&ck.config, k, settings.context))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&costs)?);
    } else {
        print!("{}", cost::render(&costs));
    }
    Ok(())
}

/// The audit's inputs, tokenized with the model's tokenizer.
struct Tokenized {
    prompts: Vec<AuditPrompt>,
    generic: Vec<u32>,
    excluded: Vec<u32>,
    bos: Option<u32>,
    earlier: Vec<Vec<u32>>,
}

impl Tokenized {
    /// The built-in prompts and those of `extra`, the generic text and the earlier requests.
    fn new(ck: &Checkpoint, extra: Option<&Path>) -> Result<Self> {
        let tok = ck
            .tokenizer
            .as_ref()
            .context("the model has no tokenizer; the audit needs one for its prompts")?;
        let prompts = prompts::load(tok, extra)?;
        let generic = tok.encode(GENERIC_TEXT, false)?;
        let excluded: Vec<u32> = (0..ck.config.vocab_size as u32)
            .filter(|&t| tok.is_special(t))
            .collect();
        let bos = tok.bos_token().map(|b| b.id);
        let earlier = EARLIER_REQUESTS
            .iter()
            .map(|text| Ok(bos.into_iter().chain(tok.encode(text, false)?).collect()))
            .collect::<Result<Vec<Vec<u32>>>>()?;
        Ok(Self {
            prompts,
            generic,
            excluded,
            bos,
            earlier,
        })
    }

    fn inputs(&self) -> AuditInputs<'_> {
        AuditInputs {
            prompts: &self.prompts,
            generic: &self.generic,
            excluded: self.excluded.clone(),
            bos: self.bos,
            earlier: &self.earlier,
        }
    }
}

/// The report as plain-text tables.
pub fn render(r: &AuditReport) -> String {
    let tokens: usize = r.prompts.iter().map(|p| p.tokens).sum();
    let sensitive: usize = r.prompts.iter().map(|p| p.sensitive_tokens).sum();
    let mut s = format!(
        "Privacy audit of {} ({} prompts, {tokens} prompt tokens, {sensitive} sensitive; seed {})\n\n",
        r.model,
        r.prompts.len(),
        r.settings.seed
    );
    s.push_str(
        "k | wire | noise | sigma | clip | eps/prompt | NN rec | NN sens | learned | learned sens | greedy agree | max drift | mean drift | bytes/token\n",
    );
    s.push_str("--|------|-------|-------|------|------------|--------|---------|---------|--------------|--------------|-----------|------------|------------\n");
    for c in &r.cells {
        let opt = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.3}"));
        s.push_str(&format!(
            "{} | {} | {} | {:.4} | {} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.3} | {:.3} | {}\n",
            c.edge_layers,
            c.wire,
            c.noise,
            c.sigma,
            c.clip.map_or("-".to_owned(), |v| format!("{v:.2}")),
            opt(c.prompt_epsilon),
            100.0 * c.nn_recovery,
            100.0 * c.nn_sensitive_recovery,
            100.0 * c.learned_recovery,
            100.0 * c.learned_sensitive_recovery,
            100.0 * c.greedy_agreement,
            c.max_logit_drift,
            c.mean_logit_drift,
            c.payload_bytes_per_token
        ));
    }
    s.push_str(&render_strong(r));
    s.push_str("\nEdge memory and compute per split depth\n");
    s.push_str(&cost::render(&r.costs));
    s
}

/// The exhaustive and output-pairs attacks' tables (empty when neither ran).
fn render_strong(r: &AuditReport) -> String {
    let mut s = String::new();
    if r.cells.iter().any(|c| c.exhaustive.is_some()) {
        s.push_str("\nExhaustive attack (every token per position, guided order)\n");
        s.push_str("k | wire | noise | rec | sens | stop | budget | candidates/pos (max) | matched | exhausted | max match dist | min runner-up | TFLOP | seconds\n");
        s.push_str("--|------|-------|-----|------|------|--------|----------------------|---------|-----------|----------------|---------------|-------|--------\n");
        for c in &r.cells {
            let Some(e) = &c.exhaustive else { continue };
            s.push_str(&format!(
                "{} | {} | {} | {:.1}% | {:.1}% | {} | {} | {:.0} ({}) | {}/{} | {} | {:.2e} | {} | {:.2} | {:.1}\n",
                c.edge_layers,
                c.wire,
                c.noise,
                100.0 * e.recovery,
                100.0 * e.sensitive_recovery,
                e.stop,
                e.budget.map_or("all".to_owned(), |b| b.to_string()),
                e.mean_candidates,
                e.max_candidates,
                e.matched,
                e.positions,
                e.exhausted,
                e.max_match_distance,
                e.min_runner_up.map_or("-".to_owned(), |m| format!("{m:.2e}")),
                e.tflops,
                e.seconds
            ));
        }
    }
    if r.cells.iter().any(|c| !c.output_pairs.is_empty()) {
        s.push_str("\nOutput-pairs attacker (learns from earlier outputs' token/row pairs only)\n");
        s.push_str("k | wire | noise | pairs | distinct tokens | centroid | centroid sens | linear | linear sens\n");
        s.push_str("--|------|-------|-------|-----------------|----------|---------------|--------|------------\n");
        for c in &r.cells {
            for p in &c.output_pairs {
                s.push_str(&format!(
                    "{} | {} | {} | {} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}%\n",
                    c.edge_layers,
                    c.wire,
                    c.noise,
                    p.pairs,
                    p.distinct_tokens,
                    100.0 * p.centroid_recovery,
                    100.0 * p.centroid_sensitive_recovery,
                    100.0 * p.linear_recovery,
                    100.0 * p.linear_sensitive_recovery
                ));
            }
        }
    }
    s
}
