//! What a load run does: [`LoadConfig`] and the small pieces it is made of: [`Arrival`]
//! (when devices start), [`LengthDist`] (how many prompt or output tokens), [`Trace`] (lengths
//! and think times replayed from a JSON file instead) and [`DeviceCompute`] (replayed or real
//! edge compute).
//!
//! Both distributions are parsed once from their command-line spelling (`all`,
//! `poisson:5`, `fixed:64`, `uniform:32-128`) into values that cannot be wrong (a rate that is
//! finite and positive, `1 <= min <= max`); they print back in the same spelling, which is
//! also how they appear in the JSON report. Sampling takes the caller's seeded RNG, so a run's
//! workload is a pure function of its seed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tandem_protocol::HiddenDtype;

use crate::timing::DEFAULT_SILENCE_TIMEOUT;

/// When devices start their first generation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Arrival {
    /// Every device at once (every start delay is zero).
    All,
    /// A Poisson process: independent exponential gaps between consecutive device starts.
    Poisson(Rate),
}

/// Device arrivals per second: finite and positive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate(f64);

impl Rate {
    pub fn new(per_s: f64) -> Result<Self, String> {
        if per_s.is_finite() && per_s > 0.0 {
            Ok(Self(per_s))
        } else {
            Err(format!(
                "an arrival rate must be a positive number per second, not {per_s}"
            ))
        }
    }

    pub fn per_s(self) -> f64 {
        self.0
    }
}

impl Arrival {
    /// The start offset of each of `n` devices from the start of the run, in arrival order.
    ///
    /// Poisson: gap `i` is `-ln(1 - u) / rate` with `u` uniform in `[0, 1)` (inverse-CDF
    /// sampling of the exponential distribution, mean `1 / rate`); the first device starts
    /// after the first gap, as in a process observed from time 0.
    pub fn offsets(self, n: usize, rng: &mut impl Rng) -> Vec<Duration> {
        match self {
            Self::All => vec![Duration::ZERO; n],
            Self::Poisson(rate) => {
                let mut t = 0.0;
                (0..n)
                    .map(|_| {
                        let u: f64 = rng.random();
                        t += -(1.0 - u).ln() / rate.0;
                        Duration::from_secs_f64(t)
                    })
                    .collect()
            }
        }
    }
}

impl FromStr for Arrival {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Self::All);
        }
        let rate = s.strip_prefix("poisson:").ok_or_else(|| {
            format!("arrival `{s}`: expected `all` or `poisson:RATE_PER_S` (e.g. poisson:5)")
        })?;
        let per_s: f64 = rate
            .parse()
            .map_err(|_| format!("arrival `{s}`: `{rate}` is not a number"))?;
        Ok(Self::Poisson(Rate::new(per_s)?))
    }
}

impl fmt::Display for Arrival {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Poisson(r) => write!(f, "poisson:{}", r.0),
        }
    }
}

impl TryFrom<String> for Arrival {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Arrival> for String {
    fn from(a: Arrival) -> Self {
        a.to_string()
    }
}

/// A token count drawn uniformly from `[min, max]` (`fixed:N` is `min = max = N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LengthDist {
    min: u32,
    max: u32,
}

impl LengthDist {
    pub fn fixed(n: u32) -> Result<Self, String> {
        Self::uniform(n, n)
    }

    pub fn uniform(min: u32, max: u32) -> Result<Self, String> {
        if min == 0 {
            return Err("a token count must be at least 1".into());
        }
        if min > max {
            return Err(format!(
                "uniform:{min}-{max}: the minimum is above the maximum"
            ));
        }
        Ok(Self { min, max })
    }

    pub fn min(self) -> u32 {
        self.min
    }

    pub fn max(self) -> u32 {
        self.max
    }

    pub fn sample(self, rng: &mut impl Rng) -> u32 {
        rng.random_range(self.min..=self.max)
    }
}

impl FromStr for LengthDist {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let count = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("`{s}`: `{v}` is not a token count"))
        };
        if let Some(n) = s.strip_prefix("fixed:") {
            return Self::fixed(count(n)?);
        }
        if let Some(range) = s.strip_prefix("uniform:") {
            let (a, b) = range
                .split_once('-')
                .ok_or_else(|| format!("`{s}`: expected uniform:MIN-MAX"))?;
            return Self::uniform(count(a)?, count(b)?);
        }
        Err(format!(
            "`{s}`: expected fixed:N or uniform:MIN-MAX (e.g. fixed:64, uniform:32-128)"
        ))
    }
}

