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

use tandem_testkit::http;
use tandem_testkit::redis as redis_server;
use tandem_testkit::tiny;

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
        device: &Value,
        accepted: &Value,
    ) -> Result<tandem_edge::Finished, ClientError> {
        let mut cfg = ClientConfig::new(url);
        cfg.reconnect.max_attempts = 0;
        // The servers have a device-token key: opening a session needs the user's token.
        cfg.device_token = Some(tandem_edge::DeviceToken::new(token(device)).expect("token"));
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
    decline(one, token(&carol), &pid).await;
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
    let finished = fx
        .answer(&b_srv.ws_url(), &alice, &accepted)
        .await
        .expect("answer");
    assert!(finished.usage.output_tokens >= 1);
    // The same ticket cannot start a second generation.
    match fx.answer(&a_srv.ws_url(), &alice, &accepted).await {
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
        match fx.answer(&a_srv.ws_url(), &alice, &fake).await {
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
    match fx.answer(&a_srv.ws_url(), &bob, &bob_accepted).await {
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
    let epoch = token_epoch(token(&device_token(srv.addr(), "erin").await));
    // Signed with the server's key: one that expired a second ago, one valid for a minute.
    let expired = key.issue(&erin, now_s - 1, epoch);
    let valid = key.issue(&erin, now_s + 60, epoch);
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
    let other = DeviceKey::from_secret("some-other-device-token-key-0123456789").issue(
        &erin,
        now_s + 60,
        epoch,
    );
    Req::new("GET", "/v1/edge/inbox")
        .bearer(&other.token)
        .send(srv.addr())
        .await
        .expect_error(401, "unauthorized");
    // Signed with the server's key in another epoch (an earlier one, or one to come).
    for e in [epoch - 1, epoch + 1] {
        let t = key.issue(&erin, now_s + 60, e);
        Req::new("GET", "/v1/edge/inbox")
            .bearer(&t.token)
            .send(srv.addr())
            .await
            .expect_error(401, "device_token_stale");
    }
    srv.shutdown().await;
}

/// The device-token epoch a token was issued in (its fourth dot-separated part).
fn token_epoch(token: &str) -> u64 {
    token
        .split('.')
        .nth(3)
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no epoch in {token}"))
}

/// Without Redis, revocations live in the process: a restarted server (same device-token
/// key) starts a new epoch, so a token from before the restart, revoked or not, is refused
/// with `device_token_stale` instead of coming back to life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_memory_store_refuses_earlier_device_tokens() {
    let fx = fixture();
    let first = start(fx.config()).await;
    let before = device_token(first.addr(), "heidi").await;
    let r = Req::new("GET", "/v1/edge/inbox")
        .bearer(token(&before))
        .send(first.addr())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    first.shutdown().await;
    let second = start(fx.config()).await;
    Req::new("GET", "/v1/edge/inbox")
        .bearer(token(&before))
        .send(second.addr())
        .await
        .expect_error(401, "device_token_stale");
    let after = device_token(second.addr(), "heidi").await;
    let r = Req::new("GET", "/v1/edge/inbox")
        .bearer(token(&after))
        .send(second.addr())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    second.shutdown().await;
}

/// Issue 20's "`FLUSHALL` on Redis: a revoked device token went from 401 back to 200":
/// revocations live in Redis, so the store keeps an epoch and tokens carry theirs. After the
/// loss, the revoked token stays refused, an unrevoked one from before is refused with
/// `device_token_stale` (get a new one), a new token works, and revoking works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_token_stays_refused_after_redis_loses_its_data() {
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let fx = fixture();
    let cfg = ServerConfig {
        redis: Some(redis.url()),
        redis_key_prefix: "ep".to_owned(),
        ..fx.config()
    };
    let srv = start(cfg).await;
    let addr = srv.addr();
    let me = |t: &Value| {
        let t = token(t).to_owned();
        async move {
            Req::new("GET", "/v1/edge/inbox")
                .bearer(&t)
                .send(addr)
                .await
        }
    };
    let revoked = device_token(addr, "frank").await;
    let kept = device_token(addr, "grace").await;
    assert_eq!(token_epoch(token(&revoked)), token_epoch(token(&kept)));
    let tid = revoked["token_id"].as_str().expect("token id");
    let r = Req::new("DELETE", &format!("/v1/admin/device-tokens/{tid}"))
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    me(&revoked).await.expect_error(401, "unauthorized");
    let r = me(&kept).await;
    assert_eq!(r.status, 200, "{}", r.text());

    redis.flushall();
    me(&revoked).await.expect_error(401, "device_token_stale");
    me(&kept).await.expect_error(401, "device_token_stale");
    let fresh = device_token(addr, "grace").await;
    assert!(token_epoch(token(&fresh)) > token_epoch(token(&kept)));
    let r = me(&fresh).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user_id"], "grace");
    // Revocation works in the new epoch.
    let tid = fresh["token_id"].as_str().expect("token id");
    let r = Req::new("DELETE", &format!("/v1/admin/device-tokens/{tid}"))
        .bearer(ADMIN_KEY)
        .send(addr)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    me(&fresh).await.expect_error(401, "unauthorized");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_fires_once_when_every_user_has_answered() {
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook_addr = hook.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((s, _)) = hook.accept().await {
            let _ = tx.send(answer_one_request(s).await);
        }
    });

    let fx = fixture();
    // The receiver is on loopback: the operator lets exactly it through, over http.
    let srv = start(ServerConfig {
        webhook_allow_http: true,
        webhook_allow: vec![hook_addr.to_string()],
        ..fx.config()
    })
    .await;
    let addr = srv.addr();
    let (tenant, key) = partner(addr, "Hooked", 5).await;
    // The secret made with the tenant is replaced; the new one signs from now on.
    let secret = new_webhook_secret(addr, &tenant).await;
    // Shown with a new tenant once; never in a read; unknown tenants are 404.
    let fresh = admin_post(
        addr,
        "/v1/admin/tenants",
        &json!({"name": "Fresh", "quotas": {"prompts_per_minute": 1, "tokens_per_day": 1, "max_audience": 1}}),
    )
    .await;
    assert!(
        fresh["webhook_secret"]
            .as_str()
            .is_some_and(|s| s.starts_with("whsec_")),
        "{fresh}"
    );
    let read = Req::new(
        "GET",
        &format!("/v1/admin/tenants/{}", fresh["id"].as_str().expect("id")),
    )
    .bearer(ADMIN_KEY)
    .send(addr)
    .await;
    assert_eq!(read.status, 200, "{}", read.text());
    assert!(
        read.json().get("webhook_secret").is_none(),
        "{}",
        read.text()
    );
    Req::new("POST", "/v1/admin/tenants/0123456789abcdef/webhook-secret")
        .bearer(ADMIN_KEY)
        .send(addr)
        .await
        .expect_error(404, "not_found");
    let mut body = gift_prompt(&["hx", "hy"]);
    body["webhook_url"] = json!(format!("http://{hook_addr}/hooks/tandem?k=1"));
    let pid = create_prompt(addr, &key, &body).await;
    // Another port of the same address is not on the allow-list.
    body["webhook_url"] = json!(format!("http://{}:1/hook", hook_addr.ip()));
    Req::new("POST", "/v1/prompts")
        .bearer(&key)
        .json(&body)
        .send(addr)
        .await
        .expect_error(422, "invalid");

    let hx = device_token(addr, "hx").await;
    let hy = device_token(addr, "hy").await;
    decline(addr, token(&hx), &pid).await;
    // One user still pending: nothing is sent.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "the webhook fired before every user answered"
    );
    decline(addr, token(&hy), &pid).await;
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the webhook never came")
        .expect("request");
    assert!(
        got.starts_with("POST /hooks/tandem?k=1 HTTP/1.1\r\n"),
        "{got}"
    );
    let raw_body = got.split("\r\n\r\n").nth(1).expect("body");
    let json_body: Value = serde_json::from_str(raw_body).expect("JSON body");
    assert_eq!(json_body["event"], "prompt.completed");
    // Signed with the tenant's secret: a receiver accepts it, and refuses a tampered body or
    // another secret.
    let header = got
        .lines()
        .find_map(|l| l.strip_prefix("Tandem-Signature: "))
        .unwrap_or_else(|| panic!("no signature in {got}"));
    check_signature(&secret, header, raw_body.as_bytes()).expect("valid signature");
    let tampered = raw_body.replace("\"declined\":2", "\"declined\":3");
    assert_ne!(tampered, raw_body);
    assert!(check_signature(&secret, header, tampered.as_bytes()).is_err());
    let other = tandem_serve::rest::webhook::generate_secret();
    assert!(check_signature(&other, header, raw_body.as_bytes()).is_err());
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

