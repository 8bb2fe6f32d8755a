//! [`MemoryStore`]: the in-process [`SessionStore`], the default for a single replica.
//!
//! Two `DashMap`s (sessions, replica heartbeats) and an atomic id counter. Every call is
//! synchronous under a shard lock (the future does it when first polled), so no lock is ever held across
//! an `.await`. `claim` holds the session's shard lock while it reads the heartbeat map, which
//! makes it atomic; nothing locks in the other order (heartbeats never touch sessions), so it
//! cannot deadlock.
//!
//! Expiry uses the monotonic clock. Expired entries are dropped when touched, and every
//! [`SWEEP_EVERY`] creations a sweep (O(sessions)) drops the ones nobody touches again.
//! Nothing survives the process: a restart forgets every session.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::mapref::one::RefMut;
use dashmap::DashMap;

use super::{
    millis, now_ms, Claim, NewSession, ReplicaId, ResumeToken, ResumeTokenHash, SessionExpiry,
    SessionId, SessionRecord, SessionState, SessionStore, SessionUpdate, StoreError, StoreFuture,
};

/// How many `create_session` calls between two sweeps of expired entries.
pub const SWEEP_EVERY: u64 = 256;

struct Entry {
    record: SessionRecord,
    resume: ResumeTokenHash,
    deadline: Instant,
}

/// The in-memory session store.
pub struct MemoryStore {
    expiry: SessionExpiry,
    creates: AtomicU64,
    sessions: DashMap<SessionId, Entry>,
    /// Replica → when its last heartbeat expires.
    replicas: DashMap<ReplicaId, Instant>,
    /// Advertised URLs and until when.
    addresses: DashMap<ReplicaId, (String, Instant)>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("expiry", &self.expiry)
            .field("sessions", &self.sessions.len())
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(SessionExpiry::default())
    }
}

impl MemoryStore {
    pub fn new(expiry: SessionExpiry) -> Self {
        Self {
            expiry,
            creates: AtomicU64::new(0),
            sessions: DashMap::new(),
            replicas: DashMap::new(),
            addresses: DashMap::new(),
        }
    }

    /// The live entry for `id`, dropping it first if it has expired.
    fn live(&self, id: SessionId) -> Option<RefMut<'_, SessionId, Entry>> {
        let now = Instant::now();
        if let Some(entry) = self.sessions.get_mut(&id) {
            if entry.deadline > now {
                return Some(entry);
            }
        }
        self.sessions.remove_if(&id, |_, e| e.deadline <= now);
        None
    }

    fn alive(&self, replica: &ReplicaId) -> bool {
        self.replicas
            .get(replica)
            .is_some_and(|deadline| *deadline > Instant::now())
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.sessions.retain(|_, e| e.deadline > now);
        self.replicas.retain(|_, deadline| *deadline > now);
    }

    /// Sets `last_seen`, the state's TTL and `expires_ms` after a write.
    fn refresh(&self, entry: &mut Entry) {
        let ttl = self.expiry.ttl_for(entry.record.state);
        let now = now_ms();
        entry.record.last_seen_ms = now;
        entry.record.expires_ms = now.saturating_add(millis(ttl));
        entry.deadline = Instant::now() + ttl;
    }

    fn create(
        &self,
        new: NewSession,
        resume: ResumeTokenHash,
    ) -> Result<SessionRecord, StoreError> {
        if self.creates.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let now = now_ms();
        let ttl = self.expiry.idle_ttl;
        let record = SessionRecord {
            id: new.id,
            owner: new.owner,
            state: SessionState::Open,
            created_ms: now,
            last_seen_ms: now,
            tokens_in: 0,
            tokens_out: 0,
            expires_ms: now.saturating_add(millis(ttl)),
        };
        let entry = Entry {
            record: record.clone(),
            resume,
            deadline: Instant::now() + ttl,
        };
        let now = Instant::now();
        match self.sessions.entry(new.id) {
            dashmap::Entry::Occupied(mut o) if o.get().deadline <= now => {
                o.insert(entry);
            }
            dashmap::Entry::Occupied(_) => return Err(StoreError::AlreadyExists(new.id)),
            dashmap::Entry::Vacant(v) => {
                v.insert(entry);
            }
        }
        Ok(record)
    }

    fn update(
        &self,
        id: SessionId,
        by: &ReplicaId,
        update: SessionUpdate,
    ) -> Result<SessionRecord, StoreError> {
        let mut entry = self.live(id).ok_or(StoreError::UnknownSession(id))?;
        let record = &mut entry.record;
        if record.state == SessionState::Closed {
            return Err(StoreError::SessionClosed(id));
        }
        if record.owner != *by {
            let owner = record.owner.clone();
            return Err(StoreError::NotOwner { id, owner });
        }
        if let Some(state) = update.state {
            record.state = state;
        }
        record.tokens_in = record.tokens_in.saturating_add(update.add_tokens_in);
        record.tokens_out = record.tokens_out.saturating_add(update.add_tokens_out);
        self.refresh(&mut entry);
        Ok(entry.record.clone())
    }

    fn verify(&self, id: SessionId, token: &ResumeToken) -> Result<SessionRecord, StoreError> {
        let entry = self.live(id).ok_or(StoreError::UnknownSession(id))?;
        if !entry.resume.matches(token) {
            return Err(StoreError::BadResumeToken(id));
        }
        if entry.record.state == SessionState::Closed {
            return Err(StoreError::SessionClosed(id));
        }
        Ok(entry.record.clone())
    }

    fn claim_now(&self, id: SessionId, by: &ReplicaId) -> Result<Claim, StoreError> {
        let mut entry = self.live(id).ok_or(StoreError::UnknownSession(id))?;
        if entry.record.state == SessionState::Closed {
            return Err(StoreError::SessionClosed(id));
        }
        let replay = entry.record.owner != *by;
        if replay {
            if self.alive(&entry.record.owner) {
                let owner = entry.record.owner.clone();
                return Ok(Claim::OwnerAlive { owner });
            }
            entry.record.owner = by.clone();
        }
        self.refresh(&mut entry);
        let record = entry.record.clone();
        Ok(Claim::Owned { record, replay })
    }
}

