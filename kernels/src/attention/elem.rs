//! [`KvElem`]: the element types of the K/V cache (`f32`, `f16`, `bf16`) and how the kernel
//! reads them as `f32`: in place for `f32`, widened one block and kv head at a time for the
//! half-precision types (bf16 with a vectorised shift, on the hot path of prefill).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// An element type of the K/V cache, read as `f32` by the kernel.
pub trait KvElem: Copy + Send + Sync {
    /// Widens one element to `f32`.
    fn to_f32(self) -> f32;

    /// Widens `src` into `dst` (same length). Override where a batched conversion is faster.
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    /// `Some(src)` when `Self` is `f32`, so the kernel reads the cache without a copy.
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }

    /// `Some(src)` when `Self` is `bf16`, so a kernel that widens in registers reads the cache
    /// without a copy.
    fn as_bf16(_src: &[Self]) -> Option<&[bf16]> {
        None
    }
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
}

impl KvElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl KvElem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    /// bf16 is the top half of an f32, so widening is a shift (exact, NaN included): a loop
    /// the compiler vectorises, 16 lanes at a time on AVX-512. A prefill chunk widens its
    /// whole context once per query row and head group, so this is on the hot path (`half`'s
    /// slice conversion, one element at a time, made bf16 prefill 3x slower than f32).
    fn widen(src: &[bf16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present.
            return unsafe { widen_bf16_avx512(src, dst) };
        }
        widen_bf16(src, dst);
    }

    fn as_bf16(src: &[bf16]) -> Option<&[bf16]> {
        Some(src)
    }
}

fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// [`widen_bf16`] compiled for AVX-512 (the same shifts, 16 lanes at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn widen_bf16_avx512(src: &[bf16], dst: &mut [f32]) {
    widen_bf16(src, dst);
}
