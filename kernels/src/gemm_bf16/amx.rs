//! The AMX kernel ([`super::Bf16Kernel::Amx`]): the per-thread tile configuration
//! ([`Tiles`], released on drop) and blocks of 32 rows × 32 columns computed as four 16 × 16
//! f32 accumulator tiles with `tdpbf16ps`, through `asm!` (the AMX intrinsics are not stable).

use super::{KSTEP, NR, TILE_ROWS};
use std::arch::asm;
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};

/// How far ahead of its tile loads a block that streams weights from memory prefetches.
/// Without it each weight tile load waited on DRAM: decode at one session ran at 42–46
/// tokens/s on the demo model, 47–58 with 4–16 KB of lead (measured here, alternating;
/// the differences between 4, 8 and 16 KB were within the noise).
const PREFETCH_AHEAD: usize = 8192;

/// The tile configuration (palette 1): all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

/// The tiles configured on this thread; released when dropped.
pub(super) struct Tiles(());

impl Tiles {
    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// The CPU must have AMX-TILE and the process the tile-data permission.
    pub(super) unsafe fn configure() -> Self {
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = TILE_ROWS as u8;
        }
        // SAFETY: a valid palette-1 configuration, 64 bytes, read once.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        Self(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured on this thread (`configure`); releasing returns
        // them to the init state, so context switches stop saving 8 KB of tile data.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// All `m` rows of `a` against one panel: blocks of 32 rows (two activation tiles, four
/// accumulator tiles), 16 for the last block when that is all that is left.
///
/// # Safety
/// Tiles configured on this thread ([`Tiles::configure`]); `a` is `[round_up(m, 16), kp]`
/// bf16 and `panel` `kp * NR` values; `c` addresses `m` rows of `cols` writable floats
/// at stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panel(
    a: &[u16],
    kp: usize,
    m: usize,
    panel: &[u16],
    next: Option<&[u16]>,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(a.len() >= m.div_ceil(TILE_ROWS) * TILE_ROWS * kp);
    debug_assert!(panel.len() == kp * NR && kp.is_multiple_of(KSTEP));
    let mut acc = Acc([[0f32; NR]; 2 * TILE_ROWS]);
    let lda = kp * 2;
    let blocks = m.div_ceil(2 * TILE_ROWS);
    // With two or more blocks of rows, the blocks after the first read the panel from the
    // cache and memory would sit idle: instead every block pulls a share of the next panel
    // into L2, so the next panel's first block finds it there and memory streams the whole
    // time the tiles compute.
    let ahead = match next {
        Some(next) if blocks > 1 => Some(Ahead {
            next: next.as_ptr().cast(),
            lines: kp,
            steps: blocks * (kp / KSTEP),
        }),
        _ => None,
    };
    let mut r = 0;
    let mut step = 0;
    while r < m {
        let two = m - r > TILE_ROWS;
        let rows = (m - r).min(2 * TILE_ROWS);
        // Whole tiles of 16 rows × 16 columns go straight to `c`; a ragged block through
        // `acc`.
        let direct = cols == NR && rows.is_multiple_of(TILE_ROWS);
        let (dst, ldd) = if direct {
            // SAFETY: row `r` is inside `c`: the caller's promise.
            (unsafe { c.add(r * ldc) }, ldc * 4)
        } else {
            (acc.0.as_mut_ptr().cast::<f32>(), NR * 4)
        };
        // SAFETY: rows `r..r + 16` (and `r + 16..r + 32` when `two`) are inside the padded
        // activations; the panel's `kp / 2` pair rows of 128 bytes are read 16 at a time;
        // `dst` addresses `rows` rows of 32 floats at stride `ldd` (`c`'s when `direct`).
        // The first block of rows streams the panel from memory, and pulls what follows
        // it towards the cache meanwhile; later blocks find the panel in the cache.
        unsafe {
            let ap = a.as_ptr().add(r * kp);
            let ahead = ahead.map(|h| (h, step));
            block(ap, lda, panel.as_ptr(), r == 0, ahead, kp, two, dst, ldd);
        }
        if !direct {
            for (i, row) in acc.0[..rows].iter().enumerate() {
                // SAFETY: row `r + i < m`, `cols` columns: the caller's promise.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), c.add((r + i) * ldc), cols) };
            }
        }
        r += 2 * TILE_ROWS;
        step += kp / KSTEP;
    }
}

