//! What the reports of `tandem bench`, `tandem-loadtest` and the privacy audit share, so that
//! none of them links another's crate for it:
//! - [`percentiles`]: latency percentiles through one HDR histogram (one definition of p99
//!   for every report);
//! - [`charts`]: one font loader for plotters and PNG files through the `png` crate.

// Unsafe code lives in tandem-kernels (and FFI); see its crate docs.
#![forbid(unsafe_code)]

pub mod charts;
pub mod percentiles;
