//! `y = x · Wᵀ` with `W` in bf16, packed once at load, on the CPU's matrix units.
//!
//! Weights stay in the dtype the checkpoint stores (bf16: half the bytes of f32, so half
//! the memory traffic of a decode step, which streams every weight once). Activations stay
//! f32 between the matmuls; each matmul rounds its input rows to bf16 (round to nearest
//! even) and accumulates in f32. Three kernels compute the same sums:
//!
//! - [`Bf16Kernel::Amx`]: Intel AMX tile dot products (`tdpbf16ps`, through `asm!`: the AMX
//!   intrinsics are not stable in Rust). A block of 32 rows × 32 columns is four 16 × 16 f32
//!   accumulator tiles fed by two activation tiles and two weight tiles per 32 values of `k`.
//! - [`Bf16Kernel::Avx512Bf16`]: `vdpbf16ps` (AVX512-BF16), 12 rows × 32 columns of
//!   accumulators in registers, for CPUs with AVX512-BF16 but no AMX.
//! - [`Bf16Kernel::Avx2`]: weights widened to f32 in registers and fused multiply-adds,
//!   up to 5 rows × 16 columns (from 24 rows, each panel widened once to f32 for the f32
//!   AVX2 kernel), for CPUs with AVX2 and FMA only (AMD Zen 1–3, Intel client cores); the
//!   same bits as the portable kernel.
//! - [`Bf16Kernel::Portable`]: the same pair-by-pair sums in plain f32.
//!
//! One packed layout serves all four: panels of [`NR`] = 32 output columns; inside a panel,
//! one 128-byte line pair per two values of `k` ("pair row" `j`): the first 64 bytes hold
//! columns 0–15 as `(w[c][2j], w[c][2j + 1])` pairs, the next 64 columns 16–31. That is the
//! AMX weight-tile layout (16 pair rows of 64 bytes at a stride of 128) and also the operand
//! `vdpbf16ps` multiplies with a broadcast pair of activations. `k` is padded with zeros to
//! a multiple of 32 (one tile row), `n` to a multiple of 32.
//!
//! Determinism: every output element is one sum over `k` in a fixed order, computed by the
//! same instruction sequence whatever `m` is and wherever the row sits in its block (rows
//! that pad a tile are zeros and never mix with other rows): a row's result is bit-identical
//! alone and inside a batch, per kernel, and does not depend on the thread count (threads
//! split panels, never rows or `k`). Different kernels may differ in the last bits.
//!
//! Error: the products of two bf16 values are exact in f32, so the only error against an
//! exact sum of the bf16-rounded inputs is the f32 accumulation, at most about
//! `k · 2⁻²⁴ · Σ|x w|` (the tests check that bound against an f64 reference).
//!
//! The kernel is chosen once per process ([`Bf16Kernel::selected`]): the best the CPU has, or
//! the one `TANDEM_BF16_KERNEL` (`amx`, `avx512bf16`, `avx2`, `portable`) names. A named kernel that
//! the CPU lacks is an error, never a silent fallback.

use std::sync::OnceLock;

use half::bf16;

use crate::gemm::{row_blocks, SendPtr, Stripes};
use crate::team::Team;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
mod detect;
#[cfg(test)]
mod tests;

/// Output columns per packed panel.
pub const NR: usize = 32;
/// `k` is padded to a multiple of this (one AMX tile row: 32 bf16 values, 64 bytes).
pub const KSTEP: usize = 32;
/// Rows per AMX tile.
const TILE_ROWS: usize = 16;
/// The environment variable that forces a kernel.
pub const KERNEL_ENV: &str = "TANDEM_BF16_KERNEL";

/// A bf16 matmul kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bf16Kernel {
    Amx,
    Avx512Bf16,
    Avx2,
    Portable,
}

impl Bf16Kernel {
    /// Every kernel, best first.
    pub const ALL: [Bf16Kernel; 4] = [Self::Amx, Self::Avx512Bf16, Self::Avx2, Self::Portable];

