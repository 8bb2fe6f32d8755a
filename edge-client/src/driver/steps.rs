//! The edge steps of a generation: the prompt in chunks (the shared system prefix in chunks
//! of its own), then one decode step per answer, each carrying the last token and the drafts
//! (prompt lookup, as many as the acceptance so far, the cloud's cap and the tokens left
//! allow). Each step runs on the blocking pool ([`EdgeCompute`](crate::compute::EdgeCompute))
//! while the task keeps handling the connection; its frame is kept in `sent` whatever
//! happens to the connection meanwhile, since the edge's cache has consumed its tokens.

use futures_util::StreamExt;

use super::{Awaiting, Driver, Stop, Ws};
use crate::compute::{Computed, Step};
use crate::error::ClientError;

impl Driver {
    /// The cloud waits for the next decode frame: the prompt was sent and its last answer
    /// was ruled on.
    pub(super) fn owes_hidden(&self) -> bool {
        self.done.is_none()
            && self.replay.is_none()
            && self.prompt_fed == self.req.prompt.len()
            && self.awaiting.is_none()
            && !self.tokens.is_empty()
    }

    /// The last token is probably the end (end of sequence, or the token limit) and `Done`
    /// should follow it (a draft token that ends the generation needs the verdict first).
    pub(super) fn looks_final(&self) -> bool {
        !self.final_by_draft
            && (self.tokens.len() >= self.req.max_tokens as usize
                || self.tokens.last().is_some_and(|t| self.eos.contains(t)))
    }

    /// Drafts for the next decode step: prompt lookup over the prompt and the output, as
    /// many as the acceptance so far, the cloud's cap and the tokens left allow.
    fn drafts(&mut self) -> Vec<u32> {
        let last = self.tokens.last().copied();
        let ends = self.final_by_draft
            || last.is_some_and(|t| self.eos.contains(&t))
            || self.tokens.len() >= self.req.max_tokens as usize;
        if ends {
            return Vec::new();
        }
        let left = (self.req.max_tokens as usize).saturating_sub(self.tokens.len() + 1);
        let max = self.draft_len.get().min(self.cloud_cap).min(left);
        if max == 0 {
            return Vec::new();
        }
        let mut context = Vec::with_capacity(self.req.prompt.len() + self.tokens.len());
        context.extend_from_slice(&self.req.prompt);
        context.extend_from_slice(&self.tokens);
        let mut drafts = self.drafter.draft(&context, max);
        drafts.truncate(max);
        drafts
    }

    /// Runs the edge over the next prompt chunk and keeps its frame. The shared system prefix
    /// is a chunk (or chunks) of its own.
    pub(super) async fn push_prompt_chunk(&mut self, ws: &mut Ws) -> Result<(), Stop> {
        let len = self.req.prompt.len();
        let start = self.prompt_fed;
        let boundary = if start < self.req.system_prefix_len {
            self.req.system_prefix_len
        } else {
            len
        };
        let end = boundary.min(start + self.cfg.prompt_chunk_tokens);
        let step = Step {
            ids: self.req.prompt[start..end].to_vec(),
            seq: self.sent.len() as u64,
            complete: end == len,
            drafts: 0,
            at: None,
        };
        let (computed, interrupted) = self.compute(ws, step).await?;
        self.edge_prompt += computed.elapsed;
        self.stats.prompt_frames += 1;
        self.stats.prompt_bytes += computed.frame.len() as u64;
        self.sent.push(computed.frame);
        self.edge_position = end;
        self.prompt_fed = end;
        if end == len {
            self.prompt_frames = self.sent.len();
            self.awaiting = Some(Awaiting {
                input_seq: (self.sent.len() - 1) as u64,
                drafts: Vec::new(),
                draft_first: end,
                got: Vec::new(),
            });
        }
        interrupted.map_or(Ok(()), Err)
    }

    /// Runs the edge over the last token and keeps its frame; `false` when the generation
    /// ended (a `Done` came) while it ran, and there is nothing to send.
    pub(super) async fn push_decode_hidden(&mut self, ws: &mut Ws) -> Result<bool, Stop> {
        let token = *self.tokens.last().ok_or_else(|| {
            Stop::Fatal(ClientError::Protocol("no token to continue from".into()))
        })?;
        let drafts = self.drafts();
        let mut ids = Vec::with_capacity(1 + drafts.len());
        ids.push(token);
        ids.extend_from_slice(&drafts);
        let at = self.next_at.take();
        let step = Step {
            ids,
            seq: self.sent.len() as u64,
            complete: true,
            drafts: drafts.len() as u8,
            at,
        };
        // The step's first position: where the edge's cache stands after the cut.
        let position = at.unwrap_or(self.edge_position);
        let (computed, interrupted) = self.compute(ws, step).await?;
        if self.done.is_some() {
            return interrupted.map_or(Ok(false), Err);
        }
        self.edge_position = position + 1 + drafts.len();
        self.awaiting = Some(Awaiting {
            input_seq: self.sent.len() as u64,
            draft_first: position + 1,
            drafts,
            got: Vec::new(),
        });
        self.edge_decode += computed.elapsed;
        self.edge_decode_steps += 1;
        self.stats.decode_frames += 1;
        self.stats.decode_bytes += computed.frame.len() as u64;
        self.sent.push(computed.frame);
        interrupted.map_or(Ok(true), Err)
    }

    /// Runs `step` on the blocking pool and, meanwhile, handles what arrives on `ws` (a
    /// `Ping` is answered, a `Done` or an `Error` is taken). The step's frame comes back even
    /// when the connection failed meanwhile (the second value): the caller keeps it, since
    /// the edge's cache has consumed its tokens, and a later connection sends it.
    async fn compute(&mut self, ws: &mut Ws, step: Step) -> Result<(Computed, Option<Stop>), Stop> {
        let edge = self.edge.take().ok_or(Stop::Fatal(ClientError::TaskGone))?;
        let mut task = edge.spawn(step);
        let mut interrupted: Option<Stop> = None;
        let joined = loop {
            if interrupted.is_some() {
                break (&mut task).await;
            }
            let msg = tokio::select! {
                joined = &mut task => break joined,
                msg = ws.next() => msg,
            };
            let handled = match self.classify(msg) {
                Ok(Some(frame)) => self.handle(ws, frame).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            interrupted = handled.err();
        };
        // A panic in the edge layers loses the session's cache: nothing can continue.
        let (edge, result) = joined.map_err(|_| Stop::Fatal(ClientError::TaskGone))?;
        if let (Some(r), Some(noiser)) = (self.req.record.as_mut(), edge.noiser()) {
            if let Some(n) = r.noise.as_mut() {
                n.update(noiser);
            }
        }
        self.edge = Some(edge);
        Ok((result?, interrupted))
    }
}
