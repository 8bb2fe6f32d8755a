//! Base URLs: `http(s)://host[:port][/prefix]`, parsed once with a clear error.

use std::fmt;

use hyper::Uri;

/// A parsed `http(s)://host[:port][/prefix]` base URL. Request paths are appended to the
/// prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// The host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    /// The path prefix without a trailing `/` (often empty).
    prefix: String,
    /// `https://`: the exchange runs over TLS.
    tls: bool,
}

impl fmt::Debug for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BaseUrl({self})")
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.prefix)
    }
}

impl BaseUrl {
    /// Parses a base URL; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Self, String> {
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
                "`{url}`: credentials in the URL are not supported (use a token)"
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

    /// `https://`: the exchange runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host without IPv6 brackets (what TLS checks the certificate against).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host[:port]` as written (the `Host` header).
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The path prefix without a trailing `/` (often empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse() {
        let b = BaseUrl::parse("http://127.0.0.1:8080").expect("plain");
        assert_eq!(
            (b.host.as_str(), b.port, b.prefix.as_str()),
            ("127.0.0.1", 8080, "")
        );
        assert_eq!(b.to_string(), "http://127.0.0.1:8080");
        assert!(!b.tls);
        let b = BaseUrl::parse("https://example.test/api").expect("https");
        assert!(b.tls);
        assert_eq!((b.port, b.prefix.as_str()), (443, "/api"));
        assert_eq!(b.to_string(), "https://example.test/api");
        let b = BaseUrl::parse("http://example.test/tandem/").expect("prefix");
        assert_eq!((b.port, b.prefix.as_str()), (80, "/tandem"));
        assert_eq!(b.authority, "example.test");
        let b = BaseUrl::parse("http://[::1]:9000").expect("ipv6");
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
            let err = BaseUrl::parse(url).expect_err(url);
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