    /// The name `TANDEM_BF16_KERNEL` takes and logs show.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amx => "amx",
            Self::Avx512Bf16 => "avx512bf16",
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        }
    }

    /// Parses a kernel name (`amx`, `avx512bf16`, `avx2`, `portable`).
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("unknown bf16 kernel `{s}` (amx, avx512bf16, avx2 or portable)"))
    }

    /// Whether this CPU (and OS) can run the kernel. AMX needs the CPU's AMX-TILE and
    /// AMX-BF16, the OS's tile state in XCR0, and the tile-data permission, which this asks
    /// the kernel for once (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`).
    pub fn is_available(self) -> bool {
        static AVAILABLE: OnceLock<(bool, bool, bool)> = OnceLock::new();
        let (amx, avx512, avx2) =
            *AVAILABLE.get_or_init(|| (detect::amx(), detect::avx512bf16(), detect::avx2_fma()));
        match self {
            Self::Amx => amx,
            Self::Avx512Bf16 => avx512,
            Self::Avx2 => avx2,
            Self::Portable => true,
        }
    }

    /// The kernels this machine can run, best first.
    pub fn available() -> Vec<Self> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The kernel `forced` names (checked against the CPU), or the best available.
    pub fn select(forced: Option<&str>) -> Result<Self, String> {
        match forced
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "auto")
        {
            None => Ok(Self::available()[0]),
            Some(name) => {
                let k = Self::parse(name)?;
                if k.is_available() {
                    Ok(k)
                } else {
                    Err(format!(
                        "{KERNEL_ENV}={name}, but this CPU cannot run the {name} kernel (available: {})",
                        Self::available()
                            .iter()
                            .map(|k| k.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
        }
    }

    /// The process's kernel: [`Self::select`] of `TANDEM_BF16_KERNEL`, decided (and logged)
    /// once.
    pub fn selected() -> Result<Self, String> {
        static SELECTED: OnceLock<Result<Bf16Kernel, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| {
                let forced = std::env::var(KERNEL_ENV).ok();
                let k = Self::select(forced.as_deref());
                if let Ok(k) = &k {
                    tracing::info!(
                        kernel = k.name(),
                        forced = forced.is_some(),
                        "bf16 matmul kernel: {}",
                        k.name()
                    );
                }
                k
            })
            .clone()
    }
}

/// One cache line of bf16 values (the panels' storage: aligned tile and vector loads).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// A `[n, k]` bf16 weight (row `c` is output column `c`) in panels of [`NR`] columns (see the
/// module doc for the layout).
#[derive(Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of [`KSTEP`].
    kp: usize,
    /// `ceil(n / NR)` panels of `kp * NR` values.
    data: Vec<Line>,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedBf16")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

/// `f32` → bf16 bits, rounding to nearest even (NaN stays a quiet NaN).
#[inline]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

impl PackedBf16 {
    /// Packs a row-major `[n, k]` bf16 matrix. Panels are packed in parallel (an 8B model
    /// packs 15 GB of weights at load).
    pub fn pack(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not [{n}, {k}]");
        let kp = k.div_ceil(KSTEP) * KSTEP;
        let panels = n.div_ceil(NR);
        let lines_per_panel = kp * NR / 32;
        let mut data = vec![Line([0; 32]); panels * lines_per_panel];
        let fill = |p: usize, lines: &mut [Line]| {
            let cols = (n - p * NR).min(NR);
            for c in 0..cols {
                let row = &w[(p * NR + c) * k..][..k];
                let (h, cc) = (c / 16, c % 16);
                for (kk, v) in row.iter().enumerate() {
                    // Pair row `kk / 2`, half `h`, column `cc`, element `kk % 2`.
                    let at = (kk / 2) * 64 + h * 32 + cc * 2 + kk % 2;
                    lines[at / 32].0[at % 32] = v.to_bits();
                }
            }
        };
        use rayon::prelude::*;
        data.par_chunks_mut(lines_per_panel.max(1))
            .enumerate()
            .for_each(|(p, lines)| fill(p, lines));
        Self { n, k, kp, data }
    }

    /// Packs a row-major `[n, k]` f32 matrix, rounding each value to bf16.
    pub fn pack_f32(w: &[f32], n: usize, k: usize) -> Self {
        let w: Vec<bf16> = w.iter().map(|&v| bf16::from_bits(bf16_bits(v))).collect();
        Self::pack(&w, n, k)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes of packed weights (padding included).
    pub fn bytes(&self) -> usize {
        self.data.len() * 64
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    fn panel(&self, p: usize) -> &[u16] {
        let lines = self.kp * NR / 32;
        let lines = &self.data[p * lines..][..lines];
        // SAFETY: `Line` is exactly 32 `u16`s (`repr(C)`, size 64), with no padding.
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 32) }
    }

    /// `x · Wᵀ` (`x` is `[m, k]` f32) as a new `[m, n]` vector, on the process's kernel.
    ///
    /// # Panics
    /// When no kernel can be selected (`TANDEM_BF16_KERNEL` names one this CPU lacks): the
    /// loaders check [`Bf16Kernel::selected`] before packing, so a loaded model never does.
    pub fn matmul_to_vec(&self, x: &[f32], m: usize) -> Vec<f32> {
        let kernel = Bf16Kernel::selected().unwrap_or_else(|e| panic!("{e}"));
        self.matmul_to_vec_on(kernel, x, m)
    }

    /// `x · Wᵀ` on a given kernel.
    ///
    /// # Panics
    /// When the CPU cannot run `kernel`, or `x` is not `[m, k]`.
    pub fn matmul_to_vec_on(&self, kernel: Bf16Kernel, x: &[f32], m: usize) -> Vec<f32> {
        assert!(
            kernel.is_available(),
            "the {} kernel is not available on this CPU",
            kernel.name()
        );
        assert_eq!(x.len(), m * self.k, "input is not [{m}, {}]", self.k);
        let len = m.checked_mul(self.n).expect("output size overflows");
        let mut out = Vec::with_capacity(len);
        if len > 0 {
            let a = Activations::pack(kernel, x, m, self.k, self.kp);
            // SAFETY: `out` has room for `m * n` floats, and `run` writes every one of them
            // (every panel's columns for every row) before returning, or panics before
            // `set_len`.
            unsafe {
                self.run(kernel, &a, m, out.as_mut_ptr());
                out.set_len(len);
            }
        }
        out
    }

    /// Computes every panel into `out`, on the team when there is enough work.
    ///
    /// # Safety
    /// `out` must point to `m * n` writable floats.
    unsafe fn run(&self, kernel: Bf16Kernel, a: &Activations, m: usize, out: *mut f32) {
        let panels = self.panels();
        let out = SendPtr(out);
        if 2 * m * self.n * self.k < 1 << 20 {
            // SAFETY: one caller covers every panel of `out`.
            unsafe { self.run_panels(kernel, a, m, &mut (0..panels), out.get()) };
            return;
        }
        let team = Team::global();
        let threads = team.threads().min(panels);
        let stripes = Stripes::new(panels, threads);
        team.run(threads, &|own| {
            // SAFETY (both): every panel is claimed exactly once, so each column of `out`
            // has one writer.
            let mut mine = std::iter::from_fn(|| stripes.front(own));
            unsafe { self.run_panels(kernel, a, m, &mut mine, out.get()) };
            for other in (1..threads).map(|d| (own + d) % threads) {
                let mut theirs = std::iter::from_fn(|| stripes.back(other));
                unsafe { self.run_panels(kernel, a, m, &mut theirs, out.get()) };
            }
        });
    }

    /// Computes the columns of each panel `panels` yields, for all `m` rows, into `out`
    /// (`[m, n]`).
    ///
    /// # Safety
    /// `out` must point to `m * n` writable floats, and no other thread may write the
    /// columns of these panels meanwhile.
    unsafe fn run_panels(
        &self,
        kernel: Bf16Kernel,
        a: &Activations,
        m: usize,
        panels: &mut dyn Iterator<Item = usize>,
        out: *mut f32,
    ) {
        let (n, kp) = (self.n, self.kp);
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => {
                // The tile configuration is per thread: load it for this run of panels,
                // release the tiles after.
                // SAFETY: AMX is available (checked by `matmul_to_vec_on`).
                let _tiles = unsafe { amx::Tiles::configure() };
                for p in panels {
                    let cols = (n - p * NR).min(NR);
                    // SAFETY: `a` holds `m` rows padded to 16 of `kp` values (AMX layout);
                    // the panel is `kp * NR` values; the columns of panel `p` are ours.
                    unsafe {
                        let c = out.add(p * NR);
                        let next = (p + 1 < self.panels()).then(|| self.panel(p + 1));
                        amx::panel(&a.data, kp, m, self.panel(p), next, c, n, cols)
                    };
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // Enough rows: each panel widened to f32 once, then the f32 kernel (the same
                // chain of fused steps over `k`, so the same bits as the pair kernel), whose
                // inner loop has no conversions. Few rows: the pair kernel, which reads each
                // weight once from memory and converts it in registers.
                let mut wide = vec![0f32; if m >= avx2::WIDEN_ROWS { kp * NR } else { 0 }];
                for p in panels {
                    let cols = (n - p * NR).min(NR);
                    let panel = self.panel(p);
                    if !wide.is_empty() {
                        avx2::widen_panel(panel, &mut wide);
                    }
                    for (r, rows) in row_blocks(m) {
                        let block = &a.wide[r * kp..(r + rows) * kp];
                        // SAFETY: AVX2 and FMA are available (checked by
                        // `matmul_to_vec_on`); rows `r..r + rows`, columns of panel `p`:
                        // inside `out`, and ours.
                        unsafe {
                            let c = out.add(r * n + p * NR);
                            if wide.is_empty() {
                                avx2::rows(block, rows, kp, panel, c, n, cols);
                            } else {
                                crate::gemm::avx2::rows(block, rows, kp, &wide, None, c, n, cols);
                            }
                        }
                    }
                }
            }
            _ => {
                for p in panels {
                    let cols = (n - p * NR).min(NR);
                    let panel = self.panel(p);
                    for (r, rows) in row_blocks(m) {
                        let block = &a.data[r * kp..(r + rows) * kp];
                        // SAFETY: rows `r..r + rows`, columns of panel `p`: inside `out`,
                        // and ours.
                        unsafe {
                            let c = out.add(r * n + p * NR);
                            pairs_block(kernel, block, rows, kp, panel, c, n, cols);
                        }
                    }
                }
            }
        }
    }
}

use Bf16Kernel as Kernel;

/// The input rows rounded to bf16, in the layout the kernel reads.
struct Activations {
    /// AMX: row-major `[round_up(m, 16), kp]`, zero-padded. Others: for each row block
    /// `(r, rows)` of [`row_blocks`], at offset `r * kp`, `[kp / 2][rows]` pairs (two bf16 of
    /// one row, `k = 2j` low): one pointer and constant offsets in the kernel's inner loop.
    /// Empty for AVX2.
    data: Vec<u16>,
    /// AVX2: for each row block `(r, rows)`, at offset `r * kp`, `[kp][rows]` f32 (the bf16
    /// values widened, zeros past `k`): the f32 kernel's layout, which both AVX2 paths read.
    wide: Vec<f32>,
}

impl Activations {
    fn pack(kernel: Bf16Kernel, x: &[f32], m: usize, k: usize, kp: usize) -> Self {
        if kernel == Kernel::Amx {
            let rows = m.div_ceil(TILE_ROWS) * TILE_ROWS;
            let mut data = vec![0u16; rows * kp];
            for (src, dst) in x.chunks_exact(k).zip(data.chunks_exact_mut(kp)) {
                round_row(src, &mut dst[..k]);
            }
            return Self {
                data,
                wide: Vec::new(),
            };
        }
        if kernel == Kernel::Avx2 {
            // Zeroed first (fresh pages from the allocator): the padding past `k` stays 0.
            let mut wide = vec![0f32; m * kp];
            for (r, rows) in row_blocks(m) {
                let dst = &mut wide[r * kp..(r + rows) * kp];
                for (i, row) in x[r * k..(r + rows) * k].chunks_exact(k).enumerate() {
                    for (d, &v) in dst[i..].iter_mut().step_by(rows).zip(row) {
                        *d = bf16_to_f32(bf16_bits(v));
                    }
                }
            }
            return Self {
                data: Vec::new(),
                wide,
            };
        }
        let mut data = Vec::with_capacity(m * kp);
        for (r, rows) in row_blocks(m) {
            let block = &x[r * k..(r + rows) * k];
            for j in 0..kp / 2 {
                for i in 0..rows {
                    let row = &block[i * k..][..k];
                    let at = |kk: usize| row.get(kk).map_or(0, |&v| bf16_bits(v));
                    data.push(at(2 * j));
                    data.push(at(2 * j + 1));
                }
            }
        }
        Self {
            data,
            wide: Vec::new(),
        }
    }
}

/// `dst[i] = bf16_bits(src[i])`: 16 lanes at a time where the CPU has AVX-512 (the same
/// integer arithmetic, so the same bits), else the plain loop. Packing a batch's activations
/// runs on the calling thread before the team starts, so its speed shows in every matmul.
fn round_row(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512F and -BW are present.
        return unsafe { round_row_avx512(src, dst) };
    }
    round_row_plain(src, dst);
}

#[inline(always)]
fn round_row_plain(src: &[f32], dst: &mut [u16]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = bf16_bits(v);
    }
}

