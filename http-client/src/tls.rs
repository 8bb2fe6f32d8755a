//! The client side of TLS, one way for every caller: rustls with the ring provider, the web's
//! public roots (`webpki-roots`) plus the CAs a caller adds (a private PKI, a test CA).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Client settings: the web roots plus `extra` CAs.
pub fn client_config(
    extra: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for ca in extra {
        roots
            .add(ca.clone())
            .map_err(|e| format!("a CA certificate was refused: {e}"))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS protocol versions: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The certificates of a PEM bundle; an unreadable file or one without a certificate is an
/// error that names the file.
pub fn read_pem_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading the CA certificate {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("parsing the CA certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (BEGIN CERTIFICATE)",
            path.display()
        ));
    }
    Ok(certs)
}

/// [`client_config`] with the PEM bundle at `extra_ca` (if any) besides the web roots.
pub fn client_config_with(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    match extra_ca {
        Some(path) => client_config(&read_pem_bundle(path)?),
        None => client_config(&[]),
    }
}
