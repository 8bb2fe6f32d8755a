//! TLS for the device's connection to the cloud (`wss://`).
//!
//! rustls with the ring provider. The device trusts the platform's web roots (Mozilla's set,
//! compiled in: a phone app cannot count on a system store it can read) plus any private CA
//! the app or the user names ([`ClientConfig::ca_certs`](crate::client::ClientConfig::ca_certs),
//! `tandem-edge --ca-cert FILE`). Certificate and protocol failures are final: a wrong CA, an
//! expired certificate or a wrong host name will not fix itself, so the client reports it at
//! once instead of retrying.

use std::path::Path;
use std::sync::Arc;

use tokio_tungstenite::tungstenite;

pub use rustls::pki_types::CertificateDer;

use crate::device_token::DeviceToken;

/// [`client_config`]'s result, built once and shared (parsing the root set is not free).
pub(crate) type SharedClientConfig =
    Arc<std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>>;

/// Reads every PEM certificate in `path` (a CA bundle).
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    tandem_http::tls::read_pem_bundle(path)
}

/// The rustls client settings: web roots plus `extra` CAs (the same as every other client of
/// the project: [`tandem_http::tls::client_config`]).
pub use tandem_http::tls::client_config;

/// The WebSocket upgrade request for `url`, with the device token as `Authorization: Bearer`
/// when there is one. Fails on a URL that cannot be a request (a configuration error).
pub(crate) fn upgrade_request(
    url: &str,
    token: Option<&DeviceToken>,
) -> Result<tungstenite::handshake::client::Request, String> {
    use tungstenite::client::IntoClientRequest;
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("bad server URL: {e}"))?;
    if let Some(t) = token {
        let value = tungstenite::http::HeaderValue::from_str(&format!("Bearer {}", t.expose()))
            .map_err(|_| "the device token cannot travel in a header".to_owned())?;
        request
            .headers_mut()
            .insert(tungstenite::http::header::AUTHORIZATION, value);
    }
    Ok(request)
}

/// When connecting failed for a reason that retrying cannot fix (TLS: an untrusted or
/// expired certificate, a wrong host name, no common protocol; HTTP: the upgrade answered
/// with a client error such as 404), what to tell the user.
pub(crate) fn permanent_failure(e: &tungstenite::Error) -> Option<String> {
    use tungstenite::Error;
    match e {
        Error::Tls(t) => Some(format!("TLS: {t}")),
        Error::Io(io) => {
            let inner = io.get_ref()?.downcast_ref::<rustls::Error>()?;
            Some(format!("TLS: {inner}"))
        }
        Error::Http(resp) if resp.status().as_u16() == 401 => Some(
            "the server refused the device credential (HTTP 401): give a valid device token \
             (--device-token, ClientConfig::device_token)"
                .to_owned(),
        ),
        Error::Http(resp) => {
            let status = resp.status();
            // 408 and 429 are worth another try; other client errors are the URL's fault.
            (status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429).then(
                || {
                    format!(
                        "the server answered the WebSocket upgrade with HTTP {status} \
                         (is the URL's path /v1/edge/ws?)"
                    )
                },
            )
        }
        Error::Url(u) => Some(format!("bad server URL: {u}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused_with_its_name() {
        let tmp = std::env::temp_dir().join(format!("tandem-ca-{}.pem", std::process::id()));
        std::fs::write(&tmp, "hello").expect("write");
        let err = read_ca_file(&tmp).expect_err("no cert");
        assert!(err.contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_file(&tmp);
        let err = read_ca_file(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
