use super::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(len: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16_to_f32(bf16_bits(x))).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `x · Wᵀ` in f64 over the bf16-rounded inputs, and `Σ|x w|` per element (the error scale).
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let (x, w) = (round(x), round(w));
    let mut out = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for r in 0..m {
        for c in 0..n {
            for i in 0..k {
                let p = f64::from(x[r * k + i]) * f64::from(w[c * k + i]);
                out[r * n + c] += p;
                mag[r * n + c] += p.abs();
            }
        }
    }
    (out, mag)
}

#[test]
fn every_kernel_is_within_the_f32_accumulation_bound_on_ragged_shapes() {
    let mut rng = StdRng::seed_from_u64(7);
    // Rows across tile (16) and block (12, 32) sizes, columns not a multiple of the panel,
    // k not a multiple of a tile row, and shapes big enough to be split between threads.
    // (AMX stores whole 16-row tiles of a full panel into the output directly and the rest
    // through a scratch block; both happen here.)
    let shapes = [
        (1, 1, 1),
        (1, 33, 7),
        (5, 31, 64),
        (12, 32, 3),
        (16, 48, 33),
        (17, 65, 40),
        (33, 100, 95),
        // Whole tiles written straight to the output: two blocks of 32 rows, then a block
        // of 32 and one of 16.
        (64, 160, 576),
        (48, 96, 64),
    ];
    for &(m, n, k) in &shapes {
        let (w, x) = (random(n * k, &mut rng), random(m * k, &mut rng));
        let (want, mag) = reference(&x, &w, m, n, k);
        let packed = PackedBf16::pack_f32(&w, n, k);
        for kernel in Bf16Kernel::available() {
            let got = packed.matmul_to_vec_on(kernel, &x, m);
            assert_eq!(got.len(), m * n);
            for (i, ((&got, &want), &mag)) in got.iter().zip(&want).zip(&mag).enumerate() {
                // Products of bf16 values are exact in f32; the sum of k of them rounds at
                // most k times, each time by at most 2⁻²⁴ of the running |sum| ≤ Σ|x w|.
                let tol = (k as f64 + 1.0) * 2f64.powi(-24) * mag + 1e-30;
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "{kernel:?} m={m} n={n} k={k}: element {i} is {got}, want {want} ± {tol:e}"
                );
            }
        }
    }
}

#[test]
fn a_rows_result_does_not_depend_on_the_batch_around_it() {
    let mut rng = StdRng::seed_from_u64(11);
    let (n, k) = (96, 200);
    let packed = PackedBf16::pack_f32(&random(n * k, &mut rng), n, k);
    for m in [37, 70] {
        let x = random(m * k, &mut rng);
        for kernel in Bf16Kernel::available() {
            let batched = packed.matmul_to_vec_on(kernel, &x, m);
            for r in 0..m {
                let solo = packed.matmul_to_vec_on(kernel, &x[r * k..][..k], 1);
                assert_eq!(
                    bits(&solo),
                    bits(&batched[r * n..][..n]),
                    "{kernel:?}: row {r} alone differs from the same row in a batch of {m}"
                );
            }
        }
    }
}

#[test]
fn rounding_is_to_nearest_even_as_half_does_it() {
    let mut rng = StdRng::seed_from_u64(3);
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        // Ties: exactly half an ulp of bf16 above 1.0 (rounds down to even) and above the
        // next value (rounds up to even).
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
    ];
    let randoms = (0..10_000).map(|_| f32::from_bits(rng.random::<u32>()));
    for v in specials.into_iter().chain(randoms) {
        let want = bf16::from_f32(v);
        if v.is_nan() {
            assert!(bf16_to_f32(bf16_bits(v)).is_nan(), "{v:e} must stay NaN");
        } else {
            assert_eq!(bf16_bits(v), want.to_bits(), "{v:e} ({:#x})", v.to_bits());
        }
    }
}

#[test]
fn rounding_a_row_with_vectors_gives_the_scalar_bits() {
    let mut rng = StdRng::seed_from_u64(4);
    // Random bit patterns (NaNs, infinities, subnormals and ties included), at lengths that
    // leave every remainder after 16 lanes.
    for len in [0, 1, 15, 16, 17, 63, 576, 1537] {
        let mut src: Vec<f32> = (0..len)
            .map(|_| f32::from_bits(rng.random::<u32>()))
            .collect();
        if len > 3 {
            src[..4].copy_from_slice(&[
                f32::NAN,
                -f32::INFINITY,
                1e-40,
                f32::from_bits(0x3f80_8000),
            ]);
        }
        let mut got = vec![0u16; len];
        super::round_row(&src, &mut got);
        let want: Vec<u16> = src.iter().map(|&v| bf16_bits(v)).collect();
        assert_eq!(got, want, "len {len}");
    }
}

