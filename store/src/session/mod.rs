//! The session store: where sessions, resume tokens and replica heartbeats live, so that a
//! device reconnecting to any replica finds its session (DESIGN.md §8).
//!
//! # Layout
//! - this module: the [`SessionStore`] trait, the records it keeps and [`StoreError`].
//!   [`Stores::open`](crate::Stores::open) builds either backend as one
//!   `Arc<dyn SessionStore>`.
//! - [`memory`]: [`MemoryStore`], the embedded default for a single process (`DashMap`s).
//! - [`redis`]: [`RedisStore`], for production; several replicas share one Redis.
//!
//! # Guarantees
//! - **Resume tokens are stored hashed**: the store keeps `sha256(token)` only and compares
//!   it in constant time. [`ResumeToken`]'s `Debug` is redacted; nothing here logs it.
//! - **Ownership is fenced**: a session has one owner replica. Only the owner updates or
//!   closes it ([`StoreError::NotOwner`] otherwise). Another replica takes it over with
//!   [`SessionStore::claim`], which succeeds only when the owner's heartbeat has expired, and
//!   is atomic (a Lua script in Redis), so two replicas never both win. A claim that moved the
//!   session answers `replay: true`: the new owner has no KV and must rebuild it from the
//!   device's replayed hidden states.
//! - **A replica id names one process lifetime** ([`ReplicaId::unique`]). A restarted process
//!   has lost its KV cache, so it must not reuse its old id, or `claim` would say "no replay".
//! - **Sessions expire**: every write refreshes a session's idle TTL; a closed session stays
//!   readable for a short grace period (so a late reconnect learns it was closed), then goes.
//! - **Session ids are unguessable**: 128 bits from the CSPRNG (never 0), so an id says
//!   nothing about other sessions, and losing the store's data cannot make ids repeat (there
//!   is no counter to lose). `create_session` refuses an id already in use
//!   ([`StoreError::AlreadyExists`]); the caller draws again. The id is the wire's
//!   [`SessionId`] (`tandem_protocol`); the store writes it in decimal (keys, messages).
//! - **Bounded latency** (Redis): every call has a timeout; with Redis down or hung a call fails
//!   with [`StoreError::Unavailable`] instead of hanging, and works again once Redis is back.
//!
//! Every method returns a boxed future ([`StoreFuture`]) so the trait is object safe: the
//! server holds one `Arc<dyn SessionStore>` whichever backend runs.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
pub use tandem_protocol::SessionId;

pub mod memory;
pub mod redis;

use crate::secret::SecretDigest;

pub use self::memory::MemoryStore;
pub use self::redis::{RedisStore, RedisStoreConfig};

/// What every store method returns: a boxed, sendable future.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The longest replica id accepted.
pub const MAX_REPLICA_ID_LEN: usize = 64;

/// The name of one server process: 1 to 64 characters of `[A-Za-z0-9._:-]` (it becomes part
/// of a Redis key).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(String);

/// A replica id that is empty, too long or has characters outside `[A-Za-z0-9._:-]`.
#[derive(Debug, thiserror::Error)]
#[error("invalid replica id {0:?}: want 1 to 64 characters of [A-Za-z0-9._:-]")]
pub struct InvalidReplicaId(pub String);

impl ReplicaId {
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidReplicaId> {
        let id = id.into();
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if id.is_empty() || id.len() > MAX_REPLICA_ID_LEN || !id.chars().all(ok_char) {
            return Err(InvalidReplicaId(id));
        }
        Ok(Self(id))
    }

    /// `{base}-{8 random hex digits}`: a fresh id for this process lifetime (see the module
    /// doc for why a restarted process needs a new one). `base` is cut to fit.
    pub fn unique(base: &str) -> Result<Self, InvalidReplicaId> {
        let suffix = hex::encode(rand::random::<[u8; 4]>());
        let base: String = base.chars().take(MAX_REPLICA_ID_LEN - 9).collect();
        Self::new(format!("{base}-{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Opened; no generation running.
    Open,
    /// A generation is running.
    Generating,
    /// The last generation finished; the session may start another.
    Done,
    /// Closed for good: only readable until its grace period ends.
    Closed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Generating => "generating",
            Self::Done => "done",
            Self::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => Self::Open,
            "generating" => Self::Generating,
            "done" => Self::Done,
            "closed" => Self::Closed,
            _ => return None,
        })
    }
}

/// A session as the store knows it. Times are unix milliseconds of the writing replica's
/// clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: SessionId,
    /// The replica that holds (or last held) the session's KV cache.
    pub owner: ReplicaId,
    pub state: SessionState,
    pub created_ms: u64,
    pub last_seen_ms: u64,
    /// Prompt tokens received (hidden-state positions), over all generations.
    pub tokens_in: u64,
    /// Tokens generated, over all generations.
    pub tokens_out: u64,
    /// When the store forgets the session unless it is written again.
    pub expires_ms: u64,
}

