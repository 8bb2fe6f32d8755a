//! One connection of a generation after the handshake: `Open` or `Resume`, `Opened`, the
//! frames the server is owed again (a resume or a replay, see *Resume and replay* in
//! [`crate::device`]), then `Token`s answered with `Hidden` frames until `Done`.
//!
//! The device waits for the server only while the server owes it a frame, and then for at
//! most the silence timeout (or [`FINAL_TOKEN_GRACE`] after a final-looking token it holds);
//! its own work (the step delay, the edge compute) is done outside those waits.

use std::time::Instant;

use tandem_protocol::{Done, ErrorCode, Frame, Open, Opened, Token};
use tokio_tungstenite::tungstenite::Bytes;

use super::run::Run;
use super::speculation::Speculation;
use super::wire::{recv, send, send_frame, Stop, Ws};
use super::{Failure, FINAL_TOKEN_GRACE};

/// How the connection after `Opened` should start.
enum Entry {
    /// A new session: the server waits for the prompt.
    Fresh,
    /// The server has (or rebuilds) every token we hold and waits for the rest of our
    /// frames, then for the last token's hidden state if we still owe it.
    Resumed,
    /// A new session for a generation that already has tokens: they come again.
    Reopened,
}

/// This connection's side of the exchange.
struct Link<'w> {
    ws: &'w mut Ws,
    /// Frames sent on this connection so far: the next one to send is `frames[sent]`.
    sent: usize,
    /// A final-looking token whose hidden state has not been sent.
    held: Option<u32>,
}

