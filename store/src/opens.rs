//! Where a session's `Open` frame is kept, so that a replica that takes the session over
//! (Replay, docs/protocol.md §6) knows its sampling parameters, limits and dtype: `Resume`
//! does not carry them, and [`SessionStore`](crate::SessionStore) records have no field for
//! them.
//!
//! The value is the `Open` frame exactly as the device encoded it (a canonical encoding of
//! every parameter, no prompt text). In memory for the in-memory store (one process); in
//! Redis under `{prefix}:open:{session}` (the id in decimal) with the sessions' idle TTL for
//! the Redis store, on the connection the other stores use. Costs: one `SET` per `Open`, one
//! `GET` per Replay. These calls are bounded by the connection's timeout but, unlike the
//! stores' calls, not reported to the call observer.

use std::future::Future;
use std::time::Duration;

use dashmap::DashMap;
use redis::RedisResult;

use crate::redis_conn::RedisConn;
use crate::session::millis;
use crate::SessionId;

/// The `Open` frames of live sessions.
pub enum OpenParams {
    Memory(DashMap<SessionId, Vec<u8>>),
    Redis {
        conn: RedisConn,
        prefix: String,
        ttl: Duration,
    },
}

impl std::fmt::Debug for OpenParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory(map) => f.debug_tuple("Memory").field(&map.len()).finish(),
            Self::Redis { conn, prefix, ttl } => f
                .debug_struct("Redis")
                .field("conn", conn)
                .field("prefix", prefix)
                .field("ttl", ttl)
                .finish(),
        }
    }
}

/// Why a saved `Open` could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum OpenParamsError {
    /// Redis did not answer within the connection's timeout.
    #[error("redis timed out")]
    TimedOut,
    /// Redis failed the call; the text is the error's category only.
    #[error("redis: {0}")]
    Redis(String),
}

impl OpenParams {
    pub fn memory() -> Self {
        Self::Memory(DashMap::new())
    }

    /// Kept in Redis on `conn`, under `{prefix}:open:`, for `ttl` after each `put`.
    pub fn redis(conn: RedisConn, prefix: &str, ttl: Duration) -> Self {
        Self::Redis {
            conn,
            prefix: prefix.to_owned(),
            ttl,
        }
    }

    fn key(prefix: &str, session: SessionId) -> String {
        format!("{prefix}:open:{}", session.0)
    }

    /// Keeps `open` (the encoded frame) for `session`.
    pub async fn put(&self, session: SessionId, open: Vec<u8>) -> Result<(), OpenParamsError> {
        match self {
            Self::Memory(map) => {
                map.insert(session, open);
                Ok(())
            }
            Self::Redis { conn, prefix, ttl } => {
                let mut manager = conn.manager();
                let cmd = redis::cmd("SET")
                    .arg(Self::key(prefix, session))
                    .arg(open)
                    .arg("PX")
                    .arg(millis(*ttl))
                    .clone();
                let fut = async move { cmd.query_async::<()>(&mut manager).await };
                timed(conn, fut).await
            }
        }
    }

    /// The encoded `Open` of `session`, if kept.
    pub async fn get(&self, session: SessionId) -> Result<Option<Vec<u8>>, OpenParamsError> {
        match self {
            Self::Memory(map) => Ok(map.get(&session).map(|v| v.clone())),
            Self::Redis { conn, prefix, .. } => {
                let mut manager = conn.manager();
                let cmd = redis::cmd("GET").arg(Self::key(prefix, session)).clone();
                let fut = async move { cmd.query_async::<Option<Vec<u8>>>(&mut manager).await };
                timed(conn, fut).await
            }
        }
    }

    /// Forgets `session`'s `Open` (best effort: the TTL removes it anyway).
    pub async fn remove(&self, session: SessionId) {
        match self {
            Self::Memory(map) => {
                map.remove(&session);
            }
            Self::Redis { conn, prefix, .. } => {
                let mut manager = conn.manager();
                let cmd = redis::cmd("DEL").arg(Self::key(prefix, session)).clone();
                let fut = async move { cmd.query_async::<()>(&mut manager).await };
                let _ = timed(conn, fut).await;
            }
        }
    }
}

/// Runs one call under the connection's timeout.
async fn timed<T>(
    conn: &RedisConn,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, OpenParamsError> {
    tokio::time::timeout(conn.op_timeout(), call)
        .await
        .map_err(|_| OpenParamsError::TimedOut)?
        .map_err(|e| OpenParamsError::Redis(e.category().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_keeps_and_forgets() {
        let params = OpenParams::memory();
        let id = SessionId(7);
        assert_eq!(params.get(id).await.ok(), Some(None));
        params.put(id, vec![1, 2]).await.expect("put");
        assert_eq!(params.get(id).await.ok(), Some(Some(vec![1, 2])));
        params.remove(id).await;
        assert_eq!(params.get(id).await.ok(), Some(None));
    }
}
