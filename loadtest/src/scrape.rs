//! Reading the server's `/metrics` before and after a run.
//!
//! The fetch is one `GET` through `tandem-http` (the project's one HTTP client). The parse is
//! the simple part of the Prometheus text format: `# TYPE` lines give each family's type, every other
//! non-comment line is `name{labels} value [timestamp]`. Only `tandem_*` samples are kept.
//!
//! The report keeps, per sample (name with its labels), the change of every `*_total`
//! counter over the run and the final value of every gauge, and, when the server exports its
//! engine phases and thread CPU times, the serving overhead they imply ([`ServerOverhead`]).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BYTES: usize = 16 << 20;

/// The server's side of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerMetrics {
    /// `tandem_*_total` samples: after minus before.
    pub counters_delta: BTreeMap<String, f64>,
    /// `tandem_*` gauge samples after the run.
    pub gauges: BTreeMap<String, f64>,
    /// Set when the scrape after the run failed (the maps are then empty).
    pub error: Option<String>,
    /// The serving overhead over the run, when the server exports what it needs.
    #[serde(default)]
    pub overhead: Option<ServerOverhead>,
}

/// Where the server's time went over the run, from `tandem_engine_seconds_total` (engine
/// thread, wall clock, by phase) and `tandem_thread_cpu_seconds_total` (CPU, by thread
/// group). The overhead is what serving adds to the model's compute: the engine thread's
/// bookkeeping (commands, scheduling, outcomes) plus the CPU of the I/O threads (sockets,
/// frames, session tasks), against the engine's forward time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerOverhead {
    pub steps: f64,
    pub forward_s: f64,
    pub bookkeeping_s: f64,
    pub decode_wait_s: f64,
    /// CPU seconds by thread group (`engine`, `matmul`, `io`, `other`).
    pub cpu_s: BTreeMap<String, f64>,
    /// `(bookkeeping_s + cpu_s["io"]) / forward_s`.
    pub overhead_share: f64,
    /// `bookkeeping_s / steps`, in milliseconds.
    pub bookkeeping_ms_per_step: f64,
}

impl ServerOverhead {
    /// Derived from counter deltas; `None` without an engine forward time to compare with.
    pub fn from_deltas(d: &BTreeMap<String, f64>) -> Option<Self> {
        let get = |k: &str| d.get(k).copied();
        let phase = |p: &str| get(&format!("tandem_engine_seconds_total{{phase=\"{p}\"}}"));
        let forward_s = phase("forward").filter(|&f| f > 0.0)?;
        let bookkeeping_s = phase("bookkeeping").unwrap_or(0.0);
        let prefix = "tandem_thread_cpu_seconds_total{threads=\"";
        let cpu_s: BTreeMap<String, f64> = d
            .iter()
            .filter_map(|(k, &v)| {
                let group = k.strip_prefix(prefix)?.strip_suffix("\"}")?;
                Some((group.to_owned(), v))
            })
            .collect();
        let io = cpu_s.get("io").copied().unwrap_or(0.0);
        let steps = get("tandem_engine_steps_total").unwrap_or(0.0);
        Some(Self {
            steps,
            forward_s,
            bookkeeping_s,
            decode_wait_s: phase("decode_wait").unwrap_or(0.0),
            cpu_s,
            overhead_share: (bookkeeping_s + io) / forward_s,
            bookkeeping_ms_per_step: if steps > 0.0 {
                bookkeeping_s * 1e3 / steps
            } else {
                0.0
            },
        })
    }
}

