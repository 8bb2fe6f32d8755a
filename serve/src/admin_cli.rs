//! `tandem admin`: the provider's command line over the `/v1/admin/...` routes of a running
//! server (tenants, API keys, quotas, device tokens).
//!
//! It speaks HTTP/1.1 over `https://` (rustls: the web roots plus `--ca-cert FILE` for a
//! private CA, the same client settings as the server's webhooks) or plain `http://` (the
//! loopback admin listener), one request per connection, and prints
//! the server's JSON answer on stdout. An error answer prints its code and message on stderr
//! and exits with status 1. The admin key comes from `--admin-key` or `TANDEM_ADMIN_KEY`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server::config::Secret;

/// The largest answer read.
const MAX_REPLY_BYTES: usize = 4 << 20;
/// The longest one exchange may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The server's operator listener (`tandem serve --admin-listen`; the public listener
    /// also serves the admin routes).
    #[arg(
        long = "admin-url",
        visible_alias = "url",
        env = "TANDEM_ADMIN_URL",
        default_value = "http://127.0.0.1:9091"
    )]
    pub url: String,
    /// A PEM file of certificate authorities to trust for an `https://` admin URL besides the
    /// web's public roots (a private CA).
    #[arg(long, env = "TANDEM_ADMIN_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// The provider's admin key. Prefer the environment: flags show in `ps`.
    #[arg(long, env = "TANDEM_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Secret,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Partner tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// A tenant's API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Users' device tokens.
    #[command(subcommand, name = "device-token")]
    DeviceToken(DeviceTokenCommand),
}

#[derive(Args, Debug, Clone, Copy)]
pub struct QuotaArgs {
    /// Prompts the tenant may submit per minute.
    #[arg(long, default_value_t = 60)]
    pub prompts_per_minute: u32,
    /// Tokens the tenant's prompts may generate per day (charged max_tokens × audience).
    #[arg(long, default_value_t = 1_000_000)]
    pub tokens_per_day: u64,
    /// Users one prompt may target.
    #[arg(long, default_value_t = 10_000)]
    pub max_audience: u32,
}

impl QuotaArgs {
    fn json(self) -> Value {
        json!({
            "prompts_per_minute": self.prompts_per_minute,
            "tokens_per_day": self.tokens_per_day,
            "max_audience": self.max_audience,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum TenantCommand {
    /// Create a tenant.
    Create {
        name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// List every tenant.
    List,
    /// Show one tenant.
    Show { tenant_id: String },
    /// Replace a tenant's quotas.
    Quotas {
        tenant_id: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// Replace the secret that signs a tenant's webhooks (the new one is printed once).
    WebhookSecret { tenant_id: String },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Issue a key (printed once).
    Issue { tenant_id: String },
    /// List a tenant's live keys (ids only).
    List { tenant_id: String },
    /// Revoke a key: refused from the next request on, on every replica.
    Revoke { tenant_id: String, key_id: String },
}

#[derive(Subcommand, Debug)]
pub enum DeviceTokenCommand {
    /// Issue a token for a user (printed once).
    Issue {
        user_id: String,
        /// Lifetime in seconds (default 30 days).
        #[arg(long)]
        ttl_seconds: Option<u64>,
    },
    /// Revoke a token by its id.
    Revoke { token_id: String },
}

/// One request: method, path, optional JSON body.
fn request(cmd: &AdminCommand) -> (&'static str, String, Option<Value>) {
    match cmd {
        AdminCommand::Tenant(t) => match t {
            TenantCommand::Create { name, quotas } => (
                "POST",
                "/v1/admin/tenants".into(),
                Some(json!({"name": name, "quotas": quotas.json()})),
            ),
            TenantCommand::List => ("GET", "/v1/admin/tenants".into(), None),
            TenantCommand::Show { tenant_id } => {
                ("GET", format!("/v1/admin/tenants/{tenant_id}"), None)
            }
            TenantCommand::Quotas { tenant_id, quotas } => (
                "PUT",
                format!("/v1/admin/tenants/{tenant_id}/quotas"),
                Some(quotas.json()),
            ),
            TenantCommand::WebhookSecret { tenant_id } => (
                "POST",
                format!("/v1/admin/tenants/{tenant_id}/webhook-secret"),
                None,
            ),
        },
        AdminCommand::Key(k) => match k {
            KeyCommand::Issue { tenant_id } => {
                ("POST", format!("/v1/admin/tenants/{tenant_id}/keys"), None)
            }
            KeyCommand::List { tenant_id } => {
                ("GET", format!("/v1/admin/tenants/{tenant_id}/keys"), None)
            }
            KeyCommand::Revoke { tenant_id, key_id } => (
                "DELETE",
                format!("/v1/admin/tenants/{tenant_id}/keys/{key_id}"),
                None,
            ),
        },
        AdminCommand::DeviceToken(d) => match d {
            DeviceTokenCommand::Issue {
                user_id,
                ttl_seconds,
            } => {
                let mut body = json!({"user_id": user_id});
                if let Some(ttl) = ttl_seconds {
                    body["ttl_seconds"] = json!(ttl);
                }
                ("POST", "/v1/admin/device-tokens".into(), Some(body))
            }
            DeviceTokenCommand::Revoke { token_id } => (
                "DELETE",
                format!("/v1/admin/device-tokens/{token_id}"),
                None,
            ),
        },
    }
}

/// An admin URL taken apart: `https://`, `host:port` to connect to, and the host name the
/// certificate must hold (no brackets, no port).
#[derive(Debug, PartialEq, Eq)]
struct AdminUrl {
    tls: bool,
    addr: String,
    host: String,
}

/// Parses `http(s)://host[:port][/]`.
fn admin_url(url: &str) -> Result<AdminUrl> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        bail!("--admin-url must start with https:// or http://: {url}");
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '@']) {
        bail!("--admin-url must be https://HOST[:PORT] with no path: {url}");
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let (host, has_port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let end = v6
                .find(']')
                .with_context(|| format!("bad IPv6 host in {url}"))?;
            (&v6[..end], v6[end + 1..].starts_with(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, _)) => (h, true),
            None => (authority, false),
        },
    };
    let addr = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    Ok(AdminUrl {
        tls,
        addr,
        host: host.to_owned(),
    })
}

/// What the server answered: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `host:port` and the path (with its query; `/` when empty) of an `http://` URL.
pub fn split_url(url: &str) -> Result<(String, String)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("only http:// URLs are supported (no TLS client here): {url}");
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() || host.contains('@') {
        bail!("bad URL {url}");
    }
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_owned()))
}

