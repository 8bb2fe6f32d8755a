//! The WebSocket upgrade of `/v1/edge/ws`: who is connecting, and how large a message may be
//! before the session exists.
//!
//! # Credentials
//! A device token in `Authorization: Bearer` is checked (signature, expiry, revocation, the
//! same check as the device REST routes) and names the session's user; without one the
//! upgrade is refused with 401 when the operator requires credentials
//! ([`ServerConfig::credential_required`](super::ServerConfig::credential_required)). A
//! token that does not verify is refused even when none is required: a misconfigured device
//! should learn it at once.
//!
//! # Messages before `Open`
//! Until the connection's `Open` or `Resume` is accepted, a WebSocket message may be at most
//! [`MAX_PRE_OPEN_MESSAGE_BYTES`] (the largest `Open` is about 5 KB); after it, the frame
//! limit (`max_frame_bytes` plus [`super::FRAME_LIMIT_SLACK`]) applies, enforced by
//! tungstenite at each frame's header. tungstenite cannot change its limits on a live
//! connection, so the upgrade is done here (not by axum's extractor) and the socket is read
//! through [`PreOpenLimit`], which follows the WebSocket frame headers in the byte stream
//! (RFC 6455 §5.2: two bytes, an extended length, a mask) and fails the read as soon as a
//! header declares a message over the small limit, before its payload is read. The
//! connection then answers `frame_too_large` and closes: a stranger cannot make the server
//! buffer more than one read (16 KiB) per connection before `Open`. Once the session is
//! attached, [`Gate::lift`] turns the scan off (it costs nothing after).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::{connection, Shared, FRAME_LIMIT_SLACK};
use crate::rest::device::{DeviceAuth, DEVICE_UNAUTHORIZED};
use crate::rest::error::ApiError;
use crate::rest::store::prompts::UserId;

/// The largest WebSocket message accepted before `Open`/`Resume` (fixed).
pub const MAX_PRE_OPEN_MESSAGE_BYTES: usize = 64 << 10;

/// The socket of an upgraded connection, as the connection task reads it.
pub(crate) type Socket = WebSocketStream<PreOpenLimit<TokioIo<hyper::upgrade::Upgraded>>>;

/// `GET /v1/edge/ws`: checks the upgrade and the credential, answers `101`, and serves the
/// connection once hyper hands the socket over.
pub(crate) async fn ws_upgrade(State(shared): State<Arc<Shared>>, mut req: Request) -> Response {
    let key = match upgrade_key(req.method(), req.headers()) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let user = match authenticate(&shared, req.headers()).await {
        Ok(u) => u,
        Err(e) => {
            shared.metrics.errors_total.with("unauthorized").inc();
            return e.into_response();
        }
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        )
            .into_response();
    };
    let transport_max = shared.cfg.max_frame_bytes.saturating_add(FRAME_LIMIT_SLACK);
    let config = WebSocketConfig::default()
        .max_message_size(Some(transport_max))
        .max_frame_size(Some(transport_max))
        .read_buffer_size(tandem_protocol::wire::WS_READ_BUFFER_BYTES);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "the upgrade failed");
                return;
            }
        };
        let gate = Arc::new(Gate::default());
        let io = PreOpenLimit::new(TokioIo::new(upgraded), gate.clone());
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        connection::serve_connection(shared, socket, user, gate).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
        .header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(Body::empty())
        .unwrap_or_else(|_| ApiError::internal().into_response())
}

/// The request's `Sec-WebSocket-Key` if it is a WebSocket upgrade (RFC 6455 §4.2.1), else the
/// 400 that says what is missing.
fn upgrade_key(method: &Method, headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if method != Method::GET {
        return Err(ApiError::method_not_allowed());
    }
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(ApiError::bad_request(
            "a WebSocket upgrade needs `Connection: upgrade` and `Upgrade: websocket`",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ApiError::bad_request("`Sec-WebSocket-Version` must be 13"));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or_else(|| ApiError::bad_request("`Sec-WebSocket-Key` is missing"))
}

/// The device token's user; `None` for an anonymous device where that is allowed.
async fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<Option<UserId>, ApiError> {
    match crate::rest::auth::bearer_in(headers) {
        Some(presented) => {
            let auth =
                DeviceAuth::check(&shared.device_key, shared.prompts.as_ref(), presented).await?;
            Ok(Some(auth.user))
        }
        None if shared.cfg.credential_required() => {
            Err(ApiError::unauthorized(DEVICE_UNAUTHORIZED))
        }
        None => Ok(None),
    }
}

/// Shared by a connection's reader ([`PreOpenLimit`]) and its task.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    lifted: AtomicBool,
    tripped: AtomicBool,
}