#[test]
fn packing_bf16_equals_packing_the_same_values_from_f32() {
    let mut rng = StdRng::seed_from_u64(5);
    let (n, k) = (40, 70);
    let w = round(&random(n * k, &mut rng));
    let from_bf16 = PackedBf16::pack(
        &w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
        n,
        k,
    );
    let from_f32 = PackedBf16::pack_f32(&w, n, k);
    let x = random(3 * k, &mut rng);
    assert_eq!(
        bits(&from_bf16.matmul_to_vec_on(Bf16Kernel::Portable, &x, 3)),
        bits(&from_f32.matmul_to_vec_on(Bf16Kernel::Portable, &x, 3))
    );
    // Two panels of 32 columns, k padded to 96, two bytes a value.
    assert_eq!(from_bf16.bytes(), 2 * 96 * 32 * 2);
}

#[test]
fn a_named_kernel_is_chosen_or_refused_never_replaced() {
    assert_eq!(
        Bf16Kernel::select(Some("portable")),
        Ok(Bf16Kernel::Portable)
    );
    assert_eq!(
        Bf16Kernel::select(None),
        Ok(Bf16Kernel::available()[0]),
        "auto picks the best available"
    );
    assert_eq!(Bf16Kernel::select(Some("auto")), Bf16Kernel::select(None));
    assert!(Bf16Kernel::select(Some("tpu")).is_err());
    for k in Bf16Kernel::ALL {
        assert_eq!(Bf16Kernel::parse(k.name()), Ok(k));
        match Bf16Kernel::select(Some(k.name())) {
            Ok(got) => assert_eq!(got, k, "{} must select itself", k.name()),
            Err(e) => {
                assert!(
                    !k.is_available(),
                    "{} is available yet refused: {e}",
                    k.name()
                );
                assert!(e.contains(k.name()), "the error names the kernel: {e}");
            }
        }
    }
}

/// On the machine kind CI runs on (AMX and AVX512-BF16), `.ci/run` sets TANDEM_REQUIRE_AMX=1
/// so that the fast kernels are tested, not skipped.
#[test]
fn the_matrix_unit_kernels_are_present_where_required() {
    if std::env::var("TANDEM_REQUIRE_AMX").is_ok_and(|v| v == "1") {
        let have = Bf16Kernel::available();
        assert!(
            have.contains(&Bf16Kernel::Amx),
            "TANDEM_REQUIRE_AMX=1 but no AMX: {have:?}"
        );
        assert!(
            have.contains(&Bf16Kernel::Avx512Bf16),
            "TANDEM_REQUIRE_AMX=1 but no AVX512-BF16: {have:?}"
        );
    } else if Bf16Kernel::available().len() < Bf16Kernel::ALL.len() {
        eprintln!(
            "note: bf16 kernels available here: {:?} (the others' tests are skipped)",
            Bf16Kernel::available()
        );
    }
}

/// The AVX2 kernel's fused steps round exactly as the portable kernel's adds (a product of
/// two bf16 values is exact in f32): the same bits, on every shape.
#[test]
fn the_avx2_kernel_equals_the_portable_one_bit_for_bit() {
    if !Bf16Kernel::Avx2.is_available() {
        eprintln!("note: no AVX2 + FMA here; nothing to compare");
        return;
    }
    let mut rng = StdRng::seed_from_u64(19);
    for &(m, n, k) in &[
        (1, 33, 7),
        (5, 31, 64),
        (7, 64, 100),
        (37, 96, 200),
        (64, 160, 576),
    ] {
        let packed = PackedBf16::pack_f32(&random(n * k, &mut rng), n, k);
        let x = random(m * k, &mut rng);
        assert_eq!(
            bits(&packed.matmul_to_vec_on(Bf16Kernel::Avx2, &x, m)),
            bits(&packed.matmul_to_vec_on(Bf16Kernel::Portable, &x, m)),
            "m={m} n={n} k={k}"
        );
    }
}

#[test]
fn non_finite_inputs_propagate_and_empty_shapes_work() {
    let packed = PackedBf16::pack_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
    for kernel in Bf16Kernel::available() {
        assert!(packed.matmul_to_vec_on(kernel, &[], 0).is_empty());
        assert_eq!(
            packed.matmul_to_vec_on(kernel, &[1.0, 0.0, -1.0], 1),
            [-2.0, -2.0]
        );
        let out = packed.matmul_to_vec_on(kernel, &[f32::NAN, 0.0, 0.0], 1);
        assert!(out.iter().all(|v| v.is_nan()), "{kernel:?}: {out:?}");
    }
}
