//! Where a webhook may be sent: the guard against server-side request forgery.
//!
//! A partner names a `webhook_url` and the server connects to it, so without a guard a
//! partner could make the server `POST` to anything it can reach: its own loopback
//! services, the cloud's metadata endpoint (`169.254.169.254`), Redis, other pods. The
//! guard refuses, unless the operator allow-listed the target ([`WebhookPolicy`]):
//!
//! - any scheme but `https://`; `http://` only with `webhook_allow_http`;
//! - user info in the URL, and the names `localhost` and `*.localhost`;
//! - any address that is not public unicast ([`forbidden_reason`]): loopback, private
//!   (RFC 1918, `fc00::/7`), link-local, CGNAT (`100.64/10`), multicast, unspecified,
//!   broadcast, documentation, benchmarking and reserved ranges, and IPv6 forms that embed
//!   an IPv4 address (mapped `::ffff:0:0/96`, compatible `::/96`, NAT64 `64:ff9b::/96`, 6to4
//!   `2002::/16`, Teredo) when the embedded address is refused, or always where it cannot be
//!   told.
//!
//! Numeric host spellings (`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`) are read the
//! way browsers read them (the WHATWG URL parser of the `url` crate), so they are checked as
//! the address they stand for, and the connection goes to that parsed address, never to the
//! spelling.
//!
//! # Two checks
//! On submission ([`WebhookPolicy::check_submitted`]) the URL is parsed and a name resolved
//! (bounded by [`SUBMIT_RESOLVE_TIMEOUT`]; a name that does not resolve then is accepted and
//! left to the second check). On every delivery ([`WebhookPolicy::connect`]) the name is
//! resolved once, every address is checked (one refused address refuses the target), and the
//! connection goes to one of those checked addresses: a name that resolved to a public
//! address at submission and to `127.0.0.1` later (DNS rebinding) is refused then. The
//! sender follows no redirects.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use url::{Host, Url};

/// The longest webhook URL.
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;

/// How long submission waits for a name to resolve.
pub const SUBMIT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a delivery waits for a name to resolve.
pub const DELIVERY_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a webhook target is refused. The messages name `webhook_url` and are written for the
/// partner.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("webhook_url must be an absolute https:// URL of at most {MAX_WEBHOOK_URL_LEN} characters without spaces")]
    Malformed,
    #[error(
        "webhook_url must use https:// (this server does not send webhooks over plain http://)"
    )]
    PlainHttp,
    #[error("webhook_url must use https://, not {0}://")]
    Scheme(String),
    #[error("webhook_url must not hold a user name or password")]
    UserInfo,
    #[error("webhook_url must name a public host, not {0}")]
    LocalName(String),
    #[error("webhook_url must reach a public address; {host} is {reason} ({addr})")]
    Forbidden {
        host: String,
        addr: IpAddr,
        reason: &'static str,
    },
    /// Delivery only: the name did not resolve (in time).
    #[error("webhook_url host {0} did not resolve")]
    Unresolved(String),
}

/// One operator allow-list entry (`--webhook-allow-host`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum AllowRule {
    /// A host name (lowercase, as the URL parser writes it): every address it resolves to is
    /// allowed.
    Name { name: String, port: Option<u16> },
    /// Addresses in a network (one address: a /32 or /128).
    Net { net: Cidr, port: Option<u16> },
}

impl AllowRule {
    fn port_ok(port: Option<u16>, p: u16) -> bool {
        port.is_none_or(|want| want == p)
    }
}

/// Which webhook targets the operator lets through. `Default`: https only, nothing internal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebhookPolicy {
    allow_http: bool,
    allow: Vec<AllowRule>,
}

/// A parsed webhook URL whose form passed the checks (its addresses are checked when it is
/// resolved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    url: Url,
    host: Host<String>,
    port: u16,
}

impl Target {
    pub fn is_https(&self) -> bool {
        self.url.scheme() == "https"
    }

