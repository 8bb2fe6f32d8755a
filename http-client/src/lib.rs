//! Tandem's one HTTP client stack: the device's inbox calls, the admin CLI, partner webhooks,
//! the OTLP `http/protobuf` export and the load generator's `/metrics` scrape all send their
//! requests through here. hyper does the HTTP/1.1 (request framing, chunked or sized bodies,
//! header parsing); rustls (with ring) does TLS, with the web's roots plus any CAs the caller
//! adds ([`tls::client_config`]).
//!
//! One request per connection. What it does not do, on purpose: connection pooling (none of
//! its callers sends often enough to need one), redirects (a webhook's redirect is just a
//! status that is not 2xx), proxies and compression.
//!
//! Bounds: the whole exchange (connect, TLS, request, response head and body) runs under the
//! request's timeout; response heads are capped by hyper's buffer limit ([`MAX_HEAD_BYTES`])
//! and bodies at the request's `max_body_bytes`, checked against `Content-Length` before
//! reading and while reading.
//!
//! Errors are typed ([`HttpError`]): a refused certificate (`Tls`) is final, a transport
//! failure may be retried. A bearer token is marked sensitive on the request and never
//! appears in an error message.

#![forbid(unsafe_code)]

pub mod tls;
mod url;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

pub use hyper::body::Bytes;
pub use hyper::header;
pub use hyper::{Method, StatusCode};
pub use url::BaseUrl;

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What to send.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub method: Method,
    /// Path (and query) under the base URL's prefix, starting with `/`.
    pub path: &'a str,
    /// Sent as `Authorization: Bearer …`, marked sensitive.
    pub bearer: Option<&'a str>,
    /// More headers (`Host`, `Content-Length` and `User-Agent` are written by this crate).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body and its `Content-Type`; none sends no body (`Content-Length: 0` on a POST).
    pub body: Option<(Bytes, &'a str)>,
    /// Bounds the whole exchange.
    pub timeout: Duration,
    /// The longest response body accepted.
    pub max_body_bytes: usize,
    /// TLS settings, needed for an `https://` base ([`tls::client_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The `User-Agent` header.
    pub user_agent: &'a str,
}

impl<'a> Request<'a> {
    /// A request with no body, no bearer, no TLS settings, a 10 s timeout and a 1 MiB body
    /// limit.
    pub fn new(method: Method, path: &'a str) -> Self {
        Self {
            method,
            path,
            bearer: None,
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(10),
            max_body_bytes: 1 << 20,
            tls: None,
            user_agent: concat!("tandem/", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A response with its body read in full.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// `Retry-After` in seconds, when the server sent one in that form.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    }
}

/// Why an exchange failed before a full response was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// Connecting, writing, reading, or the timeout: a retry may succeed.
    Transport(String),
    /// The body is longer than the limit.
    TooLarge { limit: usize },
    /// The TLS handshake failed (an untrusted or expired certificate, a wrong host name, no
    /// common protocol) or no TLS settings were given: retrying cannot fix it.
    Tls(String),
    /// The request cannot be sent as given (a header value with a line break, a bad path).
    Request(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(s) | Self::Tls(s) | Self::Request(s) => f.write_str(s),
            Self::TooLarge { limit } => write!(f, "the response body is over {limit} bytes"),
        }
    }
}

impl std::error::Error for HttpError {}

/// Runs one request against `base` over a fresh connection (TLS for `https://`).
pub async fn send(base: &BaseUrl, req: Request<'_>) -> Result<Response, HttpError> {
    let timeout = req.timeout;
    match tokio::time::timeout(timeout, connect_and_exchange(base, req)).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(&base.to_string(), timeout)),
    }
}

/// Runs one request over a stream the caller connected (a webhook's checked address, after
/// its own TLS handshake), with `authority` as the `Host` header and `req.path` as the whole
/// request target; bounded by `req.timeout` too.
pub async fn send_over<S>(
    stream: S,
    authority: &str,
    req: Request<'_>,
) -> Result<Response, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = req.timeout;
    match tokio::time::timeout(timeout, exchange(stream, authority, "", req)).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(authority, timeout)),
    }
}

/// The TLS handshake as a client of `host` over `stream`; a refused certificate is
/// [`HttpError::Tls`].
pub async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HttpError> {
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| HttpError::Tls(format!("`{host}` is not a server name: {e}")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(
            |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(t) => HttpError::Tls(format!("TLS with {host}: {t}")),
                None => HttpError::Transport(format!("TLS handshake with {host} failed: {e}")),
            },
        )
}

fn timed_out(whom: &str, timeout: Duration) -> HttpError {
    HttpError::Transport(format!(
        "no complete answer from {whom} within {:.1} s",
        timeout.as_secs_f64()
    ))
}

/// Aborts the connection task when the exchange ends or is dropped (a timeout).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn connect_and_exchange(base: &BaseUrl, req: Request<'_>) -> Result<Response, HttpError> {
    let stream = TcpStream::connect((base.host(), base.port()))
        .await
        .map_err(|e| HttpError::Transport(format!("cannot connect to {base}: {e}")))?;
    let _ = stream.set_nodelay(true);
    if !base.is_tls() {
        return exchange(stream, base.authority(), base.prefix(), req).await;
    }
    let config = req
        .tls
        .clone()
        .ok_or_else(|| HttpError::Tls(format!("{base}: no TLS settings were given")))?;
    let tls = tls_connect(config, base.host(), stream).await?;
    exchange(tls, base.authority(), base.prefix(), req).await
}

