//! Decoding is total and canonical: any input decodes to a frame or a typed error without
//! panicking, and a frame that decodes re-encodes to exactly the same bytes
//! ([`tandem_protocol::fuzzing::decode_frame`]).
//!
//! Run with `cargo +nightly fuzz run decode_frame` from `protocol/` (seeds: `seeds/decode_frame`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_protocol::fuzzing::decode_frame(data));