    /// The name a TLS certificate must carry: the URL's host name or IP address.
    pub fn server_name(&self) -> anyhow::Result<rustls::pki_types::ServerName<'static>> {
        use rustls::pki_types::{IpAddr as TlsIp, ServerName};
        Ok(match &self.host {
            Host::Domain(d) => ServerName::try_from(d.clone())
                .map_err(|e| anyhow::anyhow!("{d} is not a TLS server name: {e}"))?,
            Host::Ipv4(ip) => ServerName::IpAddress(TlsIp::from(*ip)),
            Host::Ipv6(ip) => ServerName::IpAddress(TlsIp::from(*ip)),
        })
    }

    /// The `Host` header: the host as the parser wrote it, with the port unless it is the
    /// scheme's default.
    pub fn host_header(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        match self.url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        }
    }

    /// The path and query (no fragment).
    pub fn path_and_query(&self) -> String {
        match self.url.query() {
            Some(q) => format!("{}?{q}", self.url.path()),
            None => self.url.path().to_owned(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Resolves `(host, port)` to addresses. The default is the system resolver; tests pass
/// their own to play a rebinding DNS.
pub type Resolver = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver (`getaddrinfo` on a blocking thread).
pub fn system_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    })
}

impl WebhookPolicy {
    /// `allow_http`: accept `http://` targets. `allow`: entries `HOST[:PORT]`, `IP[:PORT]`
    /// (`[v6]:PORT`) or `CIDR`, which pass the address checks (not the scheme check).
    pub fn new(allow_http: bool, allow: &[String]) -> Result<Self, String> {
        let allow = allow
            .iter()
            .map(|s| parse_rule(s).ok_or_else(|| format!("webhook allow entry {s:?}: expected HOST[:PORT], IP[:PORT], [IPv6]:PORT or CIDR")))
            .collect::<Result<_, _>>()?;
        Ok(Self { allow_http, allow })
    }

    pub fn allows_http(&self) -> bool {
        self.allow_http
    }

