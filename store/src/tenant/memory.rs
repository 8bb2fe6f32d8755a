//! [`MemoryTenantStore`]: tenants and keys in one process.
//!
//! One std `Mutex` over plain maps: every operation is a few map lookups and never awaits
//! while holding the lock, so a tokio mutex would only add cost. Listing is O(n log n).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::prompts::{
    window, AnswerRefusal, Assignment, AssignmentStatus, Claimed, GenerationResult, PromptId,
    PromptRecord, PromptStore, TicketRefusal, UserId, RESULT_RETENTION_MS,
};
use super::{
    KeyHash, KeyId, KeyInfo, KeyRecord, Quotas, TenantFuture, TenantId, TenantRecord, TenantStore,
    TenantStoreError,
};

#[derive(Default)]
struct Inner {
    tenants: HashMap<TenantId, TenantRecord>,
    /// name → id, for uniqueness.
    names: HashMap<String, TenantId>,
    keys: HashMap<KeyId, KeyRecord>,
    /// Tenant → webhook signing secret.
    webhook_secrets: HashMap<TenantId, String>,
    prompts: HashMap<PromptId, PromptRecord>,
    assignments: HashMap<(PromptId, UserId), Slot>,
    /// Hex sha256 of a live ticket → its assignment.
    tickets: HashMap<String, (PromptId, UserId)>,
    inboxes: HashMap<UserId, Vec<PromptId>>,
    /// Revoked device token id → until when (Unix ms).
    revoked: HashMap<String, u64>,
    /// The device-token epoch, from the first call (a new process starts a new one).
    device_epoch: Option<u64>,
    /// (counter name, window length, window index) → count.
    counters: HashMap<(String, u64, u64), u64>,
}

struct Slot {
    assignment: Assignment,
    ticket: Option<String>,
}

impl Inner {
    /// Forgets prompts past their retention, and stale counters and revocations.
    fn prune(&mut self, now_ms: u64) {
        let old: Vec<PromptId> = self
            .prompts
            .values()
            .filter(|p| p.expires_ms.saturating_add(RESULT_RETENTION_MS) <= now_ms)
            .map(|p| p.id.clone())
            .collect();
        for id in old {
            if let Some(p) = self.prompts.remove(&id) {
                for user in &p.audience {
                    if let Some(slot) = self.assignments.remove(&(id.clone(), user.clone())) {
                        if let Some(t) = slot.ticket {
                            self.tickets.remove(&t);
                        }
                    }
                    if let Some(inbox) = self.inboxes.get_mut(user) {
                        inbox.retain(|p| p != &id);
                    }
                }
            }
        }
        self.revoked.retain(|_, until| *until > now_ms);
        // Only the current window of each counter matters.
        self.counters
            .retain(|(_, len, index), _| *index >= now_ms / (*len).max(1));
    }
}

/// The in-process tenant store.
#[derive(Default)]
pub struct MemoryTenantStore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryTenantStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTenantStore").finish_non_exhaustive()
    }
}

impl MemoryTenantStore {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-written (every write is
        // one insert or remove), so a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, TenantStoreError>,
    ) -> TenantFuture<'_, T> {
        let result = f(&mut self.lock());
        Box::pin(std::future::ready(result))
    }
}

impl TenantStore for MemoryTenantStore {
    fn create_tenant<'a>(&'a self, tenant: &'a TenantRecord) -> TenantFuture<'a, ()> {
        self.run(|s| {
            if s.names.contains_key(&tenant.name) {
                return Err(TenantStoreError::NameTaken(tenant.name.clone()));
            }
            if s.tenants.contains_key(&tenant.id) {
                return Err(TenantStoreError::IdTaken(tenant.id.to_string()));
            }
            s.names.insert(tenant.name.clone(), tenant.id.clone());
            s.tenants.insert(tenant.id.clone(), tenant.clone());
            Ok(())
        })
    }

    fn get_tenant<'a>(&'a self, id: &'a TenantId) -> TenantFuture<'a, Option<TenantRecord>> {
        self.run(|s| Ok(s.tenants.get(id).cloned()))
    }

