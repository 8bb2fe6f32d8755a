//! Where a session's `Open` frame is kept, so that a replica that takes the session over
//! (Replay, docs/protocol.md §6) knows its sampling parameters, limits and dtype: `Resume`
//! does not carry them, and [`SessionStore`](crate::store::SessionStore) records have no field
//! for them.
//!
//! The value is the `Open` frame exactly as the device encoded it (a canonical encoding of
//! every parameter, no prompt text). In memory for the in-memory store (one process); in
//! Redis under `{prefix}:open:{session}` with the sessions' idle TTL for the Redis store.
//! Costs: one `SET` per `Open`, one `GET` per Replay.

use std::time::Duration;

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// The `Open` frames of live sessions.
pub(crate) enum OpenParams {
    Memory(DashMap<u128, Vec<u8>>),
    Redis {
        conn: ConnectionManager,
        prefix: String,
        ttl: Duration,
        op_timeout: Duration,
    },
}

impl OpenParams {
    pub(crate) fn memory() -> Self {
        Self::Memory(DashMap::new())
    }

    pub(crate) fn redis(url: &str, prefix: &str, ttl: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("bad redis url: {}", e.category()))?;
        let op_timeout = Duration::from_secs(1);
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_lazy_with_config(client, cfg)
            .map_err(|e| anyhow::anyhow!("redis client: {e}"))?;
        Ok(Self::Redis {
            conn,
            prefix: prefix.to_owned(),
            ttl,
            op_timeout,
        })
    }

    fn key(prefix: &str, session: u128) -> String {
        format!("{prefix}:open:{session}")
    }

    /// Keeps `open` (the encoded frame) for `session`.
    pub(crate) async fn put(&self, session: u128, open: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Self::Memory(map) => {
                map.insert(session, open);
                Ok(())
            }
            Self::Redis {
                conn,
                prefix,
                ttl,
                op_timeout,
            } => {
                let mut conn = conn.clone();
                let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                let cmd = redis::cmd("SET")
                    .arg(Self::key(prefix, session))
                    .arg(open)
                    .arg("PX")
                    .arg(ms)
                    .clone();
                let fut = async move { cmd.query_async::<()>(&mut conn).await };
                tokio::time::timeout(*op_timeout, fut)
                    .await
                    .map_err(|_| anyhow::anyhow!("redis timed out"))?
                    .map_err(|e| anyhow::anyhow!("redis: {}", e.category()))
            }
        }
    }

    /// The encoded `Open` of `session`, if kept.
    pub(crate) async fn get(&self, session: u128) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Self::Memory(map) => Ok(map.get(&session).map(|v| v.clone())),
            Self::Redis {
                conn,
                prefix,
                op_timeout,
                ..
            } => {
                let mut conn = conn.clone();
                let cmd = redis::cmd("GET").arg(Self::key(prefix, session)).clone();
                let fut = async move { cmd.query_async::<Option<Vec<u8>>>(&mut conn).await };
                tokio::time::timeout(*op_timeout, fut)
                    .await
                    .map_err(|_| anyhow::anyhow!("redis timed out"))?
                    .map_err(|e| anyhow::anyhow!("redis: {}", e.category()))
            }
        }
    }

    /// Forgets `session`'s `Open` (best effort: the TTL removes it anyway).
    pub(crate) async fn remove(&self, session: u128) {
        match self {
            Self::Memory(map) => {
                map.remove(&session);
            }
            Self::Redis {
                conn,
                prefix,
                op_timeout,
                ..
            } => {
                let mut conn = conn.clone();
                let cmd = redis::cmd("DEL").arg(Self::key(prefix, session)).clone();
                let fut = async move { cmd.query_async::<()>(&mut conn).await };
                let _ = tokio::time::timeout(*op_timeout, fut).await;
            }
        }
    }
}
