//! The session store, against both backends: one conformance suite, written once over
//! `Arc<dyn SessionStore>`, runs on `MemoryStore` and on `RedisStore` with a real
//! `redis-server` started per test (see `tandem_testkit::redis`; skipped loudly when Redis is
//! not installed, a failure when `TANDEM_REQUIRE_REDIS=1`). Two "replicas" are two store values:
//! two `RedisStore`s with their own connections on one Redis, or one shared `MemoryStore`.
//! Then Redis-only tests: outages (killed, hung, restarted empty), key namespacing, and that
//! no clear resume token reaches Redis.

use tandem_testkit::redis as redis_server;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use tandem_store::session::{
    Claim, MemoryStore, NewSession, RedisStore, RedisStoreConfig, ReplicaId, ResumeToken,
    SessionExpiry, SessionId, SessionRecord, SessionState, SessionStore, SessionUpdate, StoreError,
};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Redis,
}

/// One backend's world: the stores that play replicas come from here.
struct Fixture {
    server: Option<RedisServer>,
    memory: Option<Arc<MemoryStore>>,
    expiry: SessionExpiry,
}

impl Fixture {
    /// `None` when the backend is Redis and `redis-server` is not installed.
    fn new(kind: Kind) -> Option<Self> {
        Self::with_expiry(kind, SessionExpiry::default())
    }

    fn with_expiry(kind: Kind, expiry: SessionExpiry) -> Option<Self> {
        Some(match kind {
            Kind::Memory => Self {
                server: None,
                memory: Some(Arc::new(MemoryStore::new(expiry))),
                expiry,
            },
            Kind::Redis => Self {
                server: Some(RedisServer::start()?),
                memory: None,
                expiry,
            },
        })
    }

    fn redis_config(&self, prefix: &str) -> RedisStoreConfig {
        let server = self.server.as_ref().expect("a redis fixture");
        RedisStoreConfig {
            key_prefix: prefix.to_owned(),
            op_timeout: Duration::from_secs(1),
            expiry: self.expiry,
            ..RedisStoreConfig::new(server.url())
        }
    }

    /// A store as one replica sees it.
    async fn replica(&self) -> Arc<dyn SessionStore> {
        match &self.memory {
            Some(memory) => memory.clone(),
            None => Arc::new(
                RedisStore::connect(self.redis_config("test"))
                    .await
                    .expect("connect to the test redis"),
            ),
        }
    }
}

fn replica(name: &str) -> ReplicaId {
    ReplicaId::new(name).expect("valid replica id")
}

/// Allocates an id and creates a session owned by `owner`; answers it and its token.
async fn open(store: &dyn SessionStore, owner: &ReplicaId) -> (SessionRecord, ResumeToken) {
    let id = store.next_session_id().await.expect("next id");
    let token = ResumeToken::generate();
    let new = NewSession {
        id,
        owner: owner.clone(),
    };
    let record = store
        .create_session(new, token.hash())
        .await
        .expect("create");
    (record, token)
}

fn is_unavailable<T: std::fmt::Debug>(r: &Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Unavailable(_)))
}

// ---------------------------------------------------------------- conformance suite

async fn create_get_update_close(kind: Kind) {
    let Some(fx) = Fixture::new(kind) else { return };
    let store = fx.replica().await;
    let a = replica("a");
    let (created, _) = open(&*store, &a).await;
    assert_eq!(created.state, SessionState::Open);
    assert_eq!(created.owner, a);
    assert_eq!((created.tokens_in, created.tokens_out), (0, 0));
    assert!(created.expires_ms > created.last_seen_ms);
    let id = created.id;
    assert_eq!(
        store.get_session(id).await.expect("get"),
        Some(created.clone())
    );

    tokio::time::sleep(Duration::from_millis(5)).await;
    let upd = SessionUpdate {
        state: Some(SessionState::Generating),
        add_tokens_in: 12,
        add_tokens_out: 1,
    };
    let updated = store.update_session(id, &a, upd).await.expect("update");
    assert_eq!(updated.state, SessionState::Generating);
    assert_eq!((updated.tokens_in, updated.tokens_out), (12, 1));
    assert!(
        updated.last_seen_ms > created.last_seen_ms,
        "last seen moves"
    );
    assert_eq!(updated.created_ms, created.created_ms);
    // Counts add up; no state leaves the state alone.
    let upd = SessionUpdate {
        add_tokens_out: 4,
        ..SessionUpdate::default()
    };
    let updated = store.update_session(id, &a, upd).await.expect("update");
    assert_eq!(updated.state, SessionState::Generating);
    assert_eq!((updated.tokens_in, updated.tokens_out), (12, 5));
    assert_eq!(store.get_session(id).await.expect("get"), Some(updated));

    store.close_session(id, &a).await.expect("close");
    store
        .close_session(id, &a)
        .await
        .expect("closing twice is a no-op");
    let closed = store
        .get_session(id)
        .await
        .expect("get")
        .expect("still readable");
    assert_eq!(closed.state, SessionState::Closed);
    assert_eq!(closed.tokens_out, 5);
    let after = store.update_session(id, &a, SessionUpdate::default()).await;
    assert!(
        matches!(after, Err(StoreError::SessionClosed(i)) if i == id),
        "{after:?}"
    );

    let missing = SessionId(id.0 + 1_000_000);
    assert_eq!(store.get_session(missing).await.expect("get"), None);
    let r = store
        .update_session(missing, &a, SessionUpdate::default())
        .await;
    assert!(
        matches!(r, Err(StoreError::UnknownSession(i)) if i == missing),
        "{r:?}"
    );
}

