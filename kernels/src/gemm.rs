//! `y = x · Wᵀ` for f32 on the CPU, with `W` packed once at load.
//!
//! The projections of a decoder layer are `[n, k]` weights applied to a few dozen rows per
//! step (one per decoding sequence). At that shape the work is a stream of the weight
//! through the cores with every weight element used by each of the `m` rows, so the layout
//! of the weight is what matters: [`PackedMatrix`] stores it as panels of [`NR`] output
//! columns, each panel `k` rows of `NR` contiguous values (zero-padded past `n`), so that
//! the kernel reads one cache line per `k` step and per 16 columns.
//!
//! The kernel keeps an `MR × NR` block of outputs in registers and walks `k` once, in order:
//! every output element is `Σ_k x[r, k] · w[c, k]` accumulated by fused multiply-adds from
//! `k = 0` up, whatever `m` is and wherever the row sits in a block. A row's result is
//! therefore bit-identical whether it is computed alone or inside a batch of 64 — batched
//! decoding returns exactly what each sequence would get by itself.
//!
//! Threads ([`Team`]) split the panels (output columns) between them ([`Stripes`]); rows are
//! never split,
//! so the sum order does not depend on the thread count either.
//!
//! Three kernels, chosen once per process from the CPU: AVX-512 register blocks (`MR` rows ×
//! 32 columns), AVX2 + FMA ones (`avx2`: up to 6 rows × 16 columns, for CPUs without
//! AVX-512 such as AMD's Zen 1–3), which compute the same fused chains and so the same bits,
//! and a portable loop (multiply, then add) for anything else.

use std::sync::OnceLock;

use crate::team::Team;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

/// Output columns per packed panel: two 512-bit vectors of f32.
pub const NR: usize = 32;
/// Rows per register block of the AVX-512 kernel (`2 × MR` accumulators of 32).
const MR: usize = 12;

