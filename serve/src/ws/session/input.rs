//! The device's side of the state machine (docs/protocol.md §6): each `Hidden` is checked
//! (its sequence number, its positions, the token owed, the dtype, the limits), then queued
//! and fed to the engine one complete input at a time, since the scheduler takes no input
//! while a token is owed. A duplicate (a resuming device resends) is dropped; a bad one
//! ends the session.
//!
//! Costs: the queue holds the accepted inputs not yet fed (at most one complete input ahead
//! of the engine, plus a Replay's frames while their tokens come).

use tandem_protocol::wire::{ErrorCode, ErrorFrame, Frame};

use super::actor::{Actor, Flow};
use super::{error_frame, CloseStatus, Input};
use crate::store::{SessionState, SessionUpdate};

impl Actor {
    /// Checks a `Hidden` against the state machine; accepts, drops or fails it.
    pub(super) async fn on_hidden(&mut self, input: Input) -> Flow {
        if self.done.is_some() {
            let e = error_frame(ErrorCode::Finished, Some(input.seq), "the generation ended");
            self.send(&Frame::Error(e));
            self.detach_current(CloseStatus::for_error(ErrorCode::Finished));
            return Flow::Continue;
        }
        if input.seq < self.next_hidden_seq {
            return Flow::Continue; // a duplicate (a resuming device resends)
        }
        if let Err(e) = self.check(&input) {
            return self.fail(e).await;
        }
        self.next_hidden_seq += 1;
        self.next_position = u64::from(input.first_position) + input.rows as u64;
        self.shared
            .metrics
            .tokens_in_total
            .inc_by(input.rows as u64);
        if input.complete {
            self.completes_accepted += 1;
            self.prompt_tokens.get_or_insert(self.next_position);
            self.draft_first = (input.drafts > 0).then(|| self.next_position - input.drafts as u64);
        }
        if !self.marked_generating {
            self.marked_generating = true;
            self.update_store(SessionUpdate {
                state: Some(SessionState::Generating),
                ..SessionUpdate::default()
            });
        }
        self.queue.push_back(input);
        self.feed()
    }

    fn check(&self, input: &Input) -> Result<(), ErrorFrame> {
        let seq = Some(input.seq);
        if input.seq > self.next_hidden_seq {
            return Err(error_frame(
                ErrorCode::SequenceOutOfOrder,
                seq,
                format!("expected hidden sequence number {}", self.next_hidden_seq),
            ));
        }
        let device_tokens = self.device_has.max(self.answered);
        if self.completes_accepted > device_tokens {
            return Err(error_frame(
                ErrorCode::UnexpectedFrame,
                seq,
                "a Hidden frame while a token is owed",
            ));
        }
        if input.dtype != self.dtype {
            return Err(error_frame(
                ErrorCode::HiddenShape,
                seq,
                format!("dtype {} differs from Open's {}", input.dtype, self.dtype),
            ));
        }
        let at = u64::from(input.first_position);
        // After an answer with draft tokens, the input may start at any draft row: it drops
        // the rows from there on (the engine checks it against the tokens it sampled).
        let earliest = self.draft_first.unwrap_or(self.next_position);
        if at < earliest || at > self.next_position {
            return Err(error_frame(
                ErrorCode::HiddenShape,
                seq,
                if earliest == self.next_position {
                    format!("expected first position {}", self.next_position)
                } else {
                    format!(
                        "expected a first position from {earliest} to {}",
                        self.next_position
                    )
                },
            ));
        }
        if self.draft_first.is_some() && !input.complete {
            return Err(error_frame(
                ErrorCode::HiddenShape,
                seq,
                "after an answer with draft tokens the next Hidden is a decode step (complete)",
            ));
        }
        if input.drafts > 0 && self.prompt_tokens.is_none() {
            return Err(error_frame(
                ErrorCode::HiddenShape,
                seq,
                "drafts before the prompt is complete",
            ));
        }
        let end = at + input.rows as u64;
        let cfg = &self.shared.cfg;
        if self.prompt_tokens.is_none() && end > cfg.max_prompt_tokens as u64 {
            return Err(error_frame(
                ErrorCode::ContextLengthExceeded,
                seq,
                format!("prompt longer than {} tokens", cfg.max_prompt_tokens),
            ));
        }
        let prompt = self.prompt_tokens.unwrap_or(end);
        if prompt + u64::from(self.max_tokens) > self.shared.served.max_context as u64 {
            return Err(error_frame(
                ErrorCode::ContextLengthExceeded,
                seq,
                format!(
                    "prompt + max tokens exceed the context of {}",
                    self.shared.served.max_context
                ),
            ));
        }
        Ok(())
    }

    /// Hands queued inputs to the engine, stopping after a complete one until its answer
    /// has come.
    pub(super) fn feed(&mut self) -> Flow {
        while self.completes_fed <= self.answered {
            let Some(input) = self.queue.pop_front() else {
                break;
            };
            let complete = input.complete;
            if complete {
                // The device's verdict on the last answer's draft tokens: the log keeps the
                // ones it accepted (the engine does the same with its rows and output).
                if let Some(first) = self.last_fed_draft_first.take() {
                    let accepted = u64::from(input.first_position).saturating_sub(first) as usize;
                    let keep = (self.answer_start + 1 + accepted).min(self.tokens.len());
                    let accepted = keep.saturating_sub(self.answer_start + 1);
                    self.shared.metrics.tokens_out_total.inc_by(accepted as u64);
                    self.accepted_last = accepted;
                    self.tokens.truncate(keep);
                    self.device_has = self.device_has.min(keep as u64);
                }
                self.answering = input.seq;
                self.answer_start = self.tokens.len();
                self.answer_left = 1 + input.drafts;
                self.last_fed_draft_first = (input.drafts > 0).then(|| {
                    u64::from(input.first_position) + input.rows as u64 - input.drafts as u64
                });
            }
            if let Err(e) = self.shared.engine.push_hidden_at_nowait(
                self.seq,
                input.data,
                input.rows,
                complete,
                input.first_position as usize,
                input.drafts,
            ) {
                // Shape and finiteness were checked by the connection; only a stopped
                // engine gets here. The event loop reports it.
                tracing::error!(session = self.id.0, error = %e, "engine refused input");
                break;
            }
            if complete {
                self.completes_fed += 1;
            }
        }
        Flow::Continue
    }
}
