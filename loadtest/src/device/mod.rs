//! One simulated device's generation over the raw protocol (docs/protocol.md §6), timed,
//! surviving dropped connections as a real device does.
//!
//! Connect, send `Open`, wait for `Opened`, send the prompt's `Hidden` frames, then answer
//! each `Token` with the next step's frame (from the [`Cursor`]) until `Done`. A token that
//! looks final (the `max_tokens`-th, or an end-of-sequence id) is not answered at once:
//! `Done` should follow it; if none comes within [`FINAL_TOKEN_GRACE`] its hidden state is
//! sent anyway (as `tandem-edge` does).
//!
//! # Resume and replay
//! Every `Hidden` frame sent is kept (`Bytes`, shared with the replay tree: no copy), and
//! every token id received. When the connection drops, a send fails, the server is silent
//! for the silence timeout (see below), or it answers a `3xx` error (`shutting_down`,
//! `unavailable`, …), the device reconnects after a [`backoff`] and:
//! - sends `Resume` (session id, the latest resume token, the last token's sequence number);
//!   on `Opened` it resends every kept `Hidden` from the `Opened`'s next sequence number:
//!   a *resume* when the server kept the session, a *replay* when it says 0 (it lost the
//!   state but kept the session's parameters, e.g. in Redis): then every frame goes back to
//!   back and the server rebuilds its KV from them without sending the known tokens again;
//! - if the server answers `unknown_session` (an in-memory store after a restart), it sends
//!   a new `Open` and replays step by step: the prompt's frames, then for each token the
//!   server sends again the kept frame that followed it the first time. Tokens it already
//!   has are checked (same id, else `protocol_violation`) and not counted again; new ones
//!   continue the generation. This is also counted as a replay (and as a *reopen*).
//! - `moved` reconnects at once to the URL it names.
//!
//! `--max-reconnects` bounds the consecutive failed attempts of one outage; a connection
//! that brings a new token or `Done` ends the outage. A generation that runs out of attempts
//! fails with the last cause and is counted as *lost*. Refusals of the first `Open`
//! (`overloaded`, `rate_limited`) are not retried: they are what a load test measures.
//!
//! # Speculation
//! With `--max-draft-tokens N` (real edge compute only) a device drafts as `tandem-edge`
//! does, with the same types ([`tandem_edge::draft`]): prompt lookup over the prompt and the
//! output so far, as many drafts as its adaptive [`DraftLength`], the cloud's last
//! `draft_cap` and the tokens left allow. Each decode frame carries the token received and
//! the drafts; the device takes the cloud's answer whole (the token that counts, then one
//! per draft row), rules on it with [`accepted_drafts`], and its next frame starts where the
//! verdict says (the edge forgets the drafts that did not count). Only the tokens that count
//! are the generation's tokens (and are timed); the report counts drafted and accepted
//! tokens and the round trips. A drafting generation survives resumes (the server kept its
//! state: its frames are resent from where the server stands); a server that lost the
//! session (`unknown_session`) fails it, as no step-by-step replay of drafted answers is
//! made (`tandem-edge` does that one; the load generator measures, it does not recover).
//!
//! # Silence
//! The silence timeout (`--silence-timeout-s`, [`DEFAULT_SILENCE_TIMEOUT`]) bounds only the
//! waits for the server: for `Opened`, and for the next frame while the server owes a token
//! or `Done`. What the device itself takes when it is its turn to send (the step delay, the
//! edge compute, the think time between generations, the reconnection backoff) is never
//! counted, so a session kept open by a device that sends one step every ten minutes is not
//! silence, however short the timeout.
//!
//! # Timings
//! Taken on the device: TTFT from just before the first `Open` is written to the first
//! `Token`; each gap between two consecutive new tokens (so the gap spanning an outage holds
//! the outage, the reconnection and any replay: what the user sees as a stall, and it counts
//! in TPOT); end to end from the first `Open` to `Done`; the first TCP + WebSocket handshake
//! on its own (later ones are inside the gaps). They include the device's edge work (replayed
//! and usually cached, or real).
//!
//! # Layout
//! - this module: what a generation is given ([`DeviceContext`], [`Job`]) and what it
//!   measured ([`GenerationRecord`], [`Outcome`], [`Failure`]), and [`generate`];
//! - `run`: one generation in progress, its reconnection loop and its record;
//! - `session`: one connection, from `Open` or `Resume` to `Done`;
//! - `speculation`: a drafting device's bookkeeping, without sockets;
//! - `wire`: the WebSocket handshake, frames in and out, and why a connection stops.
//!
//! [`Cursor`]: crate::compute::Cursor
//! [`DraftLength`]: tandem_edge::draft::DraftLength
//! [`accepted_drafts`]: tandem_edge::draft::accepted_drafts

use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::{DoneReason, ErrorCode, Open};

use crate::compute::Compute;
use crate::live::Live;
use crate::workload::PromptId;

mod run;
mod session;
mod speculation;
mod wire;

pub use crate::timing::{
    backoff, BACKOFF_INITIAL, BACKOFF_MAX, CONNECT_TIMEOUT, DEFAULT_SILENCE_TIMEOUT,
    FINAL_TOKEN_GRACE,
};

