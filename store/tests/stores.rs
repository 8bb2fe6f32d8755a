//! [`Stores::open`]: every store on one backend. On Redis the session store, the tenant store
//! and the saved opens share one connection (Redis sees one client), keep their keys under
//! the one prefix, and every store call is reported to the registered call observer.
//! Skipped loudly without `redis-server`, a failure with `TANDEM_REQUIRE_REDIS=1`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_store::session::{NewSession, ReplicaId, ResumeToken};
use tandem_store::tenant::{Quotas, TenantId, TenantRecord};
use tandem_store::{set_call_observer, RedisStoreConfig, SessionExpiry, StoreConfig, Stores};
use tandem_testkit::redis::RedisServer;

static CALLS: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

fn observe(_elapsed: Duration, failed: bool) {
    CALLS.fetch_add(1, Ordering::SeqCst);
    if failed {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
}

async fn use_every_store(stores: &Stores) {
    let owner = ReplicaId::new("r1").expect("replica id");
    let id = stores.sessions.next_session_id().await.expect("id");
    let new = NewSession {
        id,
        owner: owner.clone(),
    };
    stores
        .sessions
        .create_session(new, ResumeToken::generate().hash())
        .await
        .expect("create session");
    stores.opens.put(id, vec![7, 7]).await.expect("put open");
    assert_eq!(
        stores.opens.get(id).await.expect("get open"),
        Some(vec![7, 7])
    );
    let tenant = TenantRecord {
        id: TenantId::generate(),
        name: "acme".to_owned(),
        quotas: Quotas {
            prompts_per_minute: 1,
            tokens_per_day: 1,
            max_audience: 1,
        },
        created_ms: 1,
    };
    stores.tenants.create_tenant(&tenant).await.expect("tenant");
    assert!(stores
        .prompts
        .take("c", 1, 1, 60_000, 1)
        .await
        .expect("take")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stores_share_one_connection_and_report_their_calls() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    set_call_observer(observe);
    let config = StoreConfig::Redis(RedisStoreConfig {
        key_prefix: "all".to_owned(),
        ..RedisStoreConfig::new(server.url())
    });
    let stores = Stores::open(&config).await.expect("open");
    let before = CALLS.load(Ordering::SeqCst);
    assert!(before >= 1, "the ping is reported");
    use_every_store(&stores).await;
    // create_session, create_tenant, take; the saved opens are not reported.
    assert_eq!(CALLS.load(Ordering::SeqCst) - before, 3);
    assert_eq!(FAILED.load(Ordering::SeqCst), 0);

    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .expect("client list");
    // This inspecting connection and the stores' one.
    assert_eq!(clients.lines().count(), 2, "{clients}");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(keys.iter().all(|k| k.starts_with("all:")), "{keys:?}");
    for kind in ["session", "open", "tenant"] {
        let prefix = format!("all:{kind}:");
        assert!(
            keys.iter().any(|k| k.starts_with(&prefix)),
            "{kind}: {keys:?}"
        );
    }
}

#[tokio::test]
async fn memory_stores_keep_everything_in_process() {
    let stores = Stores::open(&StoreConfig::Memory {
        expiry: SessionExpiry::default(),
    })
    .await
    .expect("open");
    use_every_store(&stores).await;
}
