//! The engine's CPU kernels, and every `unsafe` block of the project outside FFI (each with
//! its SAFETY comment): what the rest of the workspace calls through safe functions.
//!
//! - [`team`]: the thread team the kernels split work over (one team, spinning briefly, then
//!   parked), instead of a general-purpose pool that fights the matmuls for two cores.
//! - [`gemm`]: the f32 matmul over weights packed once at load (AVX-512 or AVX2 + FMA
//!   register blocks, a portable path elsewhere).
//! - [`gemm_bf16`]: the bf16 matmul on AMX tiles, AVX512-BF16 dot products, or AVX2 + FMA on
//!   weights widened in registers (or portable), chosen at run time (`TANDEM_BF16_KERNEL`
//!   forces one).
//! - [`simd`]: vector helpers (`exp` within 2 ulp of libm's).
//! - [`ops`]: the fused passes of a decoder layer between its matmuls (RMSNorm with the
//!   residual add, RoPE while splitting Q/K/V, SiLU times the gate).
//! - [`attention`]: paged attention over K/V blocks in f32, f16 or bf16.
//! - [`mmap`]: read-only maps of weight files, behind a safe function whose contract is
//!   that model files do not change while they are served.
//! - [`quant`]: int8 rows and 4-bit blocks for memory-light device parts, and the int8
//!   matmul.
//!
//! Nothing here knows tensors, models or caches: inputs are slices and shapes. `tandem-model`
//! and `tandem-kvcache` wrap them.

pub mod attention;
pub mod gemm;
pub mod gemm_bf16;
pub mod mmap;
pub mod ops;
pub mod quant;
pub mod simd;
pub mod team;