/// What `create_session` needs; the store fills in the state (`Open`), times and counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSession {
    /// From [`SessionStore::next_session_id`].
    pub id: SessionId,
    pub owner: ReplicaId,
}

/// A change to a session. Every update also sets `last_seen` to now and refreshes the TTL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionUpdate {
    /// `Some(Closed)` closes the session (see [`SessionStore::close_session`]).
    pub state: Option<SessionState>,
    /// Added to `tokens_in` (increments, so concurrent writers never lose counts).
    pub add_tokens_in: u64,
    /// Added to `tokens_out`.
    pub add_tokens_out: u64,
}

/// The secret a device presents to resume its session: 32 random bytes. Sent once in
/// `Opened`; the store keeps only its [`ResumeTokenHash`]. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeToken([u8; 32]);

impl ResumeToken {
    /// 32 bytes from the thread-local CSPRNG.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The bytes to put on the wire.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn hash(&self) -> ResumeTokenHash {
        ResumeTokenHash(Sha256::digest(self.0).into())
    }
}

impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeToken(<redacted>)")
    }
}

/// `sha256` of a [`ResumeToken`]: what the store keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ResumeTokenHash([u8; 32]);

impl ResumeTokenHash {
    /// Whether `token` hashes to this, comparing in constant time.
    pub fn matches(&self, token: &ResumeToken) -> bool {
        SecretDigest(self.0).matches(&SecretDigest(token.hash().0))
    }

    pub(crate) fn to_hex(self) -> String {
        SecretDigest(self.0).to_hex()
    }

    pub(crate) fn from_hex(s: &str) -> Option<Self> {
        SecretDigest::from_hex(s).map(|d| Self(d.0))
    }
}

impl fmt::Debug for ResumeTokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeTokenHash(..)")
    }
}

/// What [`SessionStore::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the session now. `replay` is true when ownership moved to the caller:
    /// its KV is not here and must be rebuilt from the device's replayed hidden states.
    Owned { record: SessionRecord, replay: bool },
    /// Another replica owns the session and its heartbeat is alive: send the device there.
    OwnerAlive { owner: ReplicaId },
}

/// How long sessions live without a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionExpiry {
    /// An open session is forgotten this long after its last write.
    pub idle_ttl: Duration,
    /// A closed session stays readable this long.
    pub closed_ttl: Duration,
}

impl Default for SessionExpiry {
    fn default() -> Self {
        Self {
            idle_ttl: Duration::from_secs(30 * 60),
            closed_ttl: Duration::from_secs(5 * 60),
        }
    }
}

impl SessionExpiry {
    /// The TTL a session gets after a write that leaves it in `state`.
    pub(crate) fn ttl_for(&self, state: SessionState) -> Duration {
        match state {
            SessionState::Closed => self.closed_ttl,
            _ => self.idle_ttl,
        }
    }
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown session {}", .0 .0)]
    UnknownSession(SessionId),
    #[error("wrong resume token for session {}", .0 .0)]
    BadResumeToken(SessionId),
    #[error("session {} is closed", .0 .0)]
    SessionClosed(SessionId),
    #[error("session {} is owned by replica {owner}", id.0)]
    NotOwner { id: SessionId, owner: ReplicaId },
    #[error("session {} already exists", .0 .0)]
    AlreadyExists(SessionId),
    /// The backend cannot be reached or did not answer in time; retry later.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with something this code did not write.
    #[error("session store holds unreadable data: {0}")]
    Corrupt(String),
    /// The backend refused a command (misconfiguration, e.g. a read-only replica).
    #[error("session store error: {0}")]
    Backend(String),
}

