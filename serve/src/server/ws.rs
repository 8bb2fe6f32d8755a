//! One task per WebSocket connection: the edge of the server where bytes become valid values.
//!
//! The reader checks every message (binary only, size, the per-connection frame rate), decodes
//! it (`Hidden` without copying, then to f32 with shape and finiteness checked), runs the
//! `Open`/`Resume` handshake, and forwards the rest to the session actor. A writer task drains
//! the connection's bounded outbound queue into the socket. Before a session is attached, a
//! bad frame is answered here and the connection closed; after, the session answers it (so the
//! error goes out in order with its tokens).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use tandem_protocol::wire::{
    peek_frame_type, ErrorCode, ErrorFrame, Frame, FrameType, HiddenRef, Limits, ManifestId, Open,
    Resume,
};
use tandem_protocol::OpenError;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::Message;

use super::admission::{Refusal, SessionSlot};
use super::assignment::AssignmentRef;
use super::session::{self, CloseStatus, Conn, Input, Outbound, SessionCmd, SessionHandle, Setup};
use super::upgrade::{Gate, Socket};
use super::{stopped, Shared};
use crate::rest::inbox::ticket_hash;
use crate::rest::store::prompts::{TicketRefusal, UserId};
use crate::store::{self, now_ms, Claim, NewSession, ResumeToken, StoreError};
use tandem_engine::{EngineError, SessionParams};
use tandem_scheduler::SchedError;

/// Counts frames per one-second window.
struct RateLimit {
    max: u32,
    window_start: Instant,
    count: u32,
}

impl RateLimit {
    fn new(max: u32) -> Self {
        Self {
            max,
            window_start: Instant::now(),
            count: 0,
        }
    }

    /// Counts one frame; `false` when over the limit.
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.max
    }
}

fn err(code: ErrorCode, seq: Option<u64>, message: &str) -> ErrorFrame {
    ErrorFrame {
        code,
        seq,
        message: message.to_owned(),
        retry_after_ms: None,
    }
}

/// The connection's side of an attached session.
struct Attached {
    session: u128,
    tx: mpsc::Sender<SessionCmd>,
}

struct Connection {
    shared: Arc<Shared>,
    conn: Conn,
    /// The device token's user, when the upgrade carried one.
    user: Option<UserId>,
    attached: Option<Attached>,
    rate: RateLimit,
    /// An error was sent before any session: wait for the writer to close.
    closing: bool,
    /// Lifted once a session is attached (see [`super::upgrade`]).
    gate: Arc<Gate>,
}

pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    socket: Socket,
    user: Option<UserId>,
    gate: Arc<Gate>,
) {
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (sink, mut stream) = socket.split();
    let (out, out_rx) = mpsc::channel(shared.cfg.outbound_queue);
    let kill = Arc::new(Notify::new());
    let mut writer = tokio::spawn(write_loop(
        sink,
        out_rx,
        kill.clone(),
        shared.metrics.clone(),
    ));
    let handshake_by = tokio::time::Instant::now() + shared.cfg.handshake_timeout();
    let mut stop = shared.stop.subscribe();
    let mut c = Connection {
        rate: RateLimit::new(shared.cfg.max_frames_per_second),
        shared,
        conn: Conn { id, out, kill },
        user,
        attached: None,
        closing: false,
        gate,
    };
    tracing::debug!(conn = id, "connection opened");
    let mut writer_done = false;
    loop {
        let waiting = c.attached.is_none() && !c.closing;
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(msg)) => c.on_message(msg).await,
                Some(Err(e)) => {
                    tracing::debug!(conn = id, error = %e, "websocket error");
                    if c.gate.tripped() && !c.closing {
                        // Tell the device why, then let the writer close.
                        let msg = format!(
                            "a message before Open or Resume may be at most {} bytes",
                            super::upgrade::MAX_PRE_OPEN_MESSAGE_BYTES
                        );
                        c.reject(err(ErrorCode::FrameTooLarge, None, &msg));
                        let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
                        writer_done = true;
                    }
                    break;
                }
                None => break,
            },
            _ = &mut writer => {
                writer_done = true;
                break;
            }
            _ = tokio::time::sleep_until(handshake_by), if waiting => {
                tracing::info!(conn = id, "no Open or Resume in time");
                c.reject(err(ErrorCode::UnexpectedFrame, None, "expected Open or Resume"));
            }
            _ = stopped(&mut stop), if waiting => {
                c.reject(err(ErrorCode::ShuttingDown, None, "this replica is shutting down"));
            }
        }
    }
    if let Some(a) = c.attached.take() {
        tracing::debug!(conn = id, session = a.session, "detaching");
        let _ = a.tx.send(SessionCmd::Detach { conn: id }).await;
    }
    if !writer_done {
        // The device is gone: nothing more needs writing.
        c.conn.kill.notify_one();
    }
    tracing::debug!(conn = id, "connection closed");
}

