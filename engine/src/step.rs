//! The engine thread: its loop (drain commands, schedule, run one step, deliver), one
//! function per command, and the step itself.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::Receiver;
use tandem_kvcache::{BlockHash, BlockPool, BlockTable, KvLayout};
use tandem_model::pipeline::StopFilter;
use tandem_model::sampling::Sampler;
use tandem_model::tokenizer::{StreamDecoder, TextTokenizer};
use tandem_model::{CloudModel, ForwardCtx};
use tandem_scheduler::{Batch, Scheduler, SeqId, StepOutcome};

use crate::cache::Cache;
use crate::command::{Ack, Command, EventSink};
use crate::config::{wait_cap, BLOCKED_POLL};
use crate::observe::{Observer, StepFigures};
use crate::pacing::StepCostFit;
use crate::session::{deliver_rows, HiddenRows, SessionState};
use crate::types::{EngineError, EngineStats, Event, SessionParams};
use crate::EngineConfig;

struct Loop<'t> {
    cloud: CloudModel,
    tokenizer: Option<&'t TextTokenizer>,
    sched: Scheduler,
    storage: Cache,
    sessions: HashMap<SeqId, SessionState<'t>>,
    busy_s: f64,
    tokens_sampled: u64,
    positions_computed: u64,
    block_size: usize,
    prefix_sharing: bool,
    observer: Option<Arc<dyn Observer>>,
    /// Sessions that were just sent a token and answered fast last time, with the time until
    /// which the engine waits for them. Small: only prompt devices are here.
    expecting: HashMap<SeqId, Instant>,
    decode_wait: Duration,
    decode_wait_s: f64,
    bookkeeping_s: f64,
    steps: u64,
    cost: StepCostFit,
    /// The share of wall time spent in steps lately (an average over about 20 steps).
    busy_share: f64,
    last_step_end: Option<Instant>,
    /// [`EngineConfig::max_draft_tokens`].
    max_draft: u8,
    /// The sessions' [`HiddenRows`] meter, shared with the [`Engine`] handle.
    hidden_meter: Arc<AtomicU64>,
}