/// [`round_row_plain`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn round_row_avx512(src: &[f32], dst: &mut [u16]) {
    round_row_plain(src, dst);
}

/// One block of `rows ≤ MR` rows (pair layout) against one panel.
///
/// # Safety
/// `c` must address `rows` rows of `cols` writable floats at stride `ldc`; the kernel must be
/// available.
#[allow(clippy::too_many_arguments)]
unsafe fn pairs_block(
    kernel: Bf16Kernel,
    a: &[u16],
    rows: usize,
    kp: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(a.len() == rows * kp && panel.len() == kp * NR && cols <= NR);
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Bf16 {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match rows {
                    // SAFETY: AVX512-BF16 is available; `c` is the caller's promise.
                    $($r => return unsafe { avx512bf16::block::<$r>(a, kp, panel, c, ldc, cols) },)*
                    _ => unreachable!("rows {rows} > MR"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12);
    }
    let _ = kernel;
    // SAFETY: the caller's promise.
    unsafe { portable(a, rows, kp, panel, c, ldc, cols) }
}

/// The pair sums in plain f32: for each pair row, the even element's product then the odd
/// one's (both exact), each added to the accumulator.
///
/// # Safety
/// As [`pairs_block`].
unsafe fn portable(
    a: &[u16],
    rows: usize,
    kp: usize,
    panel: &[u16],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    for r in 0..rows {
        let mut acc = [0f32; NR];
        for j in 0..kp / 2 {
            let a0 = bf16_to_f32(a[(j * rows + r) * 2]);
            let a1 = bf16_to_f32(a[(j * rows + r) * 2 + 1]);
            let line = &panel[j * 64..][..64];
            for (col, acc) in acc.iter_mut().enumerate() {
                let at = (col / 16) * 32 + (col % 16) * 2;
                *acc += a0 * bf16_to_f32(line[at]);
                *acc += a1 * bf16_to_f32(line[at + 1]);
            }
        }
        // SAFETY: row `r` of the block has `cols` writable floats at `c + r * ldc`.
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), c.add(r * ldc), cols) };
    }
}
