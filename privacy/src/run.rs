//! The audit loop: per split depth, wire encoding and noise level, utility and recovery.
//! See the crate doc ([`crate`]).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tandem_model::checkpoint::Checkpoint;
use tandem_model::layers::ForwardCtx;
use tandem_model::privacy::{DpConfig, GaussianMechanism, RowNoiser};
use tandem_model::split::{LoadOptions, EMBED};
use tandem_model::{CloudModel, ContiguousKv, EdgeModel, SplitPoint};
use tandem_protocol::{f32_to_hidden, hidden_to_f32, HiddenDtype};

use crate::attack::{edge_rows, AttackerView, EmbeddingIndex, NearestNeighbour, RidgeDecoder};
use crate::cost::{edge_cost, EdgeCost};
use crate::exhaustive::{Exhaustive, StopRule};
use crate::pairs::{self, Generation, PairSet, PairsAttack, PairsRecovery};
use crate::prompts::AuditPrompt;
use crate::score::{ratio, ExhaustiveSummary, Tally};

/// One noise setting of the audit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NoiseLevel {
    /// Rows leave as computed.
    None,
    /// Clip to the bound and add noise calibrated to this per-row epsilon (`inf`: clip only).
    Dp { epsilon: f64 },
}

impl NoiseLevel {
    pub fn label(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Dp { epsilon } if epsilon.is_infinite() => "clip".into(),
            Self::Dp { epsilon } => format!("eps={epsilon}"),
        }
    }
}

impl std::str::FromStr for NoiseLevel {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "none" => Ok(Self::None),
            "inf" | "clip" => Ok(Self::Dp {
                epsilon: f64::INFINITY,
            }),
            other => match other.parse::<f64>() {
                Ok(e) if e > 0.0 => Ok(Self::Dp { epsilon: e }),
                _ => Err(format!(
                    "noise level `{other}`: none, inf (clip only) or a positive epsilon"
                )),
            },
        }
    }
}

/// What to audit.
#[derive(Clone, Debug, Serialize)]
pub struct AuditSettings {
    pub edge_layers: Vec<usize>,
    #[serde(serialize_with = "wire_names")]
    pub wire: Vec<HiddenDtype>,
    pub noise: Vec<NoiseLevel>,
    /// Per-row delta of every noise level.
    pub delta: f64,
    /// Clip bound; `None`: the median row norm of the generic text at each depth.
    pub clip: Option<f32>,
    /// Shortlist size per source for the nearest-neighbour attack.
    pub shortlist: usize,
    /// The exhaustive attack; `None` skips it.
    pub exhaustive: Option<ExhaustiveSettings>,
    /// Numbers of output pairs the output-pairs attacker fits on (empty: skipped).
    pub output_pairs: Vec<usize>,
    /// Teacher-forced steps compared for utility (the first is the prompt's next token).
    pub gen_tokens: usize,
    /// Random-token training sequences for the learned attack (besides the generic text).
    pub random_sequences: usize,
    /// Tokens per training sequence.
    pub train_seq_len: usize,
    /// Ridge penalty, relative to the mean Gram diagonal.
    pub ridge: f64,
    /// Context length at which the edge's attention FLOPs are counted.
    pub context: usize,
    pub seed: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            edge_layers: vec![1],
            wire: vec![HiddenDtype::F32],
            noise: vec![NoiseLevel::None],
            delta: 1e-5,
            clip: None,
            shortlist: 64,
            exhaustive: Some(ExhaustiveSettings::default()),
            output_pairs: vec![256, 1024, 4096],
            gen_tokens: 16,
            random_sequences: 24,
            train_seq_len: 48,
            ridge: 1e-3,
            context: 512,
            seed: 0,
        }
    }
}