impl fmt::Display for LengthDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "fixed:{}", self.min)
        } else {
            write!(f, "uniform:{}-{}", self.min, self.max)
        }
    }
}

impl TryFrom<String> for LengthDist {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<LengthDist> for String {
    fn from(d: LengthDist) -> Self {
        d.to_string()
    }
}

/// How devices get the hidden states they send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceCompute {
    /// Once per distinct token history, shared by every device (see [`crate::replay`]).
    #[default]
    Replay,
    /// Every device runs the edge layers itself, per token (`tandem_edge::EdgeSession`), as
    /// a phone would: for small device counts.
    Real,
}

impl FromStr for DeviceCompute {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "replay" => Ok(Self::Replay),
            "real" => Ok(Self::Real),
            other => Err(format!("device compute `{other}`: expected replay or real")),
        }
    }
}

impl fmt::Display for DeviceCompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Replay => "replay",
            Self::Real => "real",
        })
    }
}

/// One record of a trace file: the lengths of one generation and, optionally, the pause
/// before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRecord {
    pub prompt_tokens: u32,
    /// The generation's `max_tokens`.
    pub output_tokens: u32,
    /// Pause of the device before this generation (after its previous one); `--think-ms`
    /// when absent. Ignored for a device's first generation (its arrival decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub think_ms: Option<u64>,
}

/// Generation lengths (and think times) replayed from a JSON file: a list of
/// [`TraceRecord`]s that the generations take in order, cycling when there are more
/// generations than records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// Where it was read from (for the report).
    pub path: String,
    /// At least one.
    pub records: Vec<TraceRecord>,
}

impl Trace {
    /// Reads and checks a trace file.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("trace {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a trace file: a JSON array of
    /// `{"prompt_tokens": N, "output_tokens": N, "think_ms": MS}` objects (`think_ms`
    /// optional), counts at least 1.
    pub fn parse(text: &str, path: &str) -> Result<Self, String> {
        let records: Vec<TraceRecord> = serde_json::from_str(text).map_err(|e| {
            format!(
                "trace {path}: {e} (expected a JSON array of \
                 {{\"prompt_tokens\": N, \"output_tokens\": N, \"think_ms\": MS}} objects, \
                 think_ms optional)"
            )
        })?;
        if records.is_empty() {
            return Err(format!("trace {path}: no records"));
        }
        for (i, r) in records.iter().enumerate() {
            if r.prompt_tokens == 0 || r.output_tokens == 0 {
                return Err(format!(
                    "trace {path}: record {i}: prompt_tokens and output_tokens must be at least 1"
                ));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            records,
        })
    }

    /// The record of a device's `generation`-th generation (0-based) among `devices`:
    /// records are taken round by round, every device's first generation, then every
    /// device's second, and so on (roughly the order they start in), cycling.
    pub fn record(&self, device: usize, generation: usize, devices: usize) -> TraceRecord {
        self.records[(generation * devices + device) % self.records.len()]
    }
}

/// Parses a hidden-state dtype by its wire name (`f32`, `f16`, `bf16`, `int8`, `int4`).
pub fn parse_dtype(s: &str) -> Result<HiddenDtype, String> {
    HiddenDtype::from_name(s)
        .ok_or_else(|| format!("dtype `{s}`: expected f32, f16, bf16, int8 or int4"))
}

/// Default of `--max-reconnects`: with the backoff of [`crate::timing::backoff`] the
/// attempts span about 12 s, enough for a server restart on a small model.
pub const DEFAULT_MAX_RECONNECTS: u32 = 6;

