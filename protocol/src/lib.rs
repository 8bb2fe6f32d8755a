//! `tandem-protocol`: the types the edge and the cloud agree on.
//!
//! So far this crate holds the generation parameters ([`SamplingParams`], validated into
//! [`Sampling`]) and [`FinishReason`]. The binary wire frames of DESIGN.md §5 (`Open`,
//! `Hidden`, `Token`, …) arrive with the edge–cloud issue; nothing here pretends to be them.
//!
//! No tokio, no tensors: this crate must stay cheap to depend on from a phone.

pub mod sampling;

pub use sampling::{FinishReason, Sampling, SamplingError, SamplingParams};
