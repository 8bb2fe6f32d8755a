//! [`RedisStore`]: the [`SessionStore`] that several replicas share through one Redis.
//!
//! # Keys (`{p}` is [`RedisStoreConfig::key_prefix`], `tandem` by default)
//! - `{p}:session:{id}`: a hash `owner state created_ms last_seen_ms tokens_in tokens_out
//!   expires_ms resume`, where `resume` is the hex sha256 of the resume token. It carries a
//!   `PEXPIRE` equal to the session's TTL, refreshed on every write.
//! - `{p}:replica:{id}`: the replica's last heartbeat (unix ms), expiring after its TTL.
//! - `{p}:replica-url:{id}`: the WebSocket URL the replica advertises, expiring likewise.
//!
//! Session ids are drawn at random by the replica (no counter). Every read-check-write
//! (create, update, claim) is one Lua script, so it is
//! atomic and one round trip. `claim` builds the owner's heartbeat key inside the script,
//! which standalone Redis and Sentinel allow but Redis Cluster does not.
//!
//! # Failure
//! All calls go through one [`RedisConn`] (a multiplexed connection that reconnects itself,
//! shared with the other stores when [`Stores::open`](crate::Stores::open) built it) and are
//! bounded by [`RedisStoreConfig::op_timeout`]: with Redis down or hung they
//! answer [`StoreError::Unavailable`] within that time. The first call after Redis comes back
//! may still fail while the manager reconnects; later calls succeed. If Redis restarted
//! without persistence, every session and heartbeat is gone (`get_session` answers `None`,
//! `verify_resume` `UnknownSession`).

use std::future::Future;
use std::time::Duration;

use ::redis::{RedisResult, Script};

use crate::redis_conn::{RedisConn, RedisFailure};

use super::{
    millis, now_ms, Claim, NewSession, ReplicaId, ResumeToken, ResumeTokenHash, SessionExpiry,
    SessionId, SessionRecord, SessionState, SessionStore, SessionUpdate, StoreError, StoreFuture,
};

/// How to reach Redis and how to use it (for every store [`Stores::open`](crate::Stores::open)
/// opens on it).
#[derive(Clone, Debug)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`, `unix://`).
    pub url: String,
    /// Put in front of every key, so deployments (and tests) sharing a Redis do not collide.
    pub key_prefix: String,
    /// The most any one call may take, connecting included.
    pub op_timeout: Duration,
    pub expiry: SessionExpiry,
}

impl RedisStoreConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "tandem".to_owned(),
            op_timeout: Duration::from_secs(1),
            expiry: SessionExpiry::default(),
        }
    }
}

/// The record's fields, in the order the scripts and `HMGET` return them.
const RECORD_FIELDS: [&str; 7] = [
    "owner",
    "state",
    "created_ms",
    "last_seen_ms",
    "tokens_in",
    "tokens_out",
    "expires_ms",
];

/// Shared by the scripts: the record's fields of hash `k`, as `HMGET` returns them.
const LUA_RECORD: &str = "local function record(k)
  return redis.call('HMGET', k, 'owner', 'state', 'created_ms', 'last_seen_ms',
    'tokens_in', 'tokens_out', 'expires_ms')
end
";

/// KEYS: session. ARGV: owner, now_ms, ttl_ms, expires_ms, resume hash.
const LUA_CREATE: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'state', 'open', 'created_ms', ARGV[2],
  'last_seen_ms', ARGV[2], 'tokens_in', '0', 'tokens_out', '0', 'expires_ms', ARGV[4],
  'resume', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'ok'}";

