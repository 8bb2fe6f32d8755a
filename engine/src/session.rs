//! A session inside the engine: its hidden states (kept for recompute, metered), its
//! sampler and text state, speculation's pending drafts, and how a step's sampled rows become
//! its events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_kvcache::BlockHash;
use tandem_model::pipeline::StopFilter;
use tandem_model::sampling::Sampler;
use tandem_model::tokenizer::StreamDecoder;
use tandem_protocol::FinishReason;
use tandem_scheduler::SeqId;

use crate::command::EventSink;
use crate::observe::TraceParent;
use crate::types::{EngineError, Event};

/// The draft tokens of a speculative answer, until the device's next input says how many
/// count.
pub(crate) struct Pending<'t> {
    /// Position of the first draft row: the next input starts at `first + accepted`.
    pub(crate) first: usize,
    /// The tokens sampled after the draft rows, in order (the last may end the generation).
    pub(crate) tokens: Vec<u32>,
    /// How the last of `tokens` ends the generation, if it counts.
    pub(crate) ended: Option<FinishReason>,
    /// The session's text state before the first of `tokens`.
    pub(crate) output_len: usize,
    pub(crate) decoder: Option<StreamDecoder<'t>>,
    pub(crate) stop: StopFilter,
}

/// A sampled token applied to a session's output and text state.
pub(crate) struct Advanced {
    token: u32,
    /// The text for its `Token` event (`None`: no event, as for the end-of-sequence token of
    /// an in-process session).
    text: Option<String>,
    end: Option<FinishReason>,
}

/// A session's hidden states (row-major, `hidden_size` values a position), kept for
/// recompute, whose allocation is counted in a meter shared with the [`crate::Engine`] handle: every
/// change adds or takes away the change in capacity, and dropping takes away the rest.
pub(crate) struct HiddenRows {
    rows: Vec<f32>,
    meter: Arc<AtomicU64>,
}

impl HiddenRows {
    pub(crate) fn new(meter: Arc<AtomicU64>) -> Self {
        Self {
            rows: Vec::new(),
            meter,
        }
    }

    fn bytes(&self) -> u64 {
        (self.rows.capacity() * std::mem::size_of::<f32>()) as u64
    }

    /// Runs `change` on the rows and moves the meter by the change in allocated bytes.
    fn metered(&mut self, change: impl FnOnce(&mut Vec<f32>)) {
        let before = self.bytes();
        change(&mut self.rows);
        let after = self.bytes();
        if after > before {
            self.meter.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.meter.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    pub(crate) fn extend_from_slice(&mut self, data: &[f32]) {
        self.metered(|r| r.extend_from_slice(data));
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        self.metered(|r| r.truncate(len));
    }

    /// Gives the memory back (the generation ended: nothing will be recomputed).
    pub(crate) fn release(&mut self) {
        self.metered(|r| *r = Vec::new());
    }
}

impl std::ops::Deref for HiddenRows {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.rows
    }
}

impl Drop for HiddenRows {
    fn drop(&mut self) {
        self.release();
    }
}

pub(crate) struct SessionState<'t> {
    pub(crate) events: EventSink,
    pub(crate) hidden: HiddenRows,
    pub(crate) sampler: Sampler,
    pub(crate) max_tokens: usize,
    pub(crate) eos: Vec<u32>,
    pub(crate) output: Vec<u32>,
    pub(crate) decoder: Option<StreamDecoder<'t>>,
    pub(crate) stop: StopFilter,
    pub(crate) finished: bool,
    /// The hash chain of `hidden`'s full blocks so far (prefix sharing).
    pub(crate) chain: Vec<BlockHash>,
    /// Position of the first draft row of the input being computed (speculation).
    pub(crate) draft_first: usize,
    /// Tokens sampled after draft rows, waiting for the device's verdict.
    pub(crate) pending: Option<Pending<'t>>,
    /// The generation span steps link to.
    pub(crate) trace: Option<TraceParent>,
    /// When the last token went out, until the device's next input arrives.
    pub(crate) token_sent_at: Option<Instant>,
    /// How long the device took to answer its last token.
    pub(crate) reply_latency: Option<Duration>,
}

