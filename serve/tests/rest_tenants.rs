//! The REST tenant and key routes over real sockets: servers started in process on
//! 127.0.0.1:0 with a tiny generated model, and a minimal HTTP/1.1 client written here.
//!
//! Checked: the tenant/key lifecycle and `/v1/me`; a revoked key is refused at once, also by
//! a second replica sharing the same Redis; wrong and malformed keys get the same 401; every
//! error status in the one JSON shape (400, 401, 404, 405, 409, 413, 415, 422, 503 with
//! `Retry-After`); Redis holds no key in clear; the OpenAPI document equals
//! `openapi/openapi.json` and lists every route the router serves.
//!
//! `TANDEM_UPDATE_OPENAPI=1 cargo test -p tandem-serve --test rest_tenants` rewrites
//! `openapi/openapi.json` from the code.

use tandem_testkit::http;
use tandem_testkit::redis as redis_server;
use tandem_testkit::tiny;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use http::{dump_redis, Reply, Req};
use serde_json::{json, Value};
use tandem_serve::server::config::Secret;
use tandem_serve::server::{self, ServerConfig, ServerHandle};

const ADMIN_KEY: &str = "provider-admin-key-for-tests-0123456789";

/// A tiny model split at 2 edge layers; the server needs only its cloud part.
struct Fixture {
    _tmp: tempfile::TempDir,
    split_dir: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let split_dir = tiny::write_tiny_split(tmp.path());
    Fixture {
        _tmp: tmp,
        split_dir,
    }
}

impl Fixture {
    fn config(&self) -> ServerConfig {
        ServerConfig {
            cloud: self.split_dir.join("cloud"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
            kv_cache_gib: 0.01,
            drain_timeout_ms: 100,
            admin_key: Some(Secret::new(ADMIN_KEY)),
            ..ServerConfig::default()
        }
    }
}

fn quotas() -> Value {
    json!({"prompts_per_minute": 60, "tokens_per_day": 100000, "max_audience": 1000})
}

async fn create_tenant(addr: SocketAddr, name: &str) -> Value {
    let r = Req::new("POST", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .json(&json!({"name": name, "quotas": quotas()}))
        .send(addr)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // The webhook secret is in this answer only; the rest is what reads return.
    let mut t = r.json();
    let secret = t.as_object_mut().and_then(|o| o.remove("webhook_secret"));
    assert!(
        secret.is_some_and(|s| s.as_str().is_some_and(|s| s.starts_with("whsec_"))),
        "{}",
        r.text()
    );
    t
}

/// Issues a key; answers `(key_id, key)`.
async fn issue_key(addr: SocketAddr, tenant: &str) -> (String, String) {
    let r = Req::new("POST", &format!("/v1/admin/tenants/{tenant}/keys"))
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let key_id = v["key_id"].as_str().expect("key_id").to_owned();
    let key = v["key"].as_str().expect("key").to_owned();
    assert!(
        v["created"].as_str().is_some_and(|c| c.ends_with('Z')),
        "{v}"
    );
    (key_id, key)
}

async fn me(addr: SocketAddr, key: &str) -> Reply {
    Req::new("GET", "/v1/me").bearer(key).send(addr).await
}

async fn start(cfg: ServerConfig) -> ServerHandle {
    server::start(cfg).await.expect("start server")
}

/// Issue 20's "`/v1/me` and every route rate-limited": `/v1/me` counts against the tenant's
/// request rate like the other partner routes (one budget for all of them), and answers 429
/// `rate_limited` with `Retry-After` past it; another tenant is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn me_counts_against_the_partner_request_rate() {
    let fx = fixture();
    let srv = start(ServerConfig {
        partner_requests_per_minute: 3,
        ..fx.config()
    })
    .await;
    let addr = srv.addr();
    let t = create_tenant(addr, "Acme Shop").await;
    let (_, key) = issue_key(addr, t["id"].as_str().expect("id")).await;
    for _ in 0..2 {
        assert_eq!(me(addr, &key).await.status, 200);
    }
    let list = Req::new("GET", "/v1/prompts").bearer(&key).send(addr).await;
    assert_eq!(list.status, 200, "{}", list.text());
    let limited = me(addr, &key).await;
    limited.expect_error(429, "rate_limited");
    assert!(
        limited.header("retry-after").is_some(),
        "{:?}",
        limited.headers
    );
    let other = create_tenant(addr, "Other Shop").await;
    let (_, other_key) = issue_key(addr, other["id"].as_str().expect("id")).await;
    assert_eq!(me(addr, &other_key).await.status, 200);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_and_key_lifecycle() {
    let fx = fixture();
    let srv = start(fx.config()).await;
    let addr = srv.addr();

    let t = create_tenant(addr, "Acme Shop").await;
    let id = t["id"].as_str().expect("id").to_owned();
    assert_eq!(t["name"], "Acme Shop");
    assert_eq!(t["quotas"], quotas());
    assert!(t["created"].as_str().is_some_and(|c| c.ends_with('Z')));

    let r = Req::new("GET", &format!("/v1/admin/tenants/{id}"))
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), t);
    let other = create_tenant(addr, "Other Insurer").await;
    let r = Req::new("GET", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.status, 200);
    // Oldest first; tenants created in the same millisecond by id.
    let mut expected = vec![t.clone(), other.clone()];
    expected.sort_by_key(|v| (v["created"].to_string(), v["id"].to_string()));
    assert_eq!(r.json()["tenants"], json!(expected));