    fn list_tenants(&self) -> TenantFuture<'_, Vec<TenantRecord>> {
        self.run(|s| {
            let mut all: Vec<_> = s.tenants.values().cloned().collect();
            all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
            Ok(all)
        })
    }

    fn add_key<'a>(&'a self, key: &'a KeyRecord) -> TenantFuture<'a, ()> {
        self.run(|s| {
            if !s.tenants.contains_key(&key.tenant) {
                return Err(TenantStoreError::UnknownTenant(key.tenant.clone()));
            }
            if s.keys.contains_key(&key.key_id) {
                return Err(TenantStoreError::IdTaken(key.key_id.to_string()));
            }
            s.keys.insert(key.key_id.clone(), key.clone());
            Ok(())
        })
    }

    fn get_key<'a>(&'a self, id: &'a KeyId) -> TenantFuture<'a, Option<KeyRecord>> {
        self.run(|s| Ok(s.keys.get(id).cloned()))
    }

    fn list_keys<'a>(&'a self, tenant: &'a TenantId) -> TenantFuture<'a, Vec<KeyInfo>> {
        self.run(|s| {
            if !s.tenants.contains_key(tenant) {
                return Err(TenantStoreError::UnknownTenant(tenant.clone()));
            }
            let mut keys: Vec<_> = s
                .keys
                .values()
                .filter(|k| &k.tenant == tenant)
                .map(|k| KeyInfo {
                    key_id: k.key_id.clone(),
                    created_ms: k.created_ms,
                })
                .collect();
            keys.sort_by(|a, b| (a.created_ms, &a.key_id).cmp(&(b.created_ms, &b.key_id)));
            Ok(keys)
        })
    }

    fn set_quotas<'a>(&'a self, tenant: &'a TenantId, quotas: Quotas) -> TenantFuture<'a, ()> {
        self.run(|s| match s.tenants.get_mut(tenant) {
            Some(t) => {
                t.quotas = quotas;
                Ok(())
            }
            None => Err(TenantStoreError::UnknownTenant(tenant.clone())),
        })
    }

    fn revoke_key<'a>(&'a self, tenant: &'a TenantId, key: &'a KeyId) -> TenantFuture<'a, ()> {
        self.run(|s| {
            if !s.tenants.contains_key(tenant) {
                return Err(TenantStoreError::UnknownTenant(tenant.clone()));
            }
            match s.keys.get(key) {
                Some(k) if &k.tenant == tenant => {
                    s.keys.remove(key);
                    Ok(())
                }
                _ => Err(TenantStoreError::UnknownKey(key.clone())),
            }
        })
    }

    fn webhook_secret<'a>(&'a self, tenant: &'a TenantId) -> TenantFuture<'a, Option<String>> {
        self.run(|s| {
            if !s.tenants.contains_key(tenant) {
                return Err(TenantStoreError::UnknownTenant(tenant.clone()));
            }
            Ok(s.webhook_secrets.get(tenant).cloned())
        })
    }

    fn set_webhook_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        secret: &'a str,
        replace: bool,
    ) -> TenantFuture<'a, String> {
        self.run(|s| {
            if !s.tenants.contains_key(tenant) {
                return Err(TenantStoreError::UnknownTenant(tenant.clone()));
            }
            let slot = s.webhook_secrets.entry(tenant.clone());
            let held = match slot {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if replace {
                        o.insert(secret.to_owned());
                    }
                    o.get().clone()
                }
                std::collections::hash_map::Entry::Vacant(v) => v.insert(secret.to_owned()).clone(),
            };
            Ok(held)
        })
    }
}

impl PromptStore for MemoryTenantStore {
    fn create_prompt<'a>(&'a self, prompt: &'a PromptRecord) -> TenantFuture<'a, ()> {
        self.run(|s| {
            s.prune(prompt.created_ms);
            if s.prompts.contains_key(&prompt.id) {
                return Err(TenantStoreError::IdTaken(prompt.id.to_string()));
            }
            for user in &prompt.audience {
                let assignment = Assignment {
                    user: user.clone(),
                    status: AssignmentStatus::Pending,
                    updated_ms: prompt.created_ms,
                    result: None,
                };
                s.assignments.insert(
                    (prompt.id.clone(), user.clone()),
                    Slot {
                        assignment,
                        ticket: None,
                    },
                );
                s.inboxes
                    .entry(user.clone())
                    .or_default()
                    .push(prompt.id.clone());
            }
            s.prompts.insert(prompt.id.clone(), prompt.clone());
            Ok(())
        })
    }

    fn get_prompt<'a>(&'a self, id: &'a PromptId) -> TenantFuture<'a, Option<PromptRecord>> {
        self.run(|s| Ok(s.prompts.get(id).cloned()))
    }