async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    kill: Arc<Notify>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let bytes_out = metrics.wire_bytes_total.with("out");
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            _ = kill.notified() => return,
        };
        let sent = match next {
            Some(Outbound::Frame(bytes)) => {
                bytes_out.add(bytes.len() as u64);
                tokio::select! {
                    r = sink.send(Message::Binary(bytes.into())) => r,
                    _ = kill.notified() => return,
                }
            }
            Some(Outbound::Close(status)) => {
                let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: status.code.into(),
                    reason: status.reason.into(),
                };
                let close = sink.send(Message::Close(Some(frame)));
                let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                return;
            }
            None => {
                let close = sink.send(Message::Close(None));
                let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

impl Connection {
    /// Answers an error before any session exists, and closes.
    fn reject(&mut self, e: ErrorFrame) {
        tracing::info!(conn = self.conn.id, code = %e.code, "rejected");
        self.shared.metrics.errors_total.with(e.code.as_str()).inc();
        let status = CloseStatus::for_error(e.code);
        if let Ok(bytes) = Frame::Error(e).encode() {
            let _ = self.conn.out.try_send(Outbound::Frame(bytes));
        }
        let _ = self.conn.out.try_send(Outbound::Close(status));
        self.closing = true;
    }

    /// A frame error: the session answers it if there is one, else this connection does.
    async fn error(&mut self, e: ErrorFrame) {
        match &self.attached {
            Some(a) => {
                let _ =
                    a.tx.send(SessionCmd::Fail {
                        conn: self.conn.id,
                        error: e,
                    })
                    .await;
            }
            None => self.reject(e),
        }
    }

    async fn on_message(&mut self, msg: Message) {
        if self.closing {
            return;
        }
        let bytes = match msg {
            Message::Binary(b) => {
                self.shared
                    .metrics
                    .wire_bytes_total
                    .with("in")
                    .add(b.len() as u64);
                b
            }
            Message::Text(_) => {
                return self
                    .error(err(
                        ErrorCode::MalformedFrame,
                        None,
                        "text messages are not used",
                    ))
                    .await
            }
            // The WebSocket layer answers pings; closes end the stream.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => return,
        };
        if !self.rate.allow() {
            return self
                .error(err(
                    ErrorCode::RateLimited,
                    None,
                    "too many frames per second",
                ))
                .await;
        }
        let max = self.shared.cfg.max_frame_bytes;
        if bytes.len() > max {
            let msg = format!("frame of {} bytes; the limit is {max}", bytes.len());
            return self.error(err(ErrorCode::FrameTooLarge, None, &msg)).await;
        }
        let limits = Limits {
            max_frame_bytes: max,
        };
        match peek_frame_type(&bytes) {
            Ok(FrameType::Hidden) => self.on_hidden(&bytes, &limits).await,
            Ok(_) => match Frame::decode_with(&bytes, &limits) {
                Ok(frame) => self.on_frame(frame, &bytes).await,
                Err(e) => self.error(err(e.error_code(), None, &e.to_string())).await,
            },
            Err(e) => self.error(err(e.error_code(), None, &e.to_string())).await,
        }
    }

    async fn on_hidden(&mut self, bytes: &[u8], limits: &Limits) {
        let Some(a) = &self.attached else {
            return self.reject(err(
                ErrorCode::UnexpectedFrame,
                None,
                "Hidden before Open or Resume",
            ));
        };
        let tx = a.tx.clone();
        let h = match HiddenRef::decode(bytes, limits) {
            Ok(h) => h,
            Err(e) => return self.error(err(e.error_code(), None, &e.to_string())).await,
        };
        if h.token_count == 0 {
            return self
                .error(err(ErrorCode::HiddenShape, Some(h.seq), "zero tokens"))
                .await;
        }
        let mut data = Vec::new();
        if let Err(e) = h.to_f32(self.shared.served.hidden_size, &mut data) {
            return self
                .error(err(e.error_code(), Some(h.seq), &e.to_string()))
                .await;
        }
        let input = Input {
            seq: h.seq,
            first_position: h.first_position,
            rows: h.token_count as usize,
            complete: h.complete,
            drafts: usize::from(h.drafts),
            dtype: h.dtype,
            data,
        };
        let _ = tx
            .send(SessionCmd::Hidden {
                conn: self.conn.id,
                input,
            })
            .await;
    }

    async fn on_frame(&mut self, frame: Frame, bytes: &[u8]) {
        match (frame, &self.attached) {
            (Frame::Ping { nonce }, _) => {
                if let Ok(b) = (Frame::Pong { nonce }).encode() {
                    let _ = self.conn.out.try_send(Outbound::Frame(b));
                }
            }
            (Frame::Pong { .. }, _) => {}
            (Frame::Open(open), None) => {
                match open_session(&self.shared, open, bytes, self.user.as_ref()).await {
                    Ok((handle, token)) => self.attach(handle, token, None).await,
                    Err(e) => self.reject(e),
                }
            }
            (Frame::Resume(r), None) => {
                match resume_session(&self.shared, &r, self.user.as_ref()).await {
                    Ok((handle, token)) => self.attach(handle, token, r.last_token_seq).await,
                    Err(e) => self.reject(e),
                }
            }
            (Frame::Cancel, Some(a)) => {
                let _ = a.tx.send(SessionCmd::Cancel { conn: self.conn.id }).await;
            }
            (Frame::Error(e), _) => {
                tracing::info!(conn = self.conn.id, code = %e.code, "the device reported an error");
            }
            (frame, _) => {
                let msg = format!("{:?} not allowed now", frame.frame_type());
                self.error(err(ErrorCode::UnexpectedFrame, None, &msg))
                    .await;
            }
        }
    }

    async fn attach(&mut self, handle: SessionHandle, token: [u8; 32], last: Option<u64>) {
        let (reply, answer) = oneshot::channel();
        let cmd = SessionCmd::Attach {
            conn: self.conn.clone(),
            token,
            last_token_seq: last,
            reply,
        };
        let ok = handle.tx.send(cmd).await.is_ok() && answer.await.unwrap_or(false);
        if !ok {
            return self.reject(err(ErrorCode::Finished, None, "the session ended"));
        }
        tracing::debug!(conn = self.conn.id, session = handle.id, "attached");
        self.gate.lift();
        self.attached = Some(Attached {
            session: handle.id,
            tx: handle.tx,
        });
    }
}

/// What an `Open` asks for, checked against what this cloud serves ([`Open::check`]).
fn session_params(shared: &Shared, open: &Open) -> Result<SessionParams, ErrorFrame> {
    let s = &shared.served;
    let refuse = |e: OpenError| err(e.error_code(), None, &e.to_string());
    let served = tandem_protocol::Served {
        // A pair id the wire cannot carry matches no device.
        manifest: ManifestId::try_from(s.pair_id.as_str())
            .map_err(|_| refuse(OpenError::ManifestMismatch))?,
        split: s.split,
        hidden_size: u32::try_from(s.hidden_size).unwrap_or(u32::MAX),
        max_tokens_cap: shared.cfg.max_tokens_cap,
    };
    let valid = open.check(&served).map_err(refuse)?;
    Ok(SessionParams {
        sampling: valid.sampling,
        max_tokens: valid.max_tokens as usize,
        stop_strings: valid.stop,
        eos_ids: None,
        trace: None,
    })
}

fn store_error(e: &StoreError) -> ErrorFrame {
    tracing::warn!(error = %e, "session store");
    err(
        ErrorCode::Unavailable,
        None,
        "the session store is unavailable",
    )
}

/// For an `Open` that carries a prompt ticket: claims it (once), and applies the prompt's
/// `max_tokens` and sampling. Returns the frame to run and where its result goes.
async fn claim_prompt(
    shared: &Arc<Shared>,
    mut open: Open,
) -> Result<(Open, Option<AssignmentRef>), ErrorFrame> {
    let Some(ticket) = open.prompt_id.take() else {
        return Ok((open, None));
    };
    let bad = |m: &str| err(ErrorCode::BadPromptTicket, None, m);
    let hash = ticket_hash(&ticket).ok_or_else(|| bad("the prompt id is not a prompt ticket"))?;
    let claimed = shared
        .prompts
        .claim_ticket(&hash, now_ms())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "prompt store");
            err(
                ErrorCode::Unavailable,
                None,
                "the prompt store is unavailable",
            )
        })?
        .map_err(|r| match r {
            TicketRefusal::Unknown => bad("unknown or already used prompt ticket"),
            TicketRefusal::Closed(s) => bad(&format!("the prompt is {}", s.as_str())),
        })?;
    let a = AssignmentRef {
        prompt: claimed.prompt.id.clone(),
        user: claimed.user,
    };
    open.max_tokens = claimed.prompt.max_tokens.min(shared.cfg.max_tokens_cap);
    open.sampling = claimed.prompt.sampling;
    open.prompt_id = Some(a.mark());
    tracing::info!(prompt = %a.prompt, "prompt ticket claimed");
    Ok((open, Some(a)))
}

