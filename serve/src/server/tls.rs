//! TLS on the public listener: `tandem serve --tls-cert FILE --tls-key FILE`.
//!
//! rustls with the ring provider, TLS 1.2 and 1.3, ALPN `http/1.1`. The certificate chain and
//! key are PEM files; they are read again when either file's modification time changes
//! (looked at no more than once a second, on a handshake), so a renewed certificate is
//! served without a restart. A renewal that cannot be read (half-written, wrong key) is
//! logged and the previous certificate stays in use.
//!
//! Handshakes run in tasks of their own, each with a deadline ([`HANDSHAKE_TIMEOUT`]) and at
//! most [`MAX_HANDSHAKES`] at once, so a client that stalls its handshake holds one task, not
//! the accept loop. Finished connections reach axum through [`TlsListener`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

use super::conn_limit::{CappedListener, Counted};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 1024;
/// How often, at most, the certificate files are checked for a change.
const RECHECK: Duration = Duration::from_secs(1);

/// Where the certificate chain and its key are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Reads and checks the chain and key (the key must sign for the chain's first certificate).
fn load(files: &TlsFiles) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("reading the TLS certificate {}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing the TLS certificate {}", files.cert.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no PEM certificate (BEGIN CERTIFICATE)",
            files.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the TLS key {}", files.key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(certs, key, &provider).with_context(|| {
        format!(
            "the key {} does not fit the certificate {}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    Ok(Arc::new(ck))
}

/// The certificate to present, reloaded when its files change.
#[derive(Debug)]
struct Reloading {
    files: TlsFiles,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    key: Arc<CertifiedKey>,
    stamp: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl Reloading {
    fn new(files: TlsFiles) -> anyhow::Result<Self> {
        let stamp = (modified(&files.cert), modified(&files.key));
        let key = load(&files)?;
        Ok(Self {
            files,
            state: Mutex::new(State {
                key,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.checked.elapsed() >= RECHECK {
            st.checked = Instant::now();
            let stamp = (modified(&self.files.cert), modified(&self.files.key));
            if stamp != st.stamp {
                match load(&self.files) {
                    Ok(key) => {
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                        st.key = key;
                        st.stamp = stamp;
                    }
                    // Keep serving the old one; try again at the next change (or second).
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "TLS certificate not reloaded")
                    }
                }
            }
        }
        st.key.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The rustls server settings for `files` (read now: a bad file fails the start).
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let resolver = Reloading::new(files.clone())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client settings for the server's own outgoing TLS (partner webhooks): the web's public
/// roots plus the PEM bundle `extra_ca` (a private PKI), if given.
pub fn client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    tandem_http::tls::client_config_with(extra_ca).map_err(anyhow::Error::msg)
}

/// Accepted TCP connections after their TLS handshake, for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<Counted<TcpStream>>, SocketAddr)>,
    addr: SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Handshakes the connections `tcp` accepts (within its caps).
    pub fn new(mut tcp: CappedListener, cfg: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let addr = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(cfg);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = tcp.accept().await;
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            addr,
            accept_loop,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Counted<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop ended (the runtime is shutting down): never yield again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsFiles {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("cert");
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&files.key, ck.key_pair.serialize_pem()).expect("write key");
        files
    }

    #[test]
    fn a_key_that_does_not_fit_the_certificate_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let files = write_pair(tmp.path(), "localhost");
        let other = rcgen::KeyPair::generate().expect("key");
        std::fs::write(&files.key, other.serialize_pem()).expect("write key");
        let err = format!("{:#}", server_config(&files).expect_err("mismatch"));
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn missing_or_empty_files_are_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let files = TlsFiles {
            cert: tmp.path().join("nope.pem"),
            key: tmp.path().join("nope.key"),
        };
        let err = format!("{:#}", server_config(&files).expect_err("missing"));
        assert!(err.contains("nope.pem"), "{err}");
        std::fs::write(&files.cert, "not pem").expect("write");
        let err = format!("{:#}", server_config(&files).expect_err("empty"));
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn a_changed_certificate_is_picked_up_and_a_broken_one_is_not() {
        let tmp = tempfile::tempdir().expect("tmp");
        let files = write_pair(tmp.path(), "one.example");
        let r = Reloading::new(files.clone()).expect("load");
        let first = r.current().cert[0].clone();
        // A renewal: new files with a later modification time.
        std::thread::sleep(Duration::from_millis(20));
        write_pair(tmp.path(), "two.example");
        r.state.lock().expect("lock").checked = Instant::now() - RECHECK;
        let second = r.current().cert[0].clone();
        assert_ne!(first, second, "the renewed certificate is served");
        // A broken renewal leaves the last good one in place.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("write");
        r.state.lock().expect("lock").checked = Instant::now() - RECHECK;
        assert_eq!(r.current().cert[0], second);
    }
}