/// Samples and delivers each sampled row's token to its session (`rows[i]` owns the `i`-th
/// `vocab`-long slice of `logits`; a session's rows are consecutive: one, or the token before
/// its drafts and the drafts); returns the sessions that ended. A session whose sampling or
/// detokenizing fails (NaN logits, a decoding error) gets its own `Event::Error` and ends;
/// the other sessions of the step get their tokens.
pub(crate) fn deliver_rows(
    sessions: &mut HashMap<SeqId, SessionState<'_>>,
    rows: &[(u32, SeqId)],
    logits: &[f32],
    vocab: usize,
    draft_cap: u8,
) -> Vec<SeqId> {
    let mut finished = Vec::new();
    let slices: Vec<&[f32]> = logits.chunks_exact(vocab.max(1)).collect();
    let mut i = 0;
    while i < rows.len().min(slices.len()) {
        let id = rows[i].1;
        let n = rows[i..].iter().take_while(|(_, r)| *r == id).count();
        let window = &slices[i..(i + n).min(slices.len())];
        i += n;
        let Some(s) = sessions.get_mut(&id) else {
            continue;
        };
        match s.deliver_window(window, draft_cap) {
            Ok(true) => finished.push(id),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(session = id.0, error = %e, "sampling failed; ending this session only");
                s.events.send(Event::Error(e));
                s.finished = true;
                s.hidden.release();
                finished.push(id);
            }
        }
    }
    finished
}