impl Gate {
    /// The session is attached: messages up to the frame limit from now on.
    pub(crate) fn lift(&self) {
        self.lifted.store(true, Ordering::Relaxed);
    }

    /// Whether the connection was cut for a message over the limit before `Open`.
    pub(crate) fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Relaxed)
    }
}

/// Where the scan is in the WebSocket byte stream.
#[derive(Debug, Default)]
struct FrameScan {
    /// The header read so far (at most 2 + 8 + 4 bytes).
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame not yet seen.
    payload_left: u64,
    /// Payload bytes of the current message so far (its frames up to the one with FIN).
    message: u64,
}

/// The length of a frame header whose second byte is `b1`.
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

impl FrameScan {
    /// Follows `bytes`; `Err(declared)` as soon as a message's payload passes `limit`.
    fn feed(&mut self, mut bytes: &[u8], limit: u64) -> Result<(), u64> {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have < 2 || self.have < header_len(self.header[1]) {
                continue;
            }
            let h = &self.header;
            let len = match h[1] & 0x7f {
                126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                n => u64::from(n),
            };
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            self.have = 0;
            // Data frames (continuation 0, text 1, binary 2) add to the message; control
            // frames (125 bytes at most, checked by tungstenite) do not.
            if opcode < 8 {
                self.message = self.message.saturating_add(len);
                if self.message > limit {
                    return Err(self.message);
                }
                if fin {
                    self.message = 0;
                }
            }
            self.payload_left = len;
        }
        Ok(())
    }
}

/// A stream that fails its reads once a WebSocket message over
/// [`MAX_PRE_OPEN_MESSAGE_BYTES`] begins, until its [`Gate`] is lifted.
#[derive(Debug)]
pub(crate) struct PreOpenLimit<S> {
    inner: S,
    gate: Arc<Gate>,
    scan: FrameScan,
}

impl<S> PreOpenLimit<S> {
    fn new(inner: S, gate: Arc<Gate>) -> Self {
        Self {
            inner,
            gate,
            scan: FrameScan::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PreOpenLimit<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.gate.lifted.load(Ordering::Relaxed) {
            let limit = MAX_PRE_OPEN_MESSAGE_BYTES as u64;
            if let Err(declared) = this.scan.feed(&buf.filled()[before..], limit) {
                this.gate.tripped.store(true, Ordering::Relaxed);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a message of at least {declared} bytes before Open"),
                )));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PreOpenLimit<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame header (masked) for a payload of `len` bytes.
    fn header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
        let mut h = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=0xffff => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&len.to_be_bytes());
            }
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = header(fin, opcode, len as u64);
        f.extend(std::iter::repeat_n(7u8, len));
        f
    }

    #[test]
    fn the_scan_follows_frames_in_any_split_and_stops_at_a_large_header() {
        let limit = 1000;
        let mut stream = Vec::new();
        stream.extend(frame(true, 2, 900)); // a binary message under the limit
        stream.extend(frame(true, 9, 4)); // a ping
        stream.extend(frame(false, 2, 600)); // a message in two fragments, 600 + 300
        stream.extend(frame(true, 10, 0)); // a pong between them
        stream.extend(frame(true, 0, 300));
        stream.extend(frame(true, 2, 70_000)); // over: 16-bit length
        for split in [1, 3, 7, 64, stream.len()] {
            let mut scan = FrameScan::default();
            let mut verdict = Ok(());
            let mut seen = 0;
            for chunk in stream.chunks(split) {
                verdict = scan.feed(chunk, limit);
                seen += chunk.len();
                if verdict.is_err() {
                    break;
                }
            }
            assert_eq!(verdict, Err(70_000), "split {split}");
            // Refused at the header: none of the large payload was needed.
            let header_end = stream.len() - 70_000;
            assert!(seen <= header_end + split, "split {split}: {seen}");
        }
        // A message over the limit in fragments, each under it.
        let mut scan = FrameScan::default();
        assert_eq!(scan.feed(&frame(false, 2, 600), limit), Ok(()));
        assert_eq!(scan.feed(&frame(true, 0, 600), limit), Err(1200));
        // A 64-bit length.
        let mut scan = FrameScan::default();
        assert_eq!(scan.feed(&header(true, 2, 1 << 40), limit), Err(1 << 40));
    }
}
