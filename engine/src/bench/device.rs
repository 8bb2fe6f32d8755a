//! [`BenchDevice`]: a simulated device of the mixed and prefix runs (and of
//! `tandem device-check`): it runs the edge part of its session and answers every token with
//! its hidden state, recording when each token came.
//!
//! Each device holds its own edge KV cache (the edge model's full context length), so a
//! device costs that much memory; answering a token costs one edge forward of one position.

use std::time::Instant;

use anyhow::Result;
use tandem_model::kv::ContiguousKv;
use tandem_model::EdgeModel;

use super::{edge_kv, edge_rows, params};
use crate::{Engine, Event, Session};

/// A decoding device of the mixed and prefix runs (and of `tandem device-check`).
pub(crate) struct BenchDevice {
    pub(super) session: Session,
    kv: ContiguousKv,
    pos: usize,
    pub(crate) output: Vec<u32>,
    /// When the last token came.
    pub(super) last: Option<Instant>,
    pub(crate) done: bool,
    /// Do not answer tokens (the session then waits, holding its KV).
    pub(super) hold: bool,
}

impl BenchDevice {
    /// Opens a session and sends `chunks` of the prompt (the last one complete).
    pub(crate) fn start(
        engine: &Engine,
        edge: &EdgeModel,
        chunks: &[&[u32]],
        max_tokens: usize,
    ) -> Result<Self> {
        let session = engine.open_session(params(max_tokens)?).wait()?;
        let mut kv = edge_kv(edge);
        let mut pos = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            let h = edge_rows(edge, &mut kv, pos, chunk)?;
            engine
                .push_hidden(session.id, h, chunk.len(), i + 1 == chunks.len())
                .wait()?;
            pos += chunk.len();
        }
        Ok(Self {
            session,
            kv,
            pos,
            output: Vec::new(),
            last: None,
            done: false,
            hold: false,
        })
    }

    /// Sends the hidden state of token `id` (after the last token the engine answers Done and
    /// refuses more input, which is fine).
    pub(super) fn answer(&mut self, engine: &Engine, edge: &EdgeModel, id: u32) -> Result<()> {
        let h = edge_rows(edge, &mut self.kv, self.pos, &[id])?;
        self.pos += 1;
        let _ = engine.push_hidden_nowait(self.session.id, h, 1, true);
        Ok(())
    }

    /// Handles what arrived; answers each token with its hidden state (unless holding). Pushes
    /// onto `gaps` the gaps between consecutive tokens seen now: (arrival, seconds).
    pub(crate) fn poll(
        &mut self,
        engine: &Engine,
        edge: &EdgeModel,
        gaps: &mut Vec<(Instant, f64)>,
    ) -> Result<()> {
        while let Ok(ev) = self.session.events.try_recv() {
            match ev {
                Event::Token { id, .. } => {
                    let now = Instant::now();
                    if let Some(t) = self.last {
                        gaps.push((now, (now - t).as_secs_f64()));
                    }
                    self.last = Some(now);
                    self.output.push(id);
                    if !self.hold {
                        self.answer(engine, edge, id)?;
                    }
                }
                Event::Done { .. } => self.done = true,
                Event::Error(e) => {
                    if !self.done {
                        anyhow::bail!("session failed: {e}")
                    }
                }
            }
        }
        Ok(())
    }
}