/// The next panel, pulled into L2 a share per step: `lines` cache lines over `steps` steps
/// of `KSTEP` values (all of a panel's blocks).
#[derive(Clone, Copy)]
struct Ahead {
    next: *const i8,
    lines: usize,
    steps: usize,
}

/// A 32 × 32 f32 block, as the four accumulator tiles store it.
#[repr(C, align(64))]
struct Acc([[f32; NR]; 2 * TILE_ROWS]);

/// One block of 16 or 32 rows × 32 columns over the whole `k`.
///
/// # Safety
/// As [`panel`]: `a` points at the block's first row (stride `lda` bytes), `b` at the
/// panel.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a: *const u16,
    lda: usize,
    b: *const u16,
    prefetch: bool,
    ahead: Option<(Ahead, usize)>,
    kp: usize,
    two: bool,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (every asm block): tiles configured by the caller; the loads read
    // `16 × 64` bytes at the given strides, inside the activations and the panel (the
    // caller's promise); the stores write the 32 × 32 `acc`.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        if two {
            asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        // The lines this block will store, asked for in the exclusive state before its
        // products start (`prefetchw`: a hint, it never faults, and CPUs without it treat
        // it as a no-op), so the tile stores at the end do not each wait for a line to come
        // from L3 or memory. Measured on the project's Xeon (`examples/bf16_step`,
        // alternating): 1.11× at 64 rows over 30 layers, 1.11× at 256 rows.
        for i in 0..if two { 2 * TILE_ROWS } else { TILE_ROWS } {
            let row = c.byte_add(i * ldc);
            asm!(
                "prefetchw [{row}]",
                "prefetchw [{row} + 64]",
                row = in(reg) row,
                options(nostack, readonly, preserves_flags),
            );
        }
        let a2 = a.add(TILE_ROWS * lda / 2);
        for s in (0..kp).step_by(KSTEP) {
            // Activations: 16 rows × 32 values at `k = s`. Weights: pair rows
            // `s / 2 ..+ 16`, columns 0–15 then 16–31 (64 bytes apart, stride 128).
            let bk = b.add(s * NR);
            if prefetch {
                // The 2 KB of weights `PREFETCH_AHEAD` bytes further on (in this panel or
                // the next, which is the next in memory): 32 cache lines. `wrapping_add`:
                // past the last panel the address is never dereferenced, and a prefetch
                // does not fault.
                let ahead = bk.cast::<i8>().wrapping_add(PREFETCH_AHEAD);
                for l in 0..32 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l * 64));
                }
            }
            if let Some((h, first)) = ahead {
                let t = first + s / KSTEP;
                for l in t * h.lines / h.steps..(t + 1) * h.lines / h.steps {
                    _mm_prefetch::<_MM_HINT_T1>(h.next.wrapping_add(l * 64));
                }
            }
            asm!(
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a = in(reg) a.add(s),
                lda = in(reg) lda,
                b = in(reg) bk,
                b1 = in(reg) bk.add(32),
                ldb = in(reg) 128usize,
                options(nostack, readonly),
            );
            if two {
                asm!(
                    "tileloadd tmm5, [{a} + {lda}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a = in(reg) a2.add(s),
                    lda = in(reg) lda,
                    options(nostack, readonly),
                );
            }
        }
        asm!(
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c1} + {ldc}*1], tmm1",
            c = in(reg) c,
            c1 = in(reg) c.add(16),
            ldc = in(reg) ldc,
            options(nostack),
        );
        if two {
            let c2 = c.byte_add(TILE_ROWS * ldc);
            asm!(
                "tilestored [{c} + {ldc}*1], tmm2",
                "tilestored [{c1} + {ldc}*1], tmm3",
                c = in(reg) c2,
                c1 = in(reg) c2.add(16),
                ldc = in(reg) ldc,
                options(nostack),
            );
        }
    }
}
