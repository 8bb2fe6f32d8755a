//! HTTP plumbing of the endpoint on hyper's HTTP/1.1 server: the response body (whole, or
//! a Server-Sent Events stream fed through a channel), JSON answers, and reading a request
//! body under a size limit.
//!
//! A streamed body ends when its sender is dropped; when the client goes away hyper drops
//! the body, the receiver with it, and the sender's next `send` fails, which is how the
//! generation behind a stream learns to stop.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

use super::api::ApiError;

/// Largest request body accepted (a long conversation fits many times over).
pub(crate) const MAX_BODY_BYTES: usize = 4 << 20;

/// Events buffered ahead of a slow client before the generation waits for it.
pub(crate) const STREAM_BUFFER: usize = 64;

/// A response body: whole, or Server-Sent Events as they are produced.
#[derive(Debug)]
pub(crate) enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Full(Some(b)) => hyper::body::SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => hyper::body::SizeHint::with_exact(0),
            Self::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// A JSON answer.
pub(crate) fn json(status: u16, value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_type(status, "application/json", Body::Full(Some(bytes.into()))),
        Err(_) => with_type(500, "text/plain", Body::Full(Some("serialization".into()))),
    }
}

/// An error answer in OpenAI's shape.
pub(crate) fn error(e: &ApiError) -> Response<Body> {
    json(e.status, &e.body())
}

/// A Server-Sent Events answer fed by the returned sender.
pub(crate) fn sse() -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let mut res = with_type(200, "text/event-stream", Body::Stream(rx));
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (tx, res)
}

/// One SSE event: `data: {json}` and a blank line.
pub(crate) fn event(value: &impl Serialize) -> Bytes {
    let mut out = b"data: ".to_vec();
    // Serializing these plain structs cannot fail; an empty object keeps the framing.
    if serde_json::to_writer(&mut out, value).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    out.into()
}

/// The stream's last event.
pub(crate) const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

fn with_type(status: u16, content_type: &'static str, body: Body) -> Response<Body> {
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// Reads a JSON request body of at most [`MAX_BODY_BYTES`].
pub(crate) async fn read_json(req: Request<Incoming>) -> Result<serde_json::Value, ApiError> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !is_json {
        return Err(ApiError::bad_request(
            "the request body must be JSON (Content-Type: application/json)",
        ));
    }
    let bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| {
            ApiError::bad_request(format!(
                "the request body could not be read or exceeds {MAX_BODY_BYTES} bytes"
            ))
        })?
        .to_bytes();
    // serde_json's messages give the position and what was expected, never the text.
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}
