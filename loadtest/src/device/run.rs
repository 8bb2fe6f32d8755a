//! One generation in progress ([`Run`]): what it has received and sent so far, the
//! reconnection loop around its connections ([`Run::drive`]), and its record once it ends.
//!
//! What one connection does after the handshake is in [`super::session`]; the drafting
//! bookkeeping in [`super::speculation`].

use std::time::{Duration, Instant};

use tandem_protocol::{Done, ResumeToken, SessionId};
use tokio_tungstenite::tungstenite::Bytes;

use super::speculation::{Receipt, Speculation};
use super::wire::{self, Stop};
use super::{backoff, DeviceContext, Failure, GenerationRecord, Job, Outcome};
use crate::compute::Cursor;

/// The state of one generation in progress.
pub(super) struct Run<'a> {
    pub(super) ctx: &'a DeviceContext,
    pub(super) job: Job,
    /// Just before the first `Open`.
    pub(super) started: Instant,
    pub(super) open_sent: bool,
    pub(super) opened_once: bool,
    /// The server forgot the session: the next `Opened` starts a replay by new `Open`.
    pub(super) reopening: bool,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    last_token_at: Option<Instant>,
    e2e: Duration,
    connect: Option<Duration>,
    /// Token ids received; index = sequence number.
    pub(super) tokens: Vec<u32>,
    /// Every `Hidden` frame produced; index = sequence number.
    pub(super) frames: Vec<Bytes>,
    /// Frames the prompt took (`frames[prompt_frames + s]` answers token `s`).
    pub(super) prompt_frames: usize,
    pub(super) cursor: Option<Cursor>,
    pub(super) session: Option<(SessionId, ResumeToken)>,
    /// Where a `moved` answer said the session lives.
    pub(super) redirect: Option<String>,
    /// The current connection brought a new token or `Done` (ends an outage).
    pub(super) progressed: bool,
    reconnects: u32,
    pub(super) resumes: u32,
    pub(super) replays: u32,
    pub(super) reopens: u32,
    /// `Some` when this generation drafts.
    pub(super) spec: Option<Speculation>,
    /// Answers taken (see [`GenerationRecord::rounds`]).
    pub(super) rounds: u32,
}

impl<'a> Run<'a> {
    pub(super) fn new(ctx: &'a DeviceContext, job: Job) -> Self {
        Self {
            ctx,
            job,
            started: Instant::now(),
            open_sent: false,
            opened_once: false,
            reopening: false,
            ttft: None,
            gaps: Vec::new(),
            last_token_at: None,
            e2e: Duration::ZERO,
            connect: None,
            tokens: Vec::new(),
            frames: Vec::new(),
            prompt_frames: 0,
            cursor: None,
            session: None,
            redirect: None,
            progressed: false,
            reconnects: 0,
            resumes: 0,
            replays: 0,
            reopens: 0,
            spec: (ctx.max_draft_tokens > 0).then(|| Speculation::new(ctx.max_draft_tokens)),
            rounds: 0,
        }
    }

    /// What the generation measured, once it ended with `outcome` (`lost`: after every
    /// reconnection attempt).
    pub(super) fn into_record(self, outcome: Outcome, lost: bool) -> GenerationRecord {
        GenerationRecord {
            device: self.job.device,
            generation: self.job.generation,
            prompt_tokens: self.ctx.compute.prompt_len(self.job.prompt) as u32,
            max_tokens: self.job.max_tokens,
            outcome,
            tokens_received: self.tokens.len() as u32,
            tokens: self.tokens,
            ttft: self.ttft,
            gaps: self.gaps,
            e2e: self.e2e,
            connect: self.connect,
            reconnects: self.reconnects,
            resumes: self.resumes,
            replays: self.replays,
            reopens: self.reopens,
            lost,
            drafted: self.spec.as_ref().map_or(0, |s| s.drafted),
            accepted: self.spec.as_ref().map_or(0, |s| s.accepted),
            rounds: self.rounds,
        }
    }