/// One parsed exposition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    /// Sample (`name{labels}` as written) → value.
    pub samples: BTreeMap<String, f64>,
    /// Family name → type (`counter`, `gauge`, `histogram`, …).
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses the text format, keeping `tandem_*` samples; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    out.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') || !line.starts_with("tandem_") {
                continue;
            }
            // The sample is everything up to the value; label values may hold spaces, so
            // split after the closing brace when there is one.
            let split_at = match line.rfind('}') {
                Some(brace) => brace + 1,
                None => line.find(char::is_whitespace).unwrap_or(line.len()),
            };
            let (sample, rest) = line.split_at(split_at);
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            if let Ok(v) = parse_value(value) {
                out.samples.insert(sample.to_owned(), v);
            }
        }
        out
    }

    /// The family a sample belongs to (its name without labels).
    fn family(sample: &str) -> &str {
        sample.split('{').next().unwrap_or(sample)
    }

    /// Counter deltas from `before` to `self`, and `self`'s gauges.
    pub fn since(&self, before: &Exposition) -> ServerMetrics {
        let mut m = ServerMetrics::default();
        for (sample, &after) in &self.samples {
            let family = Self::family(sample);
            if family.ends_with("_total") {
                let prior = before.samples.get(sample).copied().unwrap_or(0.0);
                m.counters_delta.insert(sample.clone(), after - prior);
            } else if self.types.get(family).map(String::as_str) == Some("gauge") {
                m.gauges.insert(sample.clone(), after);
            }
        }
        m.overhead = ServerOverhead::from_deltas(&m.counters_delta);
        m
    }
}

fn parse_value(s: &str) -> Result<f64, std::num::ParseFloatError> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        other => other.parse(),
    }
}

/// `GET`s `url` (`http://HOST[:PORT]/PATH`) and returns the body of a `200` answer.
pub async fn fetch(url: &str) -> anyhow::Result<String> {
    fetch_inner(url).await.with_context(|| format!("GET {url}"))
}

async fn fetch_inner(url: &str) -> anyhow::Result<String> {
    let (base, path) = split(url)?;
    let mut req = tandem_http::Request::new(tandem_http::Method::GET, path);
    req.headers.push((
        tandem_http::header::ACCEPT,
        tandem_http::header::HeaderValue::from_static("text/plain"),
    ));
    req.timeout = TIMEOUT;
    req.max_body_bytes = MAX_BYTES;
    let res = tandem_http::send(&base, req).await?;
    if res.status != tandem_http::StatusCode::OK {
        bail!("answered `{}`", res.status);
    }
    String::from_utf8(res.body.to_vec()).context("the body is not UTF-8")
}

