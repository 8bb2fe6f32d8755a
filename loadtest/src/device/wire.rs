//! The device's WebSocket: the handshake (with its bearer token and timeout), one frame out,
//! one frame in, and [`Stop`], why a connection ends without `Done`.
//!
//! Every failure here is sorted once, into a retry (a new connection may do better: a
//! refused connection, a closed socket, a failed send) or a fatal stop (a refused credential,
//! a frame that does not decode), so the callers only pass it on with `?`.

use futures_util::{SinkExt, StreamExt};
use tandem_protocol::Frame;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Failure, CONNECT_TIMEOUT};

pub(super) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection ended without `Done`.
pub(super) enum Stop {
    /// Try again on a new connection.
    Retry(Failure),
    /// The server forgot the session: open a new one now and replay.
    Reopen,
    /// The generation cannot go on.
    Fatal(Failure),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Self::Fatal(f)
    }
}

/// The TCP + WebSocket handshake with `url`, presenting `token` (a device token) as a bearer
/// credential when given, within [`CONNECT_TIMEOUT`].
pub(super) async fn open(url: &str, token: Option<&str>) -> Result<Ws, Stop> {
    let mut request = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return Err(Stop::Retry(Failure::Connect(e.to_string()))),
    };
    if let Some(token) = token {
        let bearer = format!("Bearer {token}");
        match tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&bearer) {
            Ok(v) => {
                request.headers_mut().insert("authorization", v);
            }
            Err(e) => return Err(Stop::Retry(Failure::Connect(e.to_string()))),
        }
    }
    let connect = tokio_tungstenite::connect_async_with_config(
        request,
        Some(
            WebSocketConfig::default()
                .read_buffer_size(tandem_protocol::wire::WS_READ_BUFFER_BYTES),
        ),
        true, // no Nagle: frames are small and every one is waited for
    );
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        // A refused credential or a wrong path does not get better by retrying.
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(r)))
            if matches!(r.status().as_u16(), 401 | 403 | 404) =>
        {
            Err(Stop::Fatal(Failure::Connect(format!(
                "the upgrade was refused with {}",
                r.status()
            ))))
        }
        Ok(Err(e)) => Err(Stop::Retry(Failure::Connect(e.to_string()))),
        Err(_) => Err(Stop::Retry(Failure::Connect("timed out".into()))),
    }
}

pub(super) async fn send(ws: &mut Ws, frame: Bytes) -> Result<(), Stop> {
    ws.send(Message::Binary(frame))
        .await
        .map_err(|e| Stop::Retry(Failure::Disconnected(format!("send failed: {e}"))))
}

pub(super) async fn send_frame(ws: &mut Ws, frame: &Frame) -> Result<(), Stop> {
    let bytes = frame
        .encode()
        .map_err(|e| Failure::Protocol(format!("encoding {:?}: {e}", frame.frame_type())))?;
    send(ws, Bytes::from(bytes)).await
}

/// The next protocol frame.
pub(super) async fn recv(ws: &mut Ws) -> Result<Frame, Stop> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return Frame::decode(&b)
                    .map_err(|e| Stop::Fatal(Failure::Protocol(format!("bad frame: {e}"))))
            }
            Some(Ok(Message::Text(_))) => {
                return Err(Stop::Fatal(Failure::Protocol("a text message".into())));
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(Stop::Retry(Failure::Disconnected(
                    "the server closed the connection".into(),
                )))
            }
            Some(Err(e)) => return Err(Stop::Retry(Failure::Disconnected(e.to_string()))),
            Some(Ok(_)) => {} // WebSocket-level ping/pong
        }
    }
}
