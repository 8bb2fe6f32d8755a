//! The `Resume` handshake: a device reattaches to its session after its connection dropped.
//! The store checks the resume token first. A session this process holds is reattached at
//! once; one whose owner is gone is claimed and rebuilt here from the device's replay (its
//! saved `Open`, admitted like a new session); one whose owner is alive sends the device
//! there (`moved`). A session that ended here recently only resends its tokens and `Done`.
//! An unknown session and a wrong token get the same answer, so a prober learns nothing.
//!
//! Costs: a store round trip to verify and one to rotate the token; a takeover adds the
//! claim and the saved `Open`, and before sending a device to a live owner, its address and
//! (once per resume) a TCP connect of at most a second to see that it still listens.

use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::wire::{ErrorCode, ErrorFrame, Frame, Open, Resume};

use super::{admit, err, refuse_while_draining, spawn_session, store_error};
use crate::rest::store::prompts::UserId;
use crate::store::{Claim, ReplicaId, ResumeToken, SessionId, StoreError};
use crate::ws::session::SessionHandle;
use crate::ws::Shared;

/// The session a `Resume` reattaches to, and the resume token the device holds from now on:
/// a new one whenever the session goes on here (the old one stops working), the same one
/// for a session that already ended (its `Done` is only resent).
pub(crate) async fn resume_session(
    shared: &Arc<Shared>,
    r: &Resume,
    user: Option<&UserId>,
) -> Result<(SessionHandle, [u8; 32]), ErrorFrame> {
    refuse_while_draining(shared)?;
    let id = r.session;
    let local = || shared.sessions.get(&id).map(|h| h.value().clone());
    if verify(shared, r).await? == Verified::Ended {
        // Ended here recently: the actor still holds its tokens and `Done`.
        return local()
            .map(|h| (h, r.resume_token.0))
            .ok_or_else(|| err(ErrorCode::Finished, None, "the session ended"));
    }
    if let Some(handle) = local() {
        tracing::info!(session = id.0, "resume on the same replica");
        return Ok((handle, rotate(shared, r).await?));
    }
    take_over(shared, r, user).await
}

/// What the store says of a `Resume` whose token is right.
#[derive(Debug, PartialEq, Eq)]
enum Verified {
    /// The session goes on.
    Open,
    /// The session is closed.
    Ended,
}

/// Checks the resume token against the store's record of the session.
async fn verify(shared: &Shared, r: &Resume) -> Result<Verified, ErrorFrame> {
    let id = r.session;
    let token = ResumeToken::from_bytes(r.resume_token.0);
    match shared.store.verify_resume(id, &token).await {
        Ok(_) => Ok(Verified::Open),
        Err(StoreError::UnknownSession(_)) => Err(unknown_session()),
        // The same answer as an unknown session: a wrong token tells a prober nothing.
        Err(StoreError::BadResumeToken(_)) => Err(unknown_session()),
        Err(StoreError::SessionClosed(_)) => Ok(Verified::Ended),
        Err(e) => Err(store_error(&e)),
    }
}

fn unknown_session() -> ErrorFrame {
    err(
        ErrorCode::UnknownSession,
        None,
        "unknown or expired session",
    )
}

/// A session this process does not hold: claimed and rebuilt here, or the device is sent to
/// the owner whose heartbeat is alive (or told to retry when the owner has no other
/// address). An owner that refuses connections is taken for dead: its heartbeat is expired
/// and the claim tried again, once.
async fn take_over(
    shared: &Arc<Shared>,
    r: &Resume,
    user: Option<&UserId>,
) -> Result<(SessionHandle, [u8; 32]), ErrorFrame> {
    let id = r.session;
    let mut owner_checked = false;
    loop {
        let owner = match claim(shared, id).await? {
            Claim::Owned { .. } => return replay(shared, r, user).await,
            Claim::OwnerAlive { owner } => owner,
        };
        let Some(url) = owner_url(shared, &owner).await else {
            tracing::info!(session = id.0, %owner, "resume refused: the owner is alive");
            return Err(err(
                ErrorCode::Unavailable,
                None,
                "another replica holds the session; retry",
            ));
        };
        // A heartbeat outlives its process by up to its TTL: before sending the device to
        // the owner, make sure something still listens there. A refused connection is a dead
        // process; take its sessions now.
        if !owner_checked && refuses_connections(&url).await {
            owner_checked = true;
            expire_heartbeat(shared, id, &owner, &url).await;
            continue;
        }
        tracing::info!(session = id.0, %owner, "resume sent to the owner");
        return Err(err(ErrorCode::Moved, None, &url));
    }
}

