//! `tandem-protocol`: the types the edge and the cloud agree on.
//!
//! - [`wire`]: the binary frames of the edge ↔ cloud WebSocket (DESIGN.md §5) — [`Frame`],
//!   the borrowing [`HiddenRef`] decoder, the hidden-state payload conversions and the stable
//!   [`ErrorCode`]s. Its page is the byte-level specification a partner implements from.
//! - [`sampling`]: the generation parameters ([`SamplingParams`], validated into
//!   [`Sampling`]) and [`FinishReason`].
//!
//! No tokio, no tensors, no unsafe code: this crate must stay cheap to depend on from a phone.

#![forbid(unsafe_code)]

pub mod sampling;
pub mod wire;

pub use sampling::{FinishReason, Sampling, SamplingError, SamplingParams};
pub use wire::{
    f32_to_hidden, hidden_to_f32, peek_frame_type, Done, DoneReason, ErrorCode, ErrorFrame, Frame,
    FrameType, Hidden, HiddenDtype, HiddenRef, Limits, ManifestId, Open, Opened, Resume,
    ResumeToken, SessionId, Token, WireError,
};