/// Sessions, resume tokens and replica heartbeats. See the module doc for the guarantees.
///
/// A replica's usual calls: `next_session_id` + `create_session` on `Open`;
/// `update_session` as tokens flow; `close_session` at the end. On `Resume`: `verify_resume`,
/// then `claim` (replay the device's hidden states when it says so). In the background:
/// `heartbeat` every few seconds, with a TTL a few beats long.
pub trait SessionStore: Send + Sync {
    /// A fresh session id: 128 random bits (see the module doc). No store round trip.
    fn next_session_id(&self) -> StoreFuture<'_, SessionId> {
        Box::pin(async { Ok(random_session_id()) })
    }

    /// Stores a new `Open` session owned by `new.owner` with the hash of its resume token.
    /// [`StoreError::AlreadyExists`] if the id is taken.
    fn create_session(
        &self,
        new: NewSession,
        resume: ResumeTokenHash,
    ) -> StoreFuture<'_, SessionRecord>;

    /// The session, or `None` if it never existed or has expired.
    fn get_session(&self, id: SessionId) -> StoreFuture<'_, Option<SessionRecord>>;

    /// Applies `update` if `by` owns the session; answers the updated record.
    /// [`StoreError::NotOwner`], [`StoreError::SessionClosed`], [`StoreError::UnknownSession`].
    fn update_session<'a>(
        &'a self,
        id: SessionId,
        by: &'a ReplicaId,
        update: SessionUpdate,
    ) -> StoreFuture<'a, SessionRecord>;

    /// Closes the session: it stays readable (state `Closed`) for the closed TTL, and can no
    /// longer be updated, resumed or claimed. Closing a closed session is a no-op.
    fn close_session<'a>(&'a self, id: SessionId, by: &'a ReplicaId) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let update = SessionUpdate {
                state: Some(SessionState::Closed),
                ..SessionUpdate::default()
            };
            match self.update_session(id, by, update).await {
                Ok(_) | Err(StoreError::SessionClosed(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// Checks a device's resume token. [`StoreError::UnknownSession`] if there is no such
    /// session (or it expired), [`StoreError::BadResumeToken`] if the token is wrong,
    /// [`StoreError::SessionClosed`] if the token is right but the session is closed.
    fn verify_resume<'a>(
        &'a self,
        id: SessionId,
        token: &'a ResumeToken,
    ) -> StoreFuture<'a, SessionRecord>;

    /// Replaces the session's resume token: `old` must be its current one (else
    /// [`StoreError::UnknownSession`] or [`StoreError::BadResumeToken`], as
    /// [`Self::verify_resume`]), and is refused from then on. Atomic: of two resumes with the
    /// same token, one rotates and the other finds it wrong.
    fn rotate_resume<'a>(
        &'a self,
        id: SessionId,
        old: &'a ResumeToken,
        new: ResumeTokenHash,
    ) -> StoreFuture<'a, ()>;

    /// Marks `replica` alive for `ttl`.
    fn heartbeat<'a>(&'a self, replica: &'a ReplicaId, ttl: Duration) -> StoreFuture<'a, ()>;

    /// Records, for `ttl`, the WebSocket URL where devices reach `replica` (what another
    /// replica tells a device that resumes at the wrong place).
    fn advertise<'a>(
        &'a self,
        replica: &'a ReplicaId,
        url: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()>;

    /// The URL `replica` advertised, while it lasts.
    fn replica_address<'a>(&'a self, replica: &'a ReplicaId) -> StoreFuture<'a, Option<String>>;

    /// Whether `replica`'s last heartbeat has not expired.
    fn replica_alive<'a>(&'a self, replica: &'a ReplicaId) -> StoreFuture<'a, bool>;

    /// Takes the session over for `by` if `by` already owns it or its owner is not alive,
    /// atomically. Refreshes `last_seen` and the TTL when it succeeds. Check the device's
    /// token with `verify_resume` first: `claim` does not.
    fn claim<'a>(&'a self, id: SessionId, by: &'a ReplicaId) -> StoreFuture<'a, Claim>;
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// 128 bits from the thread-local CSPRNG, never 0 (which names no session).
pub(crate) fn random_session_id() -> SessionId {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return SessionId(id);
        }
    }
}

/// A duration in whole milliseconds, at least 1 (Redis rejects `PX 0`).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_matches_only_its_token() {
        let t = ResumeToken::generate();
        let h = t.hash();
        assert!(h.matches(&t));
        assert!(!h.matches(&ResumeToken::generate()));
        assert_eq!(ResumeTokenHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(format!("{t:?}"), "ResumeToken(<redacted>)");
    }

    #[test]
    fn replica_ids_are_checked() {
        assert!(ReplicaId::new("pod-7.eu:1").is_ok());
        for bad in ["", "a b", "a\n", "x/y", &"a".repeat(65)] {
            assert!(ReplicaId::new(bad).is_err(), "{bad:?}");
        }
        let long = ReplicaId::unique(&"a".repeat(100)).expect("cut to fit");
        assert_eq!(long.as_str().len(), MAX_REPLICA_ID_LEN);
        assert_ne!(ReplicaId::unique("r").ok(), ReplicaId::unique("r").ok());
    }

    #[test]
    fn errors_write_the_id_in_decimal() {
        let id = SessionId(255);
        assert_eq!(
            StoreError::UnknownSession(id).to_string(),
            "unknown session 255"
        );
        let owner = ReplicaId::new("r").expect("id");
        assert_eq!(
            StoreError::NotOwner { id, owner }.to_string(),
            "session 255 is owned by replica r"
        );
    }

    #[test]
    fn states_round_trip() {
        use SessionState::*;
        for s in [Open, Generating, Done, Closed] {
            assert_eq!(SessionState::parse(s.as_str()), Some(s));
        }
        assert_eq!(SessionState::parse("gone"), None);
    }
}
