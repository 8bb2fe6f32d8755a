//! [`PromptStore`] for [`RedisTenantStore`].
//!
//! # Keys (`{p}` is the key prefix)
//! - `{p}:prompt:{id}`: a hash `tenant json expires_ms cancelled`; `json` is the
//!   [`PromptRecord`] as JSON (the audience included).
//! - `{p}:assign:{id}`: a hash with, per user `u` of the audience: `u` → status,
//!   `u:t` → last change (Unix ms), `u:k` → the live ticket's hex sha256, `u:r` → the
//!   [`GenerationResult`] as JSON. User ids cannot hold `:`, so fields never collide.
//! - `{p}:tenant-prompts:{tenant}`: a sorted set of the tenant's prompt ids by creation time.
//! - `{p}:inbox:{user}`: a sorted set of prompt ids by expiry.
//! - `{p}:ticket:{hex sha256}`: `"{prompt id} {user}"` until the prompt expires; deleted when
//!   claimed or cancelled.
//! - `{p}:devtoken-revoked:{token id}`: present until the token's expiry.
//! - `{p}:devtoken-epoch`: the device-token epoch (Unix ms when it started); no expiry. When
//!   it is missing (Redis lost its data), the next reader starts a new one.
//! - `{p}:rl:{name}:{window ms}:{index}`: a counter that expires with its window.
//!
//! Prompt, assignment and inbox keys expire [`RESULT_RETENTION_MS`] after the prompt does.
//! Every transition is a Lua script (atomic). The scripts touch inbox and ticket keys they
//! build from arguments, which is fine on one Redis (or a replicated pair) but not on Redis
//! Cluster.

use std::sync::LazyLock;

use ::redis::Script;

use super::prompts::{
    window, AnswerRefusal, Assignment, AssignmentStatus, Claimed, GenerationResult, PromptId,
    PromptRecord, PromptStore, TicketRefusal, UserId, RESULT_RETENTION_MS,
};
use super::redis::{unexpected, RedisTenantStore};
use super::{KeyHash, TenantFuture, TenantId, TenantStoreError};

/// KEYS: prompt, assign, tenant-prompts. ARGV: id, tenant, json, expires_ms, created_ms,
/// keep_until_ms, inbox key prefix, users...
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('EXISTS', KEYS[1]) == 1 then return 'id_taken' end
redis.call('HSET', KEYS[1], 'tenant', ARGV[2], 'json', ARGV[3], 'expires_ms', ARGV[4], 'cancelled', '0')
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
for i = 8, #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], 'pending', ARGV[i] .. ':t', ARGV[5])
  local inbox = ARGV[7] .. ARGV[i]
  redis.call('ZADD', inbox, ARGV[4], ARGV[1])
  if redis.call('PTTL', inbox) >= 0 then
    redis.call('PEXPIREAT', inbox, ARGV[6], 'GT')
  else
    redis.call('PEXPIREAT', inbox, ARGV[6])
  end
end
if #ARGV >= 8 then redis.call('PEXPIREAT', KEYS[2], ARGV[6]) end
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return 'ok'",
    )
});

/// KEYS: prompt, assign. ARGV: now, ticket key prefix. Returns 0 if there is no prompt.
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancelled', '1')
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  if not string.find(f, ':', 1, true) and (v == 'pending' or v == 'accepted') then
    redis.call('HSET', KEYS[2], f, 'cancelled', f .. ':t', ARGV[1])
    local k = redis.call('HGET', KEYS[2], f .. ':k')
    if k then
      redis.call('DEL', ARGV[2] .. k)
      redis.call('HDEL', KEYS[2], f .. ':k')
    end
  end
end
return 1",
    )
});

/// KEYS: prompt, assign. ARGV: user, now, accept (1/0), ticket hex, ticket key, prompt id.
/// Returns `ok`, `not_found`, or the status that is not `pending`.
static ANSWER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local st = redis.call('HGET', KEYS[2], ARGV[1])
if not st then return 'not_found' end
local meta = redis.call('HMGET', KEYS[1], 'expires_ms', 'cancelled')
if not meta[1] then return 'not_found' end
if (st == 'pending' or st == 'accepted') and tonumber(ARGV[2]) >= tonumber(meta[1]) then
  return 'expired'
