//! The life of one connection after `Opened`: the prompt chunks and decode steps the cloud
//! is owed go out as they are computed; otherwise the task waits for a frame or the caller's
//! cancel. Each frame received is applied: a token joins the answer the device waits for,
//! and a whole answer is ruled on ([`Driver::take_answer`]: the token that counts, and the
//! drafts the cloud confirmed), delivered to the caller in order and never twice.

use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use tandem_protocol::{DoneReason, Frame};
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::{send, Driver, Stop, Ws};
use crate::client::events::Event;
use crate::error::ClientError;

/// How long to wait for `Done` after a token that looks final (end of sequence, token limit)
/// before sending its hidden state anyway.
const FINAL_TOKEN_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for `Done(cancelled)` after sending `Cancel`.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

impl Driver {
    /// The life of one connection after `Opened`: `Ok` when the generation ended.
    pub(super) async fn connection(&mut self, mut ws: Ws) -> Result<(), Stop> {
        loop {
            if self.done.is_some() {
                let _ = ws.close(None).await;
                return Ok(());
            }
            if !self.cancel_requested && self.push_owed(&mut ws).await? {
                continue;
            }
            let wait = if self.cancel_sent {
                CANCEL_WAIT
            } else {
                self.cfg.idle_timeout
            };
            let armed = !self.cancel_requested;
            let woke = tokio::select! {
                _ = &mut self.cancel_rx, if armed => None,
                msg = tokio::time::timeout(wait, ws.next()) => Some(msg),
            };
            let msg = match woke {
                None => {
                    self.cancel_requested = true;
                    tracing::info!("cancelling");
                    send(&mut ws, Bytes::from(Frame::Cancel.encode()?)).await?;
                    self.cancel_sent = true;
                    continue;
                }
                Some(Ok(msg)) => self.classify(msg),
                Some(Err(_)) => Err(Stop::Retry(format!(
                    "no frame from the server for {wait:?}"
                ))),
            };
            match msg {
                Ok(Some(frame)) => self.handle(&mut ws, frame).await?,
                Ok(None) => {}
                Err(Stop::Retry(_)) if self.cancel_sent => {
                    self.done = Some(self.local_done(DoneReason::Cancelled));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Computes and sends what the cloud is owed, if anything: the next prompt chunk, or
    /// the hidden state of the last token (after a look at what already arrived, since a
    /// `Done` may follow the token, and a grace wait after a token that looks final).
    /// `false` when nothing is owed and the connection should wait for the cloud.
    async fn push_owed(&mut self, ws: &mut Ws) -> Result<bool, Stop> {
        if self.prompt_fed < self.req.prompt.len() {
            self.push_prompt_chunk(ws).await?;
            if self.done.is_none() {
                let seq = self.sent.len() - 1;
                self.flush(ws, seq).await?;
            }
            return Ok(true);
        }
        if !self.owes_hidden() {
            return Ok(false);
        }
        // A `Done` may follow the token: look at what already arrived first.
        while let Some(msg) = ws.next().now_or_never() {
            if let Some(frame) = self.classify(msg)? {
                self.handle(ws, frame).await?;
            }
            if self.done.is_some() {
                break;
            }
        }
        if self.done.is_some() || !self.owes_hidden() {
            return Ok(true);
        }
        if self.looks_final() && self.grace_spent_at != Some(self.tokens.len()) {
            self.grace_spent_at = Some(self.tokens.len());
            if let Ok(msg) = tokio::time::timeout(FINAL_TOKEN_GRACE, ws.next()).await {
                if let Some(frame) = self.classify(msg)? {
                    self.handle(ws, frame).await?;
                }
                return Ok(true);
            }
        }
        if self.push_decode_hidden(ws).await? {
            let seq = self.sent.len() - 1;
            self.flush(ws, seq).await?;
        }
        Ok(true)
    }

    /// Receives one frame (`None`: a non-protocol message such as a WebSocket ping).
    pub(super) async fn recv(
        &mut self,
        ws: &mut Ws,
        wait: Duration,
    ) -> Result<Option<Frame>, Stop> {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(msg) => self.classify(msg),
            Err(_) => Err(Stop::Retry(format!(
                "no frame from the server for {wait:?}"
            ))),
        }
    }

    pub(super) fn classify(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<Option<Frame>, Stop> {
        match msg {
            None => Err(Stop::Retry("connection closed".into())),
            Some(Err(e)) => Err(Stop::Retry(format!("connection lost: {e}"))),
            Some(Ok(Message::Binary(bytes))) => {
                self.stats.bytes_received += bytes.len() as u64;
                if let Some(r) = self.req.record.as_mut() {
                    r.record_received(bytes.len() as u64);
                }
                Ok(Some(Frame::decode_with(&bytes, &self.cfg.limits)?))
            }
            Some(Ok(Message::Close(_))) => {
                Err(Stop::Retry("the server closed the connection".into()))
            }
            Some(Ok(Message::Text(_))) => Err(ClientError::Protocol(
                "a text message (the protocol uses binary messages only)".into(),
            )
            .into()),
            Some(Ok(_)) => Ok(None),
        }
    }

    /// Applies one frame received after `Opened`.
    pub(super) async fn handle(&mut self, ws: &mut Ws, frame: Frame) -> Result<(), Stop> {
        match frame {
            Frame::Token(t) => self.on_token(ws, t).await,
            Frame::Done(d) => {
                // A token that counts and ends the generation comes without draft tokens
                // after it: its answer is whole with `Done`.
                if self.awaiting.as_ref().is_some_and(|a| !a.got.is_empty()) {
                    self.take_answer();
                }
                tracing::info!(
                    reason = d.reason.code(),
                    output_tokens = d.output_tokens,
                    "generation done"
                );
                self.progressed = true;
                self.done = Some(d);
                Ok(())
            }
            Frame::Error(e) if e.code.is_retryable() => {
                Err(Stop::Retry(format!("server error {}", e.code)))
            }
            Frame::Error(e) => Err(ClientError::Server {
                code: e.code,
                message: e.message,
            }
            .into()),
            Frame::Ping { nonce } => {
                send(ws, Bytes::from(Frame::Pong { nonce }.encode()?)).await?;
                Ok(())
            }
            Frame::Pong { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "unexpected {:?} frame",
                other.frame_type()
            ))
            .into()),
        }
    }

    /// A token: part of the answer the device waits for (kept until the answer is whole),
    /// or one it already has (resent after a resume, or a draft token already ruled on),
    /// or, during a replay into a new session, the cue for the next stored frame. A token
    /// out of order, or for a frame not sent yet, breaks the protocol.
    async fn on_token(&mut self, ws: &mut Ws, t: tandem_protocol::Token) -> Result<(), Stop> {
        if self.replay_on_token(ws, &t).await? {
            return Ok(());
        }
        if t.input_seq >= self.sent.len() as u64 {
            return Err(ClientError::Protocol(format!(
                "token {} answers hidden frame {}, not sent yet",
                t.seq, t.input_seq
            ))
            .into());
        }
        let Some(aw) = self.awaiting.as_mut() else {
            // An answer already taken (resent after a resume), or draft tokens the
            // device has ruled on.
            return Ok(());
        };
        if t.input_seq != aw.input_seq {
            return Ok(());
        }
        let have = (self.tokens.len() + aw.got.len()) as u64;
        if t.seq < have {
            return Ok(()); // resent after a resume: already here
        }
        if t.seq > have {
            return Err(ClientError::Protocol(format!(
                "token {} arrived but {have} was expected",
                t.seq
            ))
            .into());
        }
        if t.draft == aw.got.is_empty() || aw.got.len() > aw.drafts.len() {
            return Err(ClientError::Protocol(format!(
                "token {}: not the answer to {} drafts",
                t.seq,
                aw.drafts.len()
            ))
            .into());
        }
        aw.got.push(t);
        self.progressed = true;
        if aw.is_whole() {
            self.take_answer();
        }
        Ok(())
    }

    /// Rules on a whole answer: the token that counts, and each draft token whose drafts
    /// before it all matched the cloud's tokens; records them and delivers them in order.
    fn take_answer(&mut self) {
        let Some(aw) = self.awaiting.take() else {
            return;
        };
        let answer: Vec<u32> = aw.got.iter().map(|t| t.token_id).collect();
        let accepted = crate::draft::accepted_drafts(&aw.drafts, &answer);
        if !aw.drafts.is_empty() {
            self.stats.drafted_tokens += aw.drafts.len() as u64;
            self.stats.accepted_drafts += accepted as u64;
            self.draft_len.update(aw.drafts.len(), accepted);
            if let Some(r) = self.req.record.as_mut() {
                r.record_drafts(aw.drafts.len() as u64, accepted as u64);
            }
            self.next_at = Some(aw.draft_first + accepted);
        } else {
            self.next_at = None;
        }
        if self.prompt_frames > 0 && aw.input_seq as usize >= self.prompt_frames {
            self.stats.decode_rounds += 1;
        }
        let counted = &aw.got[..=accepted];
        self.final_by_draft = counted.last().is_some_and(|t| t.last);
        if let Some(t) = counted.last() {
            self.cloud_cap = usize::from(t.draft_cap);
        }
        for t in counted {
            self.tokens.push(t.token_id);
            self.first_token.get_or_insert_with(Instant::now);
            let text = t.text.clone().unwrap_or_default();
            self.text.push_str(&text);
            let _ = self.events.send(Event::Token {
                seq: t.seq,
                token_id: t.token_id,
                text,
            });
        }
    }
}
