//! The `Open` handshake: a new session. The `Open` is checked before the store is touched,
//! the device admitted before a prompt ticket is claimed (a refused device keeps its
//! ticket), then the session is created in the store with a fresh id and resume token, its
//! `Open` frame saved for a replica that may take it over, and its engine session and actor
//! started. A failure after the claim records the partner prompt as failed.
//!
//! Costs: a few store round trips (the ticket, the id, the record, the saved frame).

use std::sync::Arc;

use tandem_protocol::wire::{ErrorCode, ErrorFrame, Frame, Open};

use super::{admit, err, refuse_while_draining, session_params, spawn_session, store_error};
use crate::rest::inbox::ticket_hash;
use crate::rest::store::prompts::{TicketRefusal, UserId};
use crate::store::{now_ms, NewSession, ResumeToken, StoreError};
use crate::ws::assignment::AssignmentRef;
use crate::ws::session::SessionHandle;
use crate::ws::Shared;

/// For an `Open` that carries a prompt ticket: claims it (once), and applies the prompt's
/// `max_tokens` and sampling. Returns the frame to run and where its result goes.
async fn claim_prompt(
    shared: &Arc<Shared>,
    mut open: Open,
) -> Result<(Open, Option<AssignmentRef>), ErrorFrame> {
    let Some(ticket) = open.prompt_id.take() else {
        return Ok((open, None));
    };
    let bad = |m: &str| err(ErrorCode::BadPromptTicket, None, m);
    let hash = ticket_hash(&ticket).ok_or_else(|| bad("the prompt id is not a prompt ticket"))?;
    let claimed = shared
        .prompts
        .claim_ticket(&hash, now_ms())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "prompt store");
            err(
                ErrorCode::Unavailable,
                None,
                "the prompt store is unavailable",
            )
        })?
        .map_err(|r| match r {
            TicketRefusal::Unknown => bad("unknown or already used prompt ticket"),
            TicketRefusal::Closed(s) => bad(&format!("the prompt is {}", s.as_str())),
        })?;
    let a = AssignmentRef {
        prompt: claimed.prompt.id.clone(),
        user: claimed.user,
    };
    open.max_tokens = claimed.prompt.max_tokens.min(shared.cfg.max_tokens_cap);
    open.sampling = claimed.prompt.sampling;
    open.prompt_id = Some(a.mark());
    tracing::info!(prompt = %a.prompt, "prompt ticket claimed");
    Ok((open, Some(a)))
}

pub(crate) async fn open_session(
    shared: &Arc<Shared>,
    open: Open,
    bytes: &[u8],
    user: Option<&UserId>,
) -> Result<(SessionHandle, [u8; 32]), ErrorFrame> {
    refuse_while_draining(shared)?;
    session_params(shared, &open)?; // refuse before touching the store
                                    // Admitted before the ticket is claimed: a refused device keeps its ticket.
    let slot = admit(shared, user)?;
    let (open, assignment) = claim_prompt(shared, open).await?;
    let fail = |e: ErrorFrame| {
        if let Some(a) = &assignment {
            a.fail_later(shared, e.code);
        }
        e
    };
    // The frame to keep for a takeover: the device's own, or the one with the prompt's
    // parameters and the assignment mark.
    let bytes = match &assignment {
        None => bytes.to_vec(),
        Some(_) => Frame::Open(open.clone())
            .encode()
            .map_err(|_| fail(err(ErrorCode::Internal, None, "internal error")))?,
    };
    session_params(shared, &open).map_err(fail)?;
    let token = ResumeToken::generate();
    // Ids are random: one in use (a chance of about n / 2^64) is drawn again.
    let mut tries = 0;
    let id = loop {
        let id = shared
            .store
            .next_session_id()
            .await
            .map_err(|e| fail(store_error(&e)))?;
        let new = NewSession {
            id,
            owner: shared.replica.clone(),
        };
        match shared.store.create_session(new, token.hash()).await {
            Ok(_) => break id,
            Err(StoreError::AlreadyExists(_)) if tries < 3 => tries += 1,
            Err(e) => return Err(fail(store_error(&e))),
        }
    };
    let cleanup = |shared: Arc<Shared>| async move {
        let _ = shared.store.close_session(id, &shared.replica).await;
        shared.params.remove(id).await;
    };
    if let Err(e) = shared.params.put(id, bytes).await {
        tracing::warn!(error = %e, "storing the session's parameters");
        cleanup(shared.clone()).await;
        return Err(fail(err(
            ErrorCode::Unavailable,
            None,
            "the session store is unavailable",
        )));
    }
    match spawn_session(shared, id, &open, 0, slot).await {
        Ok(handle) => {
            tracing::info!(
                session = id.0,
                dtype = %open.dtype,
                max_tokens = open.max_tokens,
                "session opened"
            );
            Ok((handle, *token.as_bytes()))
        }
        Err(e) => {
            cleanup(shared.clone()).await;
            Err(fail(e))
        }
    }
}
