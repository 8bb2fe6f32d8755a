//! Hidden-state payload conversions: shapes, non-finite values, error bounds per dtype.

use super::*;

/// Payload bytes for `values`, one row per `cols` values, written without the encoder (so a
/// non-finite value can be planted).
fn raw_payload(dtype: HiddenDtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        HiddenDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        HiddenDtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        HiddenDtype::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        HiddenDtype::Int8 | HiddenDtype::Int4 => unreachable!("built by hand"),
    }
}

proptest! {
    #[test]
    fn non_finite_values_are_rejected_in_every_float_dtype(
        dtype in prop::sample::select(vec![HiddenDtype::F32, HiddenDtype::F16, HiddenDtype::Bf16]),
        rows in 1usize..5,
        cols in 1usize..9,
        at in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
    ) {
        let mut values: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 1.0).collect();
        let mut out = Vec::new();
        hidden_to_f32(dtype, rows, cols, &raw_payload(dtype, &values), &mut out)
            .expect("finite values decode");
        prop_assert_eq!(&out, &values);
        let i = at.index(values.len());
        values[i] = bad;
        let want = WireError::NonFinite { row: i / cols, col: i % cols };
        let err = hidden_to_f32(dtype, rows, cols, &raw_payload(dtype, &values), &mut out);
        prop_assert_eq!(err, Err(want.clone()));
        prop_assert!(out.is_empty());
        prop_assert_eq!(want.error_code(), ErrorCode::NonFinite);
        // The encoder refuses them too, and leaves `out` alone.
        let mut payload = vec![9];
        prop_assert_eq!(f32_to_hidden(dtype, rows, cols, &values, &mut payload), Err(want.clone()));
        prop_assert_eq!(f32_to_hidden(HiddenDtype::Int8, rows, cols, &values, &mut payload), Err(want.clone()));
        prop_assert_eq!(f32_to_hidden(HiddenDtype::Int4, rows, cols, &values, &mut payload), Err(want));
        prop_assert_eq!(payload, vec![9]);
    }
}

#[test]
fn non_finite_values_are_rejected_in_int8() {
    let row = |scale: f32, q: [i8; 2]| {
        let mut p = scale.to_le_bytes().to_vec();
        p.extend(q.map(|q| q as u8));
        p
    };
    let mut out = Vec::new();
    assert!(hidden_to_f32(HiddenDtype::Int8, 1, 2, &row(0.5, [1, -128]), &mut out).is_ok());
    assert_eq!(out, [0.5, -64.0]);
    for (scale, q, col) in [
        (f32::NAN, [1, 1], 0),
        (f32::INFINITY, [0, 1], 0), // inf × 0 = NaN
        (f32::NEG_INFINITY, [1, 0], 0),
        (f32::MAX, [0, 127], 1), // overflows to inf
    ] {
        // Second row bad, first row fine.
        let mut p = 1.0f32.to_le_bytes().to_vec();
        p.extend(scale.to_le_bytes());
        p.extend([1u8, 2]);
        p.extend(q.map(|q| q as u8));
        assert_eq!(
            hidden_to_f32(HiddenDtype::Int8, 2, 2, &p, &mut out),
            Err(WireError::NonFinite { row: 1, col }),
            "scale {scale}, q {q:?}"
        );
        assert!(out.is_empty());
    }
}

#[test]
fn payload_length_must_match_the_shape() {
    let mut out = vec![1.0];
    for dtype in HiddenDtype::ALL {
        let len = dtype.payload_len(3, 4).expect("small");
        let want_len = match dtype {
            HiddenDtype::F32 => 48,
            HiddenDtype::F16 | HiddenDtype::Bf16 => 24,
            HiddenDtype::Int8 => 12 + 12,
            // Per row: 4 outliers × 4 bytes, one 2-byte scale, 2 bytes of nibbles.
            HiddenDtype::Int4 => 3 * (16 + 2 + 2),
        };
        assert_eq!(len, want_len, "{dtype}");
        // All-zero bytes are zeros in every dtype but int4, whose outlier indices must rise.
        let zeros = if dtype == HiddenDtype::Int4 {
            let mut p = Vec::new();
            f32_to_hidden(dtype, 3, 4, &[0.0; 12], &mut p).expect("zeros");
            p
        } else {
            vec![0; len]
        };
        assert!(hidden_to_f32(dtype, 3, 4, &zeros, &mut out).is_ok());
        assert_eq!(out, vec![0.0; 12]);
        for bad in [len - 1, len + 1, 0] {
            let err = hidden_to_f32(dtype, 3, 4, &vec![0; bad], &mut out).expect_err("bad len");
            assert_eq!(
                err,
                WireError::HiddenShape {
                    expected: len,
                    got: bad
                }
            );
            assert_eq!(err.error_code(), ErrorCode::HiddenShape);
            assert!(out.is_empty());
        }
        let err = f32_to_hidden(dtype, 3, 4, &[0.0; 11], &mut Vec::new()).expect_err("count");
        assert_eq!(
            err,
            WireError::ValueCount {
                expected: 12,
                got: 11
            }
        );
        assert_eq!(err.error_code(), ErrorCode::HiddenShape);
    }
    assert_eq!(HiddenDtype::F32.payload_len(usize::MAX, 2), None);
    assert!(matches!(
        hidden_to_f32(HiddenDtype::F32, usize::MAX, 2, &[], &mut out),
        Err(WireError::OutOfRange { .. })
    ));
}