    /// Connections until `Done`, a fatal failure, or the end of the reconnection budget
    /// (`Err((failure, true))`: lost).
    pub(super) async fn drive(&mut self) -> Result<Done, (Failure, bool)> {
        let mut failures: u32 = 0;
        loop {
            self.progressed = false;
            let stop = match self.connection().await {
                Ok(done) => {
                    self.e2e = self.started.elapsed();
                    return Ok(done);
                }
                Err(stop) => stop,
            };
            self.e2e = self.started.elapsed();
            if self.progressed {
                failures = 0;
            }
            let delay = match stop {
                Stop::Fatal(f) => return Err((f, false)),
                Stop::Reopen => {
                    self.reopening = true;
                    Duration::ZERO
                }
                Stop::Retry(f) => {
                    if failures >= self.ctx.max_reconnects {
                        return Err((f, true));
                    }
                    failures += 1;
                    if self.redirect.is_some() {
                        Duration::ZERO
                    } else {
                        backoff(failures - 1, rand::random::<f64>())
                    }
                }
            };
            tokio::time::sleep(delay).await;
            self.reconnects += 1;
            self.ctx.live.reconnect();
        }
    }

    /// One connection: handshake, `Open` or `Resume`, then frames until `Done`.
    async fn connection(&mut self) -> Result<Done, Stop> {
        let url = self
            .redirect
            .take()
            .unwrap_or_else(|| match self.ctx.links.len() {
                0 => self.ctx.server.clone(),
                n => self.ctx.links[self.job.device % n].clone(),
            });
        let began = Instant::now();
        let tokens = &self.ctx.device_tokens;
        let token = (!tokens.is_empty()).then(|| tokens[self.job.device % tokens.len()].as_str());
        let mut ws = wire::open(&url, token).await?;
        if self.connect.is_none() {
            self.connect = Some(began.elapsed());
        }
        let result = self.session(&mut ws).await;
        let _ = ws.close(None).await;
        result
    }

    pub(super) fn session_id(&self) -> SessionId {
        self.session
            .as_ref()
            .map_or(SessionId(u128::MAX), |(id, _)| *id)
    }

    /// Whether the last token received still waits for its hidden state.
    pub(super) fn unanswered(&self) -> bool {
        match &self.spec {
            Some(spec) => !self.tokens.is_empty() && spec.ruled(),
            None => {
                !self.tokens.is_empty()
                    && self.frames.len() - self.prompt_frames < self.tokens.len()
            }
        }
    }

    /// Tokens of the answer under way (drafting only), before the device rules on it.
    pub(super) fn answer_so_far(&self) -> usize {
        self.spec.as_ref().map_or(0, Speculation::answer_so_far)
    }

    pub(super) fn looks_final(&self, token: u32) -> bool {
        self.tokens.len() as u32 >= self.job.max_tokens || self.ctx.eos.contains(&token)
    }

    /// A new token that counts: timed, kept, counted live.
    pub(super) fn on_token(&mut self, token: u32) {
        let now = Instant::now();
        match self.last_token_at {
            None => self.ttft = Some(now - self.started),
            Some(prev) => self.gaps.push(now - prev),
        }
        self.last_token_at = Some(now);
        self.tokens.push(token);
        self.progressed = true;
        self.ctx.live.token();
    }

    /// A drafting device's `Token`: adds it to the answer waited for; `true` when the answer
    /// became whole and was ruled on (the next frame is owed, or the generation ended).
    pub(super) fn on_spec_token(&mut self, t: &tandem_protocol::Token) -> Result<bool, Stop> {
        let have = self.tokens.len();
        let Some(spec) = self.spec.as_mut() else {
            return Ok(false);
        };
        match spec.receive(t, have)? {
            Receipt::Ignored => Ok(false),
            Receipt::Partial => {
                self.progressed = true;
                Ok(false)
            }
            Receipt::Whole => {
                self.progressed = true;
                self.take_answer();
                Ok(true)
            }
        }
    }

    /// Rules on the answer waited for: the tokens that count become the generation's.
    pub(super) fn take_answer(&mut self) {
        let Some(ids) = self.spec.as_mut().and_then(Speculation::rule) else {
            return;
        };
        self.rounds += 1;
        for id in ids {
            self.on_token(id);
        }
    }

    /// Drafts for the next decode step (as `tandem-edge`'s driver makes them).
    pub(super) fn drafts(&mut self) -> Vec<u32> {
        let left = (self.job.max_tokens as usize).saturating_sub(self.tokens.len() + 1);
        let ends = self.tokens.last().is_some_and(|t| self.ctx.eos.contains(t));
        let Some(spec) = self.spec.as_mut() else {
            return Vec::new();
        };
        let (compute, prompt, tokens) = (&self.ctx.compute, self.job.prompt, &self.tokens);
        spec.drafts(left, ends, || {
            let prompt = compute.prompt_ids(prompt).unwrap_or(&[]);
            let mut context = Vec::with_capacity(prompt.len() + tokens.len());
            context.extend_from_slice(prompt);
            context.extend_from_slice(tokens);
            context
        })
    }
}
