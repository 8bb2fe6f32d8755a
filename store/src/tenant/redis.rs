//! [`RedisTenantStore`]: tenants and keys in the Redis the session store uses (on the same
//! [`RedisConn`] when [`Stores::open`](crate::Stores::open) built it).
//!
//! # Keys (`{p}` is the server's `redis_key_prefix`, `tandem` by default)
//! - `{p}:tenant:{id}`: a hash `name prompts_per_minute tokens_per_day max_audience
//!   created_ms`, and `webhook_secret` once the tenant has one (the webhook signing secret,
//!   kept as is: the server needs it to sign).
//! - `{p}:tenants`: a sorted set of tenant ids scored by `created_ms` (for listing).
//! - `{p}:tenant-names`: a hash `name → id` (names are unique).
//! - `{p}:apikey:{key_id}`: a hash `tenant hash created_ms`, where `hash` is the hex sha256
//!   of the whole key. The key itself is never written.
//! - `{p}:tenant-keys:{tenant_id}`: a sorted set of the tenant's key ids by `created_ms`.
//!
//! Writes that check something first (create a tenant, add or revoke a key) are Lua scripts,
//! so they are atomic. Listing tenants is two round trips (the ids, then one pipelined
//! `HMGET` each). Every call is bounded by the timeout and maps connection failures to
//! [`TenantStoreError::Unavailable`].

use std::future::Future;
use std::time::Duration;

use ::redis::{RedisResult, Script};

use crate::redis_conn::{RedisConn, RedisFailure};

use super::{
    KeyHash, KeyId, KeyInfo, KeyRecord, Quotas, TenantFuture, TenantId, TenantRecord, TenantStore,
    TenantStoreError, DEFAULT_OP_TIMEOUT,
};

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisTenantStoreConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Put in front of every key.
    pub key_prefix: String,
    /// The most any one call may take.
    pub op_timeout: Duration,
}

impl RedisTenantStoreConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "tandem".to_owned(),
            op_timeout: DEFAULT_OP_TIMEOUT,
        }
    }
}

const TENANT_FIELDS: [&str; 5] = [
    "name",
    "prompts_per_minute",
    "tokens_per_day",
    "max_audience",
    "created_ms",
];

/// KEYS: tenant, tenants, names. ARGV: id, name, ppm, tpd, audience, created_ms.
const LUA_CREATE_TENANT: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return 'id_taken' end
if redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[1]) == 0 then return 'name_taken' end
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'prompts_per_minute', ARGV[3],
  'tokens_per_day', ARGV[4], 'max_audience', ARGV[5], 'created_ms', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
return 'ok'";

/// KEYS: tenant, apikey, tenant-keys. ARGV: key_id, tenant_id, hash, created_ms.
const LUA_ADD_KEY: &str = "if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown_tenant' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'id_taken' end
redis.call('HSET', KEYS[2], 'tenant', ARGV[2], 'hash', ARGV[3], 'created_ms', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 'ok'";

/// KEYS: tenant, apikey, tenant-keys. ARGV: key_id, tenant_id.
const LUA_REVOKE_KEY: &str =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown_tenant' end
if redis.call('HGET', KEYS[2], 'tenant') ~= ARGV[2] then return 'unknown_key' end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 'ok'";

/// KEYS: tenant. ARGV: ppm, tpd, audience.
const LUA_SET_QUOTAS: &str =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown_tenant' end
redis.call('HSET', KEYS[1], 'prompts_per_minute', ARGV[1], 'tokens_per_day', ARGV[2],
  'max_audience', ARGV[3])
return 'ok'";

/// KEYS: tenant. ARGV: secret, replace (`1`/`0`). Answers the secret in force.
const LUA_SET_WEBHOOK_SECRET: &str =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown_tenant' end
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], 'webhook_secret', ARGV[1])
else redis.call('HSETNX', KEYS[1], 'webhook_secret', ARGV[1]) end
return redis.call('HGET', KEYS[1], 'webhook_secret')";

/// The Redis tenant store. Cheap to share: hold it in an `Arc`.
pub struct RedisTenantStore {
    pub(super) conn: RedisConn,
    pub(super) prefix: String,
    create_tenant: Script,
    add_key: Script,
    revoke_key: Script,
    set_quotas: Script,
    set_webhook_secret: Script,
}