async fn create_twice_is_refused(kind: Kind) {
    let Some(fx) = Fixture::new(kind) else { return };
    let store = fx.replica().await;
    let (first, _) = open(&*store, &replica("a")).await;
    let again = NewSession {
        id: first.id,
        owner: replica("b"),
    };
    let r = store
        .create_session(again, ResumeToken::generate().hash())
        .await;
    assert!(
        matches!(r, Err(StoreError::AlreadyExists(i)) if i == first.id),
        "{r:?}"
    );
    let kept = store
        .get_session(first.id)
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(kept.owner, replica("a"), "the first session is untouched");
}

async fn resume_token_is_checked(kind: Kind) {
    let Some(fx) = Fixture::new(kind) else { return };
    let store = fx.replica().await;
    let a = replica("a");
    let (record, token) = open(&*store, &a).await;
    let id = record.id;

    let ok = store.verify_resume(id, &token).await.expect("right token");
    assert_eq!(ok, record);

    let wrong = ResumeToken::generate();
    let r = store.verify_resume(id, &wrong).await;
    assert!(
        matches!(r, Err(StoreError::BadResumeToken(i)) if i == id),
        "{r:?}"
    );
    // A token one bit off is wrong too.
    let mut bytes = *token.as_bytes();
    bytes[31] ^= 1;
    let r = store
        .verify_resume(id, &ResumeToken::from_bytes(bytes))
        .await;
    assert!(matches!(r, Err(StoreError::BadResumeToken(_))), "{r:?}");

    let unknown = SessionId(id.0 + 1_000_000);
    let r = store.verify_resume(unknown, &token).await;
    assert!(
        matches!(r, Err(StoreError::UnknownSession(i)) if i == unknown),
        "{r:?}"
    );

    store.close_session(id, &a).await.expect("close");
    let r = store.verify_resume(id, &token).await;
    assert!(
        matches!(r, Err(StoreError::SessionClosed(i)) if i == id),
        "{r:?}"
    );
    let r = store.verify_resume(id, &wrong).await;
    assert!(
        matches!(r, Err(StoreError::BadResumeToken(_))),
        "closed or not, a wrong token is wrong: {r:?}"
    );
}

async fn resume_tokens_rotate(kind: Kind) {
    let Some(fx) = Fixture::new(kind) else { return };
    let store = fx.replica().await;
    let a = replica("a");
    let (record, first) = open(&*store, &a).await;
    let id = record.id;
    let second = ResumeToken::generate();
    store
        .rotate_resume(id, &first, second.hash())
        .await
        .expect("rotate");
    // The old token is refused from now on, the new one works.
    let r = store.verify_resume(id, &first).await;
    assert!(matches!(r, Err(StoreError::BadResumeToken(_))), "{r:?}");
    store.verify_resume(id, &second).await.expect("new token");
    // A second rotation with the old token (a racing resume) loses.
    let third = ResumeToken::generate();
    let r = store.rotate_resume(id, &first, third.hash()).await;
    assert!(matches!(r, Err(StoreError::BadResumeToken(_))), "{r:?}");
    store.verify_resume(id, &second).await.expect("unchanged");
    let unknown = SessionId(id.0 + 1_000_000);
    let r = store.rotate_resume(unknown, &second, third.hash()).await;
    assert!(matches!(r, Err(StoreError::UnknownSession(_))), "{r:?}");
}