    /// Checks the URL's form and, for an address literal, the address. No I/O.
    pub fn parse(&self, raw: &str) -> Result<Target, TargetError> {
        if raw.len() > MAX_WEBHOOK_URL_LEN
            || raw.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(TargetError::Malformed);
        }
        // Written plainly: `scheme://host`, no extra slashes or backslashes the parser would
        // forgive.
        let after_scheme = raw.split_once("://").map(|(_, rest)| rest);
        if after_scheme.is_none_or(|rest| rest.starts_with(['/', '\\'])) {
            return Err(TargetError::Malformed);
        }
        let url = Url::parse(raw).map_err(|_| TargetError::Malformed)?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => return Err(TargetError::PlainHttp),
            other => return Err(TargetError::Scheme(other.to_owned())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(TargetError::UserInfo);
        }
        let host = url.host().ok_or(TargetError::Malformed)?.to_owned();
        let port = url.port_or_known_default().ok_or(TargetError::Malformed)?;
        let target = Target { url, host, port };
        match &target.host {
            Host::Domain(name) => {
                let bare = name.trim_end_matches('.');
                if bare.is_empty() {
                    return Err(TargetError::Malformed);
                }
                if (bare == "localhost" || bare.ends_with(".localhost"))
                    && !self.name_allowed(name, port)
                {
                    return Err(TargetError::LocalName(name.clone()));
                }
            }
            Host::Ipv4(ip) => self.check_addr(&target, SocketAddr::new((*ip).into(), port))?,
            Host::Ipv6(ip) => self.check_addr(&target, SocketAddr::new((*ip).into(), port))?,
        }
        Ok(target)
    }

    /// The submission check: [`Self::parse`], then a name resolved (within
    /// [`SUBMIT_RESOLVE_TIMEOUT`]) and every address checked. A name that does not resolve
    /// now passes (delivery checks again).
    pub async fn check_submitted(
        &self,
        raw: &str,
        resolver: &Resolver,
    ) -> Result<Target, TargetError> {
        let target = self.parse(raw)?;
        match self
            .resolve(&target, resolver, SUBMIT_RESOLVE_TIMEOUT)
            .await
        {
            Ok(_) | Err(TargetError::Unresolved(_)) => Ok(target),
            Err(e) => Err(e),
        }
    }

    /// Resolves the target once and checks every address: the addresses it may connect to.
    pub async fn resolve(
        &self,
        target: &Target,
        resolver: &Resolver,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, TargetError> {
        let addrs = match &target.host {
            Host::Ipv4(ip) => vec![SocketAddr::new((*ip).into(), target.port)],
            Host::Ipv6(ip) => vec![SocketAddr::new((*ip).into(), target.port)],
            Host::Domain(name) => {
                let unresolved = || TargetError::Unresolved(name.clone());
                let found = tokio::time::timeout(timeout, resolver(name.clone(), target.port))
                    .await
                    .map_err(|_| unresolved())?
                    .map_err(|_| unresolved())?;
                if found.is_empty() {
                    return Err(unresolved());
                }
                // The port is the URL's whatever the resolver says.
                found
                    .into_iter()
                    .map(|a| SocketAddr::new(a.ip(), target.port))
                    .collect()
            }
        };
        for a in &addrs {
            self.check_addr(target, *a)?;
        }
        Ok(addrs)
    }

    /// Resolves once, checks every address, and connects to the first checked address that
    /// answers (never to the name, so nothing resolves it again in between).
    pub async fn connect(&self, target: &Target, resolver: &Resolver) -> anyhow::Result<TcpStream> {
        let addrs = self
            .resolve(target, resolver, DELIVERY_RESOLVE_TIMEOUT)
            .await?;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(anyhow::anyhow!("connecting to {a}: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no address to connect to")))
    }

    fn name_allowed(&self, name: &str, port: u16) -> bool {
        let name = name.trim_end_matches('.');
        self.allow.iter().any(|r| match r {
            AllowRule::Name { name: n, port: p } => n == name && AllowRule::port_ok(*p, port),
            AllowRule::Net { .. } => false,
        })
    }

    fn check_addr(&self, target: &Target, addr: SocketAddr) -> Result<(), TargetError> {
        if let Host::Domain(name) = &target.host {
            if self.name_allowed(name, addr.port()) {
                return Ok(());
            }
        }
        let ip = canonical(addr.ip());
        let listed = self.allow.iter().any(|r| match r {
            AllowRule::Net { net, port } => {
                (net.contains(ip) || net.contains(addr.ip()))
                    && AllowRule::port_ok(*port, addr.port())
            }
            AllowRule::Name { .. } => false,
        });
        match forbidden_reason(addr.ip()) {
            Some(reason) if !listed => Err(TargetError::Forbidden {
                host: target.url.host_str().unwrap_or_default().to_owned(),
                addr: addr.ip(),
                reason,
            }),
            _ => Ok(()),
        }
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address; anything else unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_rule(s: &str) -> Option<AllowRule> {
    let s = s.trim();
    if let Some((addr, bits)) = s.split_once('/') {
        let addr: IpAddr = addr.parse().ok()?;
        let bits: u8 = bits.parse().ok()?;
        return Cidr::new(addr, bits).map(|net| AllowRule::Net { net, port: None });
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(AllowRule::Net {
            net: Cidr::host(a.ip()),
            port: Some(a.port()),
        });
    }
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Some(AllowRule::Net {
            net: Cidr::host(ip),
            port: None,
        });
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().ok()?)),
        None => (s, None),
    };
    // Read as the URL parser reads hosts (lowercase, IDNA, numeric forms as addresses).
    match Host::parse(host).ok()? {
        Host::Domain(name) if !name.is_empty() => Some(AllowRule::Name {
            name: name.trim_end_matches('.').to_owned(),
            port,
        }),
        Host::Domain(_) => None,
        Host::Ipv4(ip) => Some(AllowRule::Net {
            net: Cidr::host(ip.into()),
            port,
        }),
        Host::Ipv6(ip) => Some(AllowRule::Net {
            net: Cidr::host(ip.into()),
            port,
        }),
    }
}