/// A TCP listener on 127.0.0.1 that counts the connections it accepts.
async fn counting_listener() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = n.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (addr, n)
}

/// Issue 20, "a partner prompt with webhook_url http://127.0.0.1:PORT/… (also localhost,
/// [::ffff:127.0.0.1], 2130706433; 169.254.169.254 accepted)": every such target is refused
/// on submission with 422 `invalid` naming `webhook_url`, under the default settings and
/// with plain http allowed, and a listening receiver that is not allow-listed gets nothing,
/// also after the prompt's users all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_cannot_be_aimed_inside() {
    let (hook, accepted) = counting_listener().await;
    let p = hook.port();
    let fx = fixture();
    let default_srv = start(fx.config()).await;
    // Plain http allowed and another loopback port allow-listed: still nothing of these.
    let http_srv = start(ServerConfig {
        webhook_allow_http: true,
        webhook_allow: vec!["127.0.0.1:1".to_owned(), "hooks.internal".to_owned()],
        ..fx.config()
    })
    .await;
    let inside = [
        format!("127.0.0.1:{p}/hook"),
        format!("localhost:{p}/hook"),
        format!("LocalHost.:{p}/hook"),
        format!("[::ffff:127.0.0.1]:{p}/hook"),
        format!("[::1]:{p}/hook"),
        format!("2130706433:{p}/hook"),
        format!("0x7f000001:{p}/hook"),
        format!("0177.0.0.1:{p}/hook"),
        format!("127.1:{p}/hook"),
        format!("0.0.0.0:{p}/hook"),
        "169.254.169.254/latest/meta-data/".to_owned(),
        "[fd00::1]/hook".to_owned(),
        "10.0.0.1/hook".to_owned(),
        "192.168.0.1/hook".to_owned(),
        "100.64.0.1/hook".to_owned(),
    ];
    for srv in [&default_srv, &http_srv] {
        let addr = srv.addr();
        let (_t, key) = partner(addr, "Aiming inside", 5).await;
        let mut body = gift_prompt(&["w1"]);
        for scheme in ["http", "https"] {
            for target in &inside {
                body["webhook_url"] = json!(format!("{scheme}://{target}"));
                let msg = Req::new("POST", "/v1/prompts")
                    .bearer(&key)
                    .json(&body)
                    .send(addr)
                    .await
                    .expect_error(422, "invalid");
                assert!(msg.starts_with("webhook_url"), "{scheme}://{target}: {msg}");
            }
        }
        // No list, no items: nothing was stored.
        let list = Req::new("GET", "/v1/prompts").bearer(&key).send(addr).await;
        assert_eq!(list.status, 200, "{}", list.text());
        assert_eq!(list.json()["prompts"], json!([]), "{}", list.text());
    }
    // http:// without the setting, even to a public address; user info; other schemes.
    let addr = default_srv.addr();
    let (_t, key) = partner(addr, "Plain", 5).await;
    let mut body = gift_prompt(&["w1"]);
    for (url, says) in [
        ("http://93.184.215.14/hook", "https://"),
        ("ftp://93.184.215.14/hook", "https://"),
        ("https://user:pw@93.184.215.14/hook", "user name"),
    ] {
        body["webhook_url"] = json!(url);
        let msg = Req::new("POST", "/v1/prompts")
            .bearer(&key)
            .json(&body)
            .send(addr)
            .await
            .expect_error(422, "invalid");
        assert!(
            msg.starts_with("webhook_url") && msg.contains(says),
            "{url}: {msg}"
        );
    }
    // A prompt whose webhook is on the allow-list of one port and whose users all answer:
    // delivered to that port only, so the receiver on another port still gets nothing.
    let addr = http_srv.addr();
    let (_t, key) = partner(addr, "Listed", 5).await;
    body["webhook_url"] = json!("http://127.0.0.1:1/hook");
    body["audience"] = json!(["w2"]);
    let pid = create_prompt(addr, &key, &body).await;
    let w2 = device_token(addr, "w2").await;
    decline(addr, token(&w2), &pid).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the receiver that is not allow-listed got a connection"
    );
    default_srv.shutdown().await;
    http_srv.shutdown().await;
}