    fn list_prompts<'a>(
        &'a self,
        tenant: &'a TenantId,
        limit: usize,
    ) -> TenantFuture<'a, Vec<PromptRecord>> {
        self.run(|s| {
            let mut all: Vec<_> = s
                .prompts
                .values()
                .filter(|p| &p.tenant == tenant)
                .cloned()
                .collect();
            all.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
            all.truncate(limit);
            Ok(all)
        })
    }

    fn assignments<'a>(&'a self, prompt: &'a PromptRecord) -> TenantFuture<'a, Vec<Assignment>> {
        self.run(|s| {
            Ok(prompt
                .audience
                .iter()
                .filter_map(|u| s.assignments.get(&(prompt.id.clone(), u.clone())))
                .map(|slot| slot.assignment.clone())
                .collect())
        })
    }

    fn cancel_prompt<'a>(&'a self, id: &'a PromptId, now_ms: u64) -> TenantFuture<'a, bool> {
        self.run(|s| {
            let Some(p) = s.prompts.get_mut(id) else {
                return Ok(false);
            };
            p.cancelled = true;
            let audience = p.audience.clone();
            for user in audience {
                if let Some(slot) = s.assignments.get_mut(&(id.clone(), user)) {
                    let a = &mut slot.assignment;
                    if matches!(
                        a.status,
                        AssignmentStatus::Pending | AssignmentStatus::Accepted
                    ) {
                        a.status = AssignmentStatus::Cancelled;
                        a.updated_ms = now_ms;
                        if let Some(t) = slot.ticket.take() {
                            s.tickets.remove(&t);
                        }
                    }
                }
            }
            Ok(true)
        })
    }

    fn inbox<'a>(&'a self, user: &'a UserId, now_ms: u64) -> TenantFuture<'a, Vec<PromptRecord>> {
        self.run(|s| {
            let ids = s.inboxes.get(user).cloned().unwrap_or_default();
            let mut out: Vec<PromptRecord> = ids
                .iter()
                .filter_map(|id| {
                    let p = s.prompts.get(id)?;
                    let slot = s.assignments.get(&(id.clone(), user.clone()))?;
                    let waiting = !p.cancelled
                        && !p.expired(now_ms)
                        && slot.assignment.status == AssignmentStatus::Pending;
                    waiting.then(|| p.clone())
                })
                .collect();
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
        self.run(|s| {
            let (Some(p), Some(slot)) = (
                s.prompts.get(prompt),
                s.assignments.get_mut(&(prompt.clone(), user.clone())),
            ) else {
                return Ok(Err(AnswerRefusal::NotFound));
            };
            let status = slot.assignment.status_at(p, now_ms);
            if status != AssignmentStatus::Pending {
                return Ok(Err(AnswerRefusal::NotPending(status)));
            }
            slot.assignment.updated_ms = now_ms;
            match accept {
                Some(ticket) => {
                    let hex = ticket.to_hex();
                    slot.assignment.status = AssignmentStatus::Accepted;
                    slot.ticket = Some(hex.clone());
                    s.tickets.insert(hex, (prompt.clone(), user.clone()));
                }
                None => slot.assignment.status = AssignmentStatus::Declined,
            }
            Ok(Ok(()))
        })
    }

    fn claim_ticket<'a>(
        &'a self,
        ticket: &'a KeyHash,
        now_ms: u64,
    ) -> TenantFuture<'a, Result<Claimed, TicketRefusal>> {
        self.run(|s| {
            let hex = ticket.to_hex();
            let Some((prompt, user)) = s.tickets.remove(&hex) else {
                return Ok(Err(TicketRefusal::Unknown));
            };
            let (Some(p), Some(slot)) = (
                s.prompts.get(&prompt),
                s.assignments.get_mut(&(prompt.clone(), user.clone())),
            ) else {
                return Ok(Err(TicketRefusal::Unknown));
            };
            slot.ticket = None;
            let status = slot.assignment.status_at(p, now_ms);
            if p.cancelled || status != AssignmentStatus::Accepted {
                return Ok(Err(TicketRefusal::Closed(status)));
            }
            slot.assignment.status = AssignmentStatus::Running;
            slot.assignment.updated_ms = now_ms;
            Ok(Ok(Claimed {
                prompt: p.clone(),
                user,
            }))
        })
    }

    fn finish<'a>(
        &'a self,
        prompt: &'a PromptId,
        user: &'a UserId,
        result: Result<GenerationResult, GenerationResult>,
        now_ms: u64,
    ) -> TenantFuture<'a, bool> {
        self.run(|s| {
            let Some(slot) = s.assignments.get_mut(&(prompt.clone(), user.clone())) else {
                return Ok(false);
            };
            let a = &mut slot.assignment;
            if a.status != AssignmentStatus::Running {
                return Ok(false);
            }
            let (status, r) = match result {
                Ok(r) => (AssignmentStatus::Completed, r),
                Err(r) => (AssignmentStatus::Failed, r),
            };
            a.status = status;
            a.result = Some(r);
            a.updated_ms = now_ms;
            Ok(true)
        })
    }

    fn revoke_device_token<'a>(&'a self, token_id: &'a str, until_ms: u64) -> TenantFuture<'a, ()> {
        self.run(|s| {
            s.revoked.insert(token_id.to_owned(), until_ms);
            Ok(())
        })
    }

    fn device_token_revoked<'a>(&'a self, token_id: &'a str) -> TenantFuture<'a, bool> {
        self.run(|s| Ok(s.revoked.contains_key(token_id)))
    }

    fn device_token_epoch(&self, now_ms: u64) -> TenantFuture<'_, u64> {
        self.run(|s| Ok(*s.device_epoch.get_or_insert(now_ms.max(1))))
    }

    fn take<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        limit: u64,
        window_ms: u64,
        now_ms: u64,
    ) -> TenantFuture<'a, Option<u64>> {
        self.run(|s| {
            if s.counters.len() > 4096 {
                s.prune(now_ms);
            }
            let (index, left_ms) = window(now_ms, window_ms);
            let count = s
                .counters
                .entry((name.to_owned(), window_ms, index))
                .or_insert(0);
            if count.saturating_add(amount) > limit {
                return Ok(Some(left_ms));
            }
            *count += amount;
            Ok(None)
        })
    }
}