impl std::fmt::Debug for RedisTenantStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTenantStore")
            .field("conn", &self.conn)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisTenantStore {
    /// Connects and pings: [`TenantStoreError::Unavailable`] if Redis does not answer in
    /// time, [`TenantStoreError::Backend`] for a malformed URL.
    pub async fn connect(config: RedisTenantStoreConfig) -> Result<Self, TenantStoreError> {
        let conn =
            RedisConn::open(&config.url, config.op_timeout).map_err(TenantStoreError::Backend)?;
        let store = Self::on(conn, config.key_prefix);
        store.conn.ping().await.map_err(tenant_error)?;
        Ok(store)
    }

    /// The store on an existing connection (keys under `{key_prefix}:`); no round trip.
    pub fn on(conn: RedisConn, key_prefix: String) -> Self {
        Self {
            conn,
            prefix: key_prefix,
            create_tenant: Script::new(LUA_CREATE_TENANT),
            add_key: Script::new(LUA_ADD_KEY),
            revoke_key: Script::new(LUA_REVOKE_KEY),
            set_quotas: Script::new(LUA_SET_QUOTAS),
            set_webhook_secret: Script::new(LUA_SET_WEBHOOK_SECRET),
        }
    }

    fn tenant_key(&self, id: &TenantId) -> String {
        format!("{}:tenant:{id}", self.prefix)
    }

    fn tenants_key(&self) -> String {
        format!("{}:tenants", self.prefix)
    }

    fn names_key(&self) -> String {
        format!("{}:tenant-names", self.prefix)
    }

    fn apikey_key(&self, id: &KeyId) -> String {
        format!("{}:apikey:{id}", self.prefix)
    }

    fn tenant_keys_key(&self, id: &TenantId) -> String {
        format!("{}:tenant-keys:{id}", self.prefix)
    }

    pub(super) async fn bounded<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, TenantStoreError> {
        self.conn.bounded(call).await.map_err(tenant_error)
    }
}

fn tenant_error(f: RedisFailure) -> TenantStoreError {
    match f {
        RedisFailure::Unavailable(m) => TenantStoreError::Unavailable(m),
        RedisFailure::Corrupt(m) => TenantStoreError::Corrupt(m),
        RedisFailure::Backend(m) => TenantStoreError::Backend(m),
    }
}

/// Builds a tenant from the five [`TENANT_FIELDS`] values.
fn parse_tenant(id: TenantId, f: &[Option<String>]) -> Result<TenantRecord, TenantStoreError> {
    let corrupt = |what: &str| TenantStoreError::Corrupt(format!("tenant {id}: bad {what}"));
    let field = |i: usize| f.get(i).and_then(Option::as_deref);
    let num = |i: usize| -> Result<u64, TenantStoreError> {
        field(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(TENANT_FIELDS[i]))
    };
    let small = |i: usize| -> Result<u32, TenantStoreError> {
        u32::try_from(num(i)?).map_err(|_| corrupt(TENANT_FIELDS[i]))
    };
    Ok(TenantRecord {
        name: field(0).ok_or_else(|| corrupt("name"))?.to_owned(),
        quotas: Quotas {
            prompts_per_minute: small(1)?,
            tokens_per_day: num(2)?,
            max_audience: small(3)?,
        },
        created_ms: num(4)?,
        id,
    })
}

pub(super) fn unexpected(word: &str) -> TenantStoreError {
    TenantStoreError::Corrupt(format!("unexpected script status {word:?}"))
}