end
if st ~= 'pending' then return st end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[2], ARGV[1], 'accepted', ARGV[1] .. ':t', ARGV[2], ARGV[1] .. ':k', ARGV[4])
  redis.call('SET', ARGV[5], ARGV[6] .. ' ' .. ARGV[1], 'PXAT', meta[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], 'declined', ARGV[1] .. ':t', ARGV[2])
end
return 'ok'",
    )
});

/// KEYS: ticket. ARGV: now, key prefix. Returns `{'ok', json, user}`, or `{status}` with
/// `unknown` or the status that is not `accepted`.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local v = redis.call('GET', KEYS[1])
if not v then return {'unknown'} end
redis.call('DEL', KEYS[1])
local sp = string.find(v, ' ', 1, true)
if not sp then return {'unknown'} end
local pid, user = string.sub(v, 1, sp - 1), string.sub(v, sp + 1)
local akey = ARGV[2] .. ':assign:' .. pid
local meta = redis.call('HMGET', ARGV[2] .. ':prompt:' .. pid, 'expires_ms', 'cancelled', 'json')
if not meta[3] then return {'unknown'} end
local st = redis.call('HGET', akey, user)
if not st then return {'unknown'} end
redis.call('HDEL', akey, user .. ':k')
if st == 'accepted' and meta[2] == '1' then return {'cancelled'} end
if st == 'accepted' and tonumber(ARGV[1]) >= tonumber(meta[1]) then return {'expired'} end
if st ~= 'accepted' then return {st} end
redis.call('HSET', akey, user, 'running', user .. ':t', ARGV[1])
return {'ok', meta[3], user}",
    )
});

/// KEYS: assign. ARGV: user, final status, now, result json. 1 if it was running.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. ':t', ARGV[3], ARGV[1] .. ':r', ARGV[4])
return 1",
    )
});

/// KEYS: epoch. ARGV: now. The epoch, started at `now` when there is none.
static EPOCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local e = redis.call('GET', KEYS[1])
if e then return e end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]",
    )
});

/// KEYS: counter. ARGV: amount, limit, window ms. 1 if taken.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
if v == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1",
    )
});

fn corrupt(what: impl std::fmt::Display) -> TenantStoreError {
    TenantStoreError::Corrupt(what.to_string())
}

fn parse_prompt(json: &str) -> Result<PromptRecord, TenantStoreError> {
    serde_json::from_str(json).map_err(|e| corrupt(format!("prompt record: {e}")))
}

impl RedisTenantStore {
    fn prompt_key(&self, id: &PromptId) -> String {
        format!("{}:prompt:{id}", self.prefix)
    }

    fn assign_key(&self, id: &PromptId) -> String {
        format!("{}:assign:{id}", self.prefix)
    }

    fn tenant_prompts_key(&self, tenant: &TenantId) -> String {
        format!("{}:tenant-prompts:{tenant}", self.prefix)
    }

    fn inbox_key(&self, user: &UserId) -> String {
        format!("{}:inbox:{user}", self.prefix)
    }

    fn ticket_prefix(&self) -> String {
        format!("{}:ticket:", self.prefix)
    }

    fn revoked_key(&self, token_id: &str) -> String {
        format!("{}:devtoken-revoked:{token_id}", self.prefix)
    }

    /// Reads prompt records by id (pipelined); ids whose record is gone are returned apart.
    async fn prompts_by_id(
        &self,
        ids: &[String],
    ) -> Result<(Vec<PromptRecord>, Vec<String>), TenantStoreError> {
        if ids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut pipe = ::redis::pipe();
        for id in ids {
            pipe.cmd("HGET")
                .arg(format!("{}:prompt:{id}", self.prefix))
                .arg("json");
        }
        let mut conn = self.conn.manager();
        let rows: Vec<Option<String>> = self.bounded(pipe.query_async(&mut conn)).await?;
        let mut found = Vec::new();
        let mut gone = Vec::new();
        for (id, row) in ids.iter().zip(rows) {
            match row {
                Some(json) => found.push(parse_prompt(&json)?),
                None => gone.push(id.clone()),
            }
        }
        Ok((found, gone))
    }
}