/// Why a generation failed.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The server sent an `Error` frame.
    Server { code: ErrorCode, message: String },
    /// No WebSocket connection could be made.
    Connect(String),
    /// The connection closed (or a send failed) before `Done`.
    Disconnected(String),
    /// The server said nothing for this long (the silence timeout) while the device waited.
    Timeout(Duration),
    /// The server broke the protocol (a bad frame, an unexpected frame, a gap in tokens, a
    /// replayed token that differs).
    Protocol(String),
    /// The edge compute failed.
    Edge(String),
}

impl Failure {
    /// The name errors are counted under: the protocol's code name for an `Error` frame
    /// (`overloaded`, `internal`, …), otherwise one of `connect_failed`, `disconnected`,
    /// `timeout`, `protocol_violation`, `edge_compute` (no protocol code has these names).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Server { code, .. } => code.as_str(),
            Self::Connect(_) => "connect_failed",
            Self::Disconnected(_) => "disconnected",
            Self::Timeout(_) => "timeout",
            Self::Protocol(_) => "protocol_violation",
            Self::Edge(_) => "edge_compute",
        }
    }

    /// A human-readable detail, for the report's examples.
    pub fn detail(&self) -> String {
        match self {
            Self::Server { code, message } => format!("{code} ({}): {message}", code.as_u16()),
            Self::Timeout(after) => format!("no frame for {}s", after.as_secs_f64()),
            Self::Connect(m) | Self::Disconnected(m) | Self::Protocol(m) | Self::Edge(m) => {
                m.clone()
            }
        }
    }
}

/// How a generation ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `Done` arrived.
    Done {
        reason: DoneReason,
        /// As `Done` reports them.
        output_tokens: u32,
    },
    Failed(Failure),
}

/// What one generation measured.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRecord {
    /// Which device (in arrival order) and which of its generations (0-based).
    pub device: usize,
    pub generation: usize,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub outcome: Outcome,
    /// Distinct `Token` frames received (a token resent after a reconnection counts once).
    pub tokens_received: u32,
    /// Their ids, in order.
    pub tokens: Vec<u32>,
    pub ttft: Option<Duration>,
    /// Between consecutive new tokens (outages included).
    pub gaps: Vec<Duration>,
    /// First `Open` to `Done` (or to the failure).
    pub e2e: Duration,
    /// The first TCP + WebSocket handshake (before `Open`; not in the other times).
    pub connect: Option<Duration>,
    /// Reconnection attempts after a lost connection.
    pub reconnects: u32,
    /// `Resume`s the server answered with the session's state kept.
    pub resumes: u32,
    /// Sessions rebuilt from the kept frames (`Resume` answered with 0, or a new `Open`).
    pub replays: u32,
    /// Of `replays`, those that needed a new `Open` (`unknown_session`).
    pub reopens: u32,
    /// Failed after every reconnection attempt (the failure is the last attempt's cause).
    pub lost: bool,
    /// Drafts sent (speculation) and those the cloud's answers confirmed.
    pub drafted: u32,
    pub accepted: u32,
    /// Answers taken: the prompt's, then one per decode frame (each a round trip).
    pub rounds: u32,
}

/// What every device shares.
#[derive(Debug)]
pub struct DeviceContext {
    pub server: String,
    /// With network conditions (`LoadConfig::network`): the URLs of the in-process delay
    /// proxies in front of the server; device `i` connects through `links[i % len]`.
    pub links: Vec<String>,
    /// The `Open` every generation sends, but for its `max_tokens`.
    pub open: Open,
    pub compute: Arc<Compute>,
    /// End-of-sequence ids: a token among them is expected to be the last.
    pub eos: Vec<u32>,
    pub live: Arc<Live>,
    /// Consecutive failed reconnection attempts before a generation is given up.
    pub max_reconnects: u32,
    /// Pause before each decode step's hidden state is computed and sent (`--step-delay-ms`).
    /// The device's own time: not counted by `silence_timeout`.
    pub step_delay: Duration,
    /// Longest wait for a frame the server owes (`--silence-timeout-s`).
    pub silence_timeout: Duration,
    /// Most drafts per decode step (`--max-draft-tokens`; 0: no speculation). Needs real
    /// edge compute.
    pub max_draft_tokens: usize,
    /// Device tokens; device `i` presents `device_tokens[i % len]` on the upgrade.
    pub device_tokens: Vec<String>,
}

/// Which generation: the device, its index there, the prompt and `max_tokens`.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub device: usize,
    pub generation: usize,
    pub prompt: PromptId,
    pub max_tokens: u32,
}

/// Runs one generation.
pub async fn generate(ctx: &DeviceContext, job: Job) -> GenerationRecord {
    let mut run = run::Run::new(ctx, job);
    let (outcome, lost) = match run.drive().await {
        Ok(done) => (
            Outcome::Done {
                reason: done.reason,
                output_tokens: done.output_tokens,
            },
            false,
        ),
        Err((f, lost)) => (Outcome::Failed(f), lost),
    };
    if lost {
        ctx.live.lost();
    }
    run.into_record(outcome, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_less_jitter() {
        let ms = |a, j| backoff(a, j).as_millis();
        assert_eq!(
            (0..6).map(|a| ms(a, 0.0)).collect::<Vec<_>>(),
            [250, 500, 1000, 2000, 4000, 4000]
        );
        assert_eq!(ms(100, 0.0), 4000);
        // Jitter takes off at most a quarter.
        assert_eq!(ms(0, 1.0), 187);
        assert!((187..=250).contains(&ms(0, 0.5)));
        assert_eq!(ms(3, 2.0), 1500); // clamped to 1
    }
}