async fn only_the_owner_writes(kind: Kind) {
    let Some(fx) = Fixture::new(kind) else { return };
    let store = fx.replica().await;
    let (a, b) = (replica("a"), replica("b"));
    let (record, _) = open(&*store, &a).await;
    let upd = SessionUpdate {
        add_tokens_in: 3,
        ..SessionUpdate::default()
    };
    let r = store.update_session(record.id, &b, upd).await;
    assert!(
        matches!(&r, Err(StoreError::NotOwner { id, owner }) if *id == record.id && *owner == a),
        "{r:?}"
    );
    let r = store.close_session(record.id, &b).await;
    assert!(matches!(r, Err(StoreError::NotOwner { .. })), "{r:?}");
    let now = store
        .get_session(record.id)
        .await
        .expect("get")
        .expect("there");
    assert_eq!(
        (now.state, now.tokens_in),
        (SessionState::Open, 0),
        "unchanged"
    );
}

async fn ids_are_unique_across_replicas(kind: Kind) {
    let Some(fx) = Fixture::new(kind) else { return };
    let stores = [fx.replica().await, fx.replica().await];
    let mut tasks = Vec::new();
    for store in &stores {
        for _ in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..100 {
                    ids.push(store.next_session_id().await.expect("id"));
                }
                ids
            }));
        }
    }
    let mut all = HashSet::new();
    for task in tasks {
        let ids = task.await.expect("task");
        all.extend(ids);
    }
    assert_eq!(all.len(), 800, "every id distinct");
    // Unguessable, not a counter: the ids spread over the 128 bits (800 sequential ids would
    // share their top 118 bits; random ones almost surely differ in the top byte).
    let top: HashSet<u128> = all.iter().map(|id| id.0 >> 120).collect();
    assert!(
        top.len() > 16,
        "ids look sequential: {} top bytes",
        top.len()
    );
    assert!(all.iter().all(|id| id.0 != 0), "0 names no session");
}

async fn idle_sessions_expire(kind: Kind) {
    let expiry = SessionExpiry {
        idle_ttl: Duration::from_millis(1000),
        closed_ttl: Duration::from_millis(200),
    };
    let Some(fx) = Fixture::with_expiry(kind, expiry) else {
        return;
    };
    let store = fx.replica().await;
    let a = replica("a");
    let (kept, token) = open(&*store, &a).await;
    let (closed, _) = open(&*store, &a).await;
    store.close_session(closed.id, &a).await.expect("close");

    tokio::time::sleep(Duration::from_millis(400)).await;
    // A write refreshes the TTL; the closed session's shorter grace has run out.
    store
        .update_session(kept.id, &a, SessionUpdate::default())
        .await
        .expect("refresh");
    assert_eq!(store.get_session(closed.id).await.expect("get"), None);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        store.get_session(kept.id).await.expect("get").is_some(),
        "800 ms after creation, 400 ms after the last write: still there"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        store.get_session(kept.id).await.expect("get"),
        None,
        "expired"
    );
    let r = store.verify_resume(kept.id, &token).await;
    assert!(matches!(r, Err(StoreError::UnknownSession(_))), "{r:?}");
}