/// An address block.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl Cidr {
    pub fn new(addr: IpAddr, bits: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (bits <= max).then_some(Self { addr, bits })
    }

    fn host(addr: IpAddr) -> Self {
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, bits }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), 32, self.bits)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), 128, self.bits)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, width: u32, bits: u8) -> bool {
    let bits = u32::from(bits);
    if bits == 0 {
        return true;
    }
    let shift = width - bits;
    (a >> shift) == (b >> shift)
}

const fn v4(a: u8, b: u8, c: u8, d: u8, bits: u8) -> (u32, u8) {
    (u32::from_be_bytes([a, b, c, d]), bits)
}

/// IPv4 blocks that are not public unicast, with what they are.
const V4_REFUSED: &[((u32, u8), &str)] = &[
    (
        v4(0, 0, 0, 0, 8),
        "the unspecified / this-network block 0.0.0.0/8",
    ),
    (v4(10, 0, 0, 0, 8), "private (RFC 1918)"),
    (
        v4(100, 64, 0, 0, 10),
        "carrier-grade NAT space (100.64.0.0/10)",
    ),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (
        v4(169, 254, 0, 0, 16),
        "link-local (cloud metadata lives here)",
    ),
    (v4(172, 16, 0, 0, 12), "private (RFC 1918)"),
    (
        v4(192, 0, 0, 0, 24),
        "reserved for IETF protocol assignments",
    ),
    (v4(192, 0, 2, 0, 24), "documentation space"),
    (v4(192, 88, 99, 0, 24), "the 6to4 relay anycast block"),
    (v4(192, 168, 0, 0, 16), "private (RFC 1918)"),
    (v4(198, 18, 0, 0, 15), "benchmarking space"),
    (v4(198, 51, 100, 0, 24), "documentation space"),
    (v4(203, 0, 113, 0, 24), "documentation space"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved (or broadcast)"),
];

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let x = u32::from(ip);
    V4_REFUSED
        .iter()
        .find(|((net, bits), _)| prefix_eq(u128::from(*net), u128::from(x), 32, *bits))
        .map(|(_, why)| *why)
}

fn v6_in(ip: Ipv6Addr, net: [u16; 8], bits: u8) -> bool {
    prefix_eq(u128::from(Ipv6Addr::from(net)), u128::from(ip), 128, bits)
}

/// The IPv4 address in the low 32 bits.
fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::try_from(u128::from(ip) & 0xffff_ffff).unwrap_or_default())
}

