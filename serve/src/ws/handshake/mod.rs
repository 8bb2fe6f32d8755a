//! The handshake that gives a connection its session: an `Open` starts one (`open.rs`), a
//! `Resume` reattaches to one (`resume.rs`). What both need lives here: the check of an
//! `Open` against what this cloud serves, admission, and the start of the engine session and
//! its actor (a session rebuilt from a replay starts like a new one).
//!
//! Every refusal is an [`ErrorFrame`] for the connection to send before it closes; store
//! and engine errors are logged here and reach the device only as their wire code.

mod open;
mod resume;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tandem_protocol::wire::{ErrorCode, ErrorFrame, ManifestId, Open};
use tandem_protocol::{OpenError, SessionId};
use tokio::sync::mpsc;

use super::admission::{Refusal, SessionSlot};
use super::assignment::AssignmentRef;
use super::session::{self, SessionHandle, Setup};
use super::Shared;
use crate::rest::store::prompts::UserId;
use crate::store::StoreError;
use tandem_engine::{EngineError, SessionParams};
use tandem_scheduler::SchedError;

pub(super) use open::open_session;
pub(super) use resume::resume_session;

/// An `Error` frame with a fixed message and no retry hint.
pub(super) fn err(code: ErrorCode, seq: Option<u64>, message: &str) -> ErrorFrame {
    ErrorFrame {
        code,
        seq,
        message: message.to_owned(),
        retry_after_ms: None,
    }
}

/// Refuses a new or resumed session while the replica drains.
fn refuse_while_draining(shared: &Shared) -> Result<(), ErrorFrame> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err(err(
            ErrorCode::ShuttingDown,
            None,
            "this replica is shutting down",
        ));
    }
    Ok(())
}

/// What an `Open` asks for, checked against what this cloud serves ([`Open::check`]).
fn session_params(shared: &Shared, open: &Open) -> Result<SessionParams, ErrorFrame> {
    let s = &shared.served;
    let refuse = |e: OpenError| err(e.error_code(), None, &e.to_string());
    let served = tandem_protocol::Served {
        // A pair id the wire cannot carry matches no device.
        manifest: ManifestId::try_from(s.pair_id.as_str())
            .map_err(|_| refuse(OpenError::ManifestMismatch))?,
        split: s.split,
        hidden_size: u32::try_from(s.hidden_size).unwrap_or(u32::MAX),
        max_tokens_cap: shared.cfg.max_tokens_cap,
    };
    let valid = open.check(&served).map_err(refuse)?;
    Ok(SessionParams {
        sampling: valid.sampling,
        max_tokens: valid.max_tokens as usize,
        stop_strings: valid.stop,
        eos_ids: None,
        trace: None,
    })
}

fn store_error(e: &StoreError) -> ErrorFrame {
    tracing::warn!(error = %e, "session store");
    err(
        ErrorCode::Unavailable,
        None,
        "the session store is unavailable",
    )
}

/// A place for a new session in the admission counts, or the `Error` that refuses it.
fn admit(shared: &Arc<Shared>, user: Option<&UserId>) -> Result<SessionSlot, ErrorFrame> {
    let held = shared.engine.hidden_state_bytes();
    shared.admission.admit(user, held).map_err(|refusal| {
        let code = match refusal {
            Refusal::Capacity(_) | Refusal::HiddenStateMemory(_) => ErrorCode::Overloaded,
            Refusal::UserCap(_) => ErrorCode::TooManySessions,
        };
        let wait = u32::try_from(refusal.retry_after().as_millis()).unwrap_or(u32::MAX);
        ErrorFrame {
            retry_after_ms: Some(wait),
            ..err(code, None, &refusal.to_string())
        }
    })
}

/// Opens the engine session and spawns its actor.
async fn spawn_session(
    shared: &Arc<Shared>,
    id: SessionId,
    open: &Open,
    device_has: u64,
    slot: SessionSlot,
) -> Result<SessionHandle, ErrorFrame> {
    let mut params = session_params(shared, open)?;
    // The device's trace (W3C `traceparent` in `Open`) is the session's parent; the engine
    // links each step to the generation span of the sessions it computed.
    let span = tracing::info_span!(
        parent: None,
        "session",
        otel.kind = "server",
        session.id = %id,
        session.replayed = device_has > 0,
        wire.dtype = %open.dtype,
        split = i64::from(open.split),
        partner_prompt = open.prompt_id.is_some(),
        replica = %shared.replica,
    );
    crate::telemetry::adopt_parent(
        &span,
        crate::telemetry::remote_parent(open.traceparent.as_deref(), None),
    );
    let generation = tracing::info_span!(
        parent: &span,
        "generation",
        max_tokens = i64::from(open.max_tokens),
        prompt_tokens = tracing::field::Empty,
        output_tokens = tracing::field::Empty,
        ttft_ms = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
        error_code = tracing::field::Empty,
    );
    params.trace = crate::telemetry::span_context(&generation).map(tandem_engine::TraceParent::new);
    let (events_tx, events) = mpsc::unbounded_channel();
    let opened = shared.engine.open_session_with(params, events_tx).await;
    let seq = opened.map_err(|e| match e {
        EngineError::Scheduler(SchedError::Overloaded(_)) => ErrorFrame {
            retry_after_ms: Some(super::admission::CAPACITY_RETRY_AFTER.as_millis() as u32),
            ..err(ErrorCode::Overloaded, None, "the cloud is at capacity")
        },
        EngineError::Stopped => err(ErrorCode::ShuttingDown, None, "the engine stopped"),
        e => {
            tracing::error!(error = %e, "engine open failed");
            err(ErrorCode::Internal, None, "internal error")
        }
    })?;
    let assignment = open.prompt_id.as_deref().and_then(AssignmentRef::from_mark);
    Ok(session::spawn(
        shared.clone(),
        Setup {
            id,
            seq,
            events,
            dtype: open.dtype,
            max_tokens: open.max_tokens,
            device_has,
            assignment,
            slot,
            span,
            generation,
        },
    ))
}