/// Claims the session for this replica, unless its owner is alive.
async fn claim(shared: &Shared, id: SessionId) -> Result<Claim, ErrorFrame> {
    shared
        .store
        .claim(id, &shared.replica)
        .await
        .map_err(|e| match e {
            StoreError::SessionClosed(_) => err(ErrorCode::Finished, None, "the session ended"),
            StoreError::UnknownSession(_) => unknown_session(),
            e => store_error(&e),
        })
}

/// Where a live owner listens, when that is not this replica's own address (and the store
/// could tell).
async fn owner_url(shared: &Shared, owner: &ReplicaId) -> Option<String> {
    match shared.store.replica_address(owner).await {
        Ok(Some(url)) if url != shared.advertise_url => Some(url),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "reading the owner's address");
            None
        }
    }
}

/// Expires the heartbeat of an owner that refuses connections, so that the next claim
/// takes its session.
async fn expire_heartbeat(shared: &Shared, id: SessionId, owner: &ReplicaId, url: &str) {
    tracing::warn!(session = id.0, %owner, %url, "the owner refuses connections; expiring its heartbeat");
    if let Err(e) = shared
        .store
        .heartbeat(owner, Duration::from_millis(1))
        .await
    {
        tracing::warn!(error = %e, "expiring a dead replica's heartbeat");
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
}

/// Rebuilds a session claimed here whose state this process does not hold (another replica
/// died, or we restarted) from the device's replay.
async fn replay(
    shared: &Arc<Shared>,
    r: &Resume,
    user: Option<&UserId>,
) -> Result<(SessionHandle, [u8; 32]), ErrorFrame> {
    let id = r.session;
    let open = saved_open(shared, id).await?;
    let device_has = r.last_token_seq.map_or(0, |s| s.saturating_add(1));
    tracing::info!(session = id.0, device_has, "replaying a session taken over");
    // A rebuilt session is a new one here: admitted like an `Open`.
    let slot = admit(shared, user)?;
    // Rotated first: a session is not rebuilt for a device whose token lost the race.
    let token = rotate(shared, r).await?;
    Ok((
        spawn_session(shared, id, &open, device_has, slot).await?,
        token,
    ))
}

/// The `Open` frame saved when the session started (with a partner prompt's parameters and
/// assignment mark).
async fn saved_open(shared: &Shared, id: SessionId) -> Result<Open, ErrorFrame> {
    let bytes = shared
        .params
        .get(id)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "reading the session's parameters");
            err(
                ErrorCode::Unavailable,
                None,
                "the session store is unavailable",
            )
        })?
        .ok_or_else(|| {
            err(
                ErrorCode::UnknownSession,
                None,
                "the session's parameters expired",
            )
        })?;
    let Ok(Frame::Open(open)) = Frame::decode(&bytes) else {
        return Err(err(ErrorCode::Internal, None, "internal error"));
    };
    Ok(open)
}

/// Whether nothing listens at a replica's advertised WebSocket URL: the TCP connection is
/// refused (a process that died). A timeout or any other answer is not taken as proof.
async fn refuses_connections(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
    else {
        return false;
    };
    let host_port = rest.split('/').next().unwrap_or_default();
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(host_port),
        )
        .await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Replaces the session's resume token before the device is attached, and returns the new
/// one (atomically: of two resumes racing with one token, the second gets
/// `unknown_session`).
async fn rotate(shared: &Arc<Shared>, r: &Resume) -> Result<[u8; 32], ErrorFrame> {
    let next = ResumeToken::generate();
    let id = r.session;
    let old = ResumeToken::from_bytes(r.resume_token.0);
    match shared.store.rotate_resume(id, &old, next.hash()).await {
        Ok(()) => Ok(*next.as_bytes()),
        Err(StoreError::UnknownSession(_) | StoreError::BadResumeToken(_)) => {
            Err(unknown_session())
        }
        Err(e) => Err(store_error(&e)),
    }
}
