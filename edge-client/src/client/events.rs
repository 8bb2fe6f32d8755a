//! What a generation reports: the [`Event`]s of its stream and, at the end, [`Finished`] with
//! the cloud's [`Usage`], the [`WireStats`] of what crossed the wire and the device's
//! [`Timings`]. Written by the private session task, read by the caller.

use std::time::Duration;

use serde::Serialize;
use tandem_protocol::{DoneReason, SessionId};

use crate::error::ClientError;
use crate::transparency::TransparencyRecord;

/// Token counts as the cloud reported them in `Done`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// What crossed the wire, resends included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WireStats {
    /// `Hidden` frames of the prompt and their bytes (each frame counted once).
    pub prompt_frames: u64,
    pub prompt_bytes: u64,
    /// `Hidden` frames of decode steps and their bytes (each frame counted once).
    pub decode_frames: u64,
    pub decode_bytes: u64,
    /// Every `Hidden` frame sent, resends included.
    pub hidden_frames_sent: u64,
    pub hidden_bytes_sent: u64,
    /// `Hidden` frames sent again after a `Resume`.
    pub hidden_frames_resent: u64,
    /// All frames received from the cloud.
    pub bytes_received: u64,
    /// Connections after the first.
    pub reconnects: u32,
    /// Resumes that replayed from 0 because the cloud had lost the state.
    pub replays: u32,
    /// New sessions opened because the cloud no longer knew the session (its store lost
    /// it): each replayed every hidden state sent (also counted in `replays`).
    pub reopens: u32,
    /// Speculation: tokens drafted and sent as hidden rows, and of those the ones the cloud
    /// confirmed; decode answers received (each a round trip).
    pub drafted_tokens: u64,
    pub accepted_drafts: u64,
    pub decode_rounds: u64,
}

/// Times of one generation, measured on the device.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    pub time_to_first_token_s: f64,
    pub total_s: f64,
    /// Output tokens after the first, per second after the first.
    pub decode_tokens_per_s: f64,
    /// Seconds this device spent in its edge layers over the prompt.
    pub edge_prompt_s: f64,
    /// Milliseconds this device spent in its edge layers per decode step (one token): the
    /// device's share of each token's round trip.
    pub edge_decode_ms_per_token: f64,
}

/// The end of a generation.
#[derive(Clone, Debug)]
pub struct Finished {
    pub reason: DoneReason,
    /// The concatenated text deltas.
    pub text: String,
    /// Every token id received, in order (the last may be an end-of-sequence token).
    pub token_ids: Vec<u32>,
    pub usage: Usage,
    pub session: SessionId,
    pub wire: WireStats,
    pub timings: Timings,
    /// The request's record, filled in.
    pub record: Option<TransparencyRecord>,
}

/// What a [`Generation`](super::Generation) yields.
#[derive(Debug)]
pub enum Event {
    /// The cloud accepted the session.
    Opened { session: SessionId },
    /// One new token (never repeated, even across a resume). `text` may be empty.
    Token {
        seq: u64,
        token_id: u32,
        text: String,
    },
    /// The connection was lost; the client tries again after `delay`.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        cause: String,
    },
    /// A new connection took over the session; `resent` hidden frames were sent again, from
    /// `next_hidden_seq` (0 with frames to resend: a replay). Also sent when the cloud no
    /// longer knew the session and a new one was opened to replay it (`WireStats::reopens`).
    Resumed { next_hidden_seq: u64, resent: u64 },
    /// The end; no more events follow.
    Done(Box<Finished>),
    /// The generation failed; no more events follow.
    Error(ClientError),
}