pub(crate) fn run(
    cloud: CloudModel,
    tokenizer: Option<TextTokenizer>,
    cfg: EngineConfig,
    rx: Receiver<Command>,
    observer: Option<Arc<dyn Observer>>,
    hidden_meter: Arc<AtomicU64>,
) {
    let ccfg = cloud.config().clone();
    let range = cloud.split().cloud_range();
    let layout = KvLayout {
        first_layer: range.start,
        num_layers: range.len(),
        num_blocks: cfg.kv_blocks,
        block_size: cfg.block_size,
        kv_heads: ccfg.num_key_value_heads,
        head_dim: ccfg.head_dim,
        dtype: cfg.kv_dtype,
    };
    let storage = match Cache::new(layout, cloud.device()) {
        Ok(c) => c,
        Err(e) => {
            // Every request then answers `EngineError::Stopped`.
            tracing::error!(error = %e, "the engine could not allocate its KV cache; stopping");
            return;
        }
    };
    let pool = BlockPool::new(cfg.kv_blocks, cfg.block_size);
    let mut lp = Loop {
        cloud,
        tokenizer: tokenizer.as_ref(),
        sched: Scheduler::new(cfg.scheduler.clone(), pool),
        storage,
        sessions: HashMap::new(),
        busy_s: 0.0,
        tokens_sampled: 0,
        positions_computed: 0,
        block_size: cfg.block_size,
        prefix_sharing: cfg.prefix_sharing,
        observer,
        expecting: HashMap::new(),
        decode_wait: cfg.decode_wait,
        decode_wait_s: 0.0,
        bookkeeping_s: 0.0,
        steps: 0,
        cost: StepCostFit::new(0.98),
        busy_share: 0.0,
        last_step_end: None,
        max_draft: cfg.max_draft_tokens.min(tandem_protocol::wire::MAX_DRAFTS),
        hidden_meter,
    };
    loop {
        while let Ok(cmd) = rx.try_recv() {
            lp.handle(cmd);
        }
        lp.wait_for_expected(&rx);
        let chosen = Instant::now();
        let batch = lp.sched.schedule();
        lp.bookkeeping_s += chosen.elapsed().as_secs_f64();
        if batch.is_empty() {
            if lp.sched.blocked() {
                // Work waits for KV blocks held by sessions idle at their devices: schedule
                // again soon, so they age and yield them (preemption rule 3).
                match rx.recv_timeout(BLOCKED_POLL) {
                    Ok(cmd) => lp.handle(cmd),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            match rx.recv() {
                Ok(cmd) => lp.handle(cmd),
                Err(_) => return,
            }
            continue;
        }
        lp.step(batch);
    }
}

/// A batch's input rows as one tensor, its varlen context, and the rows that sample with
/// their sessions ([`Loop::gather`]).
type Gathered = (Tensor, ForwardCtx, Vec<(u32, SeqId)>);

impl<'t> Loop<'t> {
    /// Handles commands until every expected device has answered or the last of their
    /// deadlines passes, then forgets them (they are waited for once per token).
    fn wait_for_expected(&mut self, rx: &Receiver<Command>) {
        let Some(&deadline) = self.expecting.values().max() else {
            return;
        };
        let started = Instant::now();
        while !self.expecting.is_empty() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match rx.recv_timeout(left) {
                Ok(cmd) => self.handle(cmd),
                Err(_) => break, // timed out, or the engine is closing: run what is ready
            }
        }
        self.expecting.clear();
        self.decode_wait_s += started.elapsed().as_secs_f64();
    }

    /// Handles one command; its time counts as bookkeeping (a stall's sleep does not).
    fn handle(&mut self, cmd: Command) {
        if let Command::Stall(d) = cmd {
            self.stall(d);
            return;
        }
        let started = Instant::now();
        self.handle_timed(cmd);
        self.bookkeeping_s += started.elapsed().as_secs_f64();
    }

    /// Sleeps `d` as if a step took that long (tests of `/readyz`'s wedge check).
    fn stall(&self, d: Duration) {
        if let Some(o) = &self.observer {
            o.step_started();
        }
        std::thread::sleep(d);
        if let Some(o) = &self.observer {
            o.step_ended(None);
        }
    }

    fn handle_timed(&mut self, cmd: Command) {
        match cmd {
            Command::Stall(d) => self.stall(d),
            Command::Open {
                id,
                params,
                events,
                ack,
            } => self.on_open(id, params, events, ack),
            Command::Hidden {
                id,
                data,
                rows,
                complete,
                first_position,
                drafts,
                ack,
            } => self.on_hidden(id, data, rows, complete, first_position, drafts, ack),
            Command::Stats { reply } => {
                let _ = reply.send(Ok(self.stats()));
            }
            Command::Close { id, ack } => {
                let _ = ack.send(self.on_close(id));
            }
        }
    }

    /// Admits a session (the scheduler may refuse it) and sets up its state.
    fn on_open(&mut self, id: SeqId, params: SessionParams, events: EventSink, ack: Ack) {
        let r = self.sched.add(id).map_err(EngineError::from);
        if r.is_ok() {
            let eos = params
                .eos_ids
                .unwrap_or_else(|| self.cloud.config().eos_token_ids.clone());
            self.sessions.insert(
                id,
                SessionState {
                    events,
                    hidden: HiddenRows::new(self.hidden_meter.clone()),
                    sampler: Sampler::new(params.sampling),
                    max_tokens: params.max_tokens,
                    eos,
                    output: Vec::new(),
                    decoder: self.tokenizer.map(StreamDecoder::new),
                    stop: StopFilter::new(params.stop_strings),
                    finished: false,
                    chain: Vec::new(),
                    draft_first: 0,
                    pending: None,
                    trace: params.trace,
                    token_sent_at: None,
                    reply_latency: None,
                },
            );
        }
        let _ = ack.send(r);
    }

    /// Takes an input and notes how long the device took to answer; the refusal goes to the
    /// caller when it waits, else to the session's events.
    #[allow(clippy::too_many_arguments)] // one command's fields, passed through
    fn on_hidden(
        &mut self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
        first_position: Option<usize>,
        drafts: usize,
        ack: Option<Ack>,
    ) {
        let r = self.take_input(id, data, rows, complete, first_position, drafts);
        if r.is_ok() {
            if let Some(s) = self.sessions.get_mut(&id) {
                if let Some(t) = s.token_sent_at.take() {
                    s.reply_latency = Some(t.elapsed());
                }
            }
            self.expecting.remove(&id);
        }
        match ack {
            Some(ack) => {
                let _ = ack.send(r);
            }
            None => {
                if let (Err(e), Some(s)) = (r, self.sessions.get(&id)) {
                    s.events.send(Event::Error(e));
                }
            }
        }
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            scheduler: self.sched.stats(),
            busy_s: self.busy_s,
            tokens_sampled: self.tokens_sampled,
            positions_computed: self.positions_computed,
            decode_wait_s: self.decode_wait_s,
            bookkeeping_s: self.bookkeeping_s,
            steps: self.steps,
            overhead_rows: self.cost.overhead_rows().unwrap_or(0.0),
        }
    }

    /// Forgets a session and gives its KV blocks back.
    fn on_close(&mut self, id: SeqId) -> Result<(), EngineError> {
        self.expecting.remove(&id);
        let s = self
            .sessions
            .remove(&id)
            .ok_or(EngineError::UnknownSession(id.0))?;
        if !s.finished {
            let _ = self.sched.remove(id);
        }
        Ok(())
    }

    /// Takes one input: checks where it starts, applies the device's verdict on the draft
    /// tokens of the last answer (drops the rejected rows and their KV, commits the accepted
    /// tokens, ends the generation when one of them ends it), then queues the rows.
    fn take_input(
        &mut self,
        id: SeqId,
        data: Vec<f32>,
        rows: usize,
        complete: bool,
        first_position: Option<usize>,
        drafts: usize,
    ) -> Result<(), EngineError> {
        let h = self.cloud.config().hidden_size;
        let bs = self.block_size;
        let s = match self.sessions.get_mut(&id) {
            None => return Err(EngineError::UnknownSession(id.0)),
            Some(s) if s.finished => return Err(EngineError::Finished(id.0)),
            Some(s) => s,
        };
        let received = self
            .sched
            .progress(id)
            .map(|p| p.received)
            .ok_or(EngineError::UnknownSession(id.0))?;
        let at = first_position.unwrap_or(received);
        // The tokens of the last answer the device accepted (drafts before `at`).
        let accepted = match &s.pending {
            Some(p) if at >= p.first && at <= p.first + p.tokens.len() => Some(at - p.first),
            _ if at == received => None,
            p => {
                return Err(EngineError::Position {
                    got: at,
                    expected: match p {
                        Some(p) => format!("{} to {}", p.first, p.first + p.tokens.len()),
                        None => received.to_string(),
                    },
                })
            }
        };
        if let Some(accepted) = accepted {
            if at < received {
                self.sched.truncate(id, at)?;
                s.hidden.truncate(at * h);
                s.chain.truncate(at / bs);
            }
            if let Some(o) = &self.observer {
                o.draft_tokens_accepted(accepted);
            }
            if let Some(reason) = s.commit(accepted)? {
                // A draft token that ended the generation counts: the rows that came with
                // the verdict are not needed.
                s.finish(reason);
                let _ = self.sched.remove(id);
                return Ok(());
            }
        }
        self.sched.push_drafts(id, rows, complete, drafts)?;
        s.hidden.extend_from_slice(&data);
        s.draft_first = at + rows - drafts;
        if drafts > 0 {
            if let Some(o) = &self.observer {
                o.draft_tokens(drafts);
            }
        }
        if self.prefix_sharing {
            self.hash_new_blocks(id);
        }
        Ok(())
    }

    /// The most drafts to ask for in the next inputs: the configured cap
    /// ([`EngineConfig::max_draft_tokens`]) while the engine
    /// mostly waits for its devices (drafts then ride in steps that would run anyway), else
    /// as many as the step's fixed cost covers per decoder (speculating sessions at most
    /// double a compute-bound step). `decoders`: the sessions sampled in this step.
    fn draft_cap(&self, decoders: usize) -> u8 {
        let max = self.max_draft;
        if self.busy_share < 0.5 {
            return max;
        }
        let per = self.cost.overhead_rows().unwrap_or(f64::from(max)) / decoders.max(1) as f64;
        (per.floor().clamp(0.0, f64::from(max))) as u8
    }

    /// Extends `id`'s hash chain over the full blocks it received since the last call and
    /// hands the new hashes to the scheduler (prefix sharing).
    fn hash_new_blocks(&mut self, id: SeqId) {
        let h = self.cloud.config().hidden_size;
        let bs = self.block_size;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let full = s.hidden.len() / (h * bs);
        let done = s.chain.len();
        if full <= done {
            return;
        }
        let mut bytes = Vec::with_capacity(h * bs * 4);
        for b in done..full {
            bytes.clear();
            for x in &s.hidden[b * bs * h..(b + 1) * bs * h] {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            let hash = BlockHash::chain(s.chain.last().copied(), &bytes);
            s.chain.push(hash);
        }
        let new = &s.chain[done..];
        // Cannot fail: the session is known and the positions were just received.
        let _ = self.sched.add_block_hashes(id, new);
    }

    /// Runs one batch; a failure fails the batch's sessions, not the engine.
    fn step(&mut self, batch: Batch) {
        let started = Instant::now();
        // A root span per step, linked to the generations it computed (a step serves many
        // traces at once, so it is no one's child).
        let span = tracing::info_span!(
            parent: None,
            "engine.step",
            batch_tokens = batch.num_tokens() as i64,
            batch_sequences = batch.items.len() as i64,
            sampled = batch.items.iter().filter(|i| i.sample).count() as i64,
            copies = batch.copies.len() as i64,
        );
        if let Some(o) = &self.observer {
            if !span.is_disabled() {
                let sessions = &self.sessions;
                let mut parents = batch
                    .items
                    .iter()
                    .filter_map(|i| sessions.get(&i.id)?.trace.as_ref());
                o.link_step(&span, &mut parents);
            }
            o.step_started();
        }
        let _in_step = span.enter();
        let result = self.forward_and_sample(&batch);
        let forwarded = Instant::now();
        let took = forwarded - started;
        if let Some(prev) = self.last_step_end.replace(forwarded) {
            let wall = (forwarded - prev).as_secs_f64();
            if wall > 0.0 {
                let share = (took.as_secs_f64() / wall).min(1.0);
                self.busy_share += 0.05 * (share - self.busy_share);
            }
        }
        self.busy_s += took.as_secs_f64();
        self.steps += 1;
        self.cost.observe(batch.num_tokens(), took.as_secs_f64());
        if let Some(rows) = self.cost.overhead_rows() {
            self.sched.set_overhead_rows(rows);
        }
        tracing::debug!(
            rows = batch.num_tokens(),
            one_row_items = batch.items.iter().filter(|i| i.len == 1).count(),
            seqs = batch.items.len(),
            ms = took.as_secs_f64() * 1e3,
            overhead_rows = self.cost.overhead_rows().unwrap_or(0.0),
            "engine step"
        );
        if let Some(o) = &self.observer {
            o.step_ended(Some(&StepFigures {
                took: started.elapsed(),
                tokens: batch.num_tokens(),
                sequences: batch.items.len(),
            }));
        }
        self.positions_computed += batch.num_tokens() as u64;
        self.tokens_sampled += batch.items.iter().filter(|i| i.sample).count() as u64;
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                for item in &batch.items {
                    if let Some(s) = self.sessions.get_mut(&item.id) {
                        s.events.send(Event::Error(e.clone()));
                        s.finished = true;
                    }
                }
                StepOutcome {
                    finished: batch.items.iter().map(|i| i.id).collect(),
                }
            }
        };
        self.sched.update(&batch, &outcome);
        for id in &outcome.finished {
            let _ = self.sched.remove(*id);
        }
        self.expect_answers(&batch);
        self.bookkeeping_s += forwarded.elapsed().as_secs_f64();
    }

    /// Notes the time each sampled session was sent its token, and expects back within
    /// [`wait_cap`] those whose devices answered that fast last time.
    fn expect_answers(&mut self, batch: &Batch) {
        let now = Instant::now();
        let cap = wait_cap(self.decode_wait, self.cost.line());
        for item in batch.items.iter().filter(|i| i.sample) {
            let Some(s) = self.sessions.get_mut(&item.id) else {
                continue;
            };
            if s.finished {
                continue;
            }
            s.token_sent_at = Some(now);
            match s.reply_latency {
                Some(lat) if !cap.is_zero() && lat <= cap => {
                    // Up to the cap, not a multiple of the last answer time: answers come
                    // back in bursts whose order changes from step to step (the devices of
                    // one host, one network queue), so a device's next answer may take
                    // several times its last, and the wait ends when the last expected
                    // device has answered anyway.
                    self.expecting.insert(item.id, now + cap);
                }
                _ => {}
            }
        }
    }

    /// One step's work: the cloud layers over the batch's rows, then the LM head, sampling and
    /// delivery on the rows that sample only.
    fn forward_and_sample(&mut self, batch: &Batch) -> Result<StepOutcome, EngineError> {
        let model_err = |e: tandem_model::ModelError| EngineError::Model(e.to_string());
        for op in &batch.copies {
            self.storage.copy(*op)?;
        }
        let (x, ctx, sample_rows) = self.gather(batch)?;
        let tables: Vec<&BlockTable> = batch
            .items
            .iter()
            .map(|i| {
                self.sched
                    .table(i.id)
                    .ok_or(EngineError::UnknownSession(i.id.0))
            })
            .collect::<Result<_, _>>()?;
        // Phase times for `RUST_LOG=tandem_engine=debug`: only then is the device
        // synchronised after the layers (on a GPU the launches are asynchronous).
        let phases = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
        // Attention timed on its own too at trace level (each call synchronised).
        let time_attention = tracing::enabled!(tracing::Level::TRACE);
        let (out, attention_s) = self
            .storage
            .forward_timed(&self.cloud, &x, &ctx, &tables, time_attention)
            .map_err(model_err)?;
        let layers_done = phases.map(|t0| {
            let _ = out.device().synchronize();
            (t0, Instant::now())
        });
        if sample_rows.is_empty() {
            return Ok(StepOutcome {
                finished: Vec::new(),
            });
        }
        let (finished, logits_done) =
            self.sample_and_deliver(&out, &sample_rows, batch.num_samples())?;
        if let Some((t0, t1)) = layers_done {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            tracing::debug!(
                rows = ctx.num_tokens(),
                sampled = sample_rows.len(),
                layers_ms = ms(t0, t1),
                attention_ms = attention_s.unwrap_or(f64::NAN) * 1e3,
                head_and_copy_ms = ms(t1, logits_done),
                sample_and_deliver_ms = ms(logits_done, Instant::now()),
                "engine step phases"
            );
        }
        Ok(StepOutcome { finished })
    }

    /// The batch's input rows as one `(rows, hidden)` tensor, its varlen context, and the
    /// rows that sample with their sessions (an item's last row, or the row before its drafts
    /// and the drafts).
    fn gather(&self, batch: &Batch) -> Result<Gathered, EngineError> {
        let h = self.cloud.config().hidden_size;
        let mut rows = Vec::with_capacity(batch.num_tokens() * h);
        let mut spans = Vec::with_capacity(batch.items.len());
        let mut sample_rows = Vec::new();
        for item in &batch.items {
            let s = self
                .sessions
                .get(&item.id)
                .ok_or(EngineError::UnknownSession(item.id.0))?;
            rows.extend_from_slice(&s.hidden[item.start * h..(item.start + item.len) * h]);
            if item.sample {
                let end = rows.len() / h;
                for r in end - item.sample_rows.clamp(1, item.len)..end {
                    sample_rows.push((r as u32, item.id));
                }
            }
            spans.push((item.start, item.len));
        }
        let ctx = ForwardCtx::varlen(&spans);
        let x = Tensor::from_vec(rows, (ctx.num_tokens(), h), &Device::Cpu)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        Ok((x, ctx, sample_rows))
    }

    /// The LM head on the sampled rows of `out`, then sampling and delivery to each session;
    /// returns the sessions that ended and when the logits were ready.
    fn sample_and_deliver(
        &mut self,
        out: &Tensor,
        sample_rows: &[(u32, SeqId)],
        decoders: usize,
    ) -> Result<(Vec<SeqId>, Instant), EngineError> {
        let candle = |e: candle_core::Error| EngineError::Model(e.to_string());
        let idx: Vec<u32> = sample_rows.iter().map(|&(r, _)| r).collect();
        let idx = Tensor::from_vec(idx, sample_rows.len(), out.device()).map_err(candle)?;
        let picked = out.index_select(&idx, 0).map_err(candle)?;
        let logits = self
            .cloud
            .logits(&picked)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let vocab = logits.dim(1).map_err(candle)?;
        let logits_done = Instant::now();
        let cap = self.draft_cap(decoders);
        if let Some(o) = &self.observer {
            o.draft_cap(cap);
        }
        let sessions = &mut self.sessions;
        let finished = if logits.device().is_cpu() && logits.dtype() == DType::F32 {
            // Read in place (a decode step of 64 sessions would copy 64 vocabulary rows).
            tandem_model::cpu::with_f32(&logits, |l| {
                deliver_rows(sessions, sample_rows, l, vocab, cap)
            })
            .map_err(|e| EngineError::Model(e.to_string()))?
        } else {
            // One flat copy to the host (not a `Vec` per row).
            let logits: Vec<f32> = logits
                .to_dtype(DType::F32)
                .and_then(|l| l.flatten_all())
                .and_then(|l| l.to_vec1())
                .map_err(candle)?;
            deliver_rows(sessions, sample_rows, &logits, vocab, cap)
        };
        Ok((finished, logits_done))
    }
}
