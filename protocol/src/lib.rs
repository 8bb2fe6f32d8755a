//! `tandem-protocol`: the types the edge and the cloud agree on.
//!
//! - [`wire`]: the binary frames of the edge ↔ cloud WebSocket (DESIGN.md §5) — [`Frame`],
//!   the borrowing [`HiddenRef`] decoder, the hidden-state payload conversions and the stable
//!   [`ErrorCode`]s. Its page is the byte-level specification a partner implements from.
//! - [`sampling`]: the generation parameters ([`SamplingParams`], validated into
//!   [`Sampling`]) and [`FinishReason`].
//! - [`open`]: [`Open::check`], an `Open` checked against what a cloud serves.
//! - [`fuzzing`]: the properties the fuzz targets check, shared with the seed-corpus test.
//!
//! No tokio, no tensors, no unsafe code: this crate must stay cheap to depend on from a phone.

#![forbid(unsafe_code)]

#[doc(hidden)]
pub mod fuzzing;
pub mod open;
pub mod sampling;
pub mod wire;

pub use open::{OpenError, Served, ValidOpen};

pub use sampling::{FinishReason, Sampling, SamplingError, SamplingParams};
pub use wire::{
    f32_to_hidden, hidden_to_f32, peek_frame_type, Done, DoneReason, ErrorCode, ErrorFrame, Frame,
    FrameType, Hidden, HiddenDtype, HiddenRef, Limits, ManifestId, Open, Opened, Resume,
    ResumeToken, SessionId, Token, WireError,
};
