//! Where the device's inbox is and how the device signs in ([`InboxConfig`]), with the
//! defaults of its limits. The TLS settings for an `https://` base are built here, once, the
//! same way as for `wss://` ([`crate::tls`]).

use std::sync::Arc;
use std::time::Duration;

use tandem_http::BaseUrl as ApiBase;

use crate::device_token::DeviceToken;
use crate::error::InboxError;

/// Default for [`InboxConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`InboxConfig::max_response_bytes`] (1 MiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Where the device's inbox is and how the device signs in. See the module doc.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    pub(super) api: ApiBase,
    /// Read by [`ClientConfig::with_inbox`](crate::ClientConfig::with_inbox) too: the same
    /// token opens sessions.
    pub(crate) token: DeviceToken,
    /// The longest one call may take, connecting included.
    pub timeout: Duration,
    /// The largest response body read.
    pub max_response_bytes: usize,
    /// TLS settings for an `https://` base (the web roots plus [`InboxConfig::with_ca_certs`]).
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
}

impl InboxConfig {
    /// `api_base` is the server's REST root, `https://HOST[:PORT]` or `http://HOST:PORT` (an
    /// optional path prefix is kept). `https://` trusts the web roots; add a private CA with
    /// [`InboxConfig::with_ca_certs`].
    pub fn new(api_base: &str, token: DeviceToken) -> Result<Self, InboxError> {
        let api = ApiBase::parse(api_base).map_err(InboxError::Config)?;
        let tls = if api.is_tls() {
            Some(crate::tls::client_config(&[]).map_err(InboxError::Config)?)
        } else {
            None
        };
        Ok(Self {
            api,
            token,
            timeout: DEFAULT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            tls,
        })
    }

    /// Trusts `cas` (a private CA, e.g. from [`crate::tls::read_ca_file`]) besides the web
    /// roots for an `https://` base; the same settings the `wss://` connection uses.
    pub fn with_ca_certs(
        mut self,
        cas: &[crate::tls::CertificateDer<'static>],
    ) -> Result<Self, InboxError> {
        if self.api.is_tls() {
            self.tls = Some(crate::tls::client_config(cas).map_err(InboxError::Config)?);
        }
        Ok(self)
    }

    /// The base URL, normalized.
    pub fn api_base(&self) -> String {
        self.api.to_string()
    }
}