/// KEYS: session. ARGV: caller, now_ms, ttl_ms, expires_ms, new state or '', +in, +out.
const LUA_UPDATE: &str = "local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if not cur[1] then return {'unknown'} end
if cur[2] == 'closed' then return {'closed'} end
if cur[1] ~= ARGV[1] then return {'not_owner', cur[1]} end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[5]) end
redis.call('HINCRBY', KEYS[1], 'tokens_in', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'tokens_out', ARGV[7])
redis.call('HSET', KEYS[1], 'last_seen_ms', ARGV[2], 'expires_ms', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local r = record(KEYS[1])
return {'ok', r[1], r[2], r[3], r[4], r[5], r[6], r[7]}";

/// KEYS: session. ARGV: caller, now_ms, ttl_ms, expires_ms, replica key prefix.
const LUA_CLAIM: &str = "local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if not cur[1] then return {'unknown'} end
if cur[2] == 'closed' then return {'closed'} end
local replay = '0'
if cur[1] ~= ARGV[1] then
  if redis.call('EXISTS', ARGV[5] .. cur[1]) == 1 then return {'owner_alive', cur[1]} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
  replay = '1'
end
redis.call('HSET', KEYS[1], 'last_seen_ms', ARGV[2], 'expires_ms', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local r = record(KEYS[1])
return {'ok', replay, r[1], r[2], r[3], r[4], r[5], r[6], r[7]}";

/// KEYS: session. ARGV: the current token's hash (hex), the new one's.
const LUA_ROTATE: &str = "local cur = redis.call('HGET', KEYS[1], 'resume')
if not cur then return 'unknown' end
if cur ~= ARGV[1] then return 'bad' end
redis.call('HSET', KEYS[1], 'resume', ARGV[2])
return 'ok'";

/// The Redis session store. Cheap to share: hold it in an `Arc`.
pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    expiry: SessionExpiry,
    create: Script,
    update: Script,
    claim: Script,
    rotate: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("conn", &self.conn)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisStore {
    /// Connects and pings: [`StoreError::Unavailable`] if Redis does not answer within
    /// `op_timeout`, [`StoreError::Backend`] for a malformed URL.
    pub async fn connect(config: RedisStoreConfig) -> Result<Self, StoreError> {
        let conn = RedisConn::open(&config.url, config.op_timeout).map_err(StoreError::Backend)?;
        let store = Self::on(conn, config.key_prefix, config.expiry);
        store.ping().await?;
        Ok(store)
    }

    /// The store on an existing connection (keys under `{key_prefix}:`); no round trip.
    pub fn on(conn: RedisConn, key_prefix: String, expiry: SessionExpiry) -> Self {
        let lua = |body: &str| Script::new(&format!("{LUA_RECORD}{body}"));
        Self {
            conn,
            prefix: key_prefix,
            expiry,
            create: Script::new(LUA_CREATE),
            update: lua(LUA_UPDATE),
            claim: lua(LUA_CLAIM),
            rotate: Script::new(LUA_ROTATE),
        }
    }

    /// `PING`: [`StoreError::Unavailable`] if Redis does not answer within the timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.conn.ping().await.map_err(store_error)
    }

    fn session_key(&self, id: SessionId) -> String {
        format!("{}:session:{}", self.prefix, id.0)
    }

    fn replica_prefix(&self) -> String {
        format!("{}:replica:", self.prefix)
    }

    fn replica_key(&self, replica: &ReplicaId) -> String {
        format!("{}{}", self.replica_prefix(), replica)
    }

    /// Runs one Redis call under the timeout, mapping its errors.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.conn.bounded(call).await.map_err(store_error)
    }

    /// `(ttl_ms, now_ms, expires_ms)` for a write that leaves the session in `state`.
    fn stamp(&self, state: SessionState) -> (u64, u64, u64) {
        let ttl = millis(self.expiry.ttl_for(state));
        let now = now_ms();
        (ttl, now, now.saturating_add(ttl))
    }
}

fn store_error(f: RedisFailure) -> StoreError {
    match f {
        RedisFailure::Unavailable(m) => StoreError::Unavailable(m),
        RedisFailure::Corrupt(m) => StoreError::Corrupt(m),
        RedisFailure::Backend(m) => StoreError::Backend(m),
    }
}