/// How the exhaustive attack searches (see [`crate::exhaustive`]).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ExhaustiveSettings {
    /// Candidates per position on noise-free cells (no noise, or clipping only), which stop
    /// at the exact match before it (`None`: every non-special token).
    pub budget: Option<usize>,
    /// Candidates per position on noisy cells (`None`: every non-special token).
    pub noisy_budget: Option<usize>,
    /// Round-off tolerance of the exact match, relative to the row's norm.
    pub match_tolerance: f64,
}

impl Default for ExhaustiveSettings {
    fn default() -> Self {
        Self {
            budget: None,
            noisy_budget: Some(1024),
            match_tolerance: 1e-3,
        }
    }
}

fn wire_names<S: serde::Serializer>(v: &[HiddenDtype], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|d| d.as_str()))
}

/// One row of the result table.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub edge_layers: usize,
    pub wire: String,
    pub noise: String,
    /// Per-row epsilon (`None`: no noise or clip only).
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub clip: Option<f32>,
    pub sigma: f64,
    /// Composed over the average prompt's rows (zCDP or basic, the smaller), at
    /// `delta_total = rows·delta`.
    pub prompt_epsilon: Option<f64>,
    pub prompt_delta: Option<f64>,
    pub tokens: usize,
    pub sensitive_tokens: usize,
    pub nn_recovery: f64,
    pub nn_sensitive_recovery: f64,
    pub learned_recovery: f64,
    pub learned_sensitive_recovery: f64,
    /// The exhaustive attack (when run).
    pub exhaustive: Option<ExhaustiveSummary>,
    /// The output-pairs attacker, one entry per number of pairs.
    pub output_pairs: Vec<PairsRecovery>,
    pub greedy_agreement: f64,
    /// The largest absolute logit difference from the noise-free f32 run, over every step.
    pub max_logit_drift: f64,
    /// The mean over steps of each step's largest absolute logit difference.
    pub mean_logit_drift: f64,
    /// Hidden-state payload per token on the wire (a one-token frame adds 28 bytes).
    pub payload_bytes_per_token: usize,
    pub seconds: f64,
}

impl Cell {
    /// The best sensitive-token recovery of all the attacks run.
    pub fn best_sensitive_recovery(&self) -> f64 {
        let strong = self
            .exhaustive
            .as_ref()
            .map_or(0.0, |e| e.sensitive_recovery);
        let pairs = self.output_pairs.iter().fold(0.0, |m: f64, p| {
            m.max(p.centroid_sensitive_recovery)
                .max(p.linear_sensitive_recovery)
        });
        self.nn_sensitive_recovery
            .max(self.learned_sensitive_recovery)
            .max(strong)
            .max(pairs)
    }
}

/// Everything the audit found.
#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub model: String,
    pub settings: AuditSettings,
    pub prompts: Vec<PromptSummary>,
    pub costs: Vec<EdgeCost>,
    /// The clip bound used at each depth.
    pub clip_by_depth: Vec<(usize, f32)>,
    pub cells: Vec<Cell>,
}

/// A prompt's name and sizes (never its text).
#[derive(Clone, Debug, Serialize)]
pub struct PromptSummary {
    pub name: String,
    pub tokens: usize,
    pub sensitive_tokens: usize,
}

/// The noise-free reference for one prompt at one depth.
struct Reference {
    /// Edge rows of the prompt followed by the teacher-forced output tokens.
    rows: Vec<f32>,
    /// Argmax tokens and logits of each step.
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// A reproducible stream seed from the run seed and a cell/prompt coordinate.
fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        x = x.wrapping_add(p).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 29;
    }
    x
}

/// Clip and noise (when `noiser`), then the wire's encode/decode round trip.
fn release(
    rows: &[f32],
    d: usize,
    noiser: Option<&mut RowNoiser>,
    wire: HiddenDtype,
) -> Result<Vec<f32>> {
    let mut v = rows.to_vec();
    if let Some(n) = noiser {
        n.apply(&mut v, d)?;
    }
    let n = v.len() / d;
    let mut payload = Vec::new();
    f32_to_hidden(wire, n, d, &v, &mut payload)?;
    let mut out = Vec::new();
    hidden_to_f32(wire, n, d, &payload, &mut out)?;
    Ok(out)
}