/// A `[n, k]` weight (row `c` is output column `c`) in panels of [`NR`] columns.
#[derive(Clone)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    /// `ceil(n / NR)` panels, each `[k][NR]`, on 64-byte boundaries (see [`Line`]).
    data: Vec<Line>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl PackedMatrix {
    /// Packs a row-major `[n, k]` matrix.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not [{n}, {k}]");
        let panels = n.div_ceil(NR);
        let mut data = vec![Line([0.0; 16]); panels * k * NR / 16];
        let floats = Line::floats_mut(&mut data);
        for (p, panel) in floats.chunks_exact_mut(k * NR).enumerate() {
            let cols = (n - p * NR).min(NR);
            for c in 0..cols {
                let row = &w[(p * NR + c) * k..][..k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * NR + c] = v;
                }
            }
        }
        Self { n, k, data }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// `out[m, n] = x[m, k] · Wᵀ`, `x` and `out` row-major and contiguous.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_on(Isa::detect(), x, m, out)
    }

    /// `x · Wᵀ` (`x` is `[m, k]`) as a new `[m, n]` vector. The kernel writes every element
    /// once, so the vector is never zeroed first (64 rows × the LM head's 49,152 columns are
    /// 12.6 MB a step).
    pub fn matmul_to_vec(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_to_vec_on(Isa::detect(), x, m)
    }

    fn matmul_to_vec_on(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        let len = m.checked_mul(self.n).expect("output size overflows");
        let mut out = Vec::with_capacity(len);
        // SAFETY: `out` has room for `m * n` floats, and `matmul_into` writes every one of
        // them (every panel's columns for every row block) before returning, or panics before
        // `set_len`.
        unsafe {
            self.matmul_into(isa, x, m, out.as_mut_ptr());
            out.set_len(len);
        }
        out
    }

    fn matmul_on(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(out.len(), m * self.n, "output is not [{m}, {}]", self.n);
        // SAFETY: `out` is `m * n` writable floats.
        unsafe { self.matmul_into(isa, x, m, out.as_mut_ptr()) }
    }

    /// Writes all `m * n` floats of the output at `out`.
    ///
    /// # Safety
    /// `out` must point to `m * n` writable floats (initialised or not).
    unsafe fn matmul_into(&self, isa: Isa, x: &[f32], m: usize, out: *mut f32) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "input is not [{m}, {k}]");
        if m == 0 || n == 0 {
            return;
        }
        let panels = self.panels();
        let x = &pack_rows(x, m, k);
        let out_ptr = SendPtr(out);
        // Little work: stay on this thread (a hand-off costs more than it saves).
        if 2 * m * n * k < 1 << 20 {
            // SAFETY: one caller covers every panel of `out`.
            unsafe { self.run_panels(isa, x, m, 0..panels, out_ptr.get()) };
            return;
        }
        let team = Team::global();
        let threads = team.threads().min(panels);
        let stripes = Stripes::new(panels, threads);
        team.run(threads, &|own| {
            // SAFETY (both loops): every panel is claimed exactly once, so each column of
            // `out` has one writer.
            while let Some(p) = stripes.front(own) {
                unsafe { self.run_panel(isa, x, m, p, p + 1, out_ptr.get()) };
            }
            for other in (1..threads).map(|d| (own + d) % threads) {
                while let Some(p) = stripes.back(other) {
                    unsafe { self.run_panel(isa, x, m, p, p.wrapping_sub(1), out_ptr.get()) };
                }
            }
        });
    }

    /// Computes the columns of `panels` for all `m` rows into `out` (`[m, n]`).
    ///
    /// # Safety
    /// As [`Self::run_panel`], for every panel of the range.
    unsafe fn run_panels(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        panels: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        for p in panels {
            // SAFETY: the caller's promise.
            unsafe { self.run_panel(isa, x, m, p, p + 1, out) };
        }
    }

    /// Computes the columns of panel `p` for all `m` rows into `out` (`[m, n]`), pulling
    /// panel `next` (if there is one) towards the cache meanwhile.
    ///
    /// # Safety
    /// `out` must point to `m * n` writable floats, and no other thread may write the
    /// columns of panel `p` meanwhile.
    unsafe fn run_panel(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        p: usize,
        next: usize,
        out: *mut f32,
    ) {
        let (n, k) = (self.n, self.k);
        let data = Line::floats(&self.data);
        let panel = &data[p * k * NR..][..k * NR];
        // The first block of rows pulls the next panel towards the cache while it works: the
        // weights do not fit in the cache between steps, and without this the first pass
        // over every panel waits on memory.
        let next = next
            .checked_mul(k * NR)
            .and_then(|at| data.get(at..at + k * NR));
        let cols = (n - p * NR).min(NR);
        for (b, (r, rows)) in row_blocks(m).enumerate() {
            let a = &x[r * k..(r + rows) * k];
            let prefetch = if b == 0 { next } else { None };
            // SAFETY: rows `r..r + rows`, columns of panel `p`: inside `out`, and ours.
            unsafe {
                let c = out.add(r * n + p * NR);
                kernel(isa, a, rows, k, panel, prefetch, c, n, cols);
            }
        }
    }
}

/// Work sharing for one matmul: the panels cut into one contiguous stripe per thread. Each
/// thread takes the panels of its own stripe from the front, in order, and when that is
/// empty takes the others' from the back. So every thread streams long runs of consecutive
/// panels (which the hardware prefetchers follow), and yet a thread that runs late (woken
/// late, or sharing its core) leaves its unclaimed panels to the others one at a time,
/// instead of whole parts: the threads finish within one panel of each other.
pub(crate) struct Stripes {
    /// Per stripe, the unclaimed panels `front..back` as `front | back << 32`.
    left: Vec<Padded>,
}

/// One stripe's state, alone on its cache line (the threads update theirs at every panel).
#[repr(align(64))]
struct Padded(std::sync::atomic::AtomicU64);

impl Stripes {
    pub(crate) fn new(panels: usize, stripes: usize) -> Self {
        assert!(u32::try_from(panels).is_ok(), "{panels} panels");
        let stripes = stripes.max(1);
        let left = (0..stripes)
            .map(|s| {
                let (lo, hi) = (s * panels / stripes, (s + 1) * panels / stripes);
                Padded(std::sync::atomic::AtomicU64::new(
                    lo as u64 | (hi as u64) << 32,
                ))
            })
            .collect();
        Self { left }
    }

    /// Claims the first unclaimed panel of stripe `s`.
    pub(crate) fn front(&self, s: usize) -> Option<usize> {
        self.claim(s, |lo, hi| (lo, lo + 1, hi))
    }

    /// Claims the last unclaimed panel of stripe `s`.
    pub(crate) fn back(&self, s: usize) -> Option<usize> {
        self.claim(s, |lo, hi| (hi - 1, lo, hi - 1))
    }

