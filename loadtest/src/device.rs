//! One simulated device's generation over the raw protocol (docs/protocol.md §6), timed.
//!
//! Connect, send `Open`, wait for `Opened`, send the prompt's `Hidden` frames, then answer
//! each `Token` with the next step's frame from the [`Replay`] tree until `Done`. A token
//! that looks final (the `max_tokens`-th, or an end-of-sequence id) is not answered at once:
//! `Done` should follow it; if none comes within [`FINAL_TOKEN_GRACE`] its hidden state is
//! sent anyway (as `tandem-edge` does).
//!
//! Unlike `tandem-edge`'s client this device does not reconnect or resume: a dropped
//! connection or an `Error` frame ends the generation and is counted by its code. That is
//! what a load test wants to see; resuming is left for later.
//!
//! Timings are taken on the device: TTFT from just before `Open` is written to the first
//! `Token`; each gap between consecutive `Token`s; end to end from `Open` to `Done`; the
//! TCP + WebSocket handshake before `Open` on its own. They include the device's own
//! (replayed, usually cached) edge work, which is what a user would see minus the real edge
//! compute time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tandem_protocol::{DoneReason, ErrorCode, Frame, Open};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::live::Live;
use crate::replay::{Replay, Step};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for the TCP + WebSocket handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A server silent this long while the device waits counts as a failure (`timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for `Done` after a token that looks final.
pub const FINAL_TOKEN_GRACE: Duration = Duration::from_secs(2);

/// Why a generation failed.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The server sent an `Error` frame.
    Server { code: ErrorCode, message: String },
    /// No WebSocket connection could be made.
    Connect(String),
    /// The connection closed (or a send failed) before `Done`.
    Disconnected(String),
    /// The server said nothing for [`IDLE_TIMEOUT`].
    Timeout,
    /// The server broke the protocol (a bad frame, an unexpected frame, a gap in tokens).
    Protocol(String),
    /// The replayed edge compute failed.
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
            Self::Timeout => "timeout",
            Self::Protocol(_) => "protocol_violation",
            Self::Edge(_) => "edge_compute",
        }
    }

    /// A human-readable detail, for the report's examples.
    pub fn detail(&self) -> String {
        match self {
            Self::Server { code, message } => format!("{code} ({}): {message}", code.as_u16()),
            Self::Timeout => format!("no frame for {}s", IDLE_TIMEOUT.as_secs()),
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
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub outcome: Outcome,
    /// `Token` frames received.
    pub tokens_received: u32,
    pub ttft: Option<Duration>,
    /// Between consecutive tokens.
    pub gaps: Vec<Duration>,
    /// `Open` to `Done` (or to the failure).
    pub e2e: Duration,
    /// The TCP + WebSocket handshake (before `Open`; not in the other times).
    pub connect: Option<Duration>,
}

/// What every device shares.
#[derive(Debug)]
pub struct DeviceContext {
    pub server: String,
    /// The `Open` every generation sends, but for its `max_tokens`.
    pub open: Open,
    pub replay: Arc<Replay>,
    /// End-of-sequence ids: a token among them is expected to be the last.
    pub eos: Vec<u32>,
    pub live: Arc<Live>,
}

/// Runs one generation from the prompt at `root`.
pub async fn generate(ctx: &DeviceContext, root: &Arc<Step>, max_tokens: u32) -> GenerationRecord {
    let mut run = Run {
        ctx,
        max_tokens,
        started: Instant::now(),
        ttft: None,
        gaps: Vec::new(),
        tokens: 0,
        last_token_at: None,
        e2e: Duration::ZERO,
        connect: None,
    };
    let outcome = match run.drive(root).await {
        Ok(done) => Outcome::Done {
            reason: done.reason,
            output_tokens: done.output_tokens,
        },
        Err(f) => Outcome::Failed(f),
    };
    GenerationRecord {
        prompt_tokens: root.len() as u32,
        max_tokens,
        outcome,
        tokens_received: run.tokens,
        ttft: run.ttft,
        gaps: run.gaps,
        e2e: run.e2e,
        connect: run.connect,
    }
}

/// The state of one generation in progress.
struct Run<'a> {
    ctx: &'a DeviceContext,
    max_tokens: u32,
    started: Instant,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: u32,
    last_token_at: Option<Instant>,
    e2e: Duration,
    connect: Option<Duration>,
}

impl Run<'_> {
    async fn drive(&mut self, root: &Arc<Step>) -> Result<tandem_protocol::Done, Failure> {
        let connect = tokio_tungstenite::connect_async_with_config(
            self.ctx.server.as_str(),
            None,
            true, // no Nagle: frames are small and every one is waited for
        );
        let mut ws = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok((ws, _))) => {
                self.connect = Some(self.started.elapsed());
                ws
            }
            Ok(Err(e)) => {
                self.e2e = self.started.elapsed();
                return Err(Failure::Connect(e.to_string()));
            }
            Err(_) => {
                self.e2e = self.started.elapsed();
                return Err(Failure::Connect("timed out".into()));
            }
        };
        let result = self.session(&mut ws, root).await;
        self.e2e = self.started.elapsed();
        let _ = ws.close(None).await;
        result
    }

    async fn session(
        &mut self,
        ws: &mut Ws,
        root: &Arc<Step>,
    ) -> Result<tandem_protocol::Done, Failure> {
        let open = Frame::Open(Open {
            max_tokens: self.max_tokens,
            ..self.ctx.open.clone()
        })
        .encode()
        .map_err(|e| Failure::Protocol(format!("encoding Open: {e}")))?;
        self.started = Instant::now();
        send(ws, Bytes::from(open)).await?;
        self.wait_opened(ws).await?;
        for frame in root.frames() {
            send(ws, frame.clone()).await?;
        }

        let mut at = root.clone();
        // A final-looking token whose hidden state has not been sent.
        let mut held: Option<u32> = None;
        loop {
            let wait = if held.is_some() {
                FINAL_TOKEN_GRACE
            } else {
                IDLE_TIMEOUT
            };
            let frame = match tokio::time::timeout(wait, recv(ws)).await {
                Ok(frame) => frame?,
                Err(_) => match held.take() {
                    // No `Done` after all: the server wants this token's hidden state.
                    Some(token) => {
                        at = self.answer(ws, &at, token).await?;
                        continue;
                    }
                    None => return Err(Failure::Timeout),
                },
            };
            match frame {
                Frame::Token(t) => {
                    if t.seq != u64::from(self.tokens) || held.is_some() {
                        return Err(Failure::Protocol(format!(
                            "token {} arrived after {} tokens{}",
                            t.seq,
                            self.tokens,
                            if held.is_some() {
                                " before the last one's hidden state was sent"
                            } else {
                                ""
                            }
                        )));
                    }
                    self.on_token();
                    if self.tokens >= self.max_tokens || self.ctx.eos.contains(&t.token_id) {
                        held = Some(t.token_id);
                    } else {
                        at = self.answer(ws, &at, t.token_id).await?;
                    }
                }
                Frame::Done(d) => return Ok(d),
                Frame::Error(e) => {
                    return Err(Failure::Server {
                        code: e.code,
                        message: e.message,
                    })
                }
                Frame::Ping { nonce } => send_frame(ws, &Frame::Pong { nonce }).await?,
                Frame::Pong { .. } => {}
                other => {
                    return Err(Failure::Protocol(format!(
                        "unexpected {:?} frame",
                        other.frame_type()
                    )))
                }
            }
        }
    }

    async fn wait_opened(&mut self, ws: &mut Ws) -> Result<(), Failure> {
        loop {
            let frame = tokio::time::timeout(IDLE_TIMEOUT, recv(ws))
                .await
                .map_err(|_| Failure::Timeout)??;
            match frame {
                Frame::Opened(_) => return Ok(()),
                Frame::Error(e) => {
                    return Err(Failure::Server {
                        code: e.code,
                        message: e.message,
                    })
                }
                Frame::Ping { nonce } => send_frame(ws, &Frame::Pong { nonce }).await?,
                Frame::Pong { .. } => {}
                other => {
                    return Err(Failure::Protocol(format!(
                        "{:?} frame before Opened",
                        other.frame_type()
                    )))
                }
            }
        }
    }

    fn on_token(&mut self) {
        let now = Instant::now();
        match self.last_token_at {
            None => self.ttft = Some(now - self.started),
            Some(prev) => self.gaps.push(now - prev),
        }
        self.last_token_at = Some(now);
        self.tokens += 1;
        self.ctx.live.token();
    }

    /// Sends the hidden state of `token`, the next step after `at`.
    async fn answer(&self, ws: &mut Ws, at: &Arc<Step>, token: u32) -> Result<Arc<Step>, Failure> {
        let next = self
            .ctx
            .replay
            .next(at, token)
            .await
            .map_err(|e| Failure::Edge(format!("{e:#}")))?;
        for frame in next.frames() {
            send(ws, frame.clone()).await?;
        }
        Ok(next)
    }
}

async fn send(ws: &mut Ws, frame: Bytes) -> Result<(), Failure> {
    ws.send(Message::Binary(frame))
        .await
        .map_err(|e| Failure::Disconnected(format!("send failed: {e}")))
}

async fn send_frame(ws: &mut Ws, frame: &Frame) -> Result<(), Failure> {
    let bytes = frame
        .encode()
        .map_err(|e| Failure::Protocol(format!("encoding {:?}: {e}", frame.frame_type())))?;
    send(ws, Bytes::from(bytes)).await
}

/// The next protocol frame.
async fn recv(ws: &mut Ws) -> Result<Frame, Failure> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return Frame::decode(&b).map_err(|e| Failure::Protocol(format!("bad frame: {e}")))
            }
            Some(Ok(Message::Text(_))) => {
                return Err(Failure::Protocol("a text message".into()));
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(Failure::Disconnected(
                    "the server closed the connection".into(),
                ))
            }
            Some(Err(e)) => return Err(Failure::Disconnected(e.to_string())),
            Some(Ok(_)) => {} // WebSocket-level ping/pong
        }
    }
}