/// Logits `[rows, V]` of the cloud over all of `rows` (one sequence from position 0).
fn cloud_logits(cloud: &CloudModel, rows: &[f32], d: usize) -> Result<Vec<Vec<f32>>> {
    let n = rows.len() / d;
    let cfg = cloud.config();
    let mut kv = ContiguousKv::new(cfg.num_hidden_layers, cfg.max_position_embeddings);
    let ctx = ForwardCtx::single(0, n);
    let h = Tensor::from_slice(rows, (n, d), &Device::Cpu)?.to_dtype(cloud.dtype())?;
    let x = cloud.forward_layers(&h, &ctx, &mut kv)?;
    Ok(cloud.logits(&x)?.to_vec2()?)
}

fn argmax(v: &[f32]) -> u32 {
    tandem_model::sampling::argmax(v)
}

/// Token sequences for training the learned attacker: the generic text in pieces, then
/// random tokens; each starts with BOS when there is one.
fn training_sequences(
    generic: &[u32],
    bos: Option<u32>,
    settings: &AuditSettings,
    vocab: usize,
    excluded: &[u32],
) -> Vec<Vec<u32>> {
    let len = settings.train_seq_len.max(2);
    let body = len - usize::from(bos.is_some());
    let mut out = Vec::new();
    for piece in generic.chunks(body) {
        out.push(bos.into_iter().chain(piece.iter().copied()).collect());
    }
    let mut rng = StdRng::seed_from_u64(mix(settings.seed, &[0xDA7A]));
    for _ in 0..settings.random_sequences {
        let mut s: Vec<u32> = bos.into_iter().collect();
        while s.len() < len {
            let t = rng.random_range(0..vocab as u32);
            if !excluded.contains(&t) {
                s.push(t);
            }
        }
        out.push(s);
    }
    out
}

/// Inputs the audit needs besides the checkpoint.
#[derive(Debug)]
pub struct AuditInputs<'a> {
    pub prompts: &'a [AuditPrompt],
    /// The generic training text, tokenized without special tokens.
    pub generic: &'a [u32],
    /// Token ids never guessed and never used for training (special tokens).
    pub excluded: Vec<u32>,
    pub bos: Option<u32>,
    /// Earlier requests of the same device (tokenized, BOS first when there is one): the
    /// output-pairs attacker learns from the outputs generated after them.
    pub earlier: &'a [Vec<u32>],
}