/// A place for a new session in the admission counts, or the `Error` that refuses it.
fn admit(shared: &Arc<Shared>, user: Option<&UserId>) -> Result<SessionSlot, ErrorFrame> {
    let held = shared.engine.hidden_state_bytes();
    shared.admission.admit(user, held).map_err(|refusal| {
        let code = match refusal {
            Refusal::Capacity(_) | Refusal::HiddenStateMemory(_) => ErrorCode::Overloaded,
            Refusal::UserCap(_) => ErrorCode::TooManySessions,
        };
        let wait = u32::try_from(refusal.retry_after().as_millis()).unwrap_or(u32::MAX);
        ErrorFrame {
            retry_after_ms: Some(wait),
            ..err(code, None, &refusal.to_string())
        }
    })
}

/// Opens the engine session and spawns its actor.
async fn spawn_session(
    shared: &Arc<Shared>,
    id: u128,
    open: &Open,
    device_has: u64,
    slot: SessionSlot,
) -> Result<SessionHandle, ErrorFrame> {
    let mut params = session_params(shared, open)?;
    // The device's trace (W3C `traceparent` in `Open`) is the session's parent; the engine
    // links each step to the generation span of the sessions it computed.
    let span = tracing::info_span!(
        parent: None,
        "session",
        otel.kind = "server",
        session.id = %tandem_protocol::SessionId(id),
        session.replayed = device_has > 0,
        wire.dtype = %open.dtype,
        split = i64::from(open.split),
        partner_prompt = open.prompt_id.is_some(),
        replica = %shared.replica,
    );
    crate::telemetry::adopt_parent(
        &span,
        crate::telemetry::remote_parent(open.traceparent.as_deref(), None),
    );
    let generation = tracing::info_span!(
        parent: &span,
        "generation",
        max_tokens = i64::from(open.max_tokens),
        prompt_tokens = tracing::field::Empty,
        output_tokens = tracing::field::Empty,
        ttft_ms = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
        error_code = tracing::field::Empty,
    );
    params.trace = crate::telemetry::span_context(&generation).map(tandem_engine::TraceParent::new);
    let (events_tx, events) = mpsc::unbounded_channel();
    let opened = shared.engine.open_session_with(params, events_tx).await;
    let seq = opened.map_err(|e| match e {
        EngineError::Scheduler(SchedError::Overloaded(_)) => ErrorFrame {
            retry_after_ms: Some(super::admission::CAPACITY_RETRY_AFTER.as_millis() as u32),
            ..err(ErrorCode::Overloaded, None, "the cloud is at capacity")
        },
        EngineError::Stopped => err(ErrorCode::ShuttingDown, None, "the engine stopped"),
        e => {
            tracing::error!(error = %e, "engine open failed");
            err(ErrorCode::Internal, None, "internal error")
        }
    })?;
    let assignment = open.prompt_id.as_deref().and_then(AssignmentRef::from_mark);
    Ok(session::spawn(
        shared.clone(),
        Setup {
            id,
            seq,
            events,
            dtype: open.dtype,
            max_tokens: open.max_tokens,
            device_has,
            assignment,
            slot,
            span,
            generation,
        },
    ))
}

