//! Partner prompts, device inboxes and results over real sockets: servers started in
//! process on 127.0.0.1:0 with a tiny generated model, devices running the edge part through
//! the `tandem-edge` library over the WebSocket, and a real Redis.
//!
//! Checked: the whole flow with two partner tenants and three users (A's prompt reaches its
//! audience, one device answers it, one declines, one is cancelled; A reads the output; B
//! cannot list, read or cancel A's prompt); tickets start one generation only; nobody but
//! the device sees the provider's system prompt or a profile value; what Redis holds; device
//! tokens (bad, expired, revoked at once on every replica); and every error status of the
//! prompt and inbox routes in the one JSON shape.

#[path = "../../model/tests/common/mod.rs"]
mod common;
#[path = "support/http.rs"]
mod http;
#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/tiny.rs"]
mod tiny;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{dump_redis, Req};
use serde_json::{json, Value};
use tandem_edge::{ClientConfig, ClientError, EdgeBundle, EdgeClient, GenerateRequest};
use tandem_protocol::wire::ErrorCode;
use tandem_protocol::SamplingParams;
use tandem_serve::server::config::Secret;
use tandem_serve::server::{self, ServerConfig, ServerHandle};

const ADMIN_KEY: &str = "provider-admin-key-for-tests-0123456789";
const DEVICE_KEY: &str = "device-token-signing-key-for-tests-0123456789";
const SYSTEM_PROMPT: &str = "PROVIDER-ONLY system prompt: answer kindly (marker 7f3a9c)";
/// A profile value that must never leave the device.
const PROFILE_VALUE: &str = "birdwatching-in-Zermatt";

struct Fixture {
    _tmp: tempfile::TempDir,
    split_dir: PathBuf,
    bundle: EdgeBundle,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let split_dir = tiny::write_tiny_split(tmp.path());
    let bundle = EdgeBundle::load(&split_dir).expect("edge bundle");
    Fixture {
        _tmp: tmp,
        split_dir,
        bundle,
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
            device_token_key: Some(Secret::new(DEVICE_KEY)),
            system_prompt: SYSTEM_PROMPT.to_owned(),
            ..ServerConfig::default()
        }
    }

    /// Runs one generation as a device would after accepting: the prompt rendered on the
    /// device (here: token ids of a text holding the profile value), the ticket in `Open`.
    async fn answer(
        &self,
        url: &str,
        accepted: &Value,
    ) -> Result<tandem_edge::Finished, ClientError> {
        let mut cfg = ClientConfig::new(url);
        cfg.reconnect.max_attempts = 0;
        let client = EdgeClient::from_bundle(&self.bundle, cfg).expect("client");
        let tok = self.bundle.tokenizer.as_ref().expect("tokenizer");
        let text = format!(
            "{} Gift ideas for someone who likes {PROFILE_VALUE}.",
            accepted["system_prompt"].as_str().unwrap_or("")
        );
        let mut ids = tok.encode(&text, false).expect("encode");
        ids.truncate(40);
        let mut req = GenerateRequest::new(ids);
        req.prompt_id = accepted["ticket"].as_str().map(str::to_owned);
        req.max_tokens = u32::try_from(accepted["max_tokens"].as_u64().unwrap_or(1)).unwrap_or(1);
        req.sampling = serde_json::from_value::<SamplingParams>(accepted["sampling"].clone())
            .expect("sampling");
        client.generate(req)?.finish().await
    }
}

async fn start(cfg: ServerConfig) -> ServerHandle {
    server::start(cfg).await.expect("start server")
}

async fn admin_post(addr: SocketAddr, path: &str, body: &Value) -> Value {
    let r = Req::new("POST", path)
        .bearer(ADMIN_KEY)
        .json(body)
        .send(addr)
        .await;
    assert_eq!(r.status, 201, "{path}: {}", r.text());
    r.json()
}

