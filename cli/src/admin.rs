//! `tandem admin`: the provider's command line over the `/v1/admin/...` routes of a running
//! server (tenants, API keys, quotas, device tokens).
//!
//! It speaks HTTP/1.1 over `https://` (rustls: the web roots plus `--ca-cert FILE` for a
//! private CA, the same client settings as the server's webhooks) or plain `http://` (the
//! loopback admin listener), one request per connection (`tandem-http`), and prints
//! the server's JSON answer on stdout. An error answer prints its code and message on stderr
//! and exits with status 1. The admin key comes from `--admin-key` or `TANDEM_ADMIN_KEY`.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use tandem_serve::server::config::Secret;

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

/// Parses `--admin-url`: `http(s)://host[:port][/]`, no path (the routes are absolute).
fn admin_url(url: &str) -> Result<tandem_http::BaseUrl> {
    let base = tandem_http::BaseUrl::parse(url).map_err(|e| anyhow::anyhow!("--admin-url: {e}"))?;
    if !base.prefix().is_empty() {
        bail!("--admin-url must be https://HOST[:PORT] with no path: {url}");
    }
    Ok(base)
}

/// What the server answered: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends one request to `url` (`https://host[:port]` or `http://…`) + `path` and reads the
/// whole answer (through `tandem-http`, the project's one client). `ca_cert` is a PEM bundle
/// trusted besides the web roots for `https://`; a refused certificate is an
/// [`AdminTlsError`].
pub async fn send(
    url: &str,
    ca_cert: Option<&std::path::Path>,
    admin_key: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply> {
    let base = admin_url(url)?;
    let tls = match base.is_tls() {
        true => Some(tandem_http::tls::client_config_with(ca_cert).map_err(anyhow::Error::msg)?),
        false => None,
    };
    let method = tandem_http::Method::from_bytes(method.as_bytes())?;
    let body = body.map(serde_json::to_vec).transpose()?;
    let mut req = tandem_http::Request::new(method.clone(), path);
    req.bearer = Some(admin_key);
    req.headers.push((
        tandem_http::header::ACCEPT,
        tandem_http::header::HeaderValue::from_static("application/json"),
    ));
    req.body = body.map(|b| (tandem_http::Bytes::from(b), "application/json"));
    req.timeout = TIMEOUT;
    req.max_body_bytes = MAX_REPLY_BYTES;
    req.tls = tls;
    match tandem_http::send(&base, req).await {
        Ok(r) => Ok(Reply {
            status: r.status.as_u16(),
            body: r.body.to_vec(),
        }),
        Err(tandem_http::HttpError::Tls(m)) => Err(AdminTlsError(m).into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{method} {base}{path}"))),
    }
}

/// The admin server's certificate was refused (an untrusted CA, an expired certificate, a
/// wrong host name): retrying cannot fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AdminTlsError(pub String);

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
    fn admin_urls_parse() {
        let u = |url: &str| admin_url(url).map(|b| (b.is_tls(), b.host().to_owned(), b.port()));
        assert_eq!(
            u("http://127.0.0.1:8080").ok(),
            Some((false, "127.0.0.1".into(), 8080))
        );
        assert_eq!(u("http://tandem/").ok(), Some((false, "tandem".into(), 80)));
        assert_eq!(
            u("https://ops.example").ok(),
            Some((true, "ops.example".into(), 443))
        );
        assert_eq!(
            u("https://[::1]:9091/").ok(),
            Some((true, "::1".into(), 9091))
        );
        assert!(admin_url("ftp://x").is_err());
        assert!(admin_url("http://x/v1").is_err());
        assert!(admin_url("https://u@x").is_err());
    }
}
