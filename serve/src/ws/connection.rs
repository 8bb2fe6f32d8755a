//! One task per WebSocket connection: the edge of the server where bytes become valid values.
//!
//! The reader checks every message (binary only, size, the per-connection frame rate), decodes
//! it (`Hidden` without copying, then to f32 with shape and finiteness checked), runs the
//! `Open`/`Resume` handshake (`handshake/`), and forwards the rest to the session actor. A
//! writer task drains the connection's bounded outbound queue into the socket. Before a
//! session is attached, a bad frame is answered here and the connection closed; after, the
//! session answers it (so the error goes out in order with its tokens).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use tandem_protocol::wire::{
    peek_frame_type, ErrorCode, ErrorFrame, Frame, FrameType, HiddenRef, Limits,
};
use tandem_protocol::SessionId;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::Message;

use super::handshake::{err, open_session, resume_session};
use super::session::{CloseStatus, Conn, Input, Outbound, SessionCmd, SessionHandle};
use super::upgrade::{Gate, Socket};
use super::{stopped, Shared};
use crate::rest::store::prompts::UserId;

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

/// The connection's side of an attached session.
struct Attached {
    session: SessionId,
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
        tracing::debug!(conn = id, session = a.session.0, "detaching");
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
                bytes_out.inc_by(bytes.len() as u64);
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
                    .inc_by(b.len() as u64);
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
        tracing::debug!(conn = self.conn.id, session = handle.id.0, "attached");
        self.gate.lift();
        self.attached = Some(Attached {
            session: handle.id,
            tx: handle.tx,
        });
    }
}