/// A receiver's check of `Tandem-Signature: t=T,v1=HEX`, written here from the spec (HMAC-
/// SHA256 over "T.BODY", keyed by the whole secret string) rather than with the server's
/// code; the server's own `verify` must agree.
fn check_signature(secret: &str, header: &str, body: &[u8]) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    let field = |name: &str| {
        header
            .split(',')
            .find_map(|p| p.trim().strip_prefix(name))
            .ok_or(format!("no {name} in {header}"))
    };
    let t: u64 = field("t=")?.parse().map_err(|_| "bad t".to_owned())?;
    let v1 = field("v1=")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    if t.abs_diff(now) > 300 {
        return Err(format!("stale t={t}"));
    }
    let mut key = [0u8; 64];
    let k = secret.as_bytes();
    if k.len() > 64 {
        key[..32].copy_from_slice(&Sha256::digest(k));
    } else {
        key[..k.len()].copy_from_slice(k);
    }
    let pad = |b: u8| key.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let mut msg = format!("{t}.").into_bytes();
    msg.extend_from_slice(body);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(&msg)
        .finalize();
    let mac = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    let ours = tandem_serve::rest::webhook::verify(secret, header, body, now, 300);
    if hex::encode(mac) == v1 {
        assert_eq!(ours, Ok(()), "the server's verify disagrees");
        Ok(())
    } else {
        assert!(
            ours.is_err(),
            "the server's verify accepts what the spec refuses"
        );
        Err("signature mismatch".to_owned())
    }
}