/// A tenant and one key of it: `(tenant id, key)`.
async fn partner(addr: SocketAddr, name: &str, max_audience: u32) -> (String, String) {
    let quotas =
        json!({"prompts_per_minute": 30, "tokens_per_day": 10000, "max_audience": max_audience});
    let t = admin_post(
        addr,
        "/v1/admin/tenants",
        &json!({"name": name, "quotas": quotas}),
    )
    .await;
    let id = t["id"].as_str().expect("id").to_owned();
    let k = admin_post(addr, &format!("/v1/admin/tenants/{id}/keys"), &json!({})).await;
    (id, k["key"].as_str().expect("key").to_owned())
}

async fn device_token(addr: SocketAddr, user: &str) -> Value {
    admin_post(addr, "/v1/admin/device-tokens", &json!({"user_id": user})).await
}

fn token(v: &Value) -> &str {
    v["token"].as_str().expect("token")
}

fn gift_prompt(audience: &[&str]) -> Value {
    json!({
        "template": "Suggest three gifts for someone who likes {{interests}}.",
        "audience": audience,
        "max_tokens": 6,
        "sampling": {"temperature": 0.0, "seed": 7},
        "expires_in_seconds": 3600,
    })
}

fn result_of<'a>(prompt: &'a Value, user: &str) -> &'a Value {
    prompt["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["user_id"] == user)
        .unwrap_or_else(|| panic!("no result for {user}: {prompt}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_partners_three_users_end_to_end() {
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = fixture();
    let cfg = ServerConfig {
        redis: Some(redis.url()),
        redis_key_prefix: "rp".to_owned(),
        ..fx.config()
    };
    // Two replicas on one Redis: everything written through one is read through the other.
    let a_srv = start(cfg.clone()).await;
    let b_srv = start(cfg).await;
    let (one, two) = (a_srv.addr(), b_srv.addr());

    let (_a_id, key_a) = partner(one, "Shop A", 3).await;
    let (_b_id, key_b) = partner(one, "Insurer B", 3).await;
    let alice = device_token(one, "alice").await;
    let bob = device_token(one, "bob").await;
    let carol = device_token(one, "carol").await;
    let dave = device_token(one, "dave").await;

    // A submits to three users.
    let r = Req::new("POST", "/v1/prompts")
        .bearer(&key_a)
        .json(&gift_prompt(&["alice", "bob", "carol"]))
        .send(one)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let pid = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["status"], "active");
    assert_eq!(created["audience_size"], 3);
    assert_eq!(created["counts"]["pending"], 3, "{created}");
    assert!(!r.text().contains(SYSTEM_PROMPT));

    // B can neither list, read nor cancel it: 404 as for an unknown id.
    let listed = Req::new("GET", "/v1/prompts")
        .bearer(&key_b)
        .send(two)
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json()["prompts"], json!([]));
    let b_get = Req::new("GET", &format!("/v1/prompts/{pid}"))
        .bearer(&key_b)
        .send(two)
        .await;
    let unknown = Req::new("GET", "/v1/prompts/0123456789abcdef")
        .bearer(&key_b)
        .send(two)
        .await;
    assert_eq!(
        b_get.expect_error(404, "not_found"),
        unknown.expect_error(404, "not_found")
    );
    Req::new("DELETE", &format!("/v1/prompts/{pid}"))
        .bearer(&key_b)
        .send(one)
        .await
        .expect_error(404, "not_found");

    // Each user's inbox holds it, with the provider's system prompt; dave's does not.
    for (user, tok) in [("alice", &alice), ("bob", &bob), ("carol", &carol)] {
        let r = Req::new("GET", "/v1/edge/inbox")
            .bearer(token(tok))
            .send(two)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["user_id"], user);
        let items = v["items"].as_array().expect("items");
        assert_eq!(items.len(), 1, "{v}");
        assert_eq!(items[0]["prompt_id"], pid.as_str());
        assert_eq!(items[0]["partner"], "Shop A");
        assert_eq!(items[0]["system_prompt"], SYSTEM_PROMPT);
        assert_eq!(items[0]["fields"], json!(["interests"]));
        assert_eq!(items[0]["status"], "pending");
    }
    let r = Req::new("GET", "/v1/edge/inbox")
        .bearer(token(&dave))
        .send(one)
        .await;
    assert_eq!(r.json()["items"], json!([]));
    Req::new("GET", &format!("/v1/edge/inbox/{pid}"))
        .bearer(token(&dave))
        .send(one)
        .await
        .expect_error(404, "not_found");

    // carol declines (twice: the second is a conflict).
    let r = Req::new("POST", &format!("/v1/edge/inbox/{pid}/decline"))
        .bearer(token(&carol))
        .send(one)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    Req::new("POST", &format!("/v1/edge/inbox/{pid}/decline"))
        .bearer(token(&carol))
        .send(two)
        .await
        .expect_error(409, "conflict");

    // alice accepts through one replica and answers through the other's WebSocket.
    let r = Req::new("POST", &format!("/v1/edge/inbox/{pid}/accept"))
        .bearer(token(&alice))
        .send(one)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let accepted = r.json();
    assert_eq!(accepted["system_prompt"], SYSTEM_PROMPT);
    assert_eq!(accepted["max_tokens"], 6);
    let ticket = accepted["ticket"].as_str().expect("ticket").to_owned();
    assert!(ticket.starts_with("tkt_") && ticket.len() == 68, "{ticket}");
    let finished = fx.answer(&b_srv.ws_url(), &accepted).await.expect("answer");
    assert!(finished.usage.output_tokens >= 1);
    // The same ticket cannot start a second generation.
    match fx.answer(&a_srv.ws_url(), &accepted).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::BadPromptTicket),
        other => panic!("a used ticket started a generation: {other:?}"),
    }
    // Neither can a forged assignment mark, nor a made-up ticket.
    for forged in [
        format!("asg:{pid}:alice"),
        format!("tkt_{}", "0".repeat(64)),
    ] {
        let mut fake = accepted.clone();
        fake["ticket"] = json!(forged);
        match fx.answer(&a_srv.ws_url(), &fake).await {
            Err(ClientError::Server { code, .. }) => {
                assert_eq!(code, ErrorCode::BadPromptTicket)
            }
            other => panic!("{forged} started a generation: {other:?}"),
        }
    }

    // bob accepts, then A cancels before bob's device starts: bob's ticket is dead.
    let r = Req::new("POST", &format!("/v1/edge/inbox/{pid}/accept"))
        .bearer(token(&bob))
        .send(two)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let bob_accepted = r.json();
    // The result is stored off the session's path: wait until alice's shows.
    let mut read = Value::Null;
    for _ in 0..200 {
        let r = Req::new("GET", &format!("/v1/prompts/{pid}"))
            .bearer(&key_a)
            .send(one)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        read = r.json();
        if result_of(&read, "alice")["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ra = result_of(&read, "alice");
    assert_eq!(ra["status"], "completed", "{read}");
    assert_eq!(ra["output"], finished.text.as_str());
    assert_eq!(
        ra["usage"]["completion_tokens"],
        finished.usage.output_tokens
    );
    assert_eq!(ra["usage"]["prompt_tokens"], finished.usage.prompt_tokens);
    assert!(ra["finish_reason"].is_string());
    assert!(ra["timings"]["total_ms"].as_u64().is_some());
    let rc = result_of(&read, "carol");
    assert_eq!(rc["status"], "declined");
    for hidden in ["output", "finish_reason", "usage", "timings"] {
        assert!(rc.get(hidden).is_none(), "a decline says no more: {rc}");
    }
    assert_eq!(result_of(&read, "bob")["status"], "accepted");

    let r = Req::new("DELETE", &format!("/v1/prompts/{pid}"))
        .bearer(&key_a)
        .send(two)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let cancelled = r.json();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(result_of(&cancelled, "bob")["status"], "cancelled");
    assert_eq!(result_of(&cancelled, "alice")["status"], "completed");
    Req::new("DELETE", &format!("/v1/prompts/{pid}"))
        .bearer(&key_a)
        .send(one)
        .await
        .expect_error(409, "conflict");
    match fx.answer(&a_srv.ws_url(), &bob_accepted).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::BadPromptTicket),
        other => panic!("a cancelled prompt's ticket started a generation: {other:?}"),
    }

    // alice sees her own answer, with the system prompt, whatever its status.
    let r = Req::new("GET", &format!("/v1/edge/inbox/{pid}"))
        .bearer(token(&alice))
        .send(two)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let own = r.json();
    assert_eq!(own["result"]["output"], finished.text.as_str());
    assert_eq!(own["item"]["system_prompt"], SYSTEM_PROMPT);
    assert_eq!(own["item"]["status"], "completed");

    // Nothing a partner reads holds the system prompt or the profile value.
    for key in [&key_a, &key_b] {
        for path in ["/v1/prompts".to_owned(), format!("/v1/prompts/{pid}")] {
            let body = Req::new("GET", &path).bearer(key).send(one).await.text();
            assert!(!body.contains("marker 7f3a9c"), "{path}: {body}");
            assert!(!body.contains(PROFILE_VALUE), "{path}: {body}");
        }
    }

    // Revoking alice's token refuses her at once on both replicas.
    let tid = alice["token_id"].as_str().expect("token id");
    let r = Req::new("DELETE", &format!("/v1/admin/device-tokens/{tid}"))
        .bearer(ADMIN_KEY)
        .send(one)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    for addr in [one, two] {
        Req::new("GET", "/v1/edge/inbox")
            .bearer(token(&alice))
            .send(addr)
            .await
            .expect_error(401, "unauthorized");
    }
    // bob's token still works.
    let r = Req::new("GET", "/v1/edge/inbox")
        .bearer(token(&bob))
        .send(two)
        .await;
    assert_eq!(r.status, 200);

    // Redis holds no key, device token, ticket, system prompt or profile value in clear.
    let dump = dump_redis(&redis.url(), "rp").await;
    let secrets = [
        key_a.as_str(),
        key_b.as_str(),
        token(&alice),
        token(&bob),
        ticket.as_str(),
        SYSTEM_PROMPT,
        PROFILE_VALUE,
    ];
    for (k, v) in &dump {
        for s in secrets {
            assert!(!k.contains(s) && !v.contains(s), "{k} holds a secret");
        }
    }
    assert!(dump.iter().any(|(k, _)| k.starts_with("rp:prompt:")));

    a_srv.shutdown().await;
    b_srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_and_inbox_errors_have_their_codes() {
    let fx = fixture();
    let srv = start(ServerConfig {
        max_tokens_cap: 64,
        device_requests_per_minute: 8,
        ..fx.config()
    })
    .await;
    let addr = srv.addr();
    // Quotas: 2 prompts per minute, 100 tokens per day, audience of 2.
    let t = admin_post(
        addr,
        "/v1/admin/tenants",
        &json!({"name": "Tight", "quotas": {"prompts_per_minute": 2, "tokens_per_day": 100, "max_audience": 2}}),
    )
    .await;
    let tid = t["id"].as_str().expect("id");
    let key = admin_post(addr, &format!("/v1/admin/tenants/{tid}/keys"), &json!({})).await;
    let key = key["key"].as_str().expect("key").to_owned();
    let post = |body: Value| {
        let key = key.clone();
        async move {
            Req::new("POST", "/v1/prompts")
                .bearer(&key)
                .json(&body)
                .send(addr)
                .await
        }
    };

    // 401: no key, a device token as a partner key.
    Req::new("GET", "/v1/prompts")
        .send(addr)
        .await
        .expect_error(401, "unauthorized");
    // 422: the template, the audience, max_tokens, sampling, expiry, webhook.
    let base = gift_prompt(&["u1"]);
    let bad = [
        ("template", json!("Hello {{ name | upper }}")),
        ("template", json!("")),
        ("audience", json!([])),
        ("audience", json!(["u1", "u1"])),
        ("audience", json!(["not valid"])),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(65)),
        ("sampling", json!({"temperature": -1.0})),
        ("expires_in_seconds", json!(5)),
        ("webhook_url", json!("ftp://example")),
    ];
    for (field, value) in bad {
        let mut body = base.clone();
        body[field] = value.clone();
        let msg = post(body).await.expect_error(422, "invalid");
        assert!(!msg.is_empty(), "{field}={value}");
    }
    let mut unknown_field = base.clone();
    unknown_field["profile"] = json!({"interests": "x"});
    post(unknown_field).await.expect_error(422, "invalid");
    // 403: over max_audience.
    post(gift_prompt(&["u1", "u2", "u3"]))
        .await
        .expect_error(403, "forbidden");
    // 429 quota_exceeded: 6 tokens × 2 users fits; 60 × 2 does not (100 per day).
    let mut greedy = gift_prompt(&["u1", "u2"]);
    greedy["max_tokens"] = json!(60);
    let r = post(greedy).await;
    r.expect_error(429, "quota_exceeded");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=86_400).contains(&retry), "{retry}");
    // 201 twice, then 429 rate_limited (2 per minute; the refused ones above counted once).
    let first = post(gift_prompt(&["u1", "u2"])).await;
    assert!(
        first.status == 201 || first.status == 429,
        "{}",
        first.text()
    );
    let mut statuses = vec![first.status];
    for _ in 0..2 {
        statuses.push(post(gift_prompt(&["u1"])).await.status);
    }
    let limited = post(gift_prompt(&["u1"])).await;
    limited.expect_error(429, "rate_limited");
    assert!(limited.header("retry-after").is_some());
    assert!(statuses.contains(&201), "{statuses:?}");

    // Device side.
    let pid = Req::new("GET", "/v1/prompts")
        .bearer(&key)
        .send(addr)
        .await
        .json()["prompts"][0]["id"]
        .as_str()
        .expect("a prompt")
        .to_owned();
    let u1 = device_token(addr, "u1").await;
    for bad in [
        "",
        "tdv_u1",
        "tdm_0000000000000000_00",
        &token(&u1).replacen("tdv_u1", "tdv_u2", 1),
    ] {
        Req::new("GET", "/v1/edge/inbox")
            .bearer(bad)
            .send(addr)
            .await
            .expect_error(401, "unauthorized");
    }
    // A partner key is not a device token, and a device token is not a partner key.
    Req::new("GET", "/v1/edge/inbox")
        .bearer(&key)
        .send(addr)
        .await
        .expect_error(401, "unauthorized");
    Req::new("GET", "/v1/prompts")
        .bearer(token(&u1))
        .send(addr)
        .await
        .expect_error(401, "unauthorized");
    Req::new("POST", "/v1/edge/inbox/zzzz/accept")
        .bearer(token(&u1))
        .send(addr)
        .await
        .expect_error(404, "not_found");
    let r = Req::new("POST", &format!("/v1/edge/inbox/{pid}/accept"))
        .bearer(token(&u1))
        .send(addr)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    Req::new("POST", &format!("/v1/edge/inbox/{pid}/decline"))
        .bearer(token(&u1))
        .send(addr)
        .await
        .expect_error(409, "conflict");
    // 422 for a device token's bad ttl; 429 once the device's 8 requests per minute are used.
    Req::new("POST", "/v1/admin/device-tokens")
        .bearer(ADMIN_KEY)
        .json(&json!({"user_id": "u1", "ttl_seconds": 1}))
        .send(addr)
        .await
        .expect_error(422, "invalid");
    let mut last = None;
    for _ in 0..10 {
        let r = Req::new("GET", "/v1/edge/inbox")
            .bearer(token(&u1))
            .send(addr)
            .await;
        if r.status == 429 {
            last = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = last.expect("the device rate limit never answered 429");
    r.expect_error(429, "rate_limited");
    assert!(r.header("retry-after").is_some());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_device_token_is_refused() {
    use tandem_serve::rest::device::DeviceKey;
    use tandem_serve::rest::store::prompts::UserId;
    let fx = fixture();
    let srv = start(fx.config()).await;
    let key = DeviceKey::from_secret(DEVICE_KEY);
    let erin = UserId::parse("erin").expect("user");
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Signed with the server's key: one that expired a second ago, one valid for a minute.
    let expired = key.issue(&erin, now_s - 1);
    let valid = key.issue(&erin, now_s + 60);
    Req::new("GET", "/v1/edge/inbox")
        .bearer(&expired.token)
        .send(srv.addr())
        .await
        .expect_error(401, "unauthorized");
    let r = Req::new("GET", "/v1/edge/inbox")
        .bearer(&valid.token)
        .send(srv.addr())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user_id"], "erin");
    // A token signed with another key is refused.
    let other =
        DeviceKey::from_secret("some-other-device-token-key-0123456789").issue(&erin, now_s + 60);
    Req::new("GET", "/v1/edge/inbox")
        .bearer(&other.token)
        .send(srv.addr())
        .await
        .expect_error(401, "unauthorized");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_fires_once_when_every_user_has_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook_addr = hook.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = hook.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = Vec::new();
            // Read the head and the declared body.
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text[..i]
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if got.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .await;
            let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
        }
    });

    let fx = fixture();
    let srv = start(fx.config()).await;
    let addr = srv.addr();
    let (_t, key) = partner(addr, "Hooked", 5).await;
    let mut body = gift_prompt(&["hx", "hy"]);
    body["webhook_url"] = json!(format!("http://{hook_addr}/hooks/tandem?k=1"));
    let r = Req::new("POST", "/v1/prompts")
        .bearer(&key)
        .json(&body)
        .send(addr)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let pid = r.json()["id"].as_str().expect("id").to_owned();
    // https is refused (no TLS client).
    body["webhook_url"] = json!("https://partner.example/hook");
    Req::new("POST", "/v1/prompts")
        .bearer(&key)
        .json(&body)
        .send(addr)
        .await
        .expect_error(422, "invalid");

    let hx = device_token(addr, "hx").await;
    let hy = device_token(addr, "hy").await;
    let decline = |t: String| {
        let pid = pid.clone();
        async move {
            let r = Req::new("POST", &format!("/v1/edge/inbox/{pid}/decline"))
                .bearer(&t)
                .send(addr)
                .await;
            assert_eq!(r.status, 204, "{}", r.text());
        }
    };
    decline(token(&hx).to_owned()).await;
    // One user still pending: nothing is sent.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "the webhook fired before every user answered"
    );
    decline(token(&hy).to_owned()).await;
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the webhook never came")
        .expect("request");
    assert!(
        got.starts_with("POST /hooks/tandem?k=1 HTTP/1.1\r\n"),
        "{got}"
    );
    let json_body: Value =
        serde_json::from_str(got.split("\r\n\r\n").nth(1).expect("body")).expect("JSON body");
    assert_eq!(json_body["event"], "prompt.completed");
    assert_eq!(json_body["prompt_id"], pid.as_str());
    assert_eq!(json_body["counts"]["declined"], 2);
    assert!(
        !got.contains("hx") && !got.contains("hy"),
        "user ids in {got}"
    );
    // Once only: a later change sends nothing more.
    Req::new("DELETE", &format!("/v1/prompts/{pid}"))
        .bearer(&key)
        .send(addr)
        .await;
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err());
    srv.shutdown().await;
}
