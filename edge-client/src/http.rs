//! The smallest HTTP client the device's REST calls need: one request per connection,
//! HTTP/1.1 over a tokio `TcpStream` (`http://`) or over rustls (`https://`, with the same
//! client settings as `wss://`: [`crate::tls::client_config`]), with hyper doing the framing
//! (chunked or sized bodies, header parsing).
//!
//! What it does not do, on purpose: connection pooling (an inbox is polled now and then, not
//! hammered), redirects, proxies and compression.
//!
//! Bounds: the whole exchange (connect, request, response head and body) runs under one
//! timeout, response heads are capped by hyper's buffer limit and bodies at a caller-given
//! number of bytes, checked against `Content-Length` before reading and while reading.
//!
//! Privacy: the bearer token is marked sensitive on the request and never appears in an
//! error message; errors carry hyper's and the OS's descriptions only.

use std::fmt;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Largest response head (status line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A parsed `http(s)://host[:port][/prefix]` base URL. Paths given to [`send`] are appended to
/// the prefix.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ApiBase {
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// The host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    /// The path prefix without a trailing `/` (often empty).
    prefix: String,
    /// `https://`: the exchange runs over TLS.
    pub(crate) tls: bool,
}

impl fmt::Debug for ApiBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiBase({self})")
    }
}

impl fmt::Display for ApiBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.prefix)
    }
}

impl ApiBase {
    /// Parses a base URL; the error says what is wrong with it.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .trim()
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(format!(
                    "`{url}`: the scheme must be https or http, not {other}"
                ))
            }
            None => {
                return Err(format!(
                    "`{url}`: give a full URL such as https://HOST:PORT"
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{url}`: credentials in the URL are not supported (use the device token)"
            ));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        if uri.query().is_some() {
            return Err(format!("`{url}`: a base URL cannot have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            authority: authority.as_str().to_owned(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            prefix,
            tls,
        })
    }
}

/// A response with its body read in full.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub status: StatusCode,
    /// `Retry-After` in seconds, when the server sent one in that form.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// Why an exchange failed before a full response was read.
#[derive(Debug)]
pub(crate) enum HttpError {
    /// Connecting, writing, reading or the timeout.
    Transport(String),
    /// The body is longer than the limit.
    TooLarge { limit: usize },
    /// The TLS handshake failed (an untrusted or expired certificate, a wrong host name, no
    /// common protocol): retrying cannot fix it.
    Tls(String),
}

/// What to send.
#[derive(Debug)]
pub(crate) struct HttpRequest<'a> {
    pub method: Method,
    /// Path under the base's prefix, starting with `/`.
    pub path: &'a str,
    /// The bearer token (sent as `Authorization: Bearer …`, marked sensitive).
    pub bearer: &'a str,
    pub timeout: Duration,
    pub max_body_bytes: usize,
    /// The TLS settings, needed for an `https://` base.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Runs one request over a fresh connection.
pub(crate) async fn send(base: &ApiBase, req: HttpRequest<'_>) -> Result<HttpResponse, HttpError> {
    let timeout = req.timeout;
    match tokio::time::timeout(timeout, exchange(base, req)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Transport(format!(
            "no complete answer from {base} within {:.1} s",
            timeout.as_secs_f64()
        ))),
    }
}

/// Aborts the connection task when the exchange ends or is dropped (a timeout).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn exchange(base: &ApiBase, req: HttpRequest<'_>) -> Result<HttpResponse, HttpError> {
    let transport = |what: &str, e: &dyn fmt::Display| HttpError::Transport(format!("{what}: {e}"));
    let stream = TcpStream::connect((base.host.as_str(), base.port))
        .await
        .map_err(|e| transport(&format!("cannot connect to {base}"), &e))?;
    let _ = stream.set_nodelay(true);
    if !base.tls {
        return exchange_over(base, req, stream).await;
    }
    let config = req
        .tls
        .clone()
        .ok_or_else(|| HttpError::Tls(format!("{base}: no TLS settings were given")))?;
    let name = rustls::pki_types::ServerName::try_from(base.host.clone()).map_err(|e| {
        HttpError::Tls(format!("{base}: `{}` is not a server name: {e}", base.host))
    })?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(
            |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(t) => HttpError::Tls(format!("TLS with {base}: {t}")),
                None => transport(&format!("TLS handshake with {base} failed"), &e),
            },
        )?;
    exchange_over(base, req, tls).await
}

async fn exchange_over<S>(
    base: &ApiBase,
    req: HttpRequest<'_>,
    stream: S,
) -> Result<HttpResponse, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let transport = |what: &str, e: &dyn fmt::Display| HttpError::Transport(format!("{what}: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| transport("HTTP handshake failed", &e))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        // Errors surface through `send_request` or the body; nothing to add here.
        let _ = conn.await;
    }));

    let mut bearer = HeaderValue::try_from(format!("Bearer {}", req.bearer))
        .map_err(|_| HttpError::Transport("the token is not a valid header value".into()))?;
    bearer.set_sensitive(true);
    let mut builder = Request::builder()
        .method(req.method.clone())
        .uri(format!("{}{}", base.prefix, req.path))
        .header(header::HOST, base.authority.as_str())
        .header(header::AUTHORIZATION, bearer)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("tandem-edge/", env!("CARGO_PKG_VERSION")),
        );
    if req.method == Method::POST {
        builder = builder.header(header::CONTENT_LENGTH, "0");
    }
    let request = builder
        .body(Empty::<Bytes>::new())
        .map_err(|e| transport("cannot build the request", &e))?;

    let response = sender
        .send_request(request)
        .await
        .map_err(|e| transport(&format!("{} {} failed", req.method, req.path), &e))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let limit = req.max_body_bytes;
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(HttpError::TooLarge { limit });
    }
    let body = Limited::new(response.into_body(), limit)
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
    Ok(HttpResponse {
        status,
        retry_after,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse() {
        let b = ApiBase::parse("http://127.0.0.1:8080").expect("plain");
        assert_eq!(
            (b.host.as_str(), b.port, b.prefix.as_str()),
            ("127.0.0.1", 8080, "")
        );
        assert_eq!(b.to_string(), "http://127.0.0.1:8080");
        assert!(!b.tls);
        let b = ApiBase::parse("https://example.test/api").expect("https");
        assert!(b.tls);
        assert_eq!((b.port, b.prefix.as_str()), (443, "/api"));
        assert_eq!(b.to_string(), "https://example.test/api");
        let b = ApiBase::parse("http://example.test/tandem/").expect("prefix");
        assert_eq!((b.port, b.prefix.as_str()), (80, "/tandem"));
        assert_eq!(b.authority, "example.test");
        let b = ApiBase::parse("http://[::1]:9000").expect("ipv6");
        assert_eq!(
            (b.host.as_str(), b.authority.as_str()),
            ("::1", "[::1]:9000")
        );
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for (url, needle) in [
            ("ws://example.test", "must be https or http"),
            ("example.test:80", "full URL"),
            ("http://user:pw@example.test", "credentials"),
            ("http://example.test/?a=1", "query"),
            ("not a url", "not a URL"),
        ] {
            let err = ApiBase::parse(url).expect_err(url);
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