/// Runs the audit. `progress` receives one line per step of the work (no prompt text).
pub fn audit(
    ck: &Checkpoint,
    inputs: &AuditInputs<'_>,
    settings: &AuditSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<AuditReport> {
    let cfg = &ck.config;
    let device = Device::Cpu;
    let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let embed = ck
        .tensors
        .load(EMBED, &[vocab, d], DType::F32, &device)
        .context("loading the embedding matrix")?;
    let index = EmbeddingIndex::new(&embed, inputs.excluded.clone())?;
    // The output-pairs attacker's target space: the LM head the server runs anyway.
    let head = pairs::lm_head(ck).context("loading the LM head")?;
    let head_index = EmbeddingIndex::new(&head, inputs.excluded.clone())?;
    let mut generations: Option<Vec<Generation>> = None;
    let lo = LoadOptions {
        dtype: DType::F32,
        device: &device,
    };
    let mut report = empty_report(ck, inputs, settings);
    let train_seqs = training_sequences(
        inputs.generic,
        inputs.bos,
        settings,
        vocab,
        &inputs.excluded,
    );
    for (ki, &k) in settings.edge_layers.iter().enumerate() {
        let split = SplitPoint::new(k, cfg.num_hidden_layers)?;
        progress(&format!("k={k}: loading the edge and cloud parts"));
        let edge = EdgeModel::load(ck.tensors.as_ref(), cfg, split, lo)?;
        let cloud = CloudModel::load(ck.tensors.as_ref(), cfg, split, lo)?;
        let parts = (&edge, &cloud);
        let pair_set = output_pairs(parts, inputs, settings, &mut generations, progress)?;
        // Training rows (BOS rows left out: they are known and atypically long).
        let mut train_rows = Vec::new();
        let mut train_tokens = Vec::new();
        for s in &train_seqs {
            let rows = edge_rows(&edge, s)?;
            let skip = usize::from(inputs.bos.is_some());
            train_rows.extend_from_slice(&rows[skip * d..]);
            train_tokens.extend_from_slice(&s[skip..]);
        }
        let clip = match settings.clip {
            Some(c) => c,
            None => median_norm(&train_rows, d),
        };
        report.clip_by_depth.push((k, clip));
        progress(&format!(
            "k={k}: {} training rows, clip bound {clip:.3}; noise-free reference over {} prompts",
            train_tokens.len(),
            inputs.prompts.len()
        ));
        let refs = inputs
            .prompts
            .iter()
            .map(|p| reference(&edge, &cloud, p, settings.gen_tokens))
            .collect::<Result<Vec<_>>>()?;
        let depth = Depth {
            k,
            edge: &edge,
            cloud: &cloud,
            index: &index,
            embed: &embed,
            train_rows: &train_rows,
            train_tokens: &train_tokens,
            refs: &refs,
            clip,
            pairs: &pair_set,
            head: &head,
            head_index: &head_index,
        };
        for (wi, &wire) in settings.wire.iter().enumerate() {
            for (li, level) in settings.noise.iter().enumerate() {
                let coord = [ki as u64, wi as u64, li as u64];
                let cell = run_cell(&depth, inputs, settings, wire, *level, coord)?;
                progress(&progress_line(&cell));
                report.cells.push(cell);
            }
        }
    }
    Ok(report)
}

/// The report before any cell: the prompts' sizes and the edge's costs.
fn empty_report(
    ck: &Checkpoint,
    inputs: &AuditInputs<'_>,
    settings: &AuditSettings,
) -> AuditReport {
    AuditReport {
        model: ck.path.display().to_string(),
        settings: settings.clone(),
        prompts: inputs
            .prompts
            .iter()
            .map(|p| PromptSummary {
                name: p.name.clone(),
                tokens: p.scored().len(),
                sensitive_tokens: p.scored().filter(|&i| p.sensitive[i]).count(),
            })
            .collect(),
        costs: settings
            .edge_layers
            .iter()
            .map(|&k| edge_cost(&ck.config, k, settings.context))
            .collect(),
        clip_by_depth: Vec::new(),
        cells: Vec::new(),
    }
}

/// The noise-free output pairs at this depth: the earlier generations are sampled on the
/// first call (the split is exact, so they do not depend on the depth) and kept in
/// `generations`. Empty when the attack is off or there are no earlier requests.
fn output_pairs(
    (edge, cloud): (&EdgeModel, &CloudModel),
    inputs: &AuditInputs<'_>,
    settings: &AuditSettings,
    generations: &mut Option<Vec<Generation>>,
    progress: &mut dyn FnMut(&str),
) -> Result<PairSet> {
    let most = settings.output_pairs.iter().copied().max().unwrap_or(0);
    if most == 0 || inputs.earlier.is_empty() {
        return Ok(PairSet::default());
    }
    if generations.is_none() {
        let each = most.div_ceil(inputs.earlier.len());
        progress(&format!(
            "sampling {each} output tokens after each of {} earlier requests",
            inputs.earlier.len()
        ));
        let seed = mix(settings.seed, &[0x0A7F]);
        let g = pairs::generate(edge, cloud, inputs.earlier, each, &inputs.excluded, seed)?;
        *generations = Some(g);
    }
    PairSet::collect(edge, generations.as_deref().unwrap_or_default())
}

/// One cell's results in one line (no prompt text).
fn progress_line(cell: &Cell) -> String {
    let ex = cell.exhaustive.as_ref().map_or(String::new(), |e| {
        format!(
            ", exhaustive {:.1}% (sensitive {:.1}%, {:.0} candidates/position, {:.1}s)",
            100.0 * e.recovery,
            100.0 * e.sensitive_recovery,
            e.mean_candidates,
            e.seconds
        )
    });
    let pairs = cell.output_pairs.last().map_or(String::new(), |p| {
        format!(
            ", {} pairs: centroid {:.1}% linear {:.1}%",
            p.pairs,
            100.0 * p.centroid_recovery,
            100.0 * p.linear_recovery
        )
    });
    format!(
        "k={} wire={} noise={}: nn {:.1}% (sensitive {:.1}%), learned {:.1}%{ex}{pairs}, \
         agreement {:.1}%, drift {:.3} in {:.1}s",
        cell.edge_layers,
        cell.wire,
        cell.noise,
        100.0 * cell.nn_recovery,
        100.0 * cell.nn_sensitive_recovery,
        100.0 * cell.learned_recovery,
        100.0 * cell.greedy_agreement,
        cell.max_logit_drift,
        cell.seconds
    )
}

/// What one split depth shares between its cells.
struct Depth<'a> {
    k: usize,
    edge: &'a EdgeModel,
    cloud: &'a CloudModel,
    index: &'a EmbeddingIndex,
    embed: &'a Tensor,
    train_rows: &'a [f32],
    train_tokens: &'a [u32],
    refs: &'a [Reference],
    clip: f32,
    /// Noise-free output pairs of earlier generations (empty: no pairs attack).
    pairs: &'a PairSet,
    head: &'a Tensor,
    head_index: &'a EmbeddingIndex,
}

