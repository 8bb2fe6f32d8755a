//! CPU and OS feature detection for the kernels: AVX2 with FMA, AVX512-BF16, and AMX (CPUID, the OS's tile
//! state in XCR0, and the tile-data permission Linux grants per process).

/// AVX512-BF16 (with AVX-512F).
pub(super) fn avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX2 and FMA (the f32 widening kernel).
pub(super) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AMX-TILE and AMX-BF16 in CPUID, tile state enabled by the OS (XCR0 bits 17 and 18),
/// and the tile-data permission granted to this process (Linux `arch_prctl`).
pub(super) fn amx() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::arch::x86_64::__cpuid_count;
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        let osxsave = __cpuid_count(1, 0).ecx >> 27 & 1 == 1;
        if !(amx_bf16 && amx_tile && osxsave) {
            return false;
        }
        // SAFETY: OSXSAVE is set, so XGETBV is available.
        let xcr0 = unsafe { xgetbv0() };
        if xcr0 >> 17 & 0b11 != 0b11 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_ulong = 18;
        // SAFETY: a plain system call with two integer arguments.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if rc != 0 {
            tracing::warn!(
                "the CPU has AMX but the kernel refused the tile-data permission: using AVX-512"
            );
        }
        rc == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// XCR0.
///
/// # Safety
/// CPUID.1:ECX.OSXSAVE must be set.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    // SAFETY: the caller's promise (XGETBV is enabled).
    unsafe { std::arch::x86_64::_xgetbv(0) }
}
