//! How a session ends, and what the store is told. A generation ends with `Done` (the actor
//! then lingers for the grace period, so a device that missed it can `Resume` and get it), a
//! fatal error ends the session at once, and the shutdown leaves a running session open in
//! the store for its device to resume elsewhere. The store record and a partner prompt's
//! result are written off the session's path: a slow store never delays the device.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_protocol::wire::{Done, DoneReason, ErrorCode, ErrorFrame, Frame};

use super::actor::{Actor, Flow};
use super::{error_frame, CloseStatus};
use crate::rest::store::prompts::GenerationResult;
use crate::store::{SessionState, SessionUpdate};

impl Actor {
    /// Sends `Done`, frees the engine session and closes the store record; the actor lingers
    /// for the grace period so a device that missed `Done` can still get it by `Resume`.
    pub(super) async fn end_generation(&mut self, reason: DoneReason) {
        let done = Done {
            reason,
            prompt_tokens: u32::try_from(self.prompt_tokens.unwrap_or(self.next_position))
                .unwrap_or(u32::MAX),
            output_tokens: u32::try_from(self.tokens.len()).unwrap_or(u32::MAX),
        };
        tracing::info!(
            session = self.id.0,
            reason = done.reason.code(),
            prompt_tokens = done.prompt_tokens,
            output_tokens = done.output_tokens,
            "generation done"
        );
        if let Some(g) = self.generation.take() {
            g.record("prompt_tokens", i64::from(done.prompt_tokens));
            g.record("output_tokens", i64::from(done.output_tokens));
            g.record("finish_reason", done.reason.name());
        }
        self.done = Some(done);
        self.shared
            .metrics
            .generation_duration_seconds
            .observe_duration(self.started.elapsed());
        if let Some(a) = &self.assignment {
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let result = GenerationResult {
                output: self
                    .tokens
                    .iter()
                    .filter_map(|t| t.text.as_deref())
                    .collect(),
                finish_reason: done.reason.name().to_owned(),
                prompt_tokens: done.prompt_tokens,
                completion_tokens: done.output_tokens,
                ttft_ms: self
                    .first_token_at
                    .map_or(0, |t| ms(t.duration_since(self.started))),
                total_ms: ms(self.started.elapsed()),
            };
            a.finish_later(&self.shared, Ok(result));
        }
        self.running.store(false, Ordering::SeqCst);
        self.slot.release();
        self.send(&Frame::Done(done));
        self.detach_current(CloseStatus::DONE);
        self.queue.clear();
        self.release(true).await;
    }

    /// Answers a fatal error (1xx, 2xx, 5xx), ends the session and the actor.
    pub(super) async fn fail(&mut self, error: ErrorFrame) -> Flow {
        tracing::info!(session = self.id.0, code = %error.code, seq = ?error.seq, "session failed");
        if let Some(g) = self.generation.take() {
            g.record("error_code", error.code.as_str());
            g.record("output_tokens", self.tokens.len() as i64);
        }
        if let (Some(a), None) = (&self.assignment, &self.done) {
            a.fail_later(&self.shared, error.code);
        }
        let status = CloseStatus::for_error(error.code);
        self.slot.release();
        self.send(&Frame::Error(error));
        if let Some(conn) = self.conn.take() {
            conn.close(status);
        }
        if self.done.is_none() {
            self.release(true).await;
        }
        Flow::Exit
    }

    /// The drain is over: a running session gets `shutting_down` and stays open in the store
    /// (its device resumes elsewhere and replays).
    pub(super) async fn on_shutdown(&mut self) {
        if self.done.is_none() {
            let e = error_frame(
                ErrorCode::ShuttingDown,
                None,
                "this replica is shutting down; resume elsewhere",
            );
            self.send(&Frame::Error(e));
            self.release(false).await;
        }
        if let Some(conn) = self.conn.take() {
            conn.close(CloseStatus::for_error(ErrorCode::ShuttingDown));
        }
    }

    /// Frees the engine session; with `close_store`, also closes the store record and forgets
    /// the `Open` parameters.
    pub(super) async fn release(&mut self, close_store: bool) {
        self.running.store(false, Ordering::SeqCst);
        // Before the engine lets go (its cap has room for every grace session besides), so
        // that a device told the session ended finds the slot free.
        self.slot.release();
        let _ = self.shared.engine.close(self.seq).await;
        if !close_store {
            return;
        }
        let shared = self.shared.clone();
        let id = self.id;
        let update = SessionUpdate {
            state: Some(SessionState::Done),
            add_tokens_in: self.next_position,
            add_tokens_out: self.tokens.len() as u64,
        };
        // Off the session's path: a slow store never delays the device.
        tokio::spawn(async move {
            let by = &shared.replica;
            if let Err(e) = shared.store.update_session(id, by, update).await {
                tracing::debug!(session = id.0, error = %e, "store update at the end failed");
            }
            if let Err(e) = shared.store.close_session(id, by).await {
                tracing::warn!(session = id.0, error = %e, "store close failed");
            }
            shared.params.remove(id).await;
        });
    }

    pub(super) fn update_store(&self, update: SessionUpdate) {
        let shared = self.shared.clone();
        let id = self.id;
        tokio::spawn(async move {
            if let Err(e) = shared
                .store
                .update_session(id, &shared.replica, update)
                .await
            {
                tracing::debug!(session = id.0, error = %e, "store update failed");
            }
        });
    }
}
