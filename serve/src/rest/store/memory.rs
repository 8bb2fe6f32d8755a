//! [`MemoryTenantStore`]: tenants and keys in one process.
//!
//! One std `Mutex` over plain maps: every operation is a few map lookups and never awaits
//! while holding the lock, so a tokio mutex would only add cost. Listing is O(n log n).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::{
    KeyId, KeyInfo, KeyRecord, TenantFuture, TenantId, TenantRecord, TenantStore, TenantStoreError,
};

#[derive(Default)]
struct Inner {
    tenants: HashMap<TenantId, TenantRecord>,
    /// name → id, for uniqueness.
    names: HashMap<String, TenantId>,
    keys: HashMap<KeyId, KeyRecord>,
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
}