async fn dead_owner_is_claimed_with_replay(kind: Kind) {
    let Some(fx) = Fixture::new(kind) else { return };
    let (store_a, store_b) = (fx.replica().await, fx.replica().await);
    let (a, b) = (replica("a"), replica("b"));
    store_a
        .heartbeat(&a, Duration::from_millis(1500))
        .await
        .expect("beat a");
    store_b
        .heartbeat(&b, Duration::from_secs(30))
        .await
        .expect("beat b");
    let (record, _) = open(&*store_a, &a).await;
    let id = record.id;

    assert!(store_b.replica_alive(&a).await.expect("alive?"));
    let r = store_b.claim(id, &b).await.expect("claim");
    assert_eq!(
        r,
        Claim::OwnerAlive { owner: a.clone() },
        "a live owner keeps it"
    );
    // The owner's own claim succeeds without replay.
    match store_a.claim(id, &a).await.expect("claim") {
        Claim::Owned { record, replay } => assert!(!replay && record.owner == a),
        other => panic!("{other:?}"),
    }

    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(
        !store_b.replica_alive(&a).await.expect("alive?"),
        "a's beat expired"
    );
    assert!(store_b.replica_alive(&b).await.expect("alive?"));
    match store_b.claim(id, &b).await.expect("claim") {
        Claim::Owned { record, replay } => {
            assert!(replay, "ownership moved: the KV must be rebuilt");
            assert_eq!(record.owner, b);
        }
        other => panic!("{other:?}"),
    }
    match store_b.claim(id, &b).await.expect("claim again") {
        Claim::Owned { replay, .. } => assert!(!replay, "b owns it already"),
        other => panic!("{other:?}"),
    }
    let owner = store_a
        .get_session(id)
        .await
        .expect("get")
        .expect("there")
        .owner;
    assert_eq!(owner, b);
    // The old owner, back from a pause, is fenced off.
    let r = store_a
        .update_session(id, &a, SessionUpdate::default())
        .await;
    assert!(
        matches!(&r, Err(StoreError::NotOwner { owner, .. }) if *owner == b),
        "{r:?}"
    );

    let r = store_b.claim(SessionId(id.0 + 1_000_000), &b).await;
    assert!(matches!(r, Err(StoreError::UnknownSession(_))), "{r:?}");
    store_b.close_session(id, &b).await.expect("close");
    let r = store_b.claim(id, &b).await;
    assert!(matches!(r, Err(StoreError::SessionClosed(_))), "{r:?}");
}

async fn concurrent_claims_have_one_winner(kind: Kind) {
    let Some(fx) = Fixture::new(kind) else { return };
    let owner_store = fx.replica().await;
    let claimers = [
        (fx.replica().await, replica("b")),
        (fx.replica().await, replica("c")),
    ];
    for (store, me) in &claimers {
        store
            .heartbeat(me, Duration::from_secs(30))
            .await
            .expect("beat");
    }
    // The owner never beats: it is dead.
    let dead = replica("dead");
    for _ in 0..25 {
        let (record, _) = open(&*owner_store, &dead).await;
        let id = record.id;
        let tasks = claimers.clone().map(|(store, me)| {
            tokio::spawn(async move {
                let r = store.claim(id, &me).await;
                (me, r)
            })
        });
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for task in tasks {
            match task.await.expect("task") {
                (me, Ok(Claim::Owned { replay: true, .. })) => winners.push(me),
                (_, Ok(Claim::OwnerAlive { owner })) => losers.push(owner),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one claim wins: {winners:?}");
        assert_eq!(losers, winners, "the loser is told who won");
        let owner = owner_store
            .get_session(record.id)
            .await
            .expect("get")
            .expect("there");
        assert_eq!(owner.owner, winners[0]);
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Memory).await
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Redis).await
                }
            )*
        }
    };
}

conformance!(
    create_get_update_close,
    create_twice_is_refused,
    resume_token_is_checked,
    resume_tokens_rotate,
    only_the_owner_writes,
    ids_are_unique_across_replicas,
    idle_sessions_expire,
    dead_owner_is_claimed_with_replay,
    concurrent_claims_have_one_winner,
);

// ---------------------------------------------------------------- Redis only

/// The bound the brief asks of a call while Redis is away (the store's timeout is 1 s).
const FAIL_FAST: Duration = Duration::from_secs(3);