fn status_word(word: &str) -> Result<AssignmentStatus, TenantStoreError> {
    AssignmentStatus::parse(word).ok_or_else(|| unexpected(word))
}

impl PromptStore for RedisTenantStore {
    fn create_prompt<'a>(&'a self, prompt: &'a PromptRecord) -> TenantFuture<'a, ()> {
        Box::pin(async move {
            let json = serde_json::to_string(prompt).map_err(corrupt)?;
            let keep_until = prompt.expires_ms.saturating_add(RESULT_RETENTION_MS);
            let mut call = CREATE.key(self.prompt_key(&prompt.id));
            call.key(self.assign_key(&prompt.id))
                .key(self.tenant_prompts_key(&prompt.tenant))
                .arg(prompt.id.as_str())
                .arg(prompt.tenant.as_str())
                .arg(json)
                .arg(prompt.expires_ms)
                .arg(prompt.created_ms)
                .arg(keep_until)
                .arg(format!("{}:inbox:", self.prefix));
            for user in &prompt.audience {
                call.arg(user.as_str());
            }
            let mut conn = self.conn.manager();
            let word: String = self.bounded(call.invoke_async(&mut conn)).await?;
            match word.as_str() {
                "ok" => Ok(()),
                "id_taken" => Err(TenantStoreError::IdTaken(prompt.id.to_string())),
                w => Err(unexpected(w)),
            }
        })
    }