impl SessionState<'_> {
    /// Samples one token from `logits` and applies it to the output and the text state:
    /// what the token's event says, and whether it ends the generation. Changes nothing
    /// else (no event is sent).
    fn advance(&mut self, logits: &[f32]) -> Result<Advanced, EngineError> {
        let token = self
            .sampler
            .sample(logits, &self.output)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let mut end = None;
        let mut text = None;
        if self.eos.contains(&token) {
            end = Some(FinishReason::Eos);
            if self.events.is_async() {
                text = Some(String::new());
            }
        } else {
            self.output.push(token);
            let piece = match self.decoder.as_mut() {
                Some(d) => d
                    .push(token)
                    .map_err(|e| EngineError::Model(e.to_string()))?,
                None => String::new(),
            };
            let mut shown = String::new();
            if self.stop.push(&piece, &mut |p| shown.push_str(p)) {
                end = Some(FinishReason::StopString);
            }
            text = Some(shown);
            if end.is_none() && self.output.len() >= self.max_tokens {
                end = Some(FinishReason::Length);
            }
        }
        if end.is_some() && end != Some(FinishReason::StopString) {
            if let Some(d) = self.decoder.as_mut() {
                let rest = d.finish().map_err(|e| EngineError::Model(e.to_string()))?;
                let mut tail = String::new();
                self.stop.push(&rest, &mut |p| tail.push_str(p));
                self.stop.flush(&mut |p| tail.push_str(p));
                // The held-back tail rides on the last token (async sinks only).
                if let (true, Some(t)) = (self.events.is_async(), text.as_mut()) {
                    t.push_str(&tail);
                }
            }
        }
        Ok(Advanced { token, text, end })
    }

    /// Ends the generation: `Done` with the output so far.
    pub(crate) fn finish(&mut self, reason: FinishReason) {
        self.finished = true;
        self.pending = None;
        self.hidden.release();
        self.events.send(Event::Done {
            reason,
            output_ids: self.output.clone(),
            text: self.stop.text().to_string(),
        });
    }

    /// Samples and delivers one answer: the token after the first row, which counts, then,
    /// after each draft row, a draft token (sampled as if the drafts before it were
    /// accepted, so that it is the token a step without speculation would give if they are),
    /// up to the first that would end the generation. Returns whether the generation ended.
    fn deliver_window(&mut self, rows: &[&[f32]], draft_cap: u8) -> Result<bool, EngineError> {
        let Some((first, drafts)) = rows.split_first() else {
            return Ok(false);
        };
        let a = self.advance(first)?;
        if let Some(text) = a.text {
            self.events.send(Event::Token {
                id: a.token,
                text,
                draft: false,
                last: false,
                draft_cap,
            });
        }
        if let Some(reason) = a.end {
            self.finish(reason);
            return Ok(true);
        }
        if drafts.is_empty() {
            return Ok(false);
        }
        let mut pending = Pending {
            first: self.draft_first,
            tokens: Vec::with_capacity(drafts.len()),
            ended: None,
            output_len: self.output.len(),
            decoder: self.decoder.clone(),
            stop: self.stop.clone(),
        };
        for row in drafts {
            let a = self.advance(row)?;
            pending.tokens.push(a.token);
            self.events.send(Event::Token {
                id: a.token,
                text: a.text.unwrap_or_default(),
                draft: true,
                last: a.end.is_some(),
                draft_cap,
            });
            if a.end.is_some() {
                pending.ended = a.end;
                break;
            }
        }
        self.pending = Some(pending);
        Ok(false)
    }

    /// Applies the device's verdict on the pending draft tokens: the first `accepted` count
    /// (the caller checked `accepted <= tokens.len()`). Returns how the generation ends when
    /// an accepted token ends it.
    pub(crate) fn commit(&mut self, accepted: usize) -> Result<Option<FinishReason>, EngineError> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        if accepted == p.tokens.len() {
            // The state already follows every draft token.
            return Ok(p.ended);
        }
        self.output.truncate(p.output_len);
        self.decoder = p.decoder;
        self.stop = p.stop;
        // None of these ends the generation (the answer stopped at the first that would).
        for &token in &p.tokens[..accepted] {
            self.output.push(token);
            let piece = match self.decoder.as_mut() {
                Some(d) => d
                    .push(token)
                    .map_err(|e| EngineError::Model(e.to_string()))?,
                None => String::new(),
            };
            self.stop.push(&piece, &mut |_| {});
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{unbounded, Sender};

    fn session(events: Sender<Event>) -> SessionState<'static> {
        SessionState {
            events: EventSink::Sync(events),
            hidden: HiddenRows::new(Arc::default()),
            sampler: Sampler::new(
                tandem_protocol::SamplingParams::default()
                    .validate()
                    .expect("greedy"),
            ),
            max_tokens: 10,
            eos: Vec::new(),
            output: Vec::new(),
            decoder: None,
            stop: StopFilter::new(Vec::new()),
            finished: false,
            chain: Vec::new(),
            draft_first: 0,
            pending: None,
            trace: None,
            token_sent_at: None,
            reply_latency: None,
        }
    }

    #[test]
    fn a_session_whose_sampling_fails_ends_alone() {
        let (tx_a, rx_a) = unbounded();
        let (tx_b, rx_b) = unbounded();
        let (a, b) = (SeqId(1), SeqId(2));
        let mut sessions = HashMap::new();
        sessions.insert(a, session(tx_a));
        sessions.insert(b, session(tx_b));
        // One step, two sampled rows of a 4-token vocabulary: a's logits hold a NaN.
        let logits = [0.1, f32::NAN, 0.3, 0.2, 0.0, 0.5, 2.0, 1.0];
        let ended = deliver_rows(&mut sessions, &[(0, a), (1, b)], &logits, 4, 0);
        assert_eq!(ended, vec![a]);
        assert!(matches!(rx_a.try_recv(), Ok(Event::Error(_))), "a is told");
        assert!(sessions[&a].finished);
        match rx_b.try_recv() {
            Ok(Event::Token { id, .. }) => assert_eq!(id, 2, "b gets its greedy token"),
            other => panic!("b: {other:?}"),
        }
        assert!(!sessions[&b].finished);
        // b goes on in the next step.
        let ended = deliver_rows(&mut sessions, &[(0, b)], &[0.0, 0.0, 0.0, 1.0], 4, 0);
        assert!(ended.is_empty());
        assert!(matches!(rx_b.try_recv(), Ok(Event::Token { id: 3, .. })));
    }
}
