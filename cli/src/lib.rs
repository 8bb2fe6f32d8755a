//! The `tandem` command's subcommands, one module each; `main.rs` parses the command line
//! and hands each subcommand its arguments. Everything these modules do lives in the
//! libraries (tandem-model, tandem-engine, tandem-serve, tandem-privacy): this crate reads
//! flags, prints progress and results, and maps errors to exit statuses.
//!
//! - [`split`]: `tandem split` and `tandem random-model`;
//! - [`generate`]: `tandem generate`;
//! - [`bench`]: `tandem bench` and `tandem device-check`;
//! - [`serve`]: `tandem serve`;
//! - [`admin`]: `tandem admin`, the provider's client of a running server's `/v1/admin` routes.
//!
//! `tandem audit-privacy` is `tandem_privacy::run_cli`.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bench;
pub mod generate;
pub mod serve;
pub mod split;
