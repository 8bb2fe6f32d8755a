//! Opening a connection for a generation: picking the server (where a `moved` answer said
//! the session lives, else the next in turn), connecting (TLS, the upgrade with the device
//! token), sending `Open` for a new session or `Resume` for the current one, and waiting for
//! `Opened`. A resumed session gets every `Hidden` frame it lacks at once; a new session that
//! replaces one the cloud forgot gets the prompt at once and each decode frame once it has
//! produced that frame's token again ([`Driver::replay_on_token`]).
//!
//! Failures split as [`Stop`] says: TLS, a refused upgrade and refusals with a `1xx`, `2xx`
//! or `5xx` code end the generation; a dropped or silent connection, `3xx` codes and `moved`
//! try again.

use std::time::Duration;

use tandem_protocol::{ErrorCode, ErrorFrame, Frame, Open, Opened};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::Connector;

use super::{is_ws_url, send, Driver, Stop, Ws, MAX_REOPENS};
use crate::client::events::Event;
use crate::error::ClientError;
use crate::tls::{client_config, permanent_failure, upgrade_request};

impl Driver {
    /// Connects, sends `Open` or `Resume`, and waits for `Opened`.
    pub(super) async fn open(&mut self, attempt: usize) -> Result<Ws, Stop> {
        let mut ws = self.connect(attempt).await?;
        let first = self.first_frame();
        let resuming = self.session.is_some();
        // Frames already sent with no session to resume: the cloud forgot the session, and
        // this `Open` starts a new one that replays them.
        let reopening = !resuming && !self.sent.is_empty();
        self.replay = None;
        send(&mut ws, Bytes::from(first.encode()?)).await?;
        loop {
            let frame = match self.recv(&mut ws, self.cfg.idle_timeout).await? {
                Some(f) => f,
                None => continue,
            };
            match frame {
                Frame::Opened(o) => {
                    self.on_opened(&mut ws, o, resuming, reopening).await?;
                    return Ok(ws);
                }
                Frame::Error(e) => return Err(self.refused(e, resuming)),
                Frame::Ping { nonce } => {
                    send(&mut ws, Bytes::from(Frame::Pong { nonce }.encode()?)).await?
                }
                Frame::Pong { .. } => {}
                other => {
                    return Err(ClientError::Protocol(format!(
                        "{:?} frame before Opened",
                        other.frame_type()
                    ))
                    .into())
                }
            }
        }
    }