/// Builds a record from the seven [`RECORD_FIELDS`] values.
fn parse_record(id: SessionId, fields: &[Option<String>]) -> Result<SessionRecord, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("session {}: bad {what}", id.0));
    let field = |i: usize| fields.get(i).and_then(Option::as_deref);
    let num = |i: usize| -> Result<u64, StoreError> {
        field(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(RECORD_FIELDS[i]))
    };
    Ok(SessionRecord {
        id,
        owner: field(0)
            .and_then(|s| ReplicaId::new(s).ok())
            .ok_or_else(|| corrupt("owner"))?,
        state: field(1)
            .and_then(SessionState::parse)
            .ok_or_else(|| corrupt("state"))?,
        created_ms: num(2)?,
        last_seen_ms: num(3)?,
        tokens_in: num(4)?,
        tokens_out: num(5)?,
        expires_ms: num(6)?,
    })
}

/// Splits a script's reply into its status word and the rest.
fn status(reply: &[Option<String>]) -> Result<(&str, &[Option<String>]), StoreError> {
    match reply.split_first() {
        Some((Some(word), rest)) => Ok((word.as_str(), rest)),
        _ => Err(StoreError::Corrupt("empty script reply".to_owned())),
    }
}

fn owner_of(id: SessionId, rest: &[Option<String>]) -> Result<ReplicaId, StoreError> {
    rest.first()
        .and_then(Option::as_deref)
        .and_then(|s| ReplicaId::new(s).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("session {}: bad owner", id.0)))
}

fn unexpected(word: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected script status {word:?}"))
}