/// The webhook secret in both tenant stores: made with the tenant, kept by a "first need"
/// set, replaced by a rotation, and per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_secrets_are_kept_in_both_stores() {
    use tandem_serve::rest::store::{
        self as ts, Quotas, RedisTenantStoreConfig, TenantId, TenantRecord, TenantStoreConfig,
    };
    let redis = redis_server::RedisServer::start();
    let mut configs = vec![TenantStoreConfig::Memory];
    if let Some(r) = &redis {
        configs.push(TenantStoreConfig::Redis(RedisTenantStoreConfig {
            key_prefix: "whs".to_owned(),
            ..RedisTenantStoreConfig::new(r.url())
        }));
    }
    for cfg in configs {
        let store = ts::open(&cfg).await.expect("open").tenants;
        let record = |name: &str| TenantRecord {
            id: TenantId::generate(),
            name: name.to_owned(),
            quotas: Quotas {
                prompts_per_minute: 1,
                tokens_per_day: 1,
                max_audience: 1,
            },
            created_ms: 1,
        };
        let (a, b) = (record("a"), record("b"));
        store.create_tenant(&a).await.expect("a");
        store.create_tenant(&b).await.expect("b");
        assert_eq!(store.webhook_secret(&a.id).await.expect("get"), None);
        let first = tandem_serve::rest::webhook::tenant_secret(&*store, &a.id)
            .await
            .expect("made on first need");
        // A second "first need" (another replica) keeps the first.
        assert_eq!(
            store
                .set_webhook_secret(&a.id, "whsec_other", false)
                .await
                .expect("set"),
            first
        );
        assert_eq!(
            store.webhook_secret(&a.id).await.expect("get"),
            Some(first.clone())
        );
        assert_eq!(store.webhook_secret(&b.id).await.expect("get"), None);
        // A rotation replaces it.
        assert_eq!(
            store
                .set_webhook_secret(&a.id, "whsec_new", true)
                .await
                .expect("set"),
            "whsec_new"
        );
        assert_eq!(
            store.webhook_secret(&a.id).await.expect("get").as_deref(),
            Some("whsec_new")
        );
        let nobody = TenantId::generate();
        assert!(store.webhook_secret(&nobody).await.is_err());
        assert!(store
            .set_webhook_secret(&nobody, "whsec_x", true)
            .await
            .is_err());
    }
}

/// The target is checked again when the webhook is sent, under the sending replica's
/// settings: a prompt accepted by a replica that allow-lists the receiver, and completed
/// through one that does not, is not delivered; completed through the first, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_targets_are_checked_again_at_delivery() {
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let (hook, accepted) = counting_listener().await;
    let fx = fixture();
    let shared = ServerConfig {
        redis: Some(redis.url()),
        redis_key_prefix: "wd".to_owned(),
        webhook_allow_http: true,
        ..fx.config()
    };
    let lenient = start(ServerConfig {
        webhook_allow: vec![hook.to_string()],
        ..shared.clone()
    })
    .await;
    let strict = start(shared).await;
    let (_t, key) = partner(lenient.addr(), "Twice checked", 5).await;
    let lenient_addr = lenient.addr();
    let submit = |user: &'static str| {
        let key = key.clone();
        async move {
            let mut body = gift_prompt(&[user]);
            body["webhook_url"] = json!(format!("http://{hook}/hook"));
            create_prompt(lenient_addr, &key, &body).await
        }
    };
    let decline_as = |via: SocketAddr, pid: String, user: &'static str| async move {
        let t = device_token(via, user).await;
        decline(via, token(&t), &pid).await;
    };
    // Completed through the strict replica: refused there, nothing arrives.
    let refused = submit("d1").await;
    decline_as(strict.addr(), refused, "d1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Completed through the lenient one: delivered.
    let allowed = submit("d2").await;
    decline_as(lenient.addr(), allowed, "d2").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the allowed webhook never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lenient.shutdown().await;
    strict.shutdown().await;
}

