//! `tandem-kvcache`: the cloud's paged KV cache (block pool, block tables, prefix sharing,
//! paged K/V storage and paged attention).
//!
//! **Not built yet.** The engine issue fills this crate. Until then the only KV cache is
//! `tandem_model::ContiguousKv` (one sequence, contiguous), which the paged cache will plug in
//! beside through the same `tandem_model::KvView` trait. This crate deliberately exports
//! nothing, so that no caller can mistake it for a working cache.