/// The request as hyper sends it.
fn build(
    authority: &str,
    prefix: &str,
    req: &Request<'_>,
) -> Result<hyper::Request<Full<Bytes>>, HttpError> {
    let bad = |e: &dyn fmt::Display| HttpError::Request(format!("cannot build the request: {e}"));
    let mut builder = hyper::Request::builder()
        .method(req.method.clone())
        .uri(format!("{prefix}{}", req.path))
        .header(header::HOST, authority)
        .header(header::USER_AGENT, req.user_agent);
    if let Some(token) = req.bearer {
        let mut bearer = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| HttpError::Request("the token is not a valid header value".into()))?;
        bearer.set_sensitive(true);
        builder = builder.header(header::AUTHORIZATION, bearer);
    }
    for (name, value) in &req.headers {
        builder = builder.header(name, value);
    }
    let body = match &req.body {
        Some((bytes, content_type)) => {
            builder = builder
                .header(header::CONTENT_TYPE, *content_type)
                .header(header::CONTENT_LENGTH, bytes.len());
            bytes.clone()
        }
        None => {
            if req.method == Method::POST || req.method == Method::PUT {
                builder = builder.header(header::CONTENT_LENGTH, 0);
            }
            Bytes::new()
        }
    };
    builder.body(Full::new(body)).map_err(|e| bad(&e))
}

async fn exchange<S>(
    stream: S,
    authority: &str,
    prefix: &str,
    req: Request<'_>,
) -> Result<Response, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let transport = |what: &str, e: &dyn fmt::Display| HttpError::Transport(format!("{what}: {e}"));
    let request = build(authority, prefix, &req)?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        // `Content-Type`, not `content-type`: names are case-blind in HTTP/1.1, but some
        // receivers (and log greps) are not.
        .title_case_headers(true)
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| transport("HTTP handshake failed", &e))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        // Errors surface through `send_request` or the body; nothing to add here.
        let _ = conn.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| transport(&format!("{} {} failed", req.method, req.path), &e))?;
    let (parts, body) = response.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let limit = req.max_body_bytes;
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(HttpError::TooLarge { limit });
    }
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                HttpError::TooLarge { limit }
            } else {
                transport("reading the response failed", &e)
            }
        })?
        .to_bytes();
    Ok(Response {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot server that answers `answer` bytes to the first request and hands back the
    /// request it read.
    async fn serve_once(answer: &'static [u8]) -> (BaseUrl, JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer).await.expect("write");
            let _ = s.shutdown().await;
            got
        });
        let base = BaseUrl::parse(&format!("http://{addr}/api")).expect("base");
        (base, task)
    }

    #[tokio::test]
    async fn a_chunked_answer_is_read_and_the_request_carries_its_headers() {
        let (base, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
        let mut req = Request::new(Method::GET, "/metrics?x=1");
        req.bearer = Some("secret-token");
        let res = send(&base, req).await.expect("answer");
        assert_eq!(res.status, StatusCode::OK);
        assert_eq!(&res.body[..], b"hello world");
        assert_eq!(res.retry_after(), Some(Duration::from_secs(7)));
        let head = String::from_utf8(server.await.expect("server")).expect("utf-8");
        assert!(
            head.starts_with("GET /api/metrics?x=1 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Authorization: Bearer secret-token\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase().contains("host: 127.0.0.1:"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_by_its_length_and_while_reading() {
        let (base, _server) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789").await;
        let mut req = Request::new(Method::GET, "/");
        req.max_body_bytes = 10;
        assert_eq!(
            send(&base, req).await.expect_err("declared too long"),
            HttpError::TooLarge { limit: 10 }
        );
        let (base, _server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n01234567\r\n0\r\n\r\n",
        )
        .await;
        let mut req = Request::new(Method::GET, "/");
        req.max_body_bytes = 10;
        assert_eq!(
            send(&base, req).await.expect_err("read too long"),
            HttpError::TooLarge { limit: 10 }
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_https_without_settings_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _hold = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let base = BaseUrl::parse(&format!("http://{addr}")).expect("base");
        let mut req = Request::new(Method::GET, "/");
        req.timeout = Duration::from_millis(200);
        match send(&base, req).await {
            Err(HttpError::Transport(m)) => assert!(m.contains("within 0.2 s"), "{m}"),
            other => panic!("{other:?}"),
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let base = BaseUrl::parse(&format!("https://{addr}")).expect("base");
        assert!(matches!(
            send(&base, Request::new(Method::GET, "/")).await,
            Err(HttpError::Tls(_))
        ));
    }

    #[tokio::test]
    async fn a_header_with_a_line_break_is_not_sent() {
        let (base, _server) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let mut req = Request::new(Method::GET, "/");
        req.bearer = Some("a\r\nX-Injected: 1");
        assert!(matches!(send(&base, req).await, Err(HttpError::Request(_))));
    }
}