/// Calls `f` until it succeeds, for at most `limit`; panics with the last error after.
async fn until_ok<T, F, Fut>(limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > limit => panic!("still failing after {limit:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_fast_and_recovers_empty() {
    let Some(mut fx) = Fixture::new(Kind::Redis) else {
        return;
    };
    let store = fx.replica().await;
    let a = replica("a");
    store
        .heartbeat(&a, Duration::from_secs(30))
        .await
        .expect("beat");
    let (record, token) = open(&*store, &a).await;

    fx.server.as_mut().expect("server").stop();
    for attempt in 0..3 {
        let start = Instant::now();
        let r = store.get_session(record.id).await;
        assert!(is_unavailable(&r), "attempt {attempt}: {r:?}");
        assert!(start.elapsed() < FAIL_FAST, "took {:?}", start.elapsed());
        let start = Instant::now();
        let r = store.claim(record.id, &a).await;
        assert!(is_unavailable(&r), "{r:?}");
        assert!(
            start.elapsed() < FAIL_FAST * 2,
            "took {:?}",
            start.elapsed()
        );
    }
    let msg = store
        .heartbeat(&a, Duration::from_secs(1))
        .await
        .expect_err("down");
    assert!(msg.to_string().contains("unavailable"), "{msg}");

    // Back, but empty (no persistence): the store reconnects by itself within a few seconds.
    fx.server.as_mut().expect("server").restart();
    until_ok(Duration::from_secs(5), || store.get_session(record.id)).await;
    assert_eq!(
        store.get_session(record.id).await.expect("get"),
        None,
        "data lost"
    );
    let r = store.verify_resume(record.id, &token).await;
    assert!(matches!(r, Err(StoreError::UnknownSession(_))), "{r:?}");
    assert!(
        !store.replica_alive(&a).await.expect("alive?"),
        "heartbeats lost too"
    );
    // And it works as before.
    store
        .heartbeat(&a, Duration::from_secs(30))
        .await
        .expect("beat");
    let (again, token) = open(&*store, &a).await;
    store.verify_resume(again.id, &token).await.expect("resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_fails_fast_and_recovers_intact() {
    let Some(fx) = Fixture::new(Kind::Redis) else {
        return;
    };
    let store = fx.replica().await;
    let a = replica("a");
    let (record, token) = open(&*store, &a).await;

    let server = fx.server.as_ref().expect("server");
    server.pause();
    let start = Instant::now();
    let r = store.get_session(record.id).await;
    let took = start.elapsed();
    server.resume();
    assert!(is_unavailable(&r), "{r:?}");
    assert!(took < FAIL_FAST, "took {took:?}");
    assert!(r.expect_err("hung").to_string().contains("did not answer"));

    let back = until_ok(Duration::from_secs(5), || {
        store.verify_resume(record.id, &token)
    })
    .await;
    assert_eq!(back, record, "nothing lost");
}

#[tokio::test]
async fn connect_to_nothing_is_unavailable_quickly() {
    // A port nobody listens on: bind one, note it, free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let start = Instant::now();
    let r = RedisStore::connect(RedisStoreConfig::new(format!("redis://127.0.0.1:{port}"))).await;
    assert!(is_unavailable(&r), "{r:?}");
    assert!(start.elapsed() < FAIL_FAST, "took {:?}", start.elapsed());
    let r = RedisStore::connect(RedisStoreConfig::new("redis://user:hunter2@[bad")).await;
    let e = r.expect_err("bad url");
    assert!(
        !e.to_string().contains("hunter2"),
        "no password in errors: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_namespaced_and_tokens_never_stored_in_clear() {
    let Some(fx) = Fixture::new(Kind::Redis) else {
        return;
    };
    let one = RedisStore::connect(fx.redis_config("one"))
        .await
        .expect("one");
    let two = RedisStore::connect(fx.redis_config("two"))
        .await
        .expect("two");
    let a = replica("a");
    one.heartbeat(&a, Duration::from_secs(30))
        .await
        .expect("beat");
    let (record, token) = open(&one, &a).await;
    assert_eq!(two.get_session(record.id).await.expect("get"), None);
    assert!(!two.replica_alive(&a).await.expect("alive?"));
    let r = two.verify_resume(record.id, &token).await;
    assert!(matches!(r, Err(StoreError::UnknownSession(_))), "{r:?}");

    // Look at everything in Redis with a plain client.
    let server = fx.server.as_ref().expect("server");
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    let mut keys: Vec<String> = keys;
    keys.sort();
    // Keys hold the id in decimal.
    let id = record.id.0;
    let mut want = vec!["one:replica:a".to_owned(), format!("one:session:{id}")];
    want.sort();
    assert_eq!(
        keys, want,
        "every key under the store's prefix, nothing else"
    );
    let session_key = format!("one:session:{id}");
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&session_key)
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(ttl_ms > 0, "session keys expire: {ttl_ms}");
    let stored: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&session_key)
        .query_async(&mut conn)
        .await
        .expect("hgetall");
    let clear_hex = hex::encode(token.as_bytes());
    let clear_raw = String::from_utf8_lossy(token.as_bytes()).into_owned();
    for (field, value) in &stored {
        assert!(
            !value.contains(&clear_hex) && *value != clear_raw,
            "{field} holds the token"
        );
    }
    let resume = stored
        .iter()
        .find(|(f, _)| f == "resume")
        .expect("resume field");
    assert_eq!(
        resume.1,
        hex::encode(sha2_of(token.as_bytes())),
        "sha256 of the token"
    );
}

fn sha2_of(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}