/// The attackers of one cell.
struct Attackers<'a> {
    nn: NearestNeighbour<'a>,
    decoder: RidgeDecoder,
    exhaustive: Option<Exhaustive<'a>>,
    pairs: Vec<PairsAttack>,
}

/// The exhaustive attack of a cell: the exact-match stop where the rows carry no noise.
fn exhaustive_attack<'a>(
    depth: &Depth<'a>,
    ex: ExhaustiveSettings,
    view: AttackerView,
    noise_free: bool,
) -> Exhaustive<'a> {
    let (stop, budget) = if noise_free {
        let relative = ex.match_tolerance;
        (StopRule::ExactMatch { relative }, ex.budget)
    } else {
        (StopRule::Nearest, ex.noisy_budget)
    };
    Exhaustive {
        edge: depth.edge,
        index: depth.index,
        view,
        stop,
        budget,
    }
}

/// One wire encoding and noise level at one depth: train the learned attacker on rows
/// released the same way, then score every prompt.
fn run_cell(
    depth: &Depth<'_>,
    inputs: &AuditInputs<'_>,
    settings: &AuditSettings,
    wire: HiddenDtype,
    level: NoiseLevel,
    coord: [u64; 3],
) -> Result<Cell> {
    let started = std::time::Instant::now();
    let d = depth.edge.config().hidden_size;
    let mech = match level {
        NoiseLevel::None => None,
        NoiseLevel::Dp { epsilon } => Some(GaussianMechanism::new(DpConfig::new(
            epsilon,
            settings.delta,
            depth.clip,
        ))?),
    };
    let noiser = |stream: u64| {
        mech.map(|m| {
            let seed = mix(settings.seed, &[coord[0], coord[1], coord[2], stream]);
            RowNoiser::new(m, Some(seed))
        })
    };
    let noisy_train = release(depth.train_rows, d, noiser(u64::MAX).as_mut(), wire)?;
    let decoder = RidgeDecoder::fit(
        &noisy_train,
        depth.train_tokens,
        depth.embed,
        settings.ridge,
    )?;
    let view = AttackerView {
        clip: mech.map(|m| m.clip()),
        wire,
    };
    let noise_free = mech.is_none_or(|m| m.sigma() == 0.0);
    let exhaustive = settings
        .exhaustive
        .map(|ex| exhaustive_attack(depth, ex, view, noise_free));
    let released_pairs = PairSet {
        rows: release(&depth.pairs.rows, d, noiser(u64::MAX - 1).as_mut(), wire)?,
        tokens: depth.pairs.tokens.clone(),
    };
    let pairs = if released_pairs.tokens.is_empty() {
        Vec::new()
    } else {
        settings
            .output_pairs
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| PairsAttack::fit(&released_pairs, n, d, depth.head, settings.ridge))
            .collect::<Result<Vec<_>>>()?
    };
    let attackers = Attackers {
        nn: NearestNeighbour {
            edge: depth.edge,
            index: depth.index,
            shortlist: settings.shortlist,
            view,
        },
        decoder,
        exhaustive,
        pairs,
    };
    let mut tally = Tally::default();
    for (pi, (p, r)) in inputs.prompts.iter().zip(depth.refs).enumerate() {
        let received = release(&r.rows, d, noiser(pi as u64).as_mut(), wire)?;
        score_prompt(depth, &attackers, p, r, &received, &mut tally)?;
    }
    let exhaustive = attackers.exhaustive.as_ref().map(|ex| {
        let stop = match ex.stop {
            StopRule::ExactMatch { .. } => "exact_match",
            StopRule::Nearest => "nearest",
        };
        tally
            .exhaustive
            .summary(tally.tokens, tally.sensitive, stop, ex.budget)
    });
    let pair_sizes: Vec<(usize, usize)> = attackers
        .pairs
        .iter()
        .map(|a| (a.pairs, a.centroid.len()))
        .collect();
    let avg_rows = tally.rows / inputs.prompts.len().max(1);
    let composed = mech.map(|m| m.compose(avg_rows));
    Ok(Cell {
        edge_layers: depth.k,
        wire: wire.as_str().to_owned(),
        noise: level.label(),
        epsilon: mech.and_then(|m| m.config().epsilon.is_finite().then_some(m.config().epsilon)),
        delta: mech.map(|m| m.config().delta),
        clip: mech.map(|m| m.clip()),
        sigma: mech.map_or(0.0, |m| m.sigma()),
        prompt_epsilon: composed.as_ref().and_then(|c| c.epsilon),
        prompt_delta: composed.as_ref().map(|c| c.basic_delta),
        tokens: tally.tokens,
        sensitive_tokens: tally.sensitive,
        nn_recovery: ratio(tally.nn, tally.tokens),
        nn_sensitive_recovery: ratio(tally.nn_sensitive, tally.sensitive),
        learned_recovery: ratio(tally.learned, tally.tokens),
        learned_sensitive_recovery: ratio(tally.learned_sensitive, tally.sensitive),
        exhaustive,
        output_pairs: tally.pairs_recovery(&pair_sizes),
        greedy_agreement: ratio(tally.agree, tally.steps),
        max_logit_drift: tally.drift,
        mean_logit_drift: if tally.steps == 0 {
            0.0
        } else {
            tally.drift_sum / tally.steps as f64
        },
        payload_bytes_per_token: wire.payload_len(1, d).unwrap_or(0),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Utility and every attack on one prompt's released rows.
fn score_prompt(
    depth: &Depth<'_>,
    att: &Attackers<'_>,
    p: &AuditPrompt,
    r: &Reference,
    received: &[f32],
    tally: &mut Tally,
) -> Result<()> {
    let d = depth.edge.config().hidden_size;
    // Utility: teacher-forced steps from the last prompt row on.
    let logits = cloud_logits(depth.cloud, received, d)?;
    let first = p.ids.len() - 1;
    for (step, want) in r.logits.iter().enumerate() {
        let got = &logits[first + step];
        tally.steps += 1;
        tally.agree += usize::from(argmax(got) == r.tokens[step]);
        let drift = got
            .iter()
            .zip(want)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        tally.drift = tally.drift.max(drift);
        tally.drift_sum += drift;
    }
    // Attacks on the prompt's rows.
    let prompt_rows = &received[..p.ids.len() * d];
    let known = p.starts_with_bos.then(|| p.ids[0]);
    let nn_guess = att.nn.invert(prompt_rows, known, Some(&att.decoder))?;
    let learned_guess = att.decoder.decode(prompt_rows, d, depth.index)?;
    for i in p.scored() {
        tally.count(
            p.sensitive[i],
            nn_guess[i] == p.ids[i],
            learned_guess[i] == p.ids[i],
        );
    }
    if let Some(ex) = &att.exhaustive {
        let started = std::time::Instant::now();
        // The guided order's hints: the learned decoder's and the output-pairs decoder's.
        let rows = Tensor::from_slice(prompt_rows, (p.ids.len(), d), &Device::Cpu)?;
        let mut hints = vec![att.decoder.scores(&rows, depth.index)?];
        if let Some(a) = att.pairs.last() {
            hints.push(a.linear.scores(&rows, depth.head_index)?);
        }
        let outcomes = ex.invert(prompt_rows, known, &hints)?;
        tally.exhaustive.seconds += started.elapsed().as_secs_f64();
        let cfg = depth.edge.config();
        let vocab = cfg.vocab_size - depth.index.excluded().len();
        let limit = ex.budget.map_or(vocab, |b| b.min(vocab));
        for i in p.scored() {
            let flops = edge_cost(cfg, depth.k, i + 1).flops_per_token as f64;
            let o = &outcomes[i];
            tally
                .exhaustive
                .count(o, o.token == p.ids[i], p.sensitive[i], limit, flops);
        }
    }
    for (ai, a) in att.pairs.iter().enumerate() {
        let (centroid, linear) = a.decode(prompt_rows, d, depth.head_index)?;
        for i in p.scored() {
            let (s, want) = (p.sensitive[i], p.ids[i]);
            tally.count_pairs(ai, s, centroid[i] == want, linear[i] == want);
        }
    }
    tally.rows += p.ids.len();
    Ok(())
}

fn median_norm(rows: &[f32], d: usize) -> f32 {
    let mut norms: Vec<f32> = rows
        .chunks_exact(d)
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    if norms.is_empty() {
        return 1.0;
    }
    norms.sort_by(f32::total_cmp);
    norms[norms.len() / 2]
}

/// The noise-free f32 run: greedy tokens from the prompt, then the edge rows of the prompt
/// followed by those tokens (what the device sends under teacher forcing).
fn reference(
    edge: &EdgeModel,
    cloud: &CloudModel,
    p: &AuditPrompt,
    steps: usize,
) -> Result<Reference> {
    let d = edge.config().hidden_size;
    let n = edge.config().num_hidden_layers;
    let max = edge.config().max_position_embeddings;
    let (mut ekv, mut ckv) = (ContiguousKv::new(n, max), ContiguousKv::new(n, max));
    let mut input = p.ids.clone();
    let mut pos = 0;
    let mut rows: Vec<f32> = Vec::new();
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..steps.max(1) {
        let ctx = ForwardCtx::single(pos, input.len());
        let h = edge.forward(&input, &ctx, &mut ekv)?;
        rows.extend(h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        let l: Vec<f32> = cloud.forward(&h, &ctx, &mut ckv)?.squeeze(0)?.to_vec1()?;
        pos += input.len();
        let t = argmax(&l);
        tokens.push(t);
        logits.push(l);
        input = vec![t];
    }
    debug_assert_eq!(rows.len() / d, p.ids.len() + steps.max(1) - 1);
    Ok(Reference {
        rows,
        tokens,
        logits,
    })
}
