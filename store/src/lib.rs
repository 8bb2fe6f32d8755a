//! `tandem-store`: what the server keeps beyond one connection, in memory (one process) or
//! in Redis (several replicas).
//!
//! # What it keeps
//! - [`session`]: sessions, hashed resume tokens, replica heartbeats and advertised URLs
//!   ([`SessionStore`]; [`MemoryStore`], [`RedisStore`]), so that a device reconnecting to
//!   any replica finds its session.
//! - [`opens`]: each live session's `Open` frame ([`OpenParams`]), for a replica that takes
//!   a session over and replays it.
//! - [`tenant`]: partner tenants, quotas, hashed API keys and webhook secrets
//!   ([`TenantStore`]), and in [`tenant::prompts`] partner prompts, their assignments,
//!   results, tickets, device-token revocations and rate-limit counters ([`PromptStore`]).
//!
//! [`Stores::open`] opens all of them on one backend. On Redis they share one
//! [`RedisConn`]: one client, one connection manager, one timeout.
//!
//! # Guarantees (each module doc says more)
//! - **Secrets are stored hashed**: resume tokens, API keys and tickets as their SHA-256
//!   ([`SecretDigest`]), compared in constant time; the secrets' `Debug` is redacted.
//! - **Checked writes are atomic**: every read-check-write is one Lua script in Redis (one
//!   shard lock or one mutex in memory), so two replicas racing on one session, key or
//!   assignment never both win.
//! - **Bounded latency** (Redis): every call has a timeout; with Redis down or hung a call
//!   fails with an `Unavailable` error instead of hanging, and works again once Redis is back.
//! - **Everything expires**: sessions after their idle TTL, saved opens with them, prompts a
//!   retention period after their expiry, counters with their window.
//!
//! # Layout
//! - [`redis_conn`]: [`RedisConn`], the timeout and error classification every Redis call
//!   goes through, and [`set_call_observer`], where the server plugs its Redis metrics in
//!   (this crate has no metrics of its own).
//! - [`secret`]: [`SecretDigest`], the hash a secret is kept as.
//!
//! The session id is the wire's [`SessionId`] (`tandem_protocol`), re-exported here.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

use std::sync::Arc;

pub mod opens;
pub mod redis_conn;
pub mod secret;
pub mod session;
pub mod tenant;

pub use opens::{OpenParams, OpenParamsError};
pub use redis_conn::{set_call_observer, CallObserver, RedisConn};
pub use secret::SecretDigest;
pub use session::{
    now_ms, MemoryStore, RedisStore, RedisStoreConfig, ReplicaId, SessionExpiry, SessionId,
    SessionStore, StoreError,
};
pub use tenant::{MemoryTenantStore, PromptStore, RedisTenantStore, TenantStore};

/// Which backend [`Stores::open`] opens.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// In-process; for a single replica.
    Memory { expiry: SessionExpiry },
    /// Shared by several replicas: every store on this Redis, under one key prefix.
    Redis(RedisStoreConfig),
}

/// Every store a server uses, on one backend.
pub struct Stores {
    pub sessions: Arc<dyn SessionStore>,
    pub tenants: Arc<dyn TenantStore>,
    pub prompts: Arc<dyn PromptStore>,
    pub opens: OpenParams,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("opens", &self.opens)
            .finish_non_exhaustive()
    }
}

impl Stores {
    /// Opens the configured backend. For Redis this makes one connection for every store and
    /// pings it, so a wrong address fails here, at start-up, with
    /// [`StoreError::Unavailable`] ([`StoreError::Backend`] for a malformed URL). Saved opens
    /// live as long as an idle session (`expiry.idle_ttl`).
    pub async fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        Ok(match config {
            StoreConfig::Memory { expiry } => {
                let tenants = Arc::new(MemoryTenantStore::default());
                Self {
                    sessions: Arc::new(MemoryStore::new(*expiry)),
                    tenants: tenants.clone(),
                    prompts: tenants,
                    opens: OpenParams::memory(),
                }
            }
            StoreConfig::Redis(cfg) => {
                let conn =
                    RedisConn::open(&cfg.url, cfg.op_timeout).map_err(StoreError::Backend)?;
                let sessions = RedisStore::on(conn.clone(), cfg.key_prefix.clone(), cfg.expiry);
                sessions.ping().await?;
                let tenants = Arc::new(RedisTenantStore::on(conn.clone(), cfg.key_prefix.clone()));
                Self {
                    sessions: Arc::new(sessions),
                    tenants: tenants.clone(),
                    prompts: tenants,
                    opens: OpenParams::redis(conn, &cfg.key_prefix, cfg.expiry.idle_ttl),
                }
            }
        })
    }
}