async fn open_session(
    shared: &Arc<Shared>,
    open: Open,
    bytes: &[u8],
    user: Option<&UserId>,
) -> Result<(SessionHandle, [u8; 32]), ErrorFrame> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err(err(
            ErrorCode::ShuttingDown,
            None,
            "this replica is shutting down",
        ));
    }
    session_params(shared, &open)?; // refuse before touching the store
                                    // Admitted before the ticket is claimed: a refused device keeps its ticket.
    let slot = admit(shared, user)?;
    let (open, assignment) = claim_prompt(shared, open).await?;
    let fail = |e: ErrorFrame| {
        if let Some(a) = &assignment {
            a.fail_later(shared, e.code);
        }
        e
    };
    // The frame to keep for a takeover: the device's own, or the one with the prompt's
    // parameters and the assignment mark.
    let bytes = match &assignment {
        None => bytes.to_vec(),
        Some(_) => Frame::Open(open.clone())
            .encode()
            .map_err(|_| fail(err(ErrorCode::Internal, None, "internal error")))?,
    };
    session_params(shared, &open).map_err(fail)?;
    let token = ResumeToken::generate();
    // Ids are random: one in use (a chance of about n / 2^64) is drawn again.
    let mut tries = 0;
    let id = loop {
        let id = shared
            .store
            .next_session_id()
            .await
            .map_err(|e| fail(store_error(&e)))?;
        let new = NewSession {
            id,
            owner: shared.replica.clone(),
        };
        match shared.store.create_session(new, token.hash()).await {
            Ok(_) => break id,
            Err(StoreError::AlreadyExists(_)) if tries < 3 => tries += 1,
            Err(e) => return Err(fail(store_error(&e))),
        }
    };
    let cleanup = |shared: Arc<Shared>| async move {
        let _ = shared.store.close_session(id, &shared.replica).await;
        shared.params.remove(id.0).await;
    };
    if let Err(e) = shared.params.put(id.0, bytes).await {
        tracing::warn!(error = %e, "storing the session's parameters");
        cleanup(shared.clone()).await;
        return Err(fail(err(
            ErrorCode::Unavailable,
            None,
            "the session store is unavailable",
        )));
    }
    match spawn_session(shared, id.0, &open, 0, slot).await {
        Ok(handle) => {
            tracing::info!(
                session = id.0,
                dtype = %open.dtype,
                max_tokens = open.max_tokens,
                "session opened"
            );
            Ok((handle, *token.as_bytes()))
        }
        Err(e) => {
            cleanup(shared.clone()).await;
            Err(fail(e))
        }
    }
}