/// Sends one request to `url` (`https://host[:port]` or `http://…`) + `path` and reads the
/// whole answer. `ca_cert` is a PEM bundle trusted besides the web roots for `https://`.
pub async fn send(
    url: &str,
    ca_cert: Option<&std::path::Path>,
    admin_key: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply> {
    let target = admin_url(url)?;
    if !target.tls {
        return exchange(&target.addr, Some(admin_key), method, path, body).await;
    }
    let config = crate::server::tls::client_config(ca_cert)?;
    let body = body
        .map(serde_json::to_vec)
        .transpose()?
        .unwrap_or_default();
    let headers = request_headers(Some(admin_key), !body.is_empty());
    exchange_bytes_tls(
        &target.addr,
        &target.host,
        config,
        method,
        path,
        &headers,
        &body,
        TIMEOUT,
    )
    .await
}

/// [`exchange_bytes`] over TLS: the certificate must chain to `config`'s roots and name
/// `host`. A refused certificate is an [`AdminTlsError`].
#[allow(clippy::too_many_arguments)]
pub async fn exchange_bytes_tls(
    addr: &str,
    host: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<Reply> {
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .with_context(|| format!("`{host}` is not a server name"))?;
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(
                |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(t) => anyhow::Error::new(AdminTlsError(format!("TLS with {addr}: {t}"))),
                    None => anyhow::anyhow!("TLS handshake with {addr} failed: {e}"),
                },
            )?;
        exchange_on(tls, addr, method, path, headers, body).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("{addr} did not answer within {} s", timeout.as_secs()))?
}

/// The admin server's certificate was refused (an untrusted CA, an expired certificate, a
/// wrong host name): retrying cannot fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AdminTlsError(pub String);

fn request_headers(bearer: Option<&str>, has_body: bool) -> Vec<(String, String)> {
    let mut headers = vec![("Accept".to_owned(), "application/json".to_owned())];
    if let Some(token) = bearer {
        headers.push(("Authorization".to_owned(), format!("Bearer {token}")));
    }
    if has_body {
        headers.push(("Content-Type".to_owned(), "application/json".to_owned()));
    }
    headers
}