/// Why `ip` is not a public unicast address, or `None` if it is.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    let v6 = match ip {
        IpAddr::V4(v4) => return v4_reason(v4),
        IpAddr::V6(v6) => v6,
    };
    if v6.is_unspecified() {
        return Some("unspecified");
    }
    if v6.is_loopback() {
        return Some("loopback");
    }
    // Forms that carry an IPv4 address: refused when that address is.
    if let Some(mapped) = v6.to_ipv4_mapped() {
        return v4_reason(mapped).or(None);
    }
    if v6_in(v6, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return v4_reason(low_v4(v6)).map(|_| "NAT64 of a non-public IPv4 address");
    }
    if v6_in(v6, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        let seg = v6.segments();
        let inner = Ipv4Addr::from((u32::from(seg[1]) << 16) | u32::from(seg[2]));
        return v4_reason(inner).map(|_| "6to4 of a non-public IPv4 address");
    }
    let blocks: &[([u16; 8], u8, &str)] = &[
        ([0, 0, 0, 0, 0, 0, 0, 0], 96, "IPv4-compatible (deprecated)"),
        ([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "IPv4-mapped"),
        ([0, 0, 0, 0, 0xffff, 0, 0, 0], 96, "IPv4-translated"),
        ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use NAT64"),
        ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only"),
        (
            [0x2001, 0, 0, 0, 0, 0, 0, 0],
            23,
            "IETF protocol assignments (Teredo, benchmarking)",
        ),
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation space"),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation space"),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local (private)"),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (deprecated)"),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
    ];
    blocks
        .iter()
        .find(|(net, bits, _)| v6_in(v6, *net, *bits))
        .map(|(_, _, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_dns() -> Resolver {
        Arc::new(|_, _| Box::pin(async { Err(io::Error::other("no DNS in tests")) }))
    }

    fn fixed(addrs: Vec<IpAddr>) -> Resolver {
        Arc::new(move |_, port| {
            let a = addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
            Box::pin(async move { Ok(a) })
        })
    }

    #[test]
    fn internal_addresses_are_refused_in_every_spelling() {
        let p = WebhookPolicy::default();
        for bad in [
            "https://127.0.0.1/x",
            "https://127.0.0.1:8443/x",
            "https://localhost/x",
            "https://LOCALHOST./x",
            "https://api.localhost/x",
            "https://[::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://[::ffff:7f00:1]/x",
            "https://[::127.0.0.1]/x",
            "https://[64:ff9b::a9fe:a9fe]/x",
            "https://[2002:7f00:1::]/x",
            "https://[fe80::1]/x",
            "https://[fd00::1]/x",
            "https://[ff02::1]/x",
            "https://[::]/x",
            "https://2130706433/x",
            "https://0x7f000001/x",
            "https://0177.0.0.1/x",
            "https://127.1/x",
            "https://0/x",
            "https://169.254.169.254/latest/meta-data",
            "https://10.1.2.3/x",
            "https://172.16.0.1/x",
            "https://192.168.1.1/x",
            "https://100.64.0.1/x",
            "https://224.0.0.1/x",
            "https://255.255.255.255/x",
            "https://192.0.2.1/x",
            "https://198.18.0.1/x",
        ] {
            let e = p.parse(bad).expect_err(bad);
            assert!(e.to_string().starts_with("webhook_url"), "{bad}: {e}");
            assert!(
                matches!(e, TargetError::Forbidden { .. } | TargetError::LocalName(_)),
                "{bad}: {e:?}"
            );
        }
        for good in [
            "https://partner.example/hook",
            "https://93.184.215.14/x",
            "https://0x08080808/x",
            "https://[2606:4700::1111]/x",
            "https://[::ffff:8.8.8.8]/x",
            "https://[64:ff9b::808:808]/x",
        ] {
            assert!(p.parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn forms_and_schemes_are_checked() {
        let p = WebhookPolicy::default();
        assert_eq!(
            p.parse("http://partner.example/h"),
            Err(TargetError::PlainHttp)
        );
        assert!(matches!(p.parse("ftp://x/"), Err(TargetError::Scheme(_))));
        assert!(matches!(
            p.parse("file://etc/passwd"),
            Err(TargetError::Scheme(_))
        ));
        assert_eq!(
            p.parse("https://u:p@partner.example/"),
            Err(TargetError::UserInfo)
        );
        for bad in [
            "",
            "https://",
            "https:///path",
            "https:/\\\\host/",
            "https:\\\\host/",
            "https://a b",
            "javascript:alert(1)",
            "/relative",
        ] {
            assert!(p.parse(bad).is_err(), "{bad}");
        }
        let long = format!(
            "https://partner.example/{}",
            "a".repeat(MAX_WEBHOOK_URL_LEN)
        );
        assert_eq!(p.parse(&long), Err(TargetError::Malformed));
        let http = WebhookPolicy::new(true, &[]).expect("policy");
        assert!(http.parse("http://partner.example/h").is_ok());
        // Allowing http allows nothing internal.
        assert!(http.parse("http://127.0.0.1:9/h").is_err());
        let t = http
            .parse("http://partner.example:8080/a/b?x=1#frag")
            .expect("ok");
        assert_eq!(t.host_header(), "partner.example:8080");
        assert_eq!(t.path_and_query(), "/a/b?x=1");
        assert_eq!(
            http.parse("https://Partner.Example/")
                .expect("ok")
                .host_header(),
            "partner.example"
        );
    }

    #[test]
    fn the_allow_list_lets_named_targets_through() {
        let p = WebhookPolicy::new(
            true,
            &[
                "127.0.0.1:9000".into(),
                "hooks.internal".into(),
                "10.20.0.0/16".into(),
                "[::1]:443".into(),
            ],
        )
        .expect("policy");
        assert!(p.parse("http://127.0.0.1:9000/h").is_ok());
        assert!(
            p.parse("http://2130706433:9000/h").is_ok(),
            "the same address"
        );
        assert!(p.parse("http://127.0.0.1:9001/h").is_err(), "another port");
        assert!(p.parse("http://127.0.0.2:9000/h").is_err());
        assert!(p.parse("http://10.20.3.4/h").is_ok());
        assert!(p.parse("http://10.21.3.4/h").is_err());
        assert!(p.parse("https://[::1]/h").is_ok());
        assert!(
            p.parse("https://[::ffff:10.20.0.1]/h").is_ok(),
            "mapped form of a listed net"
        );
        for bad in ["", "10.0.0.0/33", "a:b", "host:99999", "::1/200"] {
            assert!(
                WebhookPolicy::new(false, &[bad.to_owned()]).is_err(),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn every_resolved_address_is_checked_at_connect_time() {
        // A name that resolves to an internal address (DNS rebinding: it may have resolved
        // to a public one at submission) is refused, and nothing connects to the listener.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let p = WebhookPolicy::new(true, &[]).expect("policy");
        let t = p
            .parse(&format!("http://rebind.test:{port}/h"))
            .expect("form ok");
        let public = fixed(vec!["93.184.215.14".parse().expect("ip")]);
        assert!(p
            .check_submitted(&format!("http://rebind.test:{port}/h"), &public)
            .await
            .is_ok());
        for addrs in [
            vec!["127.0.0.1".parse().expect("ip")],
            vec![
                "93.184.215.14".parse().expect("ip"),
                "127.0.0.1".parse().expect("ip"),
            ],
            vec!["::ffff:127.0.0.1".parse().expect("ip")],
            vec!["169.254.169.254".parse().expect("ip")],
        ] {
            let e = p
                .connect(&t, &fixed(addrs.clone()))
                .await
                .expect_err("refused");
            assert!(
                matches!(
                    e.downcast_ref::<TargetError>(),
                    Some(TargetError::Forbidden { .. })
                ),
                "{addrs:?}: {e}"
            );
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(50), listener.accept())
                .await
                .is_err(),
            "something connected"
        );
        // Submission refuses a name that resolves inside; a name that does not resolve passes.
        let inside = fixed(vec!["10.0.0.1".parse().expect("ip")]);
        assert!(p
            .check_submitted("https://partner.example/h", &inside)
            .await
            .is_err());
        assert!(p
            .check_submitted("https://partner.example/h", &no_dns())
            .await
            .is_ok());
        assert!(matches!(
            p.resolve(&t, &no_dns(), DELIVERY_RESOLVE_TIMEOUT).await,
            Err(TargetError::Unresolved(_))
        ));
        // An allow-listed name connects to what it resolves to.
        let listed = WebhookPolicy::new(true, &[format!("rebind.test:{port}")]).expect("policy");
        let s = listed
            .connect(&t, &fixed(vec!["127.0.0.1".parse().expect("ip")]))
            .await
            .expect("connects");
        drop(s);
        listener.accept().await.expect("accepted");
    }

    #[test]
    fn cidr_contains() {
        let n = Cidr::new("10.0.0.0".parse().expect("ip"), 8).expect("cidr");
        assert!(n.contains("10.255.0.1".parse().expect("ip")));
        assert!(!n.contains("11.0.0.1".parse().expect("ip")));
        assert!(!n.contains("::1".parse().expect("ip")));
        let all = Cidr::new("::".parse().expect("ip"), 0).expect("cidr");
        assert!(all.contains("2001:db8::1".parse().expect("ip")));
        assert!(Cidr::new("::".parse().expect("ip"), 129).is_none());
    }
}