/// The session a `Resume` reattaches to, and the resume token the device holds from now on:
/// a new one whenever the session goes on here (the old one stops working), the same one
/// for a session that already ended (its `Done` is only resent).
async fn resume_session(
    shared: &Arc<Shared>,
    r: &Resume,
    user: Option<&UserId>,
) -> Result<(SessionHandle, [u8; 32]), ErrorFrame> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err(err(
            ErrorCode::ShuttingDown,
            None,
            "this replica is shutting down",
        ));
    }
    let id = store::SessionId(r.session.0);
    let token = ResumeToken::from_bytes(r.resume_token.0);
    let local = || shared.sessions.get(&id.0).map(|h| h.value().clone());
    match shared.store.verify_resume(id, &token).await {
        Ok(_) => {}
        Err(StoreError::UnknownSession(_)) => {
            return Err(err(
                ErrorCode::UnknownSession,
                None,
                "unknown or expired session",
            ))
        }
        // The same answer as an unknown session: a wrong token tells a prober nothing.
        Err(StoreError::BadResumeToken(_)) => {
            return Err(err(
                ErrorCode::UnknownSession,
                None,
                "unknown or expired session",
            ))
        }
        // Ended here recently: the actor still holds its tokens and `Done`.
        Err(StoreError::SessionClosed(_)) => {
            return local()
                .map(|h| (h, r.resume_token.0))
                .ok_or_else(|| err(ErrorCode::Finished, None, "the session ended"))
        }
        Err(e) => return Err(store_error(&e)),
    }
    if let Some(handle) = local() {
        tracing::info!(session = id.0, "resume on the same replica");
        return Ok((handle, rotate(shared, r).await?));
    }
    let mut owner_checked = false;
    loop {
        match shared
            .store
            .claim(id, &shared.replica)
            .await
            .map_err(|e| match e {
                StoreError::SessionClosed(_) => err(ErrorCode::Finished, None, "the session ended"),
                StoreError::UnknownSession(_) => err(
                    ErrorCode::UnknownSession,
                    None,
                    "unknown or expired session",
                ),
                e => store_error(&e),
            })? {
            Claim::OwnerAlive { owner } => {
                match shared.store.replica_address(&owner).await {
                    Ok(Some(url)) if url != shared.advertise_url => {
                        // A heartbeat outlives its process by up to its TTL: before sending the
                        // device to the owner, make sure something still listens there. A
                        // refused connection is a dead process; take its sessions now.
                        if !owner_checked && refuses_connections(&url).await {
                            owner_checked = true;
                            tracing::warn!(session = id.0, %owner, %url, "the owner refuses connections; expiring its heartbeat");
                            if let Err(e) = shared
                                .store
                                .heartbeat(&owner, Duration::from_millis(1))
                                .await
                            {
                                tracing::warn!(error = %e, "expiring a dead replica's heartbeat");
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        tracing::info!(session = id.0, %owner, "resume sent to the owner");
                        return Err(err(ErrorCode::Moved, None, &url));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "reading the owner's address"),
                }
                tracing::info!(session = id.0, %owner, "resume refused: the owner is alive");
                return Err(err(
                    ErrorCode::Unavailable,
                    None,
                    "another replica holds the session; retry",
                ));
            }
            Claim::Owned { .. } => {
                // Our process does not hold its state (another replica died, or we restarted):
                // rebuild it from the device's replay.
                let bytes = shared
                    .params
                    .get(id.0)
                    .await
                    .map_err(|e| {
                        tracing::warn!(error = %e, "reading the session's parameters");
                        err(
                            ErrorCode::Unavailable,
                            None,
                            "the session store is unavailable",
                        )
                    })?
                    .ok_or_else(|| {
                        err(
                            ErrorCode::UnknownSession,
                            None,
                            "the session's parameters expired",
                        )
                    })?;
                let Ok(Frame::Open(open)) = Frame::decode(&bytes) else {
                    return Err(err(ErrorCode::Internal, None, "internal error"));
                };
                let device_has = r.last_token_seq.map_or(0, |s| s.saturating_add(1));
                tracing::info!(session = id.0, device_has, "replaying a session taken over");
                // A rebuilt session is a new one here: admitted like an `Open`.
                let slot = admit(shared, user)?;
                // Rotated first: a session is not rebuilt for a device whose token lost the race.
                let token = rotate(shared, r).await?;
                return Ok((
                    spawn_session(shared, id.0, &open, device_has, slot).await?,
                    token,
                ));
            }
        }
    }
}

/// Whether nothing listens at a replica's advertised WebSocket URL: the TCP connection is
/// refused (a process that died). A timeout or any other answer is not taken as proof.
async fn refuses_connections(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
    else {
        return false;
    };
    let host_port = rest.split('/').next().unwrap_or_default();
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(host_port),
        )
        .await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Replaces the session's resume token before the device is attached, and returns the new
/// one (atomically: of two resumes racing with one token, the second gets
/// `unknown_session`).
async fn rotate(shared: &Arc<Shared>, r: &Resume) -> Result<[u8; 32], ErrorFrame> {
    let next = ResumeToken::generate();
    let id = store::SessionId(r.session.0);
    let old = ResumeToken::from_bytes(r.resume_token.0);
    match shared.store.rotate_resume(id, &old, next.hash()).await {
        Ok(()) => Ok(*next.as_bytes()),
        Err(StoreError::UnknownSession(_) | StoreError::BadResumeToken(_)) => Err(err(
            ErrorCode::UnknownSession,
            None,
            "unknown or expired session",
        )),
        Err(e) => Err(store_error(&e)),
    }
}