/// `http://HOST[:PORT]/PATH` as its base and its path (`/` when none).
fn split(url: &str) -> anyhow::Result<(tandem_http::BaseUrl, &str)> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let at = rest.find('/').map_or(url.len(), |i| "http://".len() + i);
    let base = tandem_http::BaseUrl::parse(&url[..at]).map_err(anyhow::Error::msg)?;
    Ok((base, if at < url.len() { &url[at..] } else { "/" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# HELP tandem_tokens_out_total Tokens sent.
# TYPE tandem_tokens_out_total counter
tandem_tokens_out_total 100
# TYPE tandem_errors_total counter
tandem_errors_total{code=\"overloaded\"} 2
# TYPE tandem_sessions_active gauge
tandem_sessions_active 5
# TYPE tandem_ttft_seconds histogram
tandem_ttft_seconds_bucket{le=\"0.1\"} 3
tandem_ttft_seconds_count 3
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 9
";

    const AFTER: &str = "\
# TYPE tandem_tokens_out_total counter
tandem_tokens_out_total 900
# TYPE tandem_errors_total counter
tandem_errors_total{code=\"overloaded\"} 2
tandem_errors_total{code=\"internal\", where=\"a b\"} 1
# TYPE tandem_sessions_active gauge
tandem_sessions_active 0
# TYPE tandem_kv_blocks_used gauge
tandem_kv_blocks_used 12 1700000000000
# TYPE tandem_ttft_seconds histogram
tandem_ttft_seconds_bucket{le=\"+Inf\"} 7
tandem_ttft_seconds_count 7
garbage line
";

    #[test]
    fn parses_samples_and_types() {
        let e = Exposition::parse(AFTER);
        assert_eq!(e.samples["tandem_tokens_out_total"], 900.0);
        assert_eq!(
            e.samples["tandem_errors_total{code=\"internal\", where=\"a b\"}"],
            1.0
        );
        assert_eq!(e.samples["tandem_kv_blocks_used"], 12.0);
        assert_eq!(e.samples["tandem_ttft_seconds_bucket{le=\"+Inf\"}"], 7.0);
        assert_eq!(e.types["tandem_sessions_active"], "gauge");
        assert!(!e.samples.keys().any(|k| k.starts_with("process_")));
    }

    #[test]
    fn counter_deltas_and_final_gauges() {
        let m = Exposition::parse(AFTER).since(&Exposition::parse(BEFORE));
        assert_eq!(m.counters_delta["tandem_tokens_out_total"], 800.0);
        assert_eq!(
            m.counters_delta["tandem_errors_total{code=\"overloaded\"}"],
            0.0
        );
        assert_eq!(
            m.counters_delta["tandem_errors_total{code=\"internal\", where=\"a b\"}"],
            1.0
        );
        assert_eq!(m.counters_delta.len(), 3, "{:?}", m.counters_delta);
        assert_eq!(m.gauges["tandem_sessions_active"], 0.0);
        assert_eq!(m.gauges["tandem_kv_blocks_used"], 12.0);
        assert_eq!(m.gauges.len(), 2);
    }

    #[test]
    fn overhead_from_engine_phases_and_thread_groups() {
        let before = "\
# TYPE tandem_engine_seconds_total counter
tandem_engine_seconds_total{phase=\"forward\"} 10
tandem_engine_seconds_total{phase=\"bookkeeping\"} 1
tandem_engine_seconds_total{phase=\"decode_wait\"} 2
# TYPE tandem_engine_steps_total counter
tandem_engine_steps_total 100
# TYPE tandem_thread_cpu_seconds_total counter
tandem_thread_cpu_seconds_total{threads=\"io\"} 3
tandem_thread_cpu_seconds_total{threads=\"matmul\"} 9
";
        let after = "\
# TYPE tandem_engine_seconds_total counter
tandem_engine_seconds_total{phase=\"forward\"} 30
tandem_engine_seconds_total{phase=\"bookkeeping\"} 1.2
tandem_engine_seconds_total{phase=\"decode_wait\"} 2.5
# TYPE tandem_engine_steps_total counter
tandem_engine_steps_total 300
# TYPE tandem_thread_cpu_seconds_total counter
tandem_thread_cpu_seconds_total{threads=\"io\"} 3.4
tandem_thread_cpu_seconds_total{threads=\"matmul\"} 25
";
        let m = Exposition::parse(after).since(&Exposition::parse(before));
        let o = m.overhead.expect("derived");
        assert!((o.forward_s - 20.0).abs() < 1e-9);
        assert!((o.bookkeeping_s - 0.2).abs() < 1e-9);
        assert!((o.decode_wait_s - 0.5).abs() < 1e-9);
        assert!((o.cpu_s["io"] - 0.4).abs() < 1e-9);
        assert!((o.cpu_s["matmul"] - 16.0).abs() < 1e-9);
        // (0.2 + 0.4) / 20
        assert!(
            (o.overhead_share - 0.03).abs() < 1e-9,
            "{}",
            o.overhead_share
        );
        assert!((o.bookkeeping_ms_per_step - 1.0).abs() < 1e-9);
        // A server without the engine counters (an older build) has no overhead.
        assert_eq!(
            Exposition::parse(AFTER)
                .since(&Exposition::parse(BEFORE))
                .overhead,
            None
        );
    }

    #[test]
    fn metrics_urls_split_into_base_and_path() {
        let (b, p) = split("http://127.0.0.1:9091/metrics").expect("url");
        assert_eq!(
            (b.to_string(), p),
            ("http://127.0.0.1:9091".to_owned(), "/metrics")
        );
        let (b, p) = split("http://tandem").expect("no path");
        assert_eq!((b.port(), p), (80, "/"));
        assert!(split("https://tandem/metrics").is_err());
        assert!(split("http://user@tandem/metrics").is_err());
    }
}