impl SessionStore for RedisStore {
    fn create_session(
        &self,
        new: NewSession,
        resume: ResumeTokenHash,
    ) -> StoreFuture<'_, SessionRecord> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let (ttl, now, expires) = self.stamp(SessionState::Open);
            let mut call = self.create.key(self.session_key(new.id));
            call.arg(new.owner.as_str())
                .arg(now)
                .arg(ttl)
                .arg(expires)
                .arg(resume.to_hex());
            let reply: Vec<Option<String>> = self.bounded(call.invoke_async(&mut conn)).await?;
            match status(&reply)?.0 {
                "ok" => Ok(SessionRecord {
                    id: new.id,
                    owner: new.owner,
                    state: SessionState::Open,
                    created_ms: now,
                    last_seen_ms: now,
                    tokens_in: 0,
                    tokens_out: 0,
                    expires_ms: expires,
                }),
                "exists" => Err(StoreError::AlreadyExists(new.id)),
                word => Err(unexpected(word)),
            }
        })
    }

    fn get_session(&self, id: SessionId) -> StoreFuture<'_, Option<SessionRecord>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("HMGET");
            cmd.arg(self.session_key(id)).arg(&RECORD_FIELDS[..]);
            let fields: Vec<Option<String>> = self.bounded(cmd.query_async(&mut conn)).await?;
            if fields.first().is_none_or(Option::is_none) {
                return Ok(None);
            }
            parse_record(id, &fields).map(Some)
        })
    }

    fn update_session<'a>(
        &'a self,
        id: SessionId,
        by: &'a ReplicaId,
        update: SessionUpdate,
    ) -> StoreFuture<'a, SessionRecord> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            // A state change to Closed shortens the TTL; any other write restores the idle one
            // (a closed session is never written again).
            let (ttl, now, expires) = self.stamp(update.state.unwrap_or(SessionState::Open));
            let mut call = self.update.key(self.session_key(id));
            call.arg(by.as_str())
                .arg(now)
                .arg(ttl)
                .arg(expires)
                .arg(update.state.map_or("", SessionState::as_str))
                .arg(update.add_tokens_in)
                .arg(update.add_tokens_out);
            let reply: Vec<Option<String>> = self.bounded(call.invoke_async(&mut conn)).await?;
            match status(&reply)? {
                ("ok", rest) => parse_record(id, rest),
                ("unknown", _) => Err(StoreError::UnknownSession(id)),
                ("closed", _) => Err(StoreError::SessionClosed(id)),
                ("not_owner", rest) => Err(StoreError::NotOwner {
                    id,
                    owner: owner_of(id, rest)?,
                }),
                (word, _) => Err(unexpected(word)),
            }
        })
    }

    fn verify_resume<'a>(
        &'a self,
        id: SessionId,
        token: &'a ResumeToken,
    ) -> StoreFuture<'a, SessionRecord> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("HMGET");
            cmd.arg(self.session_key(id))
                .arg(&RECORD_FIELDS[..])
                .arg("resume");
            let mut fields: Vec<Option<String>> = self.bounded(cmd.query_async(&mut conn)).await?;
            if fields.first().is_none_or(Option::is_none) {
                return Err(StoreError::UnknownSession(id));
            }
            let stored = fields
                .pop()
                .flatten()
                .and_then(|hex| ResumeTokenHash::from_hex(&hex))
                .ok_or_else(|| StoreError::Corrupt(format!("session {}: bad resume hash", id.0)))?;
            if !stored.matches(token) {
                return Err(StoreError::BadResumeToken(id));
            }
            let record = parse_record(id, &fields)?;
            if record.state == SessionState::Closed {
                return Err(StoreError::SessionClosed(id));
            }
            Ok(record)
        })
    }

    fn rotate_resume<'a>(
        &'a self,
        id: SessionId,
        old: &'a ResumeToken,
        new: ResumeTokenHash,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut call = self.rotate.key(self.session_key(id));
            call.arg(old.hash().to_hex()).arg(new.to_hex());
            let answer: String = self.bounded(call.invoke_async(&mut conn)).await?;
            match answer.as_str() {
                "ok" => Ok(()),
                "unknown" => Err(StoreError::UnknownSession(id)),
                _ => Err(StoreError::BadResumeToken(id)),
            }
        })
    }

    fn heartbeat<'a>(&'a self, replica: &'a ReplicaId, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("SET");
            cmd.arg(self.replica_key(replica))
                .arg(now_ms())
                .arg("PX")
                .arg(millis(ttl));
            self.bounded(cmd.query_async::<()>(&mut conn)).await
        })
    }

    fn advertise<'a>(
        &'a self,
        replica: &'a ReplicaId,
        url: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("SET");
            cmd.arg(format!("{}:replica-url:{replica}", self.prefix))
                .arg(url)
                .arg("PX")
                .arg(millis(ttl));
            self.bounded(cmd.query_async::<()>(&mut conn)).await
        })
    }

    fn replica_address<'a>(&'a self, replica: &'a ReplicaId) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("GET");
            cmd.arg(format!("{}:replica-url:{replica}", self.prefix));
            self.bounded(cmd.query_async(&mut conn)).await
        })
    }

    fn replica_alive<'a>(&'a self, replica: &'a ReplicaId) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("EXISTS");
            cmd.arg(self.replica_key(replica));
            let n: u64 = self.bounded(cmd.query_async(&mut conn)).await?;
            Ok(n > 0)
        })
    }

    fn claim<'a>(&'a self, id: SessionId, by: &'a ReplicaId) -> StoreFuture<'a, Claim> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let (ttl, now, expires) = self.stamp(SessionState::Open);
            let mut call = self.claim.key(self.session_key(id));
            call.arg(by.as_str())
                .arg(now)
                .arg(ttl)
                .arg(expires)
                .arg(self.replica_prefix());
            let reply: Vec<Option<String>> = self.bounded(call.invoke_async(&mut conn)).await?;
            match status(&reply)? {
                ("ok", [replay, rest @ ..]) => Ok(Claim::Owned {
                    record: parse_record(id, rest)?,
                    replay: replay.as_deref() == Some("1"),
                }),
                ("owner_alive", rest) => Ok(Claim::OwnerAlive {
                    owner: owner_of(id, rest)?,
                }),
                ("unknown", _) => Err(StoreError::UnknownSession(id)),
                ("closed", _) => Err(StoreError::SessionClosed(id)),
                (word, _) => Err(unexpected(word)),
            }
        })
    }
}
