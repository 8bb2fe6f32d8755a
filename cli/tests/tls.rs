//! TLS on the listener and `wss://` in the device library, with certificates made here
//! (rcgen): a generation over `wss://` equals the same generation over `ws://`; an untrusted
//! CA, an expired certificate, a wrong host name and a wrong URL path are refused at once
//! (`ClientError::Connect`, no reconnect loop); a renewed certificate is served without a
//! restart. The device's REST inbox calls over `https://` (the same TLS settings): a call
//! equals the plain one; a wrong CA and a wrong host name fail at once with `InboxError::Tls`.

use tandem_testkit::http;
use tandem_testkit::tiny;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tandem_edge::{
    ClientConfig, ClientError, EdgeBundle, EdgeClient, Finished, GenerateRequest, ReconnectPolicy,
    ServerList,
};
use tandem_serve::server::{self, ServerConfig, ServerHandle};

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("ca key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).expect("ca cert");
    Ca { cert, key }
}

/// A server certificate for `names` signed by `ca`, written as PEM files under `dir`;
/// `expired` dates it in 2020.
fn leaf(ca: &Ca, dir: &Path, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("leaf key");
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    p.distinguished_name.push(DnType::CommonName, names[0]);
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 6, 1);
    }
    let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("sign");
    let (c, k) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c, k)
}

struct Fixture {
    dir: tempfile::TempDir,
    split: PathBuf,
    bundle: EdgeBundle,
    ca: Ca,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let split = tiny::write_tiny_split(dir.path());
        let bundle = EdgeBundle::load(&split).expect("edge");
        Self {
            dir,
            split,
            bundle,
            ca: ca("Tandem test CA"),
        }
    }

    async fn server(&self, tls: Option<(PathBuf, PathBuf)>) -> ServerHandle {
        let (tls_cert, tls_key) = match tls {
            Some((c, k)) => (Some(c), Some(k)),
            None => (None, None),
        };
        server::start(ServerConfig {
            cloud: self.split.join("cloud"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
            kv_cache_gib: 0.02,
            tls_cert,
            tls_key,
            ..ServerConfig::default()
        })
        .await
        .expect("server")
    }

    fn client(&self, url: String, trust: Option<&Ca>) -> EdgeClient {
        let mut cfg = ClientConfig::new(ServerList::single(url));
        cfg.reconnect = ReconnectPolicy {
            initial_delay: Duration::from_millis(200),
            max_attempts: 20,
            ..ReconnectPolicy::default()
        };
        if let Some(ca) = trust {
            cfg.ca_certs = vec![ca.cert.der().clone()];
        }
        EdgeClient::from_bundle(&self.bundle, cfg).expect("client")
    }
}

fn request() -> GenerateRequest {
    let mut req = GenerateRequest::new((0..24).map(|i| (i * 7) % 200 + 5).collect());
    req.max_tokens = 12;
    req
}

async fn generate(c: &EdgeClient) -> Result<Finished, ClientError> {
    c.generate(request())?.finish().await
}