impl TenantStore for RedisTenantStore {
    fn create_tenant<'a>(&'a self, tenant: &'a TenantRecord) -> TenantFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut call = self.create_tenant.key(self.tenant_key(&tenant.id));
            call.key(self.tenants_key())
                .key(self.names_key())
                .arg(tenant.id.as_str())
                .arg(&tenant.name)
                .arg(tenant.quotas.prompts_per_minute)
                .arg(tenant.quotas.tokens_per_day)
                .arg(tenant.quotas.max_audience)
                .arg(tenant.created_ms);
            let word: String = self.bounded(call.invoke_async(&mut conn)).await?;
            match word.as_str() {
                "ok" => Ok(()),
                "name_taken" => Err(TenantStoreError::NameTaken(tenant.name.clone())),
                "id_taken" => Err(TenantStoreError::IdTaken(tenant.id.to_string())),
                w => Err(unexpected(w)),
            }
        })
    }

    fn get_tenant<'a>(&'a self, id: &'a TenantId) -> TenantFuture<'a, Option<TenantRecord>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("HMGET");
            cmd.arg(self.tenant_key(id)).arg(&TENANT_FIELDS[..]);
            let fields: Vec<Option<String>> = self.bounded(cmd.query_async(&mut conn)).await?;
            if fields.first().is_none_or(Option::is_none) {
                return Ok(None);
            }
            parse_tenant(id.clone(), &fields).map(Some)
        })
    }

    fn list_tenants(&self) -> TenantFuture<'_, Vec<TenantRecord>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("ZRANGE");
            cmd.arg(self.tenants_key()).arg(0).arg(-1);
            let ids: Vec<String> = self.bounded(cmd.query_async(&mut conn)).await?;
            let ids: Vec<TenantId> = ids
                .iter()
                .map(|s| {
                    TenantId::parse(s)
                        .ok_or_else(|| TenantStoreError::Corrupt(format!("tenant id {s:?}")))
                })
                .collect::<Result<_, _>>()?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = ::redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.tenant_key(id))
                    .arg(&TENANT_FIELDS[..]);
            }
            let rows: Vec<Vec<Option<String>>> = self.bounded(pipe.query_async(&mut conn)).await?;
            let mut out = Vec::with_capacity(ids.len());
            for (id, fields) in ids.into_iter().zip(rows) {
                out.push(parse_tenant(id, &fields)?);
            }
            // The sorted set orders ties by member, i.e. by id: the order the trait promises.
            Ok(out)
        })
    }

    fn add_key<'a>(&'a self, key: &'a KeyRecord) -> TenantFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut call = self.add_key.key(self.tenant_key(&key.tenant));
            call.key(self.apikey_key(&key.key_id))
                .key(self.tenant_keys_key(&key.tenant))
                .arg(key.key_id.as_str())
                .arg(key.tenant.as_str())
                .arg(key.hash.to_hex())
                .arg(key.created_ms);
            let word: String = self.bounded(call.invoke_async(&mut conn)).await?;
            match word.as_str() {
                "ok" => Ok(()),
                "unknown_tenant" => Err(TenantStoreError::UnknownTenant(key.tenant.clone())),
                "id_taken" => Err(TenantStoreError::IdTaken(key.key_id.to_string())),
                w => Err(unexpected(w)),
            }
        })
    }

    fn get_key<'a>(&'a self, id: &'a KeyId) -> TenantFuture<'a, Option<KeyRecord>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("HMGET");
            cmd.arg(self.apikey_key(id))
                .arg("tenant")
                .arg("hash")
                .arg("created_ms");
            let f: Vec<Option<String>> = self.bounded(cmd.query_async(&mut conn)).await?;
            let field = |i: usize| f.get(i).and_then(Option::as_deref);
            let Some(tenant) = field(0) else {
                return Ok(None);
            };
            let corrupt = |what: &str| TenantStoreError::Corrupt(format!("key {id}: bad {what}"));
            Ok(Some(KeyRecord {
                key_id: id.clone(),
                tenant: TenantId::parse(tenant).ok_or_else(|| corrupt("tenant"))?,
                hash: field(1)
                    .and_then(KeyHash::from_hex)
                    .ok_or_else(|| corrupt("hash"))?,
                created_ms: field(2)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| corrupt("created_ms"))?,
            }))
        })
    }

    fn list_keys<'a>(&'a self, tenant: &'a TenantId) -> TenantFuture<'a, Vec<KeyInfo>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut pipe = ::redis::pipe();
            pipe.atomic()
                .cmd("EXISTS")
                .arg(self.tenant_key(tenant))
                .cmd("ZRANGE")
                .arg(self.tenant_keys_key(tenant))
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES");
            let (exists, keys): (u64, Vec<(String, f64)>) =
                self.bounded(pipe.query_async(&mut conn)).await?;
            if exists == 0 {
                return Err(TenantStoreError::UnknownTenant(tenant.clone()));
            }
            keys.into_iter()
                .map(|(id, score)| {
                    let key_id = KeyId::parse(&id)
                        .ok_or_else(|| TenantStoreError::Corrupt(format!("key id {id:?}")))?;
                    // Scores are unix milliseconds, exact in an f64 for millions of years.
                    Ok(KeyInfo {
                        key_id,
                        created_ms: score as u64,
                    })
                })
                .collect()
        })
    }

    fn set_quotas<'a>(&'a self, tenant: &'a TenantId, quotas: Quotas) -> TenantFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut call = self.set_quotas.key(self.tenant_key(tenant));
            call.arg(quotas.prompts_per_minute)
                .arg(quotas.tokens_per_day)
                .arg(quotas.max_audience);
            let word: String = self.bounded(call.invoke_async(&mut conn)).await?;
            match word.as_str() {
                "ok" => Ok(()),
                "unknown_tenant" => Err(TenantStoreError::UnknownTenant(tenant.clone())),
                w => Err(unexpected(w)),
            }
        })
    }

    fn revoke_key<'a>(&'a self, tenant: &'a TenantId, key: &'a KeyId) -> TenantFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut call = self.revoke_key.key(self.tenant_key(tenant));
            call.key(self.apikey_key(key))
                .key(self.tenant_keys_key(tenant))
                .arg(key.as_str())
                .arg(tenant.as_str());
            let word: String = self.bounded(call.invoke_async(&mut conn)).await?;
            match word.as_str() {
                "ok" => Ok(()),
                "unknown_tenant" => Err(TenantStoreError::UnknownTenant(tenant.clone())),
                "unknown_key" => Err(TenantStoreError::UnknownKey(key.clone())),
                w => Err(unexpected(w)),
            }
        })
    }

    fn webhook_secret<'a>(&'a self, tenant: &'a TenantId) -> TenantFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("HMGET");
            cmd.arg(self.tenant_key(tenant))
                .arg("name")
                .arg("webhook_secret");
            let (name, secret): (Option<String>, Option<String>) =
                self.bounded(cmd.query_async(&mut conn)).await?;
            if name.is_none() {
                return Err(TenantStoreError::UnknownTenant(tenant.clone()));
            }
            Ok(secret)
        })
    }

    fn set_webhook_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        secret: &'a str,
        replace: bool,
    ) -> TenantFuture<'a, String> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut call = self.set_webhook_secret.key(self.tenant_key(tenant));
            call.arg(secret).arg(if replace { "1" } else { "0" });
            let word: String = self.bounded(call.invoke_async(&mut conn)).await?;
            if word == "unknown_tenant" {
                return Err(TenantStoreError::UnknownTenant(tenant.clone()));
            }
            Ok(word)
        })
    }
}