    /// `take(front, back)` gives (the panel claimed, the new front, the new back).
    fn claim(&self, s: usize, take: impl Fn(u64, u64) -> (u64, u64, u64)) -> Option<usize> {
        use std::sync::atomic::Ordering;
        let cell = &self.left[s].0;
        let mut cur = cell.load(Ordering::Relaxed);
        loop {
            let (lo, hi) = (cur & 0xffff_ffff, cur >> 32);
            if lo >= hi {
                return None;
            }
            let (panel, lo, hi) = take(lo, hi);
            match cell.compare_exchange_weak(
                cur,
                lo | hi << 32,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(panel as usize),
                Err(now) => cur = now,
            }
        }
    }
}

/// One cache line of floats. The panels are stored as these so that every vector load of
/// the kernel is one aligned cache line: from a plain `Vec<f32>` (16-byte aligned) each
/// 64-byte load would straddle two lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl Line {
    fn floats(lines: &[Line]) -> &[f32] {
        // SAFETY: `Line` is exactly 16 `f32`s (`repr(C)`, size 64), with no padding.
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 16) }
    }

    fn floats_mut(lines: &mut [Line]) -> &mut [f32] {
        // SAFETY: as in `floats`, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16) }
    }
}

/// The row blocks of `m` rows, `(first row, rows)`, as even as possible (64 rows: 11, 11,
/// 11, 11, 10, 10 rather than five of 12 and one of 4): a block of few rows leaves the FMA
/// units waiting on latency.
pub(crate) fn row_blocks(m: usize) -> impl Iterator<Item = (usize, usize)> {
    even_blocks(m, MR)
}

/// `n` items cut into the fewest blocks of at most `most`, as even as possible: `(first,
/// len)` per block, in order (none for `n = 0`). The row blocks above, and the AVX2 kernels'
/// sub-blocks of a row block.
pub(crate) fn even_blocks(n: usize, most: usize) -> impl Iterator<Item = (usize, usize)> {
    let blocks = n.div_ceil(most);
    (0..blocks).map(move |b| {
        let (base, extra) = (n / blocks, n % blocks);
        (b * base + b.min(extra), base + usize::from(b < extra))
    })
}

/// `x` (`[m, k]`) rearranged block by block: the block of rows `r..r + rows` becomes
/// `[k, rows]` at offset `r * k`, so that the kernel reads the `rows` values of one `k` step
/// from one place (one pointer, constant offsets) instead of `rows` strided rows, whose
/// address arithmetic competes with the multiply-adds for the same execution ports.
///
/// Written in order (no zeroing first): the block's rows are read as `rows` sequential
/// streams, which the prefetchers follow, while the output only grows.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut packed = Vec::with_capacity(m * k);
    for (r, rows) in row_blocks(m) {
        let block = &x[r * k..(r + rows) * k];
        for kk in 0..k {
            packed.extend((0..rows).map(|i| block[i * k + kk]));
        }
    }
    packed
}

#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only to hand disjoint output columns to the scoped worker threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Which kernel runs: chosen once per process from the CPU's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    fn detect() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if Isa::Avx2.is_available() {
                return Isa::Avx2;
            }
            Isa::Portable
        })
    }

    /// Whether this CPU can run the kernel.
    fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512 => has!("avx512f"),
                Isa::Avx2 => has!("avx2") && has!("fma"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }
}

/// One block: `rows ≤ MR` rows of `a` (packed `[k, rows]`) against one panel, into `cols ≤ NR`
/// columns of `c` (row stride `ldc`); `prefetch` is a panel to pull into the cache meanwhile.
///
/// # Safety
/// `c` must address `rows` rows of `cols` writable floats at stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    isa: Isa,
    a: &[f32],
    rows: usize,
    k: usize,
    panel: &[f32],
    prefetch: Option<&[f32]>,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(a.len() == rows * k && panel.len() == k * NR && cols <= NR);
    debug_assert!(prefetch.is_none_or(|p| p.len() == panel.len()));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match rows {
                    // SAFETY: AVX-512F is present; `c` is the caller's promise.
                    $($r => return unsafe {
                        match prefetch {
                            Some(p) => avx512::block::<$r, true>(a, k, panel, p, c, ldc, cols),
                            None => avx512::block::<$r, false>(a, k, panel, panel, c, ldc, cols),
                        }
                    },)*
                    _ => unreachable!("rows {rows} > MR"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12);
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: AVX2 and FMA are present; the rest is the caller's promise.
        return unsafe { avx2::rows(a, rows, k, panel, prefetch, c, ldc, cols) };
    }
    // SAFETY: the caller's promise.
    let _ = prefetch; // the portable loop leaves prefetching to the hardware
    unsafe { portable(a, rows, k, panel, c, ldc, cols) }
}