/// An `https://` webhook arrives over TLS, signed, at a receiver whose certificate comes from
/// a CA the operator named (`webhook_ca_cert`); a receiver whose certificate that CA did not
/// sign gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_arrives_over_tls_and_signed() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let tmp = tempfile::tempdir().expect("tmp");
    let ca_key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "Partner CA");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = p.self_signed(&ca_key).expect("ca");
    let ca_path = tmp.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write ca");
    // Two receivers: one with a certificate from that CA, one self-signed.
    let receiver = |signed_by_ca: bool| {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        let cert = if signed_by_ca {
            params.signed_by(&key, &ca, &ca_key).expect("sign")
        } else {
            params.self_signed(&key).expect("self")
        };
        let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("server config");
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, String)>();
    let mut addrs = Vec::new();
    for good in [true, false] {
        let acceptor = receiver(good);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        addrs.push(l.local_addr().expect("addr"));
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let Ok(s) = acceptor.accept(s).await else {
                    continue; // the sender refused our certificate
                };
                let _ = tx.send((good, answer_one_request(s).await));
            }
        });
    }

    let fx = fixture();
    let srv = start(ServerConfig {
        webhook_allow: addrs.iter().map(|a| a.to_string()).collect(),
        webhook_ca_cert: Some(ca_path),
        ..fx.config()
    })
    .await;
    let addr = srv.addr();
    let (tenant, key) = partner(addr, "Secure", 5).await;
    let secret = new_webhook_secret(addr, &tenant).await;
    for (i, hook) in addrs.iter().enumerate() {
        let user = format!("tls{i}");
        let mut body = gift_prompt(&[&user]);
        body["webhook_url"] = json!(format!("https://{hook}/hook"));
        let pid = create_prompt(addr, &key, &body).await;
        let t = device_token(addr, &user).await;
        decline(addr, token(&t), &pid).await;
    }
    let (good, got) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the https webhook never came")
        .expect("request");
    assert!(good, "delivered to the receiver the CA did not sign");
    assert!(got.starts_with("POST /hook HTTP/1.1\r\n"), "{got}");
    let raw_body = got.split("\r\n\r\n").nth(1).expect("body");
    let header = got
        .lines()
        .find_map(|l| l.strip_prefix("Tandem-Signature: "))
        .unwrap_or_else(|| panic!("no signature in {got}"));
    check_signature(&secret, header, raw_body.as_bytes()).expect("valid signature");
    // The self-signed receiver completed no handshake, so it never reports; give the
    // sender's retries (1 s, 4 s) time to try and fail.
    assert!(
        tokio::time::timeout(Duration::from_secs(6), rx.recv())
            .await
            .is_err(),
        "a webhook reached the receiver with an untrusted certificate"
    );
    srv.shutdown().await;
}

/// A webhook receiver's side of one connection: reads the request head and its declared
/// body, answers 204, and returns what it read.
async fn answer_one_request<S>(mut s: S) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
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
    let _ = s.shutdown().await;
    String::from_utf8_lossy(&got).into_owned()
}

/// Replaces the tenant's webhook secret (admin route) and returns the new one.
async fn new_webhook_secret(addr: SocketAddr, tenant: &str) -> String {
    let rotated = admin_post(
        addr,
        &format!("/v1/admin/tenants/{tenant}/webhook-secret"),
        &json!({}),
    )
    .await;
    let secret = rotated["webhook_secret"]
        .as_str()
        .expect("webhook_secret")
        .to_owned();
    assert!(secret.starts_with("whsec_"), "{rotated}");
    secret
}

/// Creates a partner prompt (201 expected) and returns its id.
async fn create_prompt(addr: SocketAddr, key: &str, body: &Value) -> String {
    let r = Req::new("POST", "/v1/prompts")
        .bearer(key)
        .json(body)
        .send(addr)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().expect("id").to_owned()
}

/// The device user holding `device_token` declines prompt `pid` (204 expected).
async fn decline(addr: SocketAddr, device_token: &str, pid: &str) {
    let r = Req::new("POST", &format!("/v1/edge/inbox/{pid}/decline"))
        .bearer(device_token)
        .send(addr)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
}