    /// The TCP + WebSocket connection (TLS for `wss://`) to where the session should go,
    /// within the connect timeout. A failure that retrying cannot fix
    /// ([`permanent_failure`]) is fatal; the rest are worth another try.
    async fn connect(&mut self, attempt: usize) -> Result<Ws, Stop> {
        let url = match self.redirect.take() {
            Some(url) => url,
            None => self.cfg.servers.pick(attempt).ok_or_else(|| {
                Stop::Fatal(ClientError::Request("no server URL to connect to".into()))
            })?,
        };
        let connector = self.tls_connector(&url)?;
        let request = upgrade_request(&url, self.cfg.device_token.as_ref()).map_err(|reason| {
            Stop::Fatal(ClientError::Connect {
                url: url.clone(),
                reason,
            })
        })?;
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(
                WebSocketConfig::default()
                    .read_buffer_size(tandem_protocol::wire::WS_READ_BUFFER_BYTES),
            ),
            true, // no Nagle: every frame is waited for
            connector,
        );
        match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(e)) => {
                if let Some(reason) = permanent_failure(&e) {
                    return Err(Stop::Fatal(ClientError::Connect { url, reason }));
                }
                Err(Stop::Retry(format!("connect to {url}: {e}")))
            }
            Err(_) => Err(Stop::Retry(format!("connect to {url}: timed out"))),
        }
    }

    /// For a `wss://` URL, rustls with the client's settings (built at its first such
    /// connection, then shared); `None` for `ws://`.
    fn tls_connector(&self, url: &str) -> Result<Option<Connector>, Stop> {
        if !url.starts_with("wss://") {
            return Ok(None);
        }
        let cfg = self
            .tls
            .get_or_init(|| client_config(&self.cfg.ca_certs))
            .clone()
            .map_err(|reason| {
                Stop::Fatal(ClientError::Connect {
                    url: url.to_owned(),
                    reason,
                })
            })?;
        Ok(Some(Connector::Rustls(cfg)))
    }

    /// `Open` for a new session, `Resume` for the one the device holds.
    fn first_frame(&self) -> Frame {
        match &self.session {
            None => Frame::Open(Open {
                manifest: self.manifest.clone(),
                split: self.split as u32,
                hidden_size: self.hidden_size as u32,
                dtype: self.cfg.dtype,
                sampling: self.req.sampling.clone(),
                max_tokens: self.req.max_tokens,
                stop: self.req.stop.clone(),
                prompt_id: self.req.prompt_id.clone(),
                traceparent: self.req.traceparent.clone(),
            }),
            Some((session, token)) => Frame::Resume(tandem_protocol::Resume {
                session: *session,
                resume_token: token.clone(),
                // The tokens it holds: those that count, then those of the answer under way.
                last_token_seq: ((self.tokens.len()
                    + self.awaiting.as_ref().map_or(0, |a| a.got.len()))
                    as u64)
                    .checked_sub(1),
            }),
        }
    }

    /// Takes `Opened`: checks it against what the device holds, then resends what a resumed
    /// session lacks, starts the replay into a new session that replaces a forgotten one, or
    /// (a new session) tells the caller.
    async fn on_opened(
        &mut self,
        ws: &mut Ws,
        o: Opened,
        resuming: bool,
        reopening: bool,
    ) -> Result<(), Stop> {
        if let Some((session, _)) = &self.session {
            if o.session != *session {
                return Err(ClientError::Protocol(format!(
                    "resumed session {} but the server answered for {}",
                    session, o.session
                ))
                .into());
            }
        }
        let next = o.next_hidden_seq;
        if next > self.sent.len() as u64 {
            return Err(ClientError::Protocol(format!(
                "the server wants hidden frames from {next}, but only {} were sent",
                self.sent.len()
            ))
            .into());
        }
        self.session = Some((o.session, o.resume_token));
        if resuming {
            self.stats.reconnects += 1;
            let resent = self.sent.len() as u64 - next;
            if next == 0 && resent > 0 {
                self.stats.replays += 1;
            }
            tracing::info!(session = %o.session, next_hidden_seq = next, resent, "session resumed");
            let _ = self.events.send(Event::Resumed {
                next_hidden_seq: next,
                resent,
            });
            self.stats.hidden_frames_resent += resent;
            return self.flush(ws, next as usize).await;
        }
        if reopening {
            return self.replay_reopened(ws, next).await;
        }
        tracing::info!(session = %o.session, "session opened");
        let _ = self.events.send(Event::Opened { session: o.session });
        Ok(())
    }

    /// Why the cloud's `Error` answer to `Open` or `Resume` ends this connection: `moved`
    /// (go where it says), a retryable code (after the wait it asks for), an unknown session
    /// that may be reopened ([`Self::may_reopen`]), or else the end of the generation.
    fn refused(&mut self, e: ErrorFrame, resuming: bool) -> Stop {
        if e.code == ErrorCode::Moved && is_ws_url(&e.message) {
            tracing::info!(to = %e.message, "the session lives on another replica");
            self.redirect = Some(e.message.clone());
            return Stop::Retry(format!("moved to {}", e.message));
        }
        if e.code.is_retryable() {
            // At most the policy's whole budget: a refusal cannot park the client.
            self.retry_after = e
                .retry_after_ms
                .map(|ms| Duration::from_millis(ms.into()).min(self.cfg.reconnect.max_elapsed));
            return Stop::Retry(format!("server error {}", e.code));
        }
        if resuming && self.may_reopen(e.code) {
            self.reopens += 1;
            tracing::warn!(
                reopen = self.reopens,
                "the cloud does not know the session; opening a new one to replay it"
            );
            self.session = None;
            return Stop::Retry("the cloud no longer knows the session; opening a new one".into());
        }
        ClientError::Server {
            code: e.code,
            message: e.message,
        }
        .into()
    }

    /// Whether an error answering `Resume` lets the device open a new session and replay
    /// what it holds instead: the session is unknown (the cloud lost it), the generation is
    /// not a partner prompt's (its ticket was single-use), and reopens are left.
    fn may_reopen(&self, code: ErrorCode) -> bool {
        code == ErrorCode::UnknownSession
            && self.req.prompt_id.is_none()
            && self.reopens < MAX_REOPENS
            && !self.cancel_requested
    }

    /// After `Opened` for a new session that replaces one the cloud forgot: sends what needs
    /// no token (the prompt), then paces the decode frames on the tokens the new session
    /// produces again ([`replay_on_token`](Self::replay_on_token)): the cloud accepts
    /// a decode step's hidden state only once it has produced that step's token. Tokens the
    /// caller already has are not delivered again.
    async fn replay_reopened(&mut self, ws: &mut Ws, next: u64) -> Result<(), Stop> {
        if next != 0 {
            return Err(ClientError::Protocol(format!(
                "a new session wants hidden frames from {next}, not 0"
            ))
            .into());
        }
        let upfront = if self.prompt_fed == self.req.prompt.len() {
            self.prompt_frames
        } else {
            self.sent.len()
        };
        self.stats.reconnects += 1;
        self.stats.replays += 1;
        self.stats.reopens += 1;
        let resent = self.sent.len() as u64;
        if let Some((session, _)) = &self.session {
            tracing::info!(session = %session, resent, tokens = self.tokens.len(), "new session opened; replaying");
        }
        let _ = self.events.send(Event::Resumed {
            next_hidden_seq: 0,
            resent,
        });
        self.stats.hidden_frames_resent += resent;
        for seq in 0..upfront {
            self.send_stored(ws, seq).await?;
        }
        self.replay_got = 0;
        if !self.tokens.is_empty() && upfront < self.sent.len() {
            self.replay = Some(upfront);
        }
        Ok(())
    }

    /// During a replay into a new session, the cloud sent a token again: once the answer to
    /// the last frame replayed is whole (a token, and one per draft row of that frame, or a
    /// draft token that ends the generation), the next stored frame may go (the cloud takes a
    /// complete frame only once the previous one is answered). The answer to the last stored
    /// frame is not consumed here: it is the one the device may still wait for. Returns
    /// whether the token was consumed.
    pub(super) async fn replay_on_token(
        &mut self,
        ws: &mut Ws,
        t: &tandem_protocol::Token,
    ) -> Result<bool, Stop> {
        let Some(next) = self.replay else {
            return Ok(false);
        };
        if next >= self.sent.len() {
            self.replay = None;
            return Ok(false);
        }
        if t.input_seq + 1 != next as u64 {
            return Ok(true); // an answer to an earlier frame: the caller has it
        }
        self.replay_got += 1;
        let drafts = usize::from(self.sent[next - 1].get(22).copied().unwrap_or(0));
        if self.replay_got < 1 + drafts && !t.last {
            return Ok(true);
        }
        self.replay_got = 0;
        self.send_stored(ws, next).await?;
        self.replay = (next + 1 < self.sent.len()).then_some(next + 1);
        Ok(true)
    }
}