/// One load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The server's WebSocket URL, `ws://HOST:PORT/v1/edge/ws`.
    pub server: String,
    /// The edge checkpoint of the split the server serves (`SPLIT/edge`, or `SPLIT`).
    pub edge: PathBuf,
    /// Simulated devices.
    pub devices: usize,
    pub arrival: Arrival,
    pub prompt_tokens: LengthDist,
    /// `max_tokens` of each generation (it may end earlier on an end-of-sequence token).
    pub output_tokens: LengthDist,
    /// Pause of a device between two of its generations.
    pub think: Duration,
    /// Pause of a device before it sends each decode step's hidden state: a slow device, or
    /// a session kept open while mostly idle (thousands of live sessions at a low token rate).
    pub step_delay: Duration,
    pub generations_per_device: u32,
    /// Hard stop: generations still running then are cut and counted as such.
    pub duration: Duration,
    /// Encoding of the hidden states on the wire.
    pub dtype: HiddenDtype,
    /// Distinct prompts (random token ids); every generation takes one of them.
    pub prompt_pool: usize,
    /// Seeds the prompts, their lengths, the output lengths, the arrivals and the choice of
    /// prompt per generation.
    pub seed: u64,
    /// The server's `/metrics` (`http://HOST:PORT/metrics`), scraped before and after.
    pub metrics_url: Option<String>,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
    /// With a trace, generation lengths and think times come from it instead of
    /// `prompt_tokens`, `output_tokens` and `think`.
    pub trace: Option<Trace>,
    pub device_compute: DeviceCompute,
    /// Consecutive failed reconnection attempts after which a generation is given up (lost).
    /// The count starts again once a connection makes progress (a new token or `Done`).
    pub max_reconnects: u32,
    /// Longest wait for a frame the server owes before the connection counts as lost (the
    /// device's own step delay and think time never count: see [`crate::device`]).
    pub silence_timeout: Duration,
    /// Real network conditions between the devices and the server, if any.
    pub network: Option<Network>,
    /// Prompts given instead of drawn ones (then `prompt_tokens` and `prompt_pool` do not
    /// apply): every generation takes one of them.
    pub prompts: Option<FixedPrompts>,
    /// Most drafts per decode step (speculation, as `tandem-edge run --max-draft-tokens`);
    /// 0: none. Needs [`DeviceCompute::Real`].
    pub max_draft_tokens: usize,
    /// Device tokens (`tdv_…`) presented as `Authorization: Bearer` on the WebSocket
    /// upgrade, for a server that requires credentials: device `i` uses token
    /// `i % len` (a server caps the sessions per user, so give as many users as the run
    /// needs). Empty: none.
    pub device_tokens: Vec<String>,
}

/// Prompts a run is given (`--prompt-file`, or token ids from a test).
#[derive(Clone, Debug, PartialEq)]
pub enum FixedPrompts {
    /// One prompt: a text file (a template over the profile's fields, as `tandem-edge run
    /// --prompt-file`), put through the edge checkpoint's chat template and tokenizer.
    Text {
        file: PathBuf,
        profile: Option<PathBuf>,
    },
    /// Token ids, one entry per prompt.
    Ids(Vec<Vec<u32>>),
}

impl FixedPrompts {
    /// For the report: the file, or how many prompts were given.
    pub fn describe(&self) -> String {
        match self {
            Self::Text { file, profile } => match profile {
                Some(p) => format!("{} with profile {}", file.display(), p.display()),
                None => file.display().to_string(),
            },
            Self::Ids(p) => format!("{} prompts given as token ids", p.len()),
        }
    }
}

/// Network conditions spread across the devices: `links` in-process delay proxies
/// ([`crate::netem`]) in front of the server, whose round trips are spread evenly over
/// `rtt ± rtt_spread`; device `i` goes through proxy `i % links`. Jitter and rate caps are
/// the same on every link (per connection, each direction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Network {
    pub rtt: Duration,
    pub rtt_spread: Duration,
    pub jitter: Duration,
    pub uplink: crate::netem::Rate,
    pub downlink: crate::netem::Rate,
    pub links: usize,
}

impl Network {
    /// The round trip of link `k` of `self.links`.
    pub fn rtt_of(&self, k: usize) -> Duration {
        let lo = self.rtt.saturating_sub(self.rtt_spread);
        let hi = self.rtt + self.rtt_spread;
        if self.links <= 1 {
            return self.rtt;
        }
        lo + (hi - lo).mul_f64(k as f64 / (self.links - 1) as f64)
    }
}

impl LoadConfig {
    /// A run of `devices` devices against `server` with the defaults of the command line:
    /// everyone at once, 64 prompt tokens, 32 output tokens, one generation each, f32, a pool
    /// of 8 prompts, seed 0, a 60 s limit, replayed edge compute, up to
    /// [`DEFAULT_MAX_RECONNECTS`] reconnections per outage, a silence timeout of
    /// [`DEFAULT_SILENCE_TIMEOUT`], no progress line.
    pub fn new(server: impl Into<String>, edge: impl Into<PathBuf>, devices: usize) -> Self {
        Self {
            server: server.into(),
            edge: edge.into(),
            devices,
            arrival: Arrival::All,
            prompt_tokens: LengthDist { min: 64, max: 64 },
            output_tokens: LengthDist { min: 32, max: 32 },
            think: Duration::ZERO,
            step_delay: Duration::ZERO,
            generations_per_device: 1,
            duration: Duration::from_secs(60),
            dtype: HiddenDtype::F32,
            prompt_pool: 8,
            seed: 0,
            metrics_url: None,
            progress: false,
            trace: None,
            device_compute: DeviceCompute::Replay,
            max_reconnects: DEFAULT_MAX_RECONNECTS,
            silence_timeout: DEFAULT_SILENCE_TIMEOUT,
            network: None,
            prompts: None,
            max_draft_tokens: 0,
            device_tokens: Vec::new(),
        }
    }