    let (key_id, key) = issue_key(addr, &id).await;
    assert!(key.starts_with(&format!("tdm_{key_id}_")), "{key}");
    let (key_id2, _key2) = issue_key(addr, &id).await;

    let r = Req::new("GET", &format!("/v1/admin/tenants/{id}/keys"))
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.status, 200);
    let listing = r.json();
    let mut listed: Vec<&str> = listing["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["key_id"].as_str().expect("key_id"))
        .collect();
    listed.sort_unstable();
    let mut issued = [key_id.as_str(), key_id2.as_str()];
    issued.sort_unstable();
    assert_eq!(listed, issued);
    assert!(!r.text().contains(&key), "a listing shows a key");

    let r = me(addr, &key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"tenant_id": id, "name": "Acme Shop", "quotas": quotas()})
    );

    // Another tenant's id in the path does not revoke this tenant's key.
    let other_id = other["id"].as_str().expect("id");
    Req::new(
        "DELETE",
        &format!("/v1/admin/tenants/{other_id}/keys/{key_id}"),
    )
    .bearer(ADMIN_KEY)
    .send(addr)
    .await
    .expect_error(404, "not_found");
    assert_eq!(me(addr, &key).await.status, 200);

    let r = Req::new("DELETE", &format!("/v1/admin/tenants/{id}/keys/{key_id}"))
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    let revoked = me(addr, &key).await;
    revoked.expect_error(401, "unauthorized");
    assert_eq!(revoked.header("www-authenticate"), Some("Bearer"));
    Req::new("DELETE", &format!("/v1/admin/tenants/{id}/keys/{key_id}"))
        .bearer(ADMIN_KEY)
        .send(addr)
        .await
        .expect_error(404, "not_found");
    let r = Req::new("GET", &format!("/v1/admin/tenants/{id}/keys"))
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.json()["keys"].as_array().map(Vec::len), Some(1));

    // Wrong, malformed, missing: one and the same 401 body.
    let mut wrong = key.clone();
    let last = wrong.pop().expect("char");
    wrong.push(if last == '0' { '1' } else { '0' });
    let bodies = [
        revoked.body.clone(),
        me(addr, &wrong).await.body,
        me(addr, "tdm_nonsense").await.body,
        me(addr, "x").await.body,
        Req::new("GET", "/v1/me").send(addr).await.body,
    ];
    for b in &bodies {
        assert_eq!(b, &bodies[0], "{}", String::from_utf8_lossy(b));
    }
    // A partner key is no admin key, and the admin key is no partner key.
    let (_, live) = issue_key(addr, &id).await;
    Req::new("GET", "/v1/admin/tenants")
        .bearer(&live)
        .send(addr)
        .await
        .expect_error(401, "unauthorized");
    me(addr, ADMIN_KEY).await.expect_error(401, "unauthorized");

    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_in_the_shape() {
    let fx = fixture();
    let srv = start(fx.config()).await;
    let addr = srv.addr();
    let id = create_tenant(addr, "Acme").await["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // 401: no admin key, a wrong one, another scheme.
    let no_auth = Req::new("GET", "/v1/admin/tenants").send(addr).await;
    no_auth.expect_error(401, "unauthorized");
    let wrong = Req::new("GET", "/v1/admin/tenants")
        .bearer("provider-admin-key-for-tests-0123456788")
        .send(addr)
        .await;
    wrong.expect_error(401, "unauthorized");
    assert_eq!(no_auth.body, wrong.body);
    // Authentication comes before the body is read.
    Req::new("POST", "/v1/admin/tenants")
        .raw("application/json", b"{not json")
        .send(addr)
        .await
        .expect_error(401, "unauthorized");

    // 404: unknown tenant (well-formed and not), unknown key, unknown route.
    for path in [
        "/v1/admin/tenants/0123456789abcdef".to_owned(),
        "/v1/admin/tenants/not-an-id".to_owned(),
        "/v1/admin/tenants/0123456789abcdef/keys".to_owned(),
    ] {
        Req::new("GET", &path)
            .bearer(ADMIN_KEY)
            .send(addr)
            .await
            .expect_error(404, "not_found");
    }
    Req::new("POST", "/v1/admin/tenants/0123456789abcdef/keys")
        .bearer(ADMIN_KEY)
        .send(addr)
        .await
        .expect_error(404, "not_found");
    Req::new(
        "DELETE",
        &format!("/v1/admin/tenants/{id}/keys/0123456789abcdef"),
    )
    .bearer(ADMIN_KEY)
    .send(addr)
    .await
    .expect_error(404, "not_found");
    Req::new("GET", "/v1/nothing-here")
        .send(addr)
        .await
        .expect_error(404, "not_found");

    // 405.
    Req::new("PUT", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .send(addr)
        .await
        .expect_error(405, "method_not_allowed");

    // 400: malformed JSON; empty body.
    Req::new("POST", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .raw("application/json", b"{\"name\": ")
        .send(addr)
        .await
        .expect_error(400, "bad_request");
    Req::new("POST", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .raw("application/json", b"")
        .send(addr)
        .await
        .expect_error(400, "bad_request");

    // 415: not JSON.
    Req::new("POST", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .raw("text/plain", b"{}")
        .send(addr)
        .await
        .expect_error(415, "unsupported_media_type");

    // 422: values out of range, wrong types, missing and unknown fields, a bad name.
    let bad_bodies = [
        json!({"name": "Z", "quotas": {"prompts_per_minute": 0, "tokens_per_day": 1, "max_audience": 1}}),
        json!({"name": "Z", "quotas": {"prompts_per_minute": 1, "tokens_per_day": 1, "max_audience": 2_000_000}}),
        json!({"name": "Z", "quotas": {"prompts_per_minute": -1, "tokens_per_day": 1, "max_audience": 1}}),
        json!({"name": "Z", "quotas": {"prompts_per_minute": "many", "tokens_per_day": 1, "max_audience": 1}}),
        json!({"name": "Z"}),
        json!({"name": "Z", "quotas": quotas(), "admin": true}),
        json!({"name": "", "quotas": quotas()}),
        json!({"name": " Z", "quotas": quotas()}),
    ];
    for body in &bad_bodies {
        let msg = Req::new("POST", "/v1/admin/tenants")
            .bearer(ADMIN_KEY)
            .json(body)
            .send(addr)
            .await
            .expect_error(422, "invalid");
        assert!(!msg.contains("serde"), "{msg}");
    }
    let msg = Req::new("POST", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .json(&bad_bodies[0])
        .send(addr)
        .await
        .expect_error(422, "invalid");
    assert!(msg.contains("prompts_per_minute"), "{msg}");

    // 409: the name is taken.
    Req::new("POST", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .json(&json!({"name": "Acme", "quotas": quotas()}))
        .send(addr)
        .await
        .expect_error(409, "conflict");

    // 413: a declared body over 64 KiB is refused before it is sent...
    let mut big = Req::new("POST", "/v1/admin/tenants").bearer(ADMIN_KEY);
    big.content_type = Some("application/json");
    big.declared_len = Some(70 * 1024);
    big.send(addr).await.expect_error(413, "payload_too_large");
    // ...also on a route that reads no body, and before authentication.
    let mut big = Req::new("GET", "/v1/me");
    big.declared_len = Some(1 << 20);
    big.send(addr).await.expect_error(413, "payload_too_large");
    // A body just under the limit is read (and refused for its content, not its size).
    let pad = "x".repeat(60 * 1024);
    Req::new("POST", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .json(&json!({"name": pad, "quotas": quotas()}))
        .send(addr)
        .await
        .expect_error(422, "invalid");

    // Nothing above created a tenant.
    let r = Req::new("GET", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.json()["tenants"].as_array().map(Vec::len), Some(1));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_off_without_an_admin_key() {
    let fx = fixture();
    let srv = start(ServerConfig {
        admin_key: None,
        ..fx.config()
    })
    .await;
    let r = Req::new("GET", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .send(srv.addr())
        .await;
    r.expect_error(503, "admin_disabled");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!(retry >= 1);
    // Partner routes still work (and refuse bad keys).
    me(srv.addr(), "tdm_x")
        .await
        .expect_error(401, "unauthorized");
    let r = Req::new("GET", "/healthz").send(srv.addr()).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    srv.shutdown().await;

    // A short admin key is refused at start.
    let short = ServerConfig {
        admin_key: Some(Secret::new("short")),
        ..fx.config()
    };
    assert!(server::start(short).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_every_replica_and_redis_holds_no_key() {
    let Some(mut redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = fixture();
    let cfg = ServerConfig {
        redis: Some(redis.url()),
        redis_key_prefix: "rt".to_owned(),
        ..fx.config()
    };
    let a = start(cfg.clone()).await;
    let b = start(cfg).await;

    let t = create_tenant(a.addr(), "Acme").await;
    let id = t["id"].as_str().expect("id").to_owned();
    // B sees what A wrote.
    let r = Req::new("GET", &format!("/v1/admin/tenants/{id}"))
        .bearer(ADMIN_KEY)
        .send(b.addr())
        .await;
    assert_eq!(r.json(), t);
    Req::new("POST", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .json(&json!({"name": "Acme", "quotas": quotas()}))
        .send(b.addr())
        .await
        .expect_error(409, "conflict");

    let (key_id, key) = issue_key(a.addr(), &id).await;
    let (_, other_key) = issue_key(b.addr(), &id).await;
    for srv in [&a, &b] {
        let r = me(srv.addr(), &key).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["tenant_id"], id.as_str());
    }

    // No key in clear: neither the whole key nor its secret part, in any key or value.
    let dump = dump_redis(&redis.url(), "rt").await;
    assert!(
        dump.iter()
            .any(|(k, _)| k == &format!("rt:apikey:{key_id}")),
        "the key's record is missing: {dump:?}"
    );
    for secret in [&key, &other_key] {
        let random_part = secret.rsplit('_').next().expect("secret part");
        assert_eq!(random_part.len(), 64);
        for (k, v) in &dump {
            assert!(!k.contains(random_part), "key name {k} holds a secret");
            assert!(!v.contains(random_part), "{k} holds a secret: {v}");
        }
    }

    // Revoked through A: B refuses it on its very next request.
    let r = Req::new("DELETE", &format!("/v1/admin/tenants/{id}/keys/{key_id}"))
        .bearer(ADMIN_KEY)
        .send(a.addr())
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    me(b.addr(), &key).await.expect_error(401, "unauthorized");
    me(a.addr(), &key).await.expect_error(401, "unauthorized");
    assert_eq!(me(b.addr(), &other_key).await.status, 200);

    // Redis gone: 503 `unavailable` with Retry-After, not a hang and not a 401.
    redis.stop();
    let r = me(b.addr(), &other_key).await;
    r.expect_error(503, "unavailable");
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    Req::new("GET", "/v1/admin/tenants")
        .bearer(ADMIN_KEY)
        .send(a.addr())
        .await
        .expect_error(503, "unavailable");

    a.shutdown().await;
    b.shutdown().await;
}

fn spec_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json")
}

#[test]
fn openapi_file_matches_the_code() {
    let code = tandem_serve::rest::openapi_json();
    let path = spec_file();
    if std::env::var("TANDEM_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir openapi");
        std::fs::write(&path, &code).expect("write openapi.json");
        return;
    }
    let file = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        file == code,
        "openapi/openapi.json differs from the code's OpenAPI document.\n\
         Regenerate it with:\n\n    \
         TANDEM_UPDATE_OPENAPI=1 cargo test -p tandem-serve --test rest_tenants openapi_file\n"
    );
}

/// `(METHOD, path)` of every operation in the spec.
fn spec_operations(spec: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, _) in item.as_object().expect("path item") {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

#[test]
fn every_route_is_in_the_spec_and_states_its_security() {
    let spec: Value =
        serde_json::from_str(&tandem_serve::rest::openapi_json()).expect("spec is JSON");
    let routes: BTreeSet<(String, String)> = tandem_serve::rest::route_table()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_owned()))
        .collect();
    let ops = spec_operations(&spec);
    assert_eq!(routes, ops, "router (left) and spec (right) differ");
    for (method, path) in &ops {
        let op = &spec["paths"][path][method.to_lowercase()];
        let security = op["security"].as_array().unwrap_or_else(|| {
            panic!("{method} {path} states no security (use `security(())` for public)")
        });
        let names: Vec<&String> = security
            .iter()
            .flat_map(|s| s.as_object().expect("requirement").keys())
            .collect();
        let expected = if path.starts_with("/v1/admin/") {
            vec!["admin_key"]
        } else if path.starts_with("/v1/edge/") {
            vec!["device_token"]
        } else if path.starts_with("/v1/") {
            vec!["partner_key"]
        } else {
            vec![]
        };
        assert_eq!(names, expected, "{method} {path}");
        if !names.is_empty() {
            assert!(
                op["responses"]["401"].is_object(),
                "{method} {path}: no 401"
            );
            assert!(
                op["responses"]["503"]["headers"]["Retry-After"].is_object(),
                "{method} {path}: 503 without Retry-After"
            );
        }
    }
    for scheme in ["admin_key", "partner_key", "device_token"] {
        assert_eq!(
            spec["components"]["securitySchemes"][scheme]["scheme"], "bearer",
            "{scheme}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_spec_is_the_document_and_every_spec_route_is_served() {
    let fx = fixture();
    let srv = start(fx.config()).await;
    let r = Req::new("GET", "/openapi.json").send(srv.addr()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), tandem_serve::rest::openapi_json());
    let spec = r.json();
    // Each documented operation reaches a handler: never the unknown-route or wrong-method
    // answer (unauthenticated calls get 401, or 200 for the public routes).
    for (method, path) in spec_operations(&spec) {
        let concrete = path
            .replace("{id}", "0123456789abcdef")
            .replace("{key_id}", "0123456789abcdef")
            .replace("{token_id}", "0123456789abcdef")
            .replace("{prompt_id}", "0123456789abcdef")
            .replace("{file}", "swagger-ui.css");
        let r = Req::new(&method, &concrete).send(srv.addr()).await;
        // /docs answers 503 in a binary built without Swagger UI (still its own handler).
        let docs_missing =
            path.starts_with("/docs") && !tandem_serve::rest::docs::EMBEDDED && r.status == 503;
        assert!(
            r.status == 200 || r.status == 401 || docs_missing,
            "{method} {path}: {} {}",
            r.status,
            r.text()
        );
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_serve_swagger_ui_from_the_binary() {
    let embedded = tandem_serve::rest::docs::EMBEDDED;
    if !embedded {
        assert_ne!(
            std::env::var("TANDEM_REQUIRE_SWAGGER_UI").as_deref(),
            Ok("1"),
            "TANDEM_REQUIRE_SWAGGER_UI=1 but this build has no Swagger UI: run scripts/fetch-swagger-ui.sh"
        );
    }
    let fx = fixture();
    let srv = start(fx.config()).await;
    let page = Req::new("GET", "/docs").send(srv.addr()).await;
    if !embedded {
        let msg = page.expect_error(503, "unavailable");
        assert!(msg.contains("fetch-swagger-ui.sh"), "{msg}");
        srv.shutdown().await;
        return;
    }
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    let html = page.text();
    // Only same-origin assets: nothing is fetched from another host.
    assert!(html.contains("/docs/swagger-ui-bundle.js") && html.contains("/openapi.json"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
    let js = Req::new("GET", "/docs/swagger-ui-bundle.js")
        .send(srv.addr())
        .await;
    assert_eq!(js.status, 200);
    assert!(js.body.len() > 100_000, "{} bytes", js.body.len());
    assert!(js.text().contains("SwaggerUIBundle"));
    let css = Req::new("GET", "/docs/swagger-ui.css")
        .send(srv.addr())
        .await;
    assert_eq!(css.status, 200);
    assert_eq!(css.header("content-type"), Some("text/css"));
    Req::new("GET", "/docs/../Cargo.toml")
        .send(srv.addr())
        .await
        .expect_error(404, "not_found");
    Req::new("GET", "/docs/other.js")
        .send(srv.addr())
        .await
        .expect_error(404, "not_found");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_malformed_keys_take_the_same_time() {
    let fx = fixture();
    let srv = start(fx.config()).await;
    let addr = srv.addr();
    let t = create_tenant(addr, "Timing").await;
    let (key_id, key) = issue_key(addr, t["id"].as_str().expect("id")).await;
    // A wrong secret for a live key id, an unknown key id, and a malformed key.
    let mut wrong = key.clone();
    let last = wrong.pop().expect("char");
    wrong.push(if last == '0' { '1' } else { '0' });
    let unknown = key.replacen(&key_id, "fedcba9876543210", 1);
    let malformed = "tdm_not-a-key".to_owned();
    let kinds = [wrong, unknown, malformed];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    // Interleaved rounds, so that drift in the machine's load hits every kind alike.
    for round in 0..60 {
        for (i, k) in kinds.iter().enumerate() {
            let started = std::time::Instant::now();
            let r = me(addr, k).await;
            let elapsed = started.elapsed().as_secs_f64();
            assert_eq!(r.status, 401);
            if round >= 5 {
                times[i].push(elapsed);
            }
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect();
    let (lo, hi) = medians
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), m| (lo.min(*m), hi.max(*m)));
    // No path does measurably more work: the medians agree within 1 ms and within half.
    assert!(
        hi - lo < 0.001 && hi < lo * 1.5 + 0.0002,
        "median 401 times differ: {medians:?} s (wrong, unknown, malformed)"
    );
    srv.shutdown().await;
}

/// One request through a router in process, without a socket.
async fn in_process(
    router: &axum::Router,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> Reply {
    use tower::ServiceExt as _;
    let mut req = axum::http::Request::builder().method(method).uri(path);
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let req = req.body(axum::body::Body::empty()).expect("request");
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body")
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// `ServerHandle::router` and `admin_router` answer in process as the listeners do over a
/// socket: the same statuses, content types and bodies, for answers and errors alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_answer_in_process_as_the_listeners_do() {
    let fx = fixture();
    let srv = start(fx.config()).await;
    let ops = srv.admin_addr().expect("admin listener");
    let tenant = create_tenant(ops, "in-process").await;
    let id = tenant["id"].as_str().expect("tenant id").to_owned();
    let (_, key) = issue_key(ops, &id).await;
    let (public, admin) = (srv.router(), srv.admin_router());
    let tenant_path = format!("/v1/admin/tenants/{id}");
    let cases: [(bool, &str, &str, Option<&str>); 7] = [
        (false, "GET", "/healthz", None),
        (false, "GET", "/v1/no-such-route", None),
        (false, "GET", "/v1/me", Some("tdk_not-a-key")),
        (false, "GET", "/metrics", None),
        (true, "GET", &tenant_path, Some(ADMIN_KEY)),
        (true, "GET", "/v1/admin/tenants", Some("wrong-admin-key")),
        (true, "GET", "/v1/admin/tenants/t_unknown", Some(ADMIN_KEY)),
    ];
    for (on_admin, method, path, bearer) in cases {
        let (router, addr) = if on_admin {
            (&admin, ops)
        } else {
            (&public, srv.addr())
        };
        let mut req = Req::new(method, path);
        if let Some(b) = bearer {
            req = req.bearer(b);
        }
        let socket = req.send(addr).await;
        let local = in_process(router, method, path, bearer).await;
        assert_eq!(
            local.status,
            socket.status,
            "{method} {path}: {}",
            local.text()
        );
        assert_eq!(
            local.header("content-type"),
            socket.header("content-type"),
            "{method} {path}"
        );
        assert_eq!(local.text(), socket.text(), "{method} {path}");
    }
    // A partner call through the router counts like one over the socket: /v1/me answers
    // the same tenant either way.
    let local = in_process(&public, "GET", "/v1/me", Some(&key)).await;
    let socket = me(srv.addr(), &key).await;
    assert_eq!(
        (local.status, socket.status),
        (200, 200),
        "{}",
        local.text()
    );
    assert_eq!(local.json(), socket.json());
    assert_eq!(local.json()["tenant_id"], id);
    srv.shutdown().await;
}