impl SessionStore for MemoryStore {
    fn create_session(
        &self,
        new: NewSession,
        resume: ResumeTokenHash,
    ) -> StoreFuture<'_, SessionRecord> {
        Box::pin(async move { self.create(new, resume) })
    }

    fn get_session(&self, id: SessionId) -> StoreFuture<'_, Option<SessionRecord>> {
        Box::pin(async move { Ok(self.live(id).map(|e| e.record.clone())) })
    }

    fn update_session<'a>(
        &'a self,
        id: SessionId,
        by: &'a ReplicaId,
        update: SessionUpdate,
    ) -> StoreFuture<'a, SessionRecord> {
        Box::pin(async move { self.update(id, by, update) })
    }

    fn verify_resume<'a>(
        &'a self,
        id: SessionId,
        token: &'a ResumeToken,
    ) -> StoreFuture<'a, SessionRecord> {
        Box::pin(async move { self.verify(id, token) })
    }

    fn rotate_resume<'a>(
        &'a self,
        id: SessionId,
        old: &'a ResumeToken,
        new: ResumeTokenHash,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut entry = self.live(id).ok_or(StoreError::UnknownSession(id))?;
            if !entry.resume.matches(old) {
                return Err(StoreError::BadResumeToken(id));
            }
            entry.resume = new;
            Ok(())
        })
    }

    fn heartbeat<'a>(&'a self, replica: &'a ReplicaId, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.replicas.insert(replica.clone(), Instant::now() + ttl);
            Ok(())
        })
    }

    fn replica_alive<'a>(&'a self, replica: &'a ReplicaId) -> StoreFuture<'a, bool> {
        Box::pin(async move { Ok(self.alive(replica)) })
    }

    fn advertise<'a>(
        &'a self,
        replica: &'a ReplicaId,
        url: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.addresses
                .insert(replica.clone(), (url.to_owned(), Instant::now() + ttl));
            Ok(())
        })
    }

    fn replica_address<'a>(&'a self, replica: &'a ReplicaId) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            Ok(self
                .addresses
                .get(replica)
                .filter(|e| e.value().1 > Instant::now())
                .map(|e| e.value().0.clone()))
        })
    }

    fn claim<'a>(&'a self, id: SessionId, by: &'a ReplicaId) -> StoreFuture<'a, Claim> {
        Box::pin(async move { self.claim_now(id, by) })
    }
}
