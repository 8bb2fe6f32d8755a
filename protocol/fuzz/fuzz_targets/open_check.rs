//! `Open` validation is total, and what it accepts is what the server can run
//! ([`tandem_protocol::fuzzing::open_check`]: a control byte that picks the served pair, then
//! the frame).
//!
//! Run with `cargo +nightly fuzz run open_check` from `protocol/` (seeds: `seeds/open_check`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_protocol::fuzzing::open_check(data));