    /// The longest prompt a generation may have (given text prompts count once tokenized:
    /// see [`crate::runner`]).
    pub fn max_prompt_tokens(&self) -> u32 {
        if let Some(FixedPrompts::Ids(p)) = &self.prompts {
            return p.iter().map(Vec::len).max().unwrap_or(0) as u32;
        }
        match &self.trace {
            Some(t) => t.records.iter().map(|r| r.prompt_tokens).max().unwrap_or(1),
            None => self.prompt_tokens.max(),
        }
    }

    /// The longest prompt plus output of one generation.
    pub fn max_sequence_tokens(&self) -> u64 {
        match &self.trace {
            Some(t) => t
                .records
                .iter()
                .map(|r| u64::from(r.prompt_tokens) + u64::from(r.output_tokens))
                .max()
                .unwrap_or(0),
            None => {
                let prompt = match &self.prompts {
                    Some(FixedPrompts::Ids(_)) => self.max_prompt_tokens(),
                    _ => self.prompt_tokens.max(),
                };
                u64::from(prompt) + u64::from(self.output_tokens.max())
            }
        }
    }

    /// Checks what the types alone cannot; the model-dependent checks (context length) are
    /// made once the edge checkpoint is loaded.
    pub fn check(&self) -> Result<(), String> {
        if !(self.server.starts_with("ws://") || self.server.starts_with("wss://")) {
            return Err(format!(
                "--server `{}`: expected ws://HOST:PORT/v1/edge/ws",
                self.server
            ));
        }
        if self.devices == 0 {
            return Err("--devices must be at least 1".into());
        }
        if self.generations_per_device == 0 {
            return Err("--generations-per-device must be at least 1".into());
        }
        if self.prompt_pool == 0 {
            return Err("--prompt-pool must be at least 1".into());
        }
        if self.duration.is_zero() {
            return Err("--duration-s must be positive".into());
        }
        if self.silence_timeout.is_zero() {
            return Err("--silence-timeout-s must be positive".into());
        }
        if self.max_draft_tokens > usize::from(tandem_protocol::wire::MAX_DRAFTS) {
            return Err(format!(
                "--max-draft-tokens {}: at most {}",
                self.max_draft_tokens,
                tandem_protocol::wire::MAX_DRAFTS
            ));
        }
        if self.max_draft_tokens > 0 && self.device_compute != DeviceCompute::Real {
            return Err(
                "--max-draft-tokens needs --device-compute real (replayed devices do not draft)"
                    .into(),
            );
        }
        match &self.prompts {
            Some(_) if self.trace.is_some() => {
                return Err("give prompts (--prompt-file) or a trace, not both".into())
            }
            Some(FixedPrompts::Ids(p)) if p.is_empty() || p.iter().any(Vec::is_empty) => {
                return Err("the given prompts must be at least one, none empty".into())
            }
            _ => {}
        }
        if let Some(url) = &self.metrics_url {
            if !url.starts_with("http://") {
                return Err(format!(
                    "--metrics-url `{url}`: expected http://HOST:PORT/metrics"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn all_arrives_at_once() {
        let mut rng = StdRng::seed_from_u64(1);
        let offsets = Arrival::All.offsets(1000, &mut rng);
        assert_eq!(offsets.len(), 1000);
        assert!(offsets.iter().all(|d| d.is_zero()));
    }

    #[test]
    fn poisson_mean_gap_is_one_over_rate() {
        let rate = 20.0;
        let n = 100_000;
        let mut rng = StdRng::seed_from_u64(7);
        let a: Arrival = "poisson:20".parse().expect("parse");
        let offsets = a.offsets(n, &mut rng);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "sorted");
        let mut prev = 0.0;
        let gaps: Vec<f64> = offsets
            .iter()
            .map(|d| {
                let t = d.as_secs_f64();
                let g = t - prev;
                prev = t;
                g
            })
            .collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        // The standard error of the mean of n exponential gaps is (1/rate)/sqrt(n) = 0.3%
        // of the mean here: 2% is over six of them.
        assert!((mean * rate - 1.0).abs() < 0.02, "mean gap {mean}");
        // Exponential: the standard deviation equals the mean.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((var.sqrt() / mean - 1.0).abs() < 0.03, "sd {}", var.sqrt());
        // Same seed, same arrivals.
        let again = a.offsets(n, &mut StdRng::seed_from_u64(7));
        assert_eq!(offsets, again);
    }

    #[test]
    fn arrival_parses_and_prints() {
        assert_eq!("all".parse::<Arrival>(), Ok(Arrival::All));
        let p: Arrival = "poisson:2.5".parse().expect("parse");
        assert_eq!(p.to_string(), "poisson:2.5");
        for bad in [
            "",
            "poisson",
            "poisson:",
            "poisson:0",
            "poisson:-1",
            "poisson:inf",
            "x",
        ] {
            assert!(bad.parse::<Arrival>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn lengths_parse_print_and_stay_in_range() {
        let f: LengthDist = "fixed:64".parse().expect("fixed");
        assert_eq!((f.min(), f.max()), (64, 64));
        assert_eq!(f.to_string(), "fixed:64");
        let u: LengthDist = "uniform:32-128".parse().expect("uniform");
        assert_eq!(u.to_string(), "uniform:32-128");
        assert_eq!(
            "uniform:5-5".parse::<LengthDist>(),
            Ok(LengthDist::fixed(5).expect("5"))
        );
        for bad in [
            "fixed:0",
            "fixed:",
            "fixed:x",
            "uniform:9-3",
            "uniform:0-3",
            "uniform:3",
            "64",
            "normal:3-4",
        ] {
            assert!(
                bad.parse::<LengthDist>().is_err(),
                "{bad:?} should be refused"
            );
        }

        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = [0u32; 5];
        for _ in 0..10_000 {
            let n = u.sample(&mut rng);
            assert!((32..=128).contains(&n));
            let small = LengthDist::uniform(10, 14).expect("u").sample(&mut rng);
            seen[(small - 10) as usize] += 1;
            assert_eq!(f.sample(&mut rng), 64);
        }
        // Every value of a small range comes up about equally often (2,000 expected each).
        assert!(
            seen.iter().all(|&c| (1_700..2_300).contains(&c)),
            "{seen:?}"
        );
    }

    #[test]
    fn distributions_serialize_as_their_spelling() {
        let json = serde_json::to_string(&(Arrival::All, LengthDist::uniform(1, 9).expect("u")))
            .expect("json");
        assert_eq!(json, r#"["all","uniform:1-9"]"#);
        let back: (Arrival, LengthDist) = serde_json::from_str(&json).expect("back");
        assert_eq!(back.1.to_string(), "uniform:1-9");
        assert!(serde_json::from_str::<LengthDist>(r#""fixed:0""#).is_err());
    }

    #[test]
    fn traces_parse_cycle_and_refuse_bad_files() {
        let t = Trace::parse(
            r#"[{"prompt_tokens": 5, "output_tokens": 2},
                {"prompt_tokens": 9, "output_tokens": 1, "think_ms": 250}]"#,
            "t.json",
        )
        .expect("trace");
        assert_eq!(t.records.len(), 2);
        assert_eq!(t.records[1].think_ms, Some(250));
        assert_eq!(t.records[0].think_ms, None);
        // Round by round over 3 devices: (d0,g0)=0 (d1,g0)=1 (d2,g0)=0 (d0,g1)=1 ...
        assert_eq!(t.record(0, 0, 3).prompt_tokens, 5);
        assert_eq!(t.record(1, 0, 3).prompt_tokens, 9);
        assert_eq!(t.record(2, 0, 3).prompt_tokens, 5);
        assert_eq!(t.record(0, 1, 3).prompt_tokens, 9);
        assert_eq!(t.record(1, 1, 3).prompt_tokens, 5);

        let mut c = LoadConfig::new("ws://127.0.0.1:1/v1/edge/ws", "edge", 3);
        c.trace = Some(t);
        assert_eq!(c.max_prompt_tokens(), 9);
        assert_eq!(c.max_sequence_tokens(), 10);

        let err = |text: &str| Trace::parse(text, "bad.json").expect_err(text);
        assert!(err("").contains("bad.json"));
        assert!(err("{").contains("expected a JSON array"));
        assert!(err(r#"{"prompt_tokens": 1, "output_tokens": 1}"#).contains("JSON array"));
        assert!(err("[]").contains("no records"));
        assert!(err(r#"[{"prompt_tokens": 1}]"#).contains("output_tokens"));
        assert!(err(r#"[{"prompt_tokens": -1, "output_tokens": 1}]"#).contains("bad.json"));
        assert!(err(r#"[{"prompt_tokens": 1, "output_tokens": 1, "x": 2}]"#).contains("x"));
        let zero = err(r#"[{"prompt_tokens": 1, "output_tokens": 1},
                           {"prompt_tokens": 0, "output_tokens": 1}]"#);
        assert!(zero.contains("record 1"), "{zero}");
        let missing =
            Trace::load(std::path::Path::new("/nonexistent/trace.json")).expect_err("missing file");
        assert!(missing.contains("/nonexistent/trace.json"), "{missing}");
    }

    #[test]
    fn device_compute_parses() {
        assert_eq!("real".parse(), Ok(DeviceCompute::Real));
        assert_eq!("replay".parse(), Ok(DeviceCompute::Replay));
        assert!("fake".parse::<DeviceCompute>().is_err());
        assert_eq!(DeviceCompute::Real.to_string(), "real");
    }

    #[test]
    fn dtypes_parse_by_wire_name() {
        assert_eq!(parse_dtype("f16"), Ok(HiddenDtype::F16));
        assert_eq!(parse_dtype("f32"), Ok(HiddenDtype::F32));
        assert!(parse_dtype("fp16").is_err());
    }

    #[test]
    fn config_checks() {
        let ok = LoadConfig::new("ws://127.0.0.1:1/v1/edge/ws", "edge", 4);
        assert_eq!(ok.check(), Ok(()));
        let bad = |f: fn(&mut LoadConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.check().is_err()
        };
        assert!(bad(|c| c.server = "http://x".into()));
        assert!(bad(|c| c.devices = 0));
        assert!(bad(|c| c.generations_per_device = 0));
        assert!(bad(|c| c.prompt_pool = 0));
        assert!(bad(|c| c.duration = Duration::ZERO));
        assert!(bad(|c| c.silence_timeout = Duration::ZERO));
        assert!(bad(|c| c.metrics_url = Some("ws://x/metrics".into())));
        // Replayed devices do not draft; real ones may, up to the protocol's 16.
        assert!(bad(|c| c.max_draft_tokens = 4));
        let mut real = ok.clone();
        real.device_compute = DeviceCompute::Real;
        real.max_draft_tokens = 16;
        assert_eq!(real.check(), Ok(()));
        real.max_draft_tokens = 17;
        assert!(real.check().is_err());
        assert!(bad(
            |c| c.prompts = Some(FixedPrompts::Ids(vec![vec![1], vec![]]))
        ));
        let mut given = ok.clone();
        given.prompts = Some(FixedPrompts::Ids(vec![vec![5; 100], vec![6; 3]]));
        assert_eq!(given.check(), Ok(()));
        assert_eq!(given.max_prompt_tokens(), 100);
        assert_eq!(given.max_sequence_tokens(), 132);
    }
}

/// Reads a device-token file: one token per line; blank lines and lines starting with `#`
/// are skipped. Every token must look like one (`tdv_…`, no spaces), and there must be one.
pub fn read_device_tokens(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with("tdv_") || line.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{} line {}: not a device token (tdv_…)",
                path.display(),
                n + 1
            ));
        }
        tokens.push(line.to_owned());
    }
    if tokens.is_empty() {
        return Err(format!("{}: no device tokens", path.display()));
    }
    Ok(tokens)
}

#[cfg(test)]
mod device_token_tests {
    use super::read_device_tokens;

    #[test]
    fn token_files_skip_comments_and_refuse_what_is_not_a_token() {
        let dir = tempfile::tempdir().expect("tmp");
        let good = dir.path().join("good");
        std::fs::write(&good, "# users a and b\ntdv_a.1.x\n\n  tdv_b.2.y  \n").expect("write");
        assert_eq!(
            read_device_tokens(&good).expect("read"),
            vec!["tdv_a.1.x".to_owned(), "tdv_b.2.y".to_owned()]
        );
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "tdv_a.1.x\nBearer tdv_b\n").expect("write");
        let e = read_device_tokens(&bad).expect_err("not a token");
        assert!(e.contains("line 2"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nothing\n").expect("write");
        assert!(read_device_tokens(&empty).is_err());
    }
}