    fn get_prompt<'a>(&'a self, id: &'a PromptId) -> TenantFuture<'a, Option<PromptRecord>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("HMGET");
            cmd.arg(self.prompt_key(id)).arg("json").arg("cancelled");
            let row: Vec<Option<String>> = self.bounded(cmd.query_async(&mut conn)).await?;
            let (Some(Some(json)), cancelled) = (row.first(), row.get(1)) else {
                return Ok(None);
            };
            let mut p = parse_prompt(json)?;
            p.cancelled = matches!(cancelled, Some(Some(c)) if c == "1");
            Ok(Some(p))
        })
    }

    fn list_prompts<'a>(
        &'a self,
        tenant: &'a TenantId,
        limit: usize,
    ) -> TenantFuture<'a, Vec<PromptRecord>> {
        Box::pin(async move {
            let key = self.tenant_prompts_key(tenant);
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("ZREVRANGE");
            cmd.arg(&key).arg(0).arg(limit.saturating_sub(1));
            let ids: Vec<String> = if limit == 0 {
                Vec::new()
            } else {
                self.bounded(cmd.query_async(&mut conn)).await?
            };
            let (mut found, gone) = self.prompts_by_id(&ids).await?;
            if !gone.is_empty() {
                let mut zrem = ::redis::cmd("ZREM");
                zrem.arg(&key).arg(&gone);
                let _: i64 = self.bounded(zrem.query_async(&mut conn)).await?;
            }
            // `cancelled` lives beside the JSON; read it for the listed ones.
            if !found.is_empty() {
                let mut pipe = ::redis::pipe();
                for p in &found {
                    pipe.cmd("HGET")
                        .arg(self.prompt_key(&p.id))
                        .arg("cancelled");
                }
                let flags: Vec<Option<String>> = self.bounded(pipe.query_async(&mut conn)).await?;
                for (p, flag) in found.iter_mut().zip(flags) {
                    p.cancelled = flag.as_deref() == Some("1");
                }
            }
            Ok(found)
        })
    }

    fn assignments<'a>(&'a self, prompt: &'a PromptRecord) -> TenantFuture<'a, Vec<Assignment>> {
        Box::pin(async move {
            let mut conn = self.conn.manager();
            let mut cmd = ::redis::cmd("HGETALL");
            cmd.arg(self.assign_key(&prompt.id));
            let all: std::collections::HashMap<String, String> =
                self.bounded(cmd.query_async(&mut conn)).await?;
            let mut out = Vec::with_capacity(prompt.audience.len());
            for user in &prompt.audience {
                let Some(word) = all.get(user.as_str()) else {
                    continue;
                };
                let updated_ms = all
                    .get(&format!("{user}:t"))
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(prompt.created_ms);
                let result = match all.get(&format!("{user}:r")) {
                    Some(json) => Some(
                        serde_json::from_str::<GenerationResult>(json)
                            .map_err(|e| corrupt(format!("result: {e}")))?,
                    ),
                    None => None,
                };
                out.push(Assignment {
                    user: user.clone(),
                    status: status_word(word)?,
                    updated_ms,
                    result,
                });
            }
            Ok(out)
        })
    }

    fn cancel_prompt<'a>(&'a self, id: &'a PromptId, now_ms: u64) -> TenantFuture<'a, bool> {
        Box::pin(async move {
            let mut call = CANCEL.key(self.prompt_key(id));
            call.key(self.assign_key(id))
                .arg(now_ms)
                .arg(self.ticket_prefix());
            let mut conn = self.conn.manager();
            let found: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
            Ok(found == 1)
        })
    }

    fn inbox<'a>(&'a self, user: &'a UserId, now_ms: u64) -> TenantFuture<'a, Vec<PromptRecord>> {
        Box::pin(async move {
            let key = self.inbox_key(user);
            let mut conn = self.conn.manager();
            // Expired entries go first (score = expiry).
            let mut prune = ::redis::cmd("ZREMRANGEBYSCORE");
            prune.arg(&key).arg("-inf").arg(now_ms);
            let _: i64 = self.bounded(prune.query_async(&mut conn)).await?;
            let mut cmd = ::redis::cmd("ZRANGE");
            cmd.arg(&key).arg(0).arg(-1);
            let ids: Vec<String> = self.bounded(cmd.query_async(&mut conn)).await?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut metas = ::redis::pipe();
            let mut states = ::redis::pipe();
            for id in &ids {
                metas
                    .cmd("HMGET")
                    .arg(format!("{}:prompt:{id}", self.prefix))
                    .arg("json")
                    .arg("cancelled");
                states
                    .cmd("HGET")
                    .arg(format!("{}:assign:{id}", self.prefix))
                    .arg(user.as_str());
            }
            let metas: Vec<Vec<Option<String>>> =
                self.bounded(metas.query_async(&mut conn)).await?;
            let states: Vec<Option<String>> = self.bounded(states.query_async(&mut conn)).await?;
            let mut out = Vec::new();
            let mut gone = Vec::new();
            for ((id, meta), status) in ids.iter().zip(metas).zip(states) {
                let (Some(Some(json)), Some(status)) = (meta.first(), status) else {
                    gone.push(id.clone());
                    continue;
                };
                let cancelled = matches!(meta.get(1), Some(Some(c)) if c == "1");
                if status == "pending" && !cancelled {
                    let p = parse_prompt(json)?;
                    if !p.expired(now_ms) {
                        out.push(p);
                    }
                }
            }
            if !gone.is_empty() {
                let mut zrem = ::redis::cmd("ZREM");
                zrem.arg(&key).arg(&gone);
                let _: i64 = self.bounded(zrem.query_async(&mut conn)).await?;
            }
            out.sort_by(|a, b| (a.expires_ms, &a.id).cmp(&(b.expires_ms, &b.id)));
            Ok(out)
        })
    }

    fn answer<'a>(
        &'a self,
        prompt: &'a PromptId,
        user: &'a UserId,
        accept: Option<KeyHash>,
        now_ms: u64,
    ) -> TenantFuture<'a, Result<(), AnswerRefusal>> {
        Box::pin(async move {
            let ticket = accept.map(KeyHash::to_hex).unwrap_or_default();
            let mut call = ANSWER.key(self.prompt_key(prompt));
            call.key(self.assign_key(prompt))
                .arg(user.as_str())
                .arg(now_ms)
                .arg(if accept.is_some() { "1" } else { "0" })
                .arg(&ticket)
                .arg(format!("{}{ticket}", self.ticket_prefix()))
                .arg(prompt.as_str());
            let mut conn = self.conn.manager();
            let word: String = self.bounded(call.invoke_async(&mut conn)).await?;
            Ok(match word.as_str() {
                "ok" => Ok(()),
                "not_found" => Err(AnswerRefusal::NotFound),
                w => Err(AnswerRefusal::NotPending(status_word(w)?)),
            })
        })
    }

    fn claim_ticket<'a>(
        &'a self,
        ticket: &'a KeyHash,
        now_ms: u64,
    ) -> TenantFuture<'a, Result<Claimed, TicketRefusal>> {
        Box::pin(async move {
            let mut call = CLAIM.key(format!("{}{}", self.ticket_prefix(), ticket.to_hex()));
            call.arg(now_ms).arg(&self.prefix);
            let mut conn = self.conn.manager();
            let reply: Vec<String> = self.bounded(call.invoke_async(&mut conn)).await?;
            match reply.as_slice() {
                [ok, json, user] if ok == "ok" => {
                    let prompt = parse_prompt(json)?;
                    let user = UserId::parse(user).ok_or_else(|| corrupt("ticket user"))?;
                    Ok(Ok(Claimed { prompt, user }))
                }
                [word] if word == "unknown" => Ok(Err(TicketRefusal::Unknown)),
                [word] => Ok(Err(TicketRefusal::Closed(status_word(word)?))),
                other => Err(corrupt(format!("claim reply of {} items", other.len()))),
            }
        })
    }

    fn finish<'a>(
        &'a self,
        prompt: &'a PromptId,
        user: &'a UserId,
        result: Result<GenerationResult, GenerationResult>,
        now_ms: u64,
    ) -> TenantFuture<'a, bool> {
        Box::pin(async move {
            let (status, r) = match result {
                Ok(r) => (AssignmentStatus::Completed, r),
                Err(r) => (AssignmentStatus::Failed, r),
            };
            let json = serde_json::to_string(&r).map_err(corrupt)?;
            let mut call = FINISH.key(self.assign_key(prompt));
            call.arg(user.as_str())
                .arg(status.as_str())
                .arg(now_ms)
                .arg(json);
            let mut conn = self.conn.manager();
            let done: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
            Ok(done == 1)
        })
    }

    fn revoke_device_token<'a>(&'a self, token_id: &'a str, until_ms: u64) -> TenantFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("SET");
            cmd.arg(self.revoked_key(token_id))
                .arg("1")
                .arg("PXAT")
                .arg(until_ms.max(1));
            let mut conn = self.conn.manager();
            let _: Option<String> = self.bounded(cmd.query_async(&mut conn)).await?;
            Ok(())
        })
    }

    fn device_token_revoked<'a>(&'a self, token_id: &'a str) -> TenantFuture<'a, bool> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("EXISTS");
            cmd.arg(self.revoked_key(token_id));
            let mut conn = self.conn.manager();
            let n: i64 = self.bounded(cmd.query_async(&mut conn)).await?;
            Ok(n > 0)
        })
    }

    fn device_token_epoch(&self, now_ms: u64) -> TenantFuture<'_, u64> {
        Box::pin(async move {
            let mut call = EPOCH.key(format!("{}:devtoken-epoch", self.prefix));
            call.arg(now_ms.max(1));
            let mut conn = self.conn.manager();
            let epoch: String = self.bounded(call.invoke_async(&mut conn)).await?;
            epoch
                .parse()
                .map_err(|_| corrupt(format!("device-token epoch {epoch:?}")))
        })
    }

    fn take<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        limit: u64,
        window_ms: u64,
        now_ms: u64,
    ) -> TenantFuture<'a, Option<u64>> {
        Box::pin(async move {
            let (index, left_ms) = window(now_ms, window_ms);
            let mut call = TAKE.key(format!("{}:rl:{name}:{window_ms}:{index}", self.prefix));
            call.arg(amount).arg(limit).arg(left_ms.max(1));
            let mut conn = self.conn.manager();
            let taken: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
            Ok((taken != 1).then_some(left_ms))
        })
    }
}