/// One HTTP/1.1 exchange with `addr` (`host:port`), bounded by [`TIMEOUT`].
pub async fn exchange(
    addr: &str,
    bearer: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply> {
    let body = body
        .map(serde_json::to_vec)
        .transpose()?
        .unwrap_or_default();
    let headers = request_headers(bearer, !body.is_empty());
    exchange_bytes(addr, method, path, &headers, &body, TIMEOUT).await
}

/// One HTTP/1.1 exchange of raw bytes with `addr` (`host:port`), with `headers` (besides
/// `Host`, `Connection`, `User-Agent` and `Content-Length`, which it writes itself), bounded
/// by `timeout`. Header values with line breaks are refused.
pub async fn exchange_bytes(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<Reply> {
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        exchange_on(stream, addr, method, path, headers, body).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("{addr} did not answer within {} s", timeout.as_secs()))?
}

/// [`exchange_bytes`] over a connected stream, with `host` as the `Host` header; not bounded
/// in time (the caller bounds it).
pub async fn exchange_on<S>(
    mut stream: S,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Reply>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         User-Agent: tandem\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        let skip = ["host", "connection", "user-agent", "content-length"];
        if skip.iter().any(|s| name.eq_ignore_ascii_case(s)) {
            continue;
        }
        if [name, value].iter().any(|s| s.contains(['\r', '\n'])) {
            bail!("a header holds a line break");
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_REPLY_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .await?;
    if raw.len() > MAX_REPLY_BYTES {
        bail!("the answer is over {MAX_REPLY_BYTES} bytes");
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<Reply> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the answer has no header end")?;
    let head = std::str::from_utf8(&raw[..split]).context("the answer's header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("the answer has no status")?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(Reply { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk")?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let start = eol + 2;
        let chunk = data.get(start..start + size).context("truncated chunk")?;
        out.extend_from_slice(chunk);
        data = data.get(start + size + 2..).unwrap_or_default();
    }
}

/// Runs the command; the exit status is 0 on a 2xx answer, 1 otherwise.
pub fn run(a: AdminArgs) -> Result<std::process::ExitCode> {
    let (method, path, body) = request(&a.command);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(send(
        &a.url,
        a.ca_cert.as_deref(),
        a.admin_key.expose(),
        method,
        &path,
        body.as_ref(),
    ))?;
    let json: Option<Value> = serde_json::from_slice(&reply.body).ok();
    if (200..300).contains(&reply.status) {
        match json {
            Some(v) => println!("{}", serde_json::to_string_pretty(&v)?),
            None if reply.body.is_empty() => println!("{{\"status\": {}}}", reply.status),
            None => println!("{}", String::from_utf8_lossy(&reply.body)),
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let (code, message) = json
        .as_ref()
        .map(|v| {
            (
                v["error"]["code"].as_str().unwrap_or("?").to_owned(),
                v["error"]["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .unwrap_or_else(|| {
            (
                "?".into(),
                String::from_utf8_lossy(&reply.body).into_owned(),
            )
        });
    eprintln!("error: HTTP {} {code}: {message}", reply.status);
    Ok(std::process::ExitCode::from(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_answers_parse() {
        let u = |tls: bool, addr: &str, host: &str| AdminUrl {
            tls,
            addr: addr.into(),
            host: host.into(),
        };
        assert_eq!(
            admin_url("http://127.0.0.1:8080").ok(),
            Some(u(false, "127.0.0.1:8080", "127.0.0.1"))
        );
        assert_eq!(
            admin_url("http://tandem/").ok(),
            Some(u(false, "tandem:80", "tandem"))
        );
        assert_eq!(
            admin_url("https://ops.example").ok(),
            Some(u(true, "ops.example:443", "ops.example"))
        );
        assert_eq!(
            admin_url("https://[::1]:9091/").ok(),
            Some(u(true, "[::1]:9091", "::1"))
        );
        assert!(admin_url("ftp://x").is_err());
        assert!(admin_url("http://x/v1").is_err());
        assert!(admin_url("https://u@x").is_err());
        let r = parse(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}").expect("reply");
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{}"[..]));
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
            .expect("chunked");
        assert_eq!(r.body, b"{}");
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
        assert_eq!(
            split_url("http://hooks.example:8080/a/b?c=1").ok(),
            Some(("hooks.example:8080".into(), "/a/b?c=1".into()))
        );
        assert_eq!(
            split_url("http://hooks.example").ok(),
            Some(("hooks.example:80".into(), "/".into()))
        );
        assert!(split_url("https://hooks.example/x").is_err());
        assert!(split_url("http://user@host/x").is_err());
    }
}