/// The same sums without SIMD intrinsics (multiply, then add: no fusion), for CPUs without
/// AVX-512.
///
/// # Safety
/// As [`kernel`].
unsafe fn portable(
    a: &[f32],
    rows: usize,
    k: usize,
    panel: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    for r in 0..rows {
        let mut acc = [0f32; NR];
        for kk in 0..k {
            let v = a[kk * rows + r];
            let b = &panel[kk * NR..][..NR];
            for j in 0..NR {
                acc[j] += v * b[j];
            }
        }
        // SAFETY: row `r` of the block has `cols` writable floats at `c + r * ldc`.
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), c.add(r * ldc), cols) };
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::NR;
    use std::arch::x86_64::*;

    /// `R` rows × 32 columns, accumulated in `2 R` zmm registers over the whole `k`; with
    /// `PREFETCH`, each `k` step also asks for the same two cache lines of `next`.
    ///
    /// # Safety
    /// As [`super::kernel`], and the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block<const R: usize, const PREFETCH: bool>(
        a: &[f32],
        k: usize,
        panel: &[f32],
        next: &[f32],
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        // SAFETY: `a` is `[k, R]` and `panel` `[k, NR]` (checked by the caller), so every
        // load is in bounds; the stores are the caller's promise about `c`.
        unsafe {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            let ap = a.as_ptr();
            let bp = panel.as_ptr();
            let np = next.as_ptr().cast::<i8>();
            for kk in 0..k {
                if PREFETCH {
                    _mm_prefetch::<_MM_HINT_T1>(np.add(kk * NR * 4));
                    _mm_prefetch::<_MM_HINT_T1>(np.add(kk * NR * 4 + 64));
                }
                let b0 = _mm512_loadu_ps(bp.add(kk * NR));
                let b1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
                for r in 0..R {
                    let av = _mm512_set1_ps(*ap.add(kk * R + r));
                    lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
                }
            }
            store_block(&lo, &hi, c, ldc, cols);
        }
    }

    /// Stores `R` rows of 32 accumulated columns (`lo`: 0–15, `hi`: 16–31) at `c` (row
    /// stride `ldc`), the first `cols` of each: the tail of every 32-column register block,
    /// f32 and bf16 kernels alike.
    ///
    /// # Safety
    /// `c` must address `R` rows of `cols ≤ 32` writable floats at stride `ldc`; the CPU must
    /// have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store_block<const R: usize>(
        lo: &[__m512; R],
        hi: &[__m512; R],
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        // SAFETY: the caller's promise about `c`.
        unsafe {
            if cols == NR {
                for r in 0..R {
                    _mm512_storeu_ps(c.add(r * ldc), lo[r]);
                    _mm512_storeu_ps(c.add(r * ldc + 16), hi[r]);
                }
            } else {
                let m0 = mask(cols.min(16));
                let m1 = mask(cols.saturating_sub(16));
                for r in 0..R {
                    _mm512_mask_storeu_ps(c.add(r * ldc), m0, lo[r]);
                    _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, hi[r]);
                }
            }
        }
    }

    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(len: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// `x · Wᵀ` in f64, the reference every kernel must be close to.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                out[r * n + c] = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i]))
                    .sum();
            }
        }
        out
    }

    fn isas() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }

    /// The AVX2 and AVX-512 kernels compute the same fused chains: on a CPU with both, the
    /// same bits (on others, the test has nothing to compare).
    #[test]
    fn the_avx2_and_avx512_kernels_agree_bit_for_bit() {
        if !(Isa::Avx2.is_available() && Isa::Avx512.is_available()) {
            eprintln!("note: AVX2 and AVX-512 are not both here; nothing to compare");
            return;
        }
        let mut rng = StdRng::seed_from_u64(17);
        for &(m, n, k) in &[(1, 33, 7), (7, 64, 100), (37, 96, 200), (64, 160, 576)] {
            let packed = PackedMatrix::pack(&random(n * k, &mut rng), n, k);
            let x = random(m * k, &mut rng);
            let bits = |isa| {
                let out = packed.matmul_to_vec_on(isa, &x, m);
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(Isa::Avx2), bits(Isa::Avx512), "m={m} n={n} k={k}");
        }
    }

    #[test]
    fn every_kernel_matches_the_reference_on_ragged_shapes() {
        let mut rng = StdRng::seed_from_u64(7);
        // Rows across the block sizes, columns not a multiple of the panel, short and long k;
        // the last shape is big enough to be split between threads.
        let shapes = [
            (1, 1, 1),
            (1, 33, 7),
            (5, 31, 64),
            (12, 32, 3),
            (13, 65, 40),
            (25, 100, 17),
            (64, 160, 576),
        ];
        for &(m, n, k) in &shapes {
            let (w, x) = (random(n * k, &mut rng), random(m * k, &mut rng));
            let want = reference(&x, &w, m, n, k);
            let packed = PackedMatrix::pack(&w, n, k);
            for isa in isas() {
                let mut out = vec![f32::NAN; m * n];
                packed.matmul_on(isa, &x, m, &mut out);
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
                    assert!(
                        (f64::from(got) - want).abs() <= tol,
                        "{isa:?} m={m} n={n} k={k}: element {i} is {got}, want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch_around_it() {
        let mut rng = StdRng::seed_from_u64(11);
        let (n, k) = (96, 200);
        let packed = PackedMatrix::pack(&random(n * k, &mut rng), n, k);
        let m = 37; // blocks of 10, 9, 9, 9: every row sits at another place than alone
        let x = random(m * k, &mut rng);
        for isa in isas() {
            let mut batched = vec![0f32; m * n];
            packed.matmul_on(isa, &x, m, &mut batched);
            for r in 0..m {
                let mut solo = vec![0f32; n];
                packed.matmul_on(isa, &x[r * k..][..k], 1, &mut solo);
                assert_eq!(
                    solo.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    batched[r * n..][..n]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{isa:?}: row {r} alone differs from the same row in a batch of {m}"
                );
            }
        }
    }

    #[test]
    fn a_new_output_vector_equals_the_in_place_result() {
        let mut rng = StdRng::seed_from_u64(13);
        // Ragged columns (masked stores), rows across block sizes, and one shape split
        // between threads: every element must be written, bit for bit as in place.
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 33, 7),
            (13, 65, 40),
            (64, 1000, 96),
            (3, 0, 4),
        ] {
            let packed = PackedMatrix::pack(&random(n * k, &mut rng), n, k);
            let x = random(m * k, &mut rng);
            for isa in isas() {
                let mut want = vec![f32::NAN; m * n];
                packed.matmul_on(isa, &x, m, &mut want);
                let got = packed.matmul_to_vec_on(isa, &x, m);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{isa:?} m={m} n={n} k={k}");
            }
        }
    }

    #[test]
    fn stripes_hand_out_every_panel_once_to_owners_and_thieves() {
        use std::sync::atomic::{AtomicU32, Ordering};
        for (panels, stripes) in [(0, 2), (1, 2), (5, 3), (96, 2), (1536, 4)] {
            let s = Stripes::new(panels, stripes);
            let hits: Vec<AtomicU32> = (0..panels).map(|_| AtomicU32::new(0)).collect();
            std::thread::scope(|scope| {
                for own in 0..stripes {
                    let (s, hits) = (&s, &hits);
                    scope.spawn(move || {
                        let mut last = None;
                        while let Some(p) = s.front(own) {
                            assert!(last.is_none_or(|l| p == l + 1), "the owner goes in order");
                            last = Some(p);
                            hits[p].fetch_add(1, Ordering::Relaxed);
                        }
                        for other in (1..stripes).map(|d| (own + d) % stripes) {
                            while let Some(p) = s.back(other) {
                                hits[p].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            let counts: Vec<u32> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
            assert!(
                counts.iter().all(|&c| c == 1),
                "{panels} panels, {stripes} stripes: {counts:?}"
            );
        }
    }

    #[test]
    fn empty_inputs_and_mismatched_lengths() {
        let packed = PackedMatrix::pack(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
        let mut out = vec![];
        packed.matmul(&[], 0, &mut out);
        assert!(out.is_empty());
        let mut out = vec![0.0; 2];
        packed.matmul(&[1.0, 0.0, -1.0], 1, &mut out);
        assert_eq!(out, [-2.0, -2.0]);
        let caught = std::panic::catch_unwind(|| {
            let mut out = vec![0.0; 2];
            packed.matmul(&[1.0, 0.0], 1, &mut out);
        });
        assert!(
            caught.is_err(),
            "an input of the wrong width must be refused"
        );
    }
}
