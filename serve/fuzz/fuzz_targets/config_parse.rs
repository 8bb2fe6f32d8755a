//! The server's configuration parser is total, and what passes its check yields every
//! derived value without a panic ([`tandem_serve::server::ServerConfig::fuzz_property`]: the
//! input as TOML text).
//!
//! Run with `cargo +nightly fuzz run config_parse` from `serve/` (seeds:
//! `fuzz/seeds/config_parse`, also run by `cargo test -p tandem-serve config_seeds`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_serve::server::ServerConfig::fuzz_property(data));