#[test]
fn encoders_refuse_values_that_overflow_the_dtype() {
    let mut out = Vec::new();
    assert!(f32_to_hidden(HiddenDtype::F16, 1, 1, &[65504.0], &mut out).is_ok());
    assert_eq!(
        f32_to_hidden(HiddenDtype::F16, 1, 2, &[0.0, 70000.0], &mut out),
        Err(WireError::Overflow {
            dtype: HiddenDtype::F16,
            row: 0,
            col: 1
        })
    );
    assert_eq!(out.len(), 2, "the refused row was taken back");
    assert_eq!(
        f32_to_hidden(HiddenDtype::Bf16, 1, 1, &[f32::MAX], &mut out),
        Err(WireError::Overflow {
            dtype: HiddenDtype::Bf16,
            row: 0,
            col: 0
        })
    );
    assert!(f32_to_hidden(HiddenDtype::Bf16, 1, 1, &[1e38], &mut out).is_ok());
    assert!(f32_to_hidden(HiddenDtype::Int8, 1, 2, &[f32::MAX, -f32::MAX], &mut out).is_ok());
}

fn round_trip(dtype: HiddenDtype, rows: usize, cols: usize, values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut payload = Vec::new();
    f32_to_hidden(dtype, rows, cols, values, &mut payload).expect("encode");
    assert_eq!(Some(payload.len()), dtype.payload_len(rows, cols));
    let mut out = Vec::new();
    hidden_to_f32(dtype, rows, cols, &payload, &mut out).expect("decode");
    (payload, out)
}

proptest! {
    #[test]
    fn f32_round_trips_bit_exactly(values in prop::collection::vec(float().prop_filter("finite", |v| v.is_finite()), 0..64)) {
        let (_, out) = round_trip(HiddenDtype::F32, values.len(), 1, &values);
        prop_assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn f16_error_is_within_half_an_ulp(values in prop::collection::vec(-65504.0f32..=65504.0, 1..64)) {
        let (_, out) = round_trip(HiddenDtype::F16, 1, values.len(), &values);
        for (x, y) in values.iter().zip(&out) {
            // binary16: 10 fraction bits, normal from 2^-14, subnormal step 2^-24.
            let bound = if x.abs() >= 2f32.powi(-14) { x.abs() * 2f32.powi(-11) } else { 2f32.powi(-25) };
            prop_assert!((x - y).abs() <= bound, "{} -> {}", x, y);
        }
    }

    #[test]
    fn bf16_error_is_within_half_an_ulp(
        values in prop::collection::vec(
            float().prop_filter("bf16 range", |v| v.abs() <= 3.38e38 && v.abs() >= f32::MIN_POSITIVE),
            1..64,
        ),
    ) {
        let (_, out) = round_trip(HiddenDtype::Bf16, values.len(), 1, &values);
        for (x, y) in values.iter().zip(&out) {
            // bfloat16: 7 fraction bits.
            prop_assert!((x - y).abs() <= x.abs() * 2f32.powi(-8), "{} -> {}", x, y);
        }
    }

    #[test]
    fn int8_error_is_within_half_a_step(
        rows in 1usize..6,
        cols in 1usize..40,
        seed in prop::collection::vec(-1000.0f32..1000.0, 240),
        zero_row in any::<prop::sample::Index>(),
    ) {
        let mut values: Vec<f32> = seed.iter().cycle().take(rows * cols).copied().collect();
        let z = zero_row.index(rows);
        values[z * cols..(z + 1) * cols].fill(0.0);
        let (payload, out) = round_trip(HiddenDtype::Int8, rows, cols, &values);
        for r in 0..rows {
            let scale = f32::from_le_bytes(payload[r * 4..r * 4 + 4].try_into().expect("4 bytes"));
            let row = &values[r * cols..(r + 1) * cols];
            let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            prop_assert_eq!(scale, absmax / 127.0);
            for (c, (x, y)) in row.iter().zip(&out[r * cols..(r + 1) * cols]).enumerate() {
                let q = payload[rows * 4 + r * cols + c] as i8;
                prop_assert!((-127..=127).contains(&q));
                prop_assert!((x - y).abs() <= scale * (0.5 + 2.0 * 127.0 * f32::EPSILON), "{} -> {} (scale {})", x, y, scale);
            }
        }
        prop_assert!(out[z * cols..(z + 1) * cols].iter().all(|&v| v == 0.0));
        prop_assert_eq!(&payload[z * 4..z * 4 + 4], &[0u8; 4]);
    }
}

#[test]
fn zero_width_and_zero_row_payloads_are_consistent() {
    for dtype in HiddenDtype::ALL {
        let (payload, out) = round_trip(dtype, 0, 8, &[]);
        assert!(payload.is_empty() && out.is_empty());
        let (payload, out) = round_trip(dtype, 3, 0, &[]);
        assert_eq!(
            payload.len(),
            if dtype == HiddenDtype::Int8 { 12 } else { 0 }
        );
        assert!(out.is_empty());
    }
}

#[test]
fn golden_payloads() {
    // The int8 example of the specification.
    let (payload, _) = round_trip(HiddenDtype::Int8, 1, 3, &[0.5, -1.0, 0.25]);
    assert_eq!(payload, hex("0402013c 4081 20"));
    let (payload, _) = round_trip(HiddenDtype::F16, 1, 2, &[1.0, -2.0]);
    assert_eq!(payload, hex("003c 00c0"));
    let (payload, _) = round_trip(HiddenDtype::Bf16, 1, 2, &[1.0, -2.0]);
    assert_eq!(payload, hex("803f 00c0"));
    let (payload, _) = round_trip(HiddenDtype::F32, 1, 1, &[1.0]);
    assert_eq!(payload, hex("0000803f"));
}