impl Run<'_> {
    /// `Open` or `Resume`, then frames until `Done`.
    pub(super) async fn session(&mut self, ws: &mut Ws) -> Result<Done, Stop> {
        let resuming = self.session.is_some();
        self.send_first(ws).await?;
        let opened = self.wait_opened(ws, resuming).await?;
        self.opened_once = true;
        let entry = if resuming {
            self.enter_resumed(ws, opened).await?
        } else {
            self.enter_opened(ws, opened).await?
        };
        let sent = match entry {
            Entry::Resumed => self.frames.len(),
            Entry::Fresh | Entry::Reopened => self.prompt_frames,
        };
        let mut link = Link {
            ws,
            sent,
            held: None,
        };
        if matches!(entry, Entry::Resumed) && self.unanswered() {
            self.answer_owed(&mut link).await?;
        }
        loop {
            let Some(frame) = self.next_frame(&mut link).await? else {
                continue;
            };
            if let Some(done) = self.on_frame(&mut link, frame).await? {
                return Ok(done);
            }
        }
    }

    /// `Resume` when the generation has a session, else `Open` (starting the clock the first
    /// time).
    async fn send_first(&mut self, ws: &mut Ws) -> Result<(), Stop> {
        let first = match &self.session {
            Some((session, token)) => Frame::Resume(tandem_protocol::Resume {
                session: *session,
                resume_token: token.clone(),
                last_token_seq: ((self.tokens.len() + self.answer_so_far()) as u64).checked_sub(1),
            }),
            None => Frame::Open(Open {
                max_tokens: self.job.max_tokens,
                ..self.ctx.open.clone()
            }),
        };
        let first = first
            .encode()
            .map_err(|e| Failure::Protocol(format!("encoding the first frame: {e}")))?;
        if !self.open_sent {
            self.started = Instant::now();
            self.open_sent = true;
        }
        send(ws, Bytes::from(first)).await
    }

    /// Waits for `Opened` after `Open` (`resuming: false`) or `Resume`.
    async fn wait_opened(&mut self, ws: &mut Ws, resuming: bool) -> Result<Opened, Stop> {
        loop {
            let limit = self.ctx.silence_timeout;
            let frame = tokio::time::timeout(limit, recv(ws))
                .await
                .map_err(|_| Stop::Retry(Failure::Timeout(limit)))??;
            match frame {
                Frame::Opened(o) => return Ok(o),
                Frame::Error(e)
                    if resuming && e.code == ErrorCode::UnknownSession && self.spec.is_some() =>
                {
                    return Err(Stop::Fatal(Failure::Server {
                        code: e.code,
                        message: format!(
                            "{} (a drafting device does not replay into a new session)",
                            e.message
                        ),
                    }));
                }
                Frame::Error(e) if resuming && e.code == ErrorCode::UnknownSession => {
                    // The server lost the session (restarted, in-memory store).
                    self.session = None;
                    return Err(Stop::Reopen);
                }
                Frame::Error(e) => {
                    let failure = Failure::Server {
                        code: e.code,
                        message: e.message.clone(),
                    };
                    // Refusals of a brand-new generation are what the test measures.
                    let first_open = !self.opened_once && self.tokens.is_empty() && !resuming;
                    let refused = matches!(e.code, ErrorCode::Overloaded | ErrorCode::RateLimited);
                    if !e.code.is_retryable() || (first_open && refused) {
                        return Err(Stop::Fatal(failure));
                    }
                    if e.code == ErrorCode::Moved && e.message.starts_with("ws") {
                        self.redirect = Some(e.message);
                    }
                    return Err(Stop::Retry(failure));
                }
                Frame::Ping { nonce } => send_frame(ws, &Frame::Pong { nonce }).await?,
                Frame::Pong { .. } => {}
                other => {
                    return Err(Stop::Fatal(Failure::Protocol(format!(
                        "{:?} frame before Opened",
                        other.frame_type()
                    ))))
                }
            }
        }
    }

    /// `Opened` after `Resume`: the server kept the session (a resume) or rebuilds it from
    /// our frames (a replay, `next_hidden_seq` 0); either way it gets every frame it lacks.
    async fn enter_resumed(&mut self, ws: &mut Ws, opened: Opened) -> Result<Entry, Stop> {
        if opened.session != self.session_id() {
            return Err(Stop::Fatal(Failure::Protocol(format!(
                "resumed session {} but the server answered for {}",
                self.session_id(),
                opened.session
            ))));
        }
        let next = opened.next_hidden_seq;
        if next > self.frames.len() as u64 {
            return Err(Stop::Fatal(Failure::Protocol(format!(
                "the server wants hidden frames from {next}, but only {} were sent",
                self.frames.len()
            ))));
        }
        if next == 0 && !self.frames.is_empty() {
            self.replays += 1;
            self.ctx.live.replay();
        } else {
            self.resumes += 1;
            self.ctx.live.resume();
        }
        self.session = Some((opened.session, opened.resume_token));
        for frame in self.frames[next as usize..].iter().cloned() {
            send(ws, frame).await?;
        }
        Ok(Entry::Resumed)
    }

    /// `Opened` after `Open`: a new session (the first, or one that replaces a session the
    /// server forgot) gets the prompt's frames.
    async fn enter_opened(&mut self, ws: &mut Ws, opened: Opened) -> Result<Entry, Stop> {
        self.session = Some((opened.session, opened.resume_token));
        if self.cursor.is_none() {
            self.start_prompt().await?;
        }
        let reopened = std::mem::take(&mut self.reopening);
        if reopened {
            self.replays += 1;
            self.reopens += 1;
            self.ctx.live.replay();
        }
        for frame in self.frames[..self.prompt_frames].iter().cloned() {
            send(ws, frame).await?;
        }
        Ok(if reopened && !self.tokens.is_empty() {
            Entry::Reopened
        } else {
            Entry::Fresh
        })
    }

    /// Runs the edge over the prompt (once per generation) and keeps its frames.
    async fn start_prompt(&mut self) -> Result<(), Stop> {
        let (cursor, frames) = self
            .ctx
            .compute
            .start(self.job.prompt)
            .await
            .map_err(|e| Failure::Edge(format!("{e:#}")))?;
        self.cursor = Some(cursor);
        self.prompt_frames = frames.len();
        self.frames = frames;
        let prompt_len = self.ctx.compute.prompt_len(self.job.prompt);
        if let Some(spec) = self.spec.as_mut() {
            spec.expect_prompt_answer(prompt_len, (self.prompt_frames - 1) as u64);
        }
        Ok(())
    }

    /// After a resume: the server waits for the hidden state of our last token.
    async fn answer_owed(&mut self, link: &mut Link<'_>) -> Result<(), Stop> {
        if self.spec.is_some() {
            return self.after_answer(link).await;
        }
        let last = self.tokens[self.tokens.len() - 1];
        if self.looks_final(last) {
            link.held = Some(last);
            Ok(())
        } else {
            self.answer(link, last).await
        }
    }

    /// The server's turn: the device sends nothing until a frame comes (an answer to the last
    /// token, when it was held, goes after the grace: then `None`).
    async fn next_frame(&mut self, link: &mut Link<'_>) -> Result<Option<Frame>, Stop> {
        let wait = if link.held.is_some() {
            FINAL_TOKEN_GRACE
        } else {
            self.ctx.silence_timeout
        };
        match tokio::time::timeout(wait, recv(link.ws)).await {
            Ok(frame) => frame.map(Some),
            Err(_) => match link.held.take() {
                // No `Done` after all: the server wants this token's hidden state.
                Some(token) => {
                    self.answer(link, token).await?;
                    Ok(None)
                }
                None => Err(Stop::Retry(Failure::Timeout(wait))),
            },
        }
    }

    /// One frame from the server after `Opened`; `Some` once it is `Done`.
    async fn on_frame(&mut self, link: &mut Link<'_>, frame: Frame) -> Result<Option<Done>, Stop> {
        match frame {
            Frame::Token(t) if self.spec.is_some() => self.on_drafting_token(link, &t).await?,
            Frame::Token(t) => self.on_plain_token(link, &t).await?,
            Frame::Done(d) => {
                // A token that counts and ends the generation comes without the draft
                // tokens after it: its answer is whole with `Done`.
                if self.answer_so_far() > 0 {
                    self.take_answer();
                }
                self.progressed = true;
                return Ok(Some(d));
            }
            Frame::Error(e) if e.code.is_retryable() => {
                if e.code == ErrorCode::Moved && e.message.starts_with("ws") {
                    self.redirect = Some(e.message.clone());
                }
                return Err(Stop::Retry(Failure::Server {
                    code: e.code,
                    message: e.message,
                }));
            }
            Frame::Error(e) => {
                return Err(Stop::Fatal(Failure::Server {
                    code: e.code,
                    message: e.message,
                }))
            }
            Frame::Ping { nonce } => send_frame(link.ws, &Frame::Pong { nonce }).await?,
            Frame::Pong { .. } => {}
            other => {
                return Err(Stop::Fatal(Failure::Protocol(format!(
                    "unexpected {:?} frame",
                    other.frame_type()
                ))))
            }
        }
        Ok(None)
    }

    /// A drafting device's `Token`: part of the answer to its last frame.
    async fn on_drafting_token(&mut self, link: &mut Link<'_>, t: &Token) -> Result<(), Stop> {
        if link.held.is_some() {
            return Err(Stop::Fatal(Failure::Protocol(format!(
                "token {} arrived before the last one's hidden state was sent",
                t.seq
            ))));
        }
        if self.on_spec_token(t)? {
            self.after_answer(link).await?;
        }
        Ok(())
    }

    /// A `Token` without drafting: new (answered with its hidden state, or held when it
    /// looks final), or resent by a reopened session (checked, and answered with the frame
    /// kept for it).
    async fn on_plain_token(&mut self, link: &mut Link<'_>, t: &Token) -> Result<(), Stop> {
        let have = self.tokens.len() as u64;
        if t.seq > have || link.held.is_some() {
            return Err(Stop::Fatal(Failure::Protocol(format!(
                "token {} arrived after {have} tokens{}",
                t.seq,
                if link.held.is_some() {
                    " before the last one's hidden state was sent"
                } else {
                    ""
                }
            ))));
        }
        let s = t.seq as usize;
        if t.seq < have {
            // Sent again by a reopened session: must be the same token.
            if self.tokens[s] != t.token_id {
                return Err(Stop::Fatal(Failure::Protocol(format!(
                    "token {} came back as id {} after a replay, was {}",
                    t.seq, t.token_id, self.tokens[s]
                ))));
            }
        } else {
            self.on_token(t.token_id);
            self.rounds += 1;
        }
        let index = self.prompt_frames + s;
        if index < self.frames.len() {
            // Answered before the connection dropped: send the same frame again.
            if index == link.sent {
                send(link.ws, self.frames[index].clone()).await?;
                link.sent += 1;
            }
        } else if self.looks_final(t.token_id) {
            link.held = Some(t.token_id);
        } else {
            self.answer(link, t.token_id).await?;
        }
        Ok(())
    }

    /// After a drafting device ruled on an answer: holds a final-looking token (`Done`
    /// should follow), else sends the next frame.
    async fn after_answer(&mut self, link: &mut Link<'_>) -> Result<(), Stop> {
        let Some(&last) = self.tokens.last() else {
            return Ok(());
        };
        let by_draft = self.spec.as_ref().is_some_and(Speculation::final_by_draft);
        if !by_draft && self.looks_final(last) {
            link.held = Some(last);
            return Ok(());
        }
        self.answer(link, last).await
    }

    /// Computes the hidden state of `token` (the newest one), keeps it and sends it, after
    /// the step delay. (Frames sent again after a reconnection go at once.)
    async fn answer(&mut self, link: &mut Link<'_>, token: u32) -> Result<(), Stop> {
        if !self.ctx.step_delay.is_zero() {
            tokio::time::sleep(self.ctx.step_delay).await;
        }
        let drafts = self.drafts();
        let input_seq = self.frames.len() as u64;
        let at = self.spec.as_mut().and_then(Speculation::take_restart);
        let cursor = self
            .cursor
            .as_mut()
            .ok_or_else(|| Failure::Edge("no edge state".into()))?;
        let frame = cursor
            .next_drafted(token, &drafts, at)
            .await
            .map_err(|e| Failure::Edge(format!("{e:#}")))?;
        if let Some(spec) = self.spec.as_mut() {
            spec.expect_answer(input_seq, at, drafts);
        }
        self.frames.push(frame.clone());
        send(link.ws, frame).await?;
        link.sent = self.frames.len();
        Ok(())
    }
}