/// Fails with `Connect`, the permanent error (a retried one ends as `Unreachable` after the
/// policy's attempts): returns its message.
async fn refused(c: &EdgeClient) -> String {
    let err = generate(c).await.expect_err("refused");
    let ClientError::Connect { reason, .. } = &err else {
        panic!("expected a permanent connect error, got {err:?}");
    };
    reason.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_over_wss_equals_the_plain_one() {
    let fx = Fixture::new();
    let files = leaf(&fx.ca, fx.dir.path(), &["localhost", "127.0.0.1"], false);
    let secure = fx.server(Some(files)).await;
    let plain = fx.server(None).await;
    assert!(secure.ws_url().starts_with("wss://"), "{}", secure.ws_url());

    let over_tls = generate(&fx.client(secure.ws_url(), Some(&fx.ca)))
        .await
        .expect("wss generation");
    let in_clear = generate(&fx.client(plain.ws_url(), None))
        .await
        .expect("ws generation");
    assert!(!over_tls.token_ids.is_empty());
    assert_eq!(over_tls.token_ids, in_clear.token_ids);
    assert_eq!(over_tls.text, in_clear.text);
    // The same through the host name the certificate also names.
    let by_name = secure.ws_url().replace("127.0.0.1", "localhost");
    let f = generate(&fx.client(by_name, Some(&fx.ca)))
        .await
        .expect("wss by name");
    assert_eq!(f.token_ids, in_clear.token_ids);

    // A wrong path is the URL's fault: reported at once, not retried.
    let wrong_path = format!("ws://{}/v1/nope", plain.addr());
    let reason = refused(&fx.client(wrong_path, None)).await;
    assert!(reason.contains("404"), "{reason}");
    secure.shutdown().await;
    plain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_expired_and_misnamed_certificates_are_refused_at_once() {
    let fx = Fixture::new();
    // Signed by our CA, but the client trusts only another one (and the web roots).
    let files = leaf(&fx.ca, fx.dir.path(), &["localhost", "127.0.0.1"], false);
    let srv = fx.server(Some(files)).await;
    let reason = refused(&fx.client(srv.ws_url(), Some(&ca("Another CA")))).await;
    assert!(reason.contains("TLS"), "{reason}");
    assert!(reason.to_lowercase().contains("issuer"), "{reason}");
    let reason = refused(&fx.client(srv.ws_url(), None)).await;
    assert!(reason.to_lowercase().contains("issuer"), "{reason}");
    srv.shutdown().await;

    let expired_dir = fx.dir.path().join("expired");
    std::fs::create_dir_all(&expired_dir).expect("dir");
    let files = leaf(&fx.ca, &expired_dir, &["localhost", "127.0.0.1"], true);
    let srv = fx.server(Some(files)).await;
    let reason = refused(&fx.client(srv.ws_url(), Some(&fx.ca))).await;
    assert!(reason.to_lowercase().contains("expired"), "{reason}");
    srv.shutdown().await;

    let misnamed_dir = fx.dir.path().join("misnamed");
    std::fs::create_dir_all(&misnamed_dir).expect("dir");
    let files = leaf(&fx.ca, &misnamed_dir, &["other.example"], false);
    let srv = fx.server(Some(files)).await;
    let reason = refused(&fx.client(srv.ws_url(), Some(&fx.ca))).await;
    assert!(
        reason.to_lowercase().contains("not valid for name"),
        "{reason}"
    );
    srv.shutdown().await;
}

/// The certificate the server presents, read with a bare TLS handshake.
async fn presented(addr: SocketAddr, ca: &Ca) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let fx = Fixture::new();
    let (cert, key) = leaf(&fx.ca, fx.dir.path(), &["localhost", "127.0.0.1"], false);
    let srv = fx.server(Some((cert.clone(), key))).await;
    let first = presented(srv.addr(), &fx.ca).await;
    let on_disk = |p: &Path| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(p)
            .expect("pem")
            .to_vec()
    };
    assert_eq!(first, on_disk(&cert));
    // Renew: new files in place (the server looks at most once a second).
    tokio::time::sleep(Duration::from_millis(50)).await;
    leaf(&fx.ca, fx.dir.path(), &["localhost", "127.0.0.1"], false);
    let renewed = on_disk(&cert);
    assert_ne!(renewed, first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if presented(srv.addr(), &fx.ca).await == renewed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And a generation works over the renewed one.
    let f = generate(&fx.client(srv.ws_url(), Some(&fx.ca)))
        .await
        .expect("generation after the renewal");
    assert!(!f.token_ids.is_empty());
    srv.shutdown().await;
}

const ADMIN_KEY: &str = "provider-admin-key-for-tls-tests-0123456789";
const DEVICE_KEY: &str = "device-token-signing-key-for-tls-tests-0123456789";

/// A server with device tokens and an admin key (admin routes on the plain loopback admin
/// listener), and a device token minted by it.
async fn inbox_server(fx: &Fixture, tls: Option<(PathBuf, PathBuf)>) -> (ServerHandle, String) {
    use tandem_serve::server::config::Secret;
    let (tls_cert, tls_key) = match tls {
        Some((c, k)) => (Some(c), Some(k)),
        None => (None, None),
    };
    let srv = server::start(ServerConfig {
        cloud: fx.split.join("cloud"),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
        kv_cache_gib: 0.02,
        admin_key: Some(Secret::new(ADMIN_KEY)),
        device_token_key: Some(Secret::new(DEVICE_KEY)),
        tls_cert,
        tls_key,
        ..ServerConfig::default()
    })
    .await
    .expect("server");
    let admin = srv.admin_addr().expect("admin listener");
    let r = http::Req::new("POST", "/v1/admin/device-tokens")
        .bearer(ADMIN_KEY)
        .json(&serde_json::json!({"user_id": "alice"}))
        .send(admin)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().expect("token").to_owned();
    (srv, token)
}

fn inbox_client(url: &str, token: &str, trust: Option<&Ca>) -> tandem_edge::inbox::InboxClient {
    use tandem_edge::inbox::{DeviceToken, InboxClient, InboxConfig};
    let mut cfg = InboxConfig::new(url, DeviceToken::new(token).expect("token")).expect("cfg");
    if let Some(ca) = trust {
        cfg = cfg.with_ca_certs(&[ca.cert.der().clone()]).expect("ca");
    }
    cfg.timeout = Duration::from_secs(10);
    InboxClient::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_calls_over_https_equal_the_plain_ones_and_bad_certificates_fail_at_once() {
    use tandem_edge::inbox::{InboxError, PromptId};
    let fx = Fixture::new();
    let files = leaf(&fx.ca, fx.dir.path(), &["localhost", "127.0.0.1"], false);
    let (secure, secure_token) = inbox_server(&fx, Some(files)).await;
    let (plain, plain_token) = inbox_server(&fx, None).await;
    let https = format!("https://{}", secure.addr());
    let http = format!("http://{}", plain.addr());

    // The listing, and the typed API error for a prompt that does not exist, are the same
    // over TLS as in clear.
    let over_tls = inbox_client(&https, &secure_token, Some(&fx.ca))
        .list()
        .await
        .expect("https list");
    let in_clear = inbox_client(&http, &plain_token, None)
        .list()
        .await
        .expect("http list");
    assert_eq!(over_tls, in_clear);
    let missing = PromptId::new("p_does_not_exist").expect("id");
    let e_tls = inbox_client(&https, &secure_token, Some(&fx.ca))
        .accept(&missing)
        .await
        .expect_err("no such prompt");
    let e_plain = inbox_client(&http, &plain_token, None)
        .accept(&missing)
        .await
        .expect_err("no such prompt");
    match (&e_tls, &e_plain) {
        (
            InboxError::Api {
                status: a,
                code: ca,
                ..
            },
            InboxError::Api {
                status: b,
                code: cb,
                ..
            },
        ) => assert_eq!((a, ca), (b, cb)),
        other => panic!("expected two API errors, got {other:?}"),
    }
    // A bad token reaches the server's auth over TLS too: 401, typed.
    let e = inbox_client(&https, "tdv_forged.token", Some(&fx.ca))
        .list()
        .await
        .expect_err("forged");
    assert!(matches!(&e, InboxError::Api { status: 401, .. }), "{e:?}");
    // By the other name the certificate holds.
    let by_name = format!("https://localhost:{}", secure.addr().port());
    let listed = inbox_client(&by_name, &secure_token, Some(&fx.ca))
        .list()
        .await
        .expect("https by name");
    assert_eq!(listed, in_clear);

    // Untrusted (only the web roots, or another CA): a TLS error, at once.
    for trust in [None, Some(&ca("Another CA"))] {
        let started = Instant::now();
        let e = inbox_client(&https, &secure_token, trust)
            .list()
            .await
            .expect_err("untrusted");
        let InboxError::Tls(m) = &e else {
            panic!("expected InboxError::Tls, got {e:?}");
        };
        assert!(m.to_lowercase().contains("issuer"), "{m}");
        assert!(started.elapsed() < Duration::from_secs(5), "not retried");
    }
    // The server's certificate does not name the host the client asked for.
    let misnamed_dir = fx.dir.path().join("misnamed-inbox");
    std::fs::create_dir_all(&misnamed_dir).expect("dir");
    let files = leaf(&fx.ca, &misnamed_dir, &["other.example"], false);
    let (misnamed, token) = inbox_server(&fx, Some(files)).await;
    let e = inbox_client(
        &format!("https://{}", misnamed.addr()),
        &token,
        Some(&fx.ca),
    )
    .list()
    .await
    .expect_err("misnamed");
    let InboxError::Tls(m) = &e else {
        panic!("expected InboxError::Tls, got {e:?}");
    };
    assert!(m.to_lowercase().contains("not valid for name"), "{m}");
    // Plain HTTP against the TLS listener is not an answer either (and not a TLS error).
    let e = inbox_client(&format!("http://{}", secure.addr()), &secure_token, None)
        .list()
        .await
        .expect_err("http to a TLS port");
    assert!(!matches!(e, InboxError::Tls(_)), "{e:?}");

    misnamed.shutdown().await;
    secure.shutdown().await;
    plain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_tls_and_the_admin_cli_checks_its_certificate() {
    use tandem_cli::admin::{send, AdminTlsError};
    use tandem_serve::server::config::Secret;
    let fx = Fixture::new();
    let admin_dir = fx.dir.path().join("admin");
    std::fs::create_dir_all(&admin_dir).expect("dir");
    let (cert, key) = leaf(&fx.ca, &admin_dir, &["localhost", "127.0.0.1"], false);
    let ca_file = fx.dir.path().join("ca.pem");
    std::fs::write(&ca_file, fx.ca.cert.pem()).expect("ca file");
    let other_ca_file = fx.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, ca("Another CA").cert.pem()).expect("ca file");
    let config = |admin_tls: Option<(PathBuf, PathBuf)>| {
        let (admin_tls_cert, admin_tls_key) = match admin_tls {
            Some((c, k)) => (Some(c), Some(k)),
            None => (None, None),
        };
        ServerConfig {
            cloud: fx.split.join("cloud"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
            kv_cache_gib: 0.02,
            admin_key: Some(Secret::new(ADMIN_KEY)),
            device_token_key: Some(Secret::new(DEVICE_KEY)),
            admin_tls_cert,
            admin_tls_key,
            ..ServerConfig::default()
        }
    };
    let secure = server::start(config(Some((cert, key))))
        .await
        .expect("server");
    let plain = server::start(config(None)).await.expect("server");
    let https = secure.admin_url().expect("admin url");
    assert!(https.starts_with("https://"), "{https}");
    let http = plain.admin_url().expect("admin url");
    assert!(http.starts_with("http://"), "{http}");

    // The same call over TLS and in clear: 201 and a token for the user, both times.
    let body = serde_json::json!({"user_id": "ops-test"});
    let path = "/v1/admin/device-tokens";
    let tls_reply = send(&https, Some(&ca_file), ADMIN_KEY, "POST", path, Some(&body))
        .await
        .expect("https admin call");
    let plain_reply = send(&http, None, ADMIN_KEY, "POST", path, Some(&body))
        .await
        .expect("http admin call");
    assert_eq!((tls_reply.status, plain_reply.status), (201, 201));
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&tls_reply.body).expect("json"),
        serde_json::from_slice(&plain_reply.body).expect("json"),
    );
    assert_eq!(a["user_id"], b["user_id"]);
    assert!(
        a["token"].as_str().is_some_and(|t| t.starts_with("tdv_")),
        "{a}"
    );
    // The metrics route of the operator listener is behind the same TLS.
    let m = send(&https, Some(&ca_file), ADMIN_KEY, "GET", "/metrics", None)
        .await
        .expect("metrics");
    assert_eq!(m.status, 200);
    // The certificate also names localhost.
    let by_name = format!(
        "https://localhost:{}",
        secure.admin_addr().expect("a").port()
    );
    let r = send(
        &by_name,
        Some(&ca_file),
        ADMIN_KEY,
        "POST",
        path,
        Some(&body),
    )
    .await
    .expect("by name");
    assert_eq!(r.status, 201);

    // Untrusted: the web roots only, or another CA. A typed error, at once.
    for trust in [None, Some(other_ca_file.as_path())] {
        let started = Instant::now();
        let e = send(&https, trust, ADMIN_KEY, "POST", path, Some(&body))
            .await
            .expect_err("untrusted");
        let tls = e
            .downcast_ref::<AdminTlsError>()
            .unwrap_or_else(|| panic!("{e:#}"));
        assert!(tls.0.to_lowercase().contains("issuer"), "{}", tls.0);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    secure.shutdown().await;

    // A certificate for another name.
    let misnamed_dir = fx.dir.path().join("admin-misnamed");
    std::fs::create_dir_all(&misnamed_dir).expect("dir");
    let files = leaf(&fx.ca, &misnamed_dir, &["other.example"], false);
    let misnamed = server::start(config(Some(files))).await.expect("server");
    let url = misnamed.admin_url().expect("url");
    let e = send(&url, Some(&ca_file), ADMIN_KEY, "POST", path, Some(&body))
        .await
        .expect_err("misnamed");
    let tls = e
        .downcast_ref::<AdminTlsError>()
        .unwrap_or_else(|| panic!("{e:#}"));
    assert!(
        tls.0.to_lowercase().contains("not valid for name"),
        "{}",
        tls.0
    );
    misnamed.shutdown().await;
    plain.shutdown().await;
}
