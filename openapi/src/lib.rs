//! The contract of Tandem's REST API: every type that appears in a request or response body,
//! with its serde shape and its utoipa [`ToSchema`](utoipa::ToSchema) derive. Their doc
//! comments are the API's documentation: they become the schema descriptions of
//! `openapi/openapi.json`.
//!
//! The server (`tandem-serve`, `serve/src/rest/`) uses these types for its handlers and
//! builds the OpenAPI document from them and its route annotations; the checked-in
//! `openapi.json` next to this crate is that document. A client written in Rust can use the
//! same types to read and write the bodies.
//!
//! # Layout
//! - [`error`]: the one error body shape and its stable codes.
//! - [`tenants`]: tenants, their quotas and API keys (`/v1/admin/tenants...`, `/v1/me`).
//! - [`device`]: device tokens (`/v1/admin/device-tokens...`).
//! - [`prompts`]: the partner's prompts and per-user results (`/v1/prompts...`), user ids
//!   and assignment statuses.
//! - [`inbox`]: the device's inbox (`/v1/edge/inbox...`).
//!
//! # Dependencies
//! Data only: serde, utoipa and `tandem-protocol` (for [`SamplingParams`]); no HTTP
//! framework, runtime or store. What a type needs of the server (its HTTP status, how it is
//! built from a store record) lives in the server.
//!
//! [`SamplingParams`]: tandem_protocol::SamplingParams

#![forbid(unsafe_code)]

pub mod device;
pub mod error;
pub mod inbox;
pub mod prompts;
pub mod tenants;
