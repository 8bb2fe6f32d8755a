//! The engine's side: its events for the session become the token log and the `Token`
//! frames the device is sent (from `device_has` on), the answers counted for the state
//! machine, the output-token metrics (TTFT, TPOT), and an engine error becomes the session's
//! wire error.
//!
//! Costs: each token is kept (id and text, the text cut to the wire's cap) for the
//! session's life, so that a `Resume` can resend it.

use std::time::Instant;

use tandem_protocol::wire::{DoneReason, ErrorCode, Frame, Token, MAX_TEXT_DELTA_LEN};
use tandem_scheduler::SchedError;

use super::actor::{Actor, Flow};
use super::{error_frame, Logged};
use tandem_engine::{EngineError, Event};

impl Actor {
    pub(super) fn token_frame(&self, seq: usize) -> Frame {
        let t = self.tokens[seq].clone();
        Frame::Token(Token {
            seq: seq as u64,
            input_seq: t.input_seq,
            token_id: t.id,
            draft: t.draft,
            last: t.last,
            draft_cap: t.draft_cap,
            text: t.text,
        })
    }

    /// Answers one of the engine's events for this session.
    pub(super) async fn on_event(&mut self, ev: Event) -> Flow {
        match ev {
            Event::Token {
                id,
                text,
                draft,
                last,
                draft_cap,
            } => {
                let text = self.wire_text(text);
                self.on_token(Logged {
                    id,
                    text,
                    input_seq: self.answering,
                    draft,
                    last,
                    draft_cap,
                })
            }
            Event::Done { reason, .. } => {
                self.end_generation(DoneReason::Finished(reason)).await;
                Flow::Continue
            }
            Event::Error(e) => {
                let (code, msg) = engine_error_code(&e);
                tracing::warn!(session = self.id.0, code = %code, error = %e, "engine error");
                self.fail(error_frame(code, None, msg)).await
            }
        }
    }

    /// A token's text as its frame carries it: none when empty, and cut (at a character
    /// boundary) to the wire's cap.
    fn wire_text(&self, text: String) -> Option<String> {
        (!text.is_empty()).then_some(text).map(|mut t| {
            if t.len() > MAX_TEXT_DELTA_LEN {
                tracing::warn!(session = self.id.0, "text delta over the wire cap; cut");
                let mut cut = MAX_TEXT_DELTA_LEN;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
            }
            t
        })
    }

    /// Logs a token, counts it toward the answer it belongs to, sends it unless the device
    /// has it already (a Replay), and feeds the engine what waited for it.
    fn on_token(&mut self, token: Logged) -> Flow {
        let seq = self.tokens.len();
        let (draft, last) = (token.draft, token.last);
        self.tokens.push(token);
        self.answer_left = self.answer_left.saturating_sub(1);
        if last {
            self.answer_left = 0;
        }
        if self.answer_left == 0 && self.answered < self.completes_fed {
            self.answered += 1;
        }
        let now = Instant::now();
        self.last_activity = now;
        if !draft {
            self.observe_output_token(now);
        }
        self.first_token_at.get_or_insert(now);
        if seq as u64 >= self.device_has {
            let frame = self.token_frame(seq);
            self.send(&frame);
        }
        self.feed()
    }

    /// The metrics of a token that counts. A draft token counts when the device's verdict
    /// accepts it (`feed`), so only the others come here; the time per output token spreads
    /// an answer's wait over the tokens that came with it.
    fn observe_output_token(&mut self, now: Instant) {
        let m = &self.shared.metrics;
        m.tokens_out_total.inc();
        let per = 1 + std::mem::take(&mut self.accepted_last);
        match self.last_token_at.replace(now) {
            Some(prev) => {
                let each = (now - prev) / per as u32;
                for _ in 0..per {
                    m.tpot_seconds.observe_duration(each);
                }
            }
            None => {
                m.ttft_seconds.observe_duration(now - self.started);
                if let Some(g) = &self.generation {
                    g.record("ttft_ms", (now - self.started).as_secs_f64() * 1e3);
                }
            }
        }
    }
}

/// The wire code for an error the engine reported on a session's events.
fn engine_error_code(e: &EngineError) -> (ErrorCode, &'static str) {
    match e {
        EngineError::Scheduler(SchedError::Overloaded(_)) => {
            (ErrorCode::Overloaded, "the cloud is at capacity")
        }
        EngineError::Scheduler(SchedError::ContextLength { .. })
        | EngineError::Scheduler(SchedError::TooLarge { .. }) => (
            ErrorCode::ContextLengthExceeded,
            "the sequence does not fit in the cloud's context",
        ),
        EngineError::Scheduler(SchedError::NotReady(_)) => (
            ErrorCode::UnexpectedFrame,
            "a Hidden frame while a token is owed",
        ),
        EngineError::Position { .. }
        | EngineError::Scheduler(SchedError::Drafts { .. })
        | EngineError::Scheduler(SchedError::Truncate { .. }) => (
            ErrorCode::HiddenShape,
            "the Hidden frame does not continue the session there (speculation: at most the \
             draft tokens the cloud sampled may be accepted)",
        ),
        EngineError::Stopped => (ErrorCode::ShuttingDown, "the engine stopped"),
        _ => (ErrorCode::Internal, "internal error"),
    }
}
