//! The int4 payload (dtype code 4): its layout, its error bound, and hostile payloads.

use super::*;
use tandem_protocol::wire::{INT4_GROUP, INT4_MAX_COLS, INT4_OUTLIERS};

/// One row of an int4 payload, parsed by the layout of docs/protocol.md §4 (independently of
/// the decoder): outliers `(index, value)`, group scales, and the signed 4-bit values.
struct Row {
    outliers: Vec<(usize, f32)>,
    scales: Vec<f32>,
    q: Vec<i8>,
}

fn row_len(cols: usize) -> usize {
    4 * cols.min(INT4_OUTLIERS) + 2 * cols.div_ceil(INT4_GROUP) + cols.div_ceil(2)
}

fn parse_rows(payload: &[u8], rows: usize, cols: usize) -> Vec<Row> {
    assert_eq!(payload.len(), rows * row_len(cols));
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    payload
        .chunks_exact(row_len(cols).max(1))
        .take(rows)
        .map(|b| {
            let k = cols.min(INT4_OUTLIERS);
            let outliers = (0..k)
                .map(|i| {
                    let o = &b[4 * i..4 * i + 4];
                    (usize::from(u16::from_le_bytes([o[0], o[1]])), f16(&o[2..]))
                })
                .collect();
            let groups = cols.div_ceil(INT4_GROUP);
            let scales = (0..groups).map(|g| f16(&b[4 * k + 2 * g..])).collect();
            let nibbles = &b[4 * k + 2 * groups..];
            let q = (0..cols)
                .map(|c| ((nibbles[c / 2] >> (4 * (c % 2))) & 0x0f) as i8 - 8)
                .collect();
            Row {
                outliers,
                scales,
                q,
            }
        })
        .collect()
}

/// Indices of the `K` values of largest magnitude (ties: the lower index), ascending.
fn expected_outliers(row: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].abs().total_cmp(&row[a].abs()).then(a.cmp(&b)));
    idx.truncate(INT4_OUTLIERS);
    idx.sort_unstable();
    idx
}

fn encode(rows: usize, cols: usize, values: &[f32]) -> Vec<u8> {
    let mut payload = Vec::new();
    f32_to_hidden(HiddenDtype::Int4, rows, cols, values, &mut payload).expect("encode");
    assert_eq!(
        Some(payload.len()),
        HiddenDtype::Int4.payload_len(rows, cols)
    );
    payload
}

fn decode(rows: usize, cols: usize, payload: &[u8]) -> Result<Vec<f32>, WireError> {
    let mut out = vec![7.0];
    let r = hidden_to_f32(HiddenDtype::Int4, rows, cols, payload, &mut out);
    if r.is_err() {
        assert!(out.is_empty(), "a refused payload leaves nothing behind");
    }
    r.map(|()| out)
}

/// Checks every value of a round trip against the bound documented on `f32_to_hidden`, and
/// the payload's structure against the rule that produced it.
fn check_bound(rows: usize, cols: usize, values: &[f32]) -> Result<(), TestCaseError> {
    let payload = encode(rows, cols, values);
    let out = decode(rows, cols, &payload).expect("decode");
    prop_assert_eq!(out.len(), rows * cols);
    for (r, parsed) in parse_rows(&payload, rows, cols).iter().enumerate() {
        let row = &values[r * cols..(r + 1) * cols];
        let back = &out[r * cols..(r + 1) * cols];
        let outliers: Vec<usize> = parsed.outliers.iter().map(|&(i, _)| i).collect();
        prop_assert_eq!(&outliers, &expected_outliers(row));
        let mut mags: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        mags.sort_by(|a, b| b.total_cmp(a));
        let r_k1 = mags.get(INT4_OUTLIERS).copied().unwrap_or(0.0);
        for (g, group) in row.chunks(INT4_GROUP).enumerate() {
            let base = g * INT4_GROUP;
            let m_g = group
                .iter()
                .enumerate()
                .filter(|(j, _)| !outliers.contains(&(base + j)))
                .fold(0.0f32, |m, (_, v)| m.max(v.abs()));
            let big_m = group.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            prop_assert!(m_g <= big_m.min(r_k1));
            let s = parsed.scales[g];
            prop_assert!(
                s >= m_g / 7.0 * (1.0 - f32::EPSILON),
                "scale {} for max {}",
                s,
                m_g
            );
            prop_assert!(
                s <= (1.0 + 2f32.powi(-10)) * m_g / 7.0 * (1.0 + f32::EPSILON) + 2f32.powi(-24)
            );
            for (j, (&x, &y)) in group.iter().zip(&back[base..]).enumerate() {
                let c = base + j;
                let err = (x - y).abs();
                if outliers.contains(&c) {
                    prop_assert_eq!(parsed.q[c], 0, "an outlier's nibble is 0");
                    prop_assert!(
                        err <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                        "outlier {} -> {}",
                        x,
                        y
                    );
                } else {
                    prop_assert!((-7..=7).contains(&parsed.q[c]));
                    let bound = (1.0 + 2f32.powi(-9)) * m_g / 14.0 + 2f32.powi(-24);
                    prop_assert!(
                        err <= bound,
                        "{} -> {} (max {}, bound {})",
                        x,
                        y,
                        m_g,
                        bound
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn int4_error_is_within_its_bound(
        rows in 1usize..4,
        cols in 1usize..150,
        seed in prop::collection::vec(-2.0f32..2.0, 600),
        massive in prop::collection::vec((any::<prop::sample::Index>(), -3000.0f32..3000.0), 0..12),
        tiny in any::<bool>(),
        zero_group in any::<prop::sample::Index>(),
    ) {
        let scale = if tiny { 1e-6 } else { 1.0 };
        let mut values: Vec<f32> = seed.iter().cycle().take(rows * cols).map(|v| v * scale).collect();
        let n = values.len();
        for (at, v) in &massive {
            values[at.index(n)] = *v;
        }
        // One group of zeros: scale 0, decodes to exact zeros.
        let z = zero_group.index(values.len()) / INT4_GROUP * INT4_GROUP;
        let end = (z + INT4_GROUP).min(values.len());
        values[z..end].fill(0.0);
        check_bound(rows, cols, &values)?;
    }

    /// Any bytes of the right length decode to finite values or a typed error, never a panic.
    #[test]
    fn int4_decoding_is_total(
        rows in 0usize..3,
        cols in 0usize..70,
        bytes in prop::collection::vec(any::<u8>(), 0..800),
        cut in any::<prop::sample::Index>(),
    ) {
        let len = HiddenDtype::Int4.payload_len(rows, cols).expect("small");
        let payload: Vec<u8> = bytes.iter().cycle().take(if bytes.is_empty() { 0 } else { len }).copied().collect();
        match decode(rows, cols, &payload) {
            Ok(out) => {
                prop_assert_eq!(out.len(), rows * cols);
                prop_assert!(out.iter().all(|v| v.is_finite()));
            }
            Err(e) => {
                let _ = e.error_code();
            }
        }
        // Any shorter payload is a shape error.
        if len > 0 {
            let short = cut.index(len);
            prop_assert_eq!(
                decode(rows, cols, &payload[..short.min(payload.len())]),
                Err(WireError::HiddenShape { expected: len, got: short.min(payload.len()) })
            );
        }
    }
}

proptest! {
    /// A valid payload with one byte changed decodes to finite values or one of the payload
    /// errors (a bad outlier index, a non-finite scale or outlier, a non-zero padding nibble).
    #[test]
    fn int4_mutated_payloads_decode_or_fail_typed(
        rows in 1usize..3,
        cols in 1usize..80,
        seed in prop::collection::vec(-50.0f32..50.0, 160),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let values: Vec<f32> = seed.iter().cycle().take(rows * cols).copied().collect();
        let mut payload = encode(rows, cols, &values);
        let i = at.index(payload.len());
        payload[i] = byte;
        match decode(rows, cols, &payload) {
            Ok(out) => prop_assert!(out.len() == rows * cols && out.iter().all(|v| v.is_finite())),
            Err(WireError::BadOutlier { row, slot, index }) => {
                prop_assert!(row < rows && slot < INT4_OUTLIERS && index <= u16::MAX as usize);
            }
            Err(WireError::NonFinite { row, col }) => prop_assert!(row < rows && col < cols),
            Err(WireError::InvalidFlag { field, .. }) => prop_assert_eq!(field, "hidden.int4.padding"),
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

#[test]
fn massive_activations_do_not_blow_the_scales() {
    // A hidden row of the demo model's width: small values and three massive activations.
    let cols = 576;
    let mut values: Vec<f32> = (0..cols)
        .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.8)
        .collect();
    values[5] = 812.0;
    values[6] = -95.5;
    values[300] = 240.25;
    let payload = encode(1, cols, &values);
    let out = decode(1, cols, &payload).expect("decode");
    for (c, (&x, &y)) in values.iter().zip(&out).enumerate() {
        if [5, 6, 300].contains(&c) {
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-11), "{c}: {x} -> {y}");
        } else {
            // Half a step of a scale set by |x| ≤ 0.8, not by 812 (which would be 58).
            assert!((x - y).abs() <= 0.8 / 14.0 * 1.002, "{c}: {x} -> {y}");
        }
    }
    // 8 outliers (32 bytes), 18 scales (36 bytes), 288 bytes of values: 0.31× f16's 1152.
    assert_eq!(payload.len(), 356);
    assert_eq!(HiddenDtype::F16.payload_len(1, cols), Some(1152));
}

#[test]
fn golden_int4_payload() {
    // 10 values: the 8 largest are outliers, 0.5 and -0.7 share one group.
    let values = [100.0, 1.0, -2.0, 3.0, 4.0, 5.0, 6.0, -7.0, 0.5, -0.7];
    let payload = encode(1, 10, &values);
    assert_eq!(
        payload,
        hex(
            "0000 4056 0100 003c 0200 00c0 0300 0042 0400 0044 0500 0045 0600 0046 0700 00c7 \
             672e 88 88 88 88 1d"
        )
    );
    let out = decode(1, 10, &payload).expect("decode");
    assert_eq!(&out[..8], &values[..8]);
    let s = half::f16::from_bits(0x2e67).to_f32();
    assert!(s >= 0.1 && s < 0.1 * (1.0 + 2f32.powi(-10)));
    assert_eq!(out[8], 5.0 * s);
    assert_eq!(out[9], -7.0 * s);
}

#[test]
fn narrow_and_empty_rows() {
    // Fewer columns than outliers: every value is an outlier, sent as f16.
    let values = [1.5, -0.25, 3.0];
    let payload = encode(1, 3, &values);
    assert_eq!(payload.len(), 3 * 4 + 2 + 2);
    assert_eq!(decode(1, 3, &payload).expect("decode"), values);
    assert!(encode(4, 0, &[]).is_empty());
    assert_eq!(decode(4, 0, &[]).expect("decode"), Vec::<f32>::new());
    assert!(encode(0, 9, &[]).is_empty());
    let zeros = encode(2, 40, &[0.0; 80]);
    assert_eq!(decode(2, 40, &zeros).expect("decode"), vec![0.0; 80]);
}

#[test]
fn encoder_refuses_what_int4_cannot_carry() {
    let mut out = vec![1u8];
    // An outlier beyond f16's range.
    let mut values = vec![0.5f32; 40];
    values[3] = 70000.0;
    assert_eq!(
        f32_to_hidden(HiddenDtype::Int4, 1, 40, &values, &mut out),
        Err(WireError::Overflow {
            dtype: HiddenDtype::Int4,
            row: 0,
            col: 3
        })
    );
    // More huge values than outliers: the largest are outliers and overflow f16 first (no
    // group scale can overflow: the other values are at most the smallest outlier).
    let mut values = vec![0.5f32; 80];
    for v in &mut values[40..50] {
        *v = 6.0e5;
    }
    values[51] = -6.5e5;
    let err = f32_to_hidden(HiddenDtype::Int4, 2, 40, &values, &mut out).expect_err("overflow");
    assert!(
        matches!(
            err,
            WireError::Overflow {
                dtype: HiddenDtype::Int4,
                row: 1,
                col: 0
            }
        ),
        "{err:?}"
    );
    assert_eq!(out, [1], "a refused payload is taken back");
    // Non-finite values: the same error as every dtype.
    let mut values = vec![0.5f32; 40];
    values[17] = f32::NAN;
    assert_eq!(
        f32_to_hidden(HiddenDtype::Int4, 1, 40, &values, &mut out),
        Err(WireError::NonFinite { row: 0, col: 17 })
    );
    // Rows too wide for u16 indices.
    let wide = vec![0.0f32; INT4_MAX_COLS + 1];
    assert!(matches!(
        f32_to_hidden(HiddenDtype::Int4, 1, wide.len(), &wide, &mut out),
        Err(WireError::OutOfRange { .. })
    ));
    assert_eq!(out, [1]);
    let mut widest: Vec<f32> = (0..INT4_MAX_COLS).map(|i| (i % 5) as f32 * 0.25).collect();
    widest[INT4_MAX_COLS - 1] = 2.0;
    let payload = encode(1, widest.len(), &widest);
    let back = decode(1, widest.len(), &payload).expect("decode");
    let worst = widest
        .iter()
        .zip(&back)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1.0 / 14.0 * 1.002, "max error {worst}");
    // The last outlier sits at the last column: index 65535.
    let k = INT4_OUTLIERS;
    assert_eq!(&payload[4 * (k - 1)..4 * (k - 1) + 2], &[0xff, 0xff]);
}

#[test]
fn hostile_int4_payloads_get_typed_errors() {
    let cols = 41; // two groups, an odd width (one padding nibble)
    let values: Vec<f32> = (0..2 * cols).map(|i| (i as f32 - 30.0) * 0.1).collect();
    let good = encode(2, cols, &values);
    let rl = row_len(cols);
    assert_eq!(good.len(), 2 * rl);
    assert!(decode(2, cols, &good).is_ok());
    let k = INT4_OUTLIERS;
    let set_index = |p: &mut Vec<u8>, row: usize, slot: usize, index: u16| {
        p[row * rl + 4 * slot..row * rl + 4 * slot + 2].copy_from_slice(&index.to_le_bytes());
    };
    let index_of = |p: &[u8], row: usize, slot: usize| {
        u16::from_le_bytes([p[row * rl + 4 * slot], p[row * rl + 4 * slot + 1]])
    };

    // An index past the row.
    let mut p = good.clone();
    set_index(&mut p, 1, k - 1, cols as u16);
    let err = decode(2, cols, &p).expect_err("out of range");
    assert_eq!(
        err,
        WireError::BadOutlier {
            row: 1,
            slot: k - 1,
            index: cols
        }
    );
    assert_eq!(err.error_code(), ErrorCode::MalformedFrame);
    // A duplicated index, and one that goes down.
    let mut p = good.clone();
    let first = index_of(&p, 0, 0);
    set_index(&mut p, 0, 1, first);
    assert_eq!(
        decode(2, cols, &p),
        Err(WireError::BadOutlier {
            row: 0,
            slot: 1,
            index: usize::from(first)
        })
    );
    let mut p = good.clone();
    let second = index_of(&p, 0, 1);
    set_index(&mut p, 0, 0, second + 1);
    assert!(matches!(
        decode(2, cols, &p),
        Err(WireError::BadOutlier {
            row: 0,
            slot: 1,
            ..
        })
    ));
    // Non-finite outlier values and scales: NonFinite at the value's or the group's column.
    for bad in [half::f16::NAN, half::f16::INFINITY, half::f16::NEG_INFINITY] {
        let mut p = good.clone();
        let at = rl + 4 * 2 + 2; // row 1, outlier slot 2
        p[at..at + 2].copy_from_slice(&bad.to_le_bytes());
        let col = usize::from(index_of(&p, 1, 2));
        let err = decode(2, cols, &p).expect_err("non-finite outlier");
        assert_eq!(err, WireError::NonFinite { row: 1, col });
        assert_eq!(err.error_code(), ErrorCode::NonFinite);
        let mut p = good.clone();
        let at = 4 * k + 2; // row 0, scale of group 1
        p[at..at + 2].copy_from_slice(&bad.to_le_bytes());
        assert_eq!(
            decode(2, cols, &p),
            Err(WireError::NonFinite {
                row: 0,
                col: INT4_GROUP
            })
        );
    }
    // The padding nibble of an odd row must be 0.
    let mut p = good.clone();
    p[rl - 1] |= 0x30;
    assert!(matches!(
        decode(2, cols, &p),
        Err(WireError::InvalidFlag {
            field: "hidden.int4.padding",
            ..
        })
    ));
    // Truncated or padded payloads: a shape error, never a panic.
    for len in [0, 1, rl, 2 * rl - 1, 2 * rl + 1] {
        let mut p = good.clone();
        p.resize(len, 0);
        assert_eq!(
            decode(2, cols, &p),
            Err(WireError::HiddenShape {
                expected: 2 * rl,
                got: len
            })
        );
    }
    // Every nibble is a value (-8 included, which the encoder never writes).
    let mut p = good.clone();
    let nibbles = 4 * k + 4;
    p[nibbles..rl - 1].fill(0x00);
    let out = decode(2, cols, &p).expect("any nibble decodes");
    let s0 = half::f16::from_le_bytes([p[4 * k], p[4 * k + 1]]).to_f32();
    let outliers: Vec<usize> = (0..k).map(|i| usize::from(index_of(&p, 0, i))).collect();
    let c = (0..INT4_GROUP)
        .find(|c| !outliers.contains(c))
        .expect("an inlier");
    assert_eq!(out[c], -8.0 * s0);
}

#[test]
fn int4_frames_round_trip_and_name_their_dtype() {
    assert_eq!(HiddenDtype::from_code(4), Ok(HiddenDtype::Int4));
    assert_eq!(HiddenDtype::from_code(5), Err(WireError::UnknownDtype(5)));
    assert_eq!(HiddenDtype::from_name("int4"), Some(HiddenDtype::Int4));
    assert_eq!(HiddenDtype::Int4.to_string(), "int4");
    assert_eq!(HiddenDtype::Int4.value_bits(), 4);
    let values: Vec<f32> = (0..3 * 64).map(|i| (i as f32).sin() * 4.0).collect();
    let payload = encode(3, 64, &values);
    let frame = Frame::Hidden(Hidden {
        seq: 1,
        first_position: 0,
        token_count: 3,
        complete: true,
        drafts: 2,
        dtype: HiddenDtype::Int4,
        payload,
    });
    let bytes = frame.encode().expect("encode");
    assert_eq!(bytes[20], 4, "dtype code at offset 20");
    assert_eq!(Frame::decode(&bytes).expect("decode"), frame);
    let h = HiddenRef::decode(&bytes, &Limits::default()).expect("hidden");
    let mut out = Vec::new();
    h.to_f32(64, &mut out).expect("values");
    assert_eq!(out.len(), 3 * 64);
}

/// How a peer that does not know a dtype code answers: the frame is refused with a typed
/// error whose message names the code (an older cloud answers an int4 `Open` this way).
#[test]
fn an_unknown_dtype_code_is_refused_as_malformed() {
    let open = |dtype| {
        Frame::Open(Open {
            manifest: ManifestId::try_from("pair").expect("id"),
            split: 1,
            hidden_size: 576,
            dtype,
            sampling: SamplingParams::default(),
            max_tokens: 8,
            stop: Vec::new(),
            prompt_id: None,
            traceparent: None,
        })
        .encode()
        .expect("encode")
    };
    let (f16, int4) = (open(HiddenDtype::F16), open(HiddenDtype::Int4));
    let at: Vec<usize> = (0..f16.len()).filter(|&i| f16[i] != int4[i]).collect();
    assert_eq!(at.len(), 1, "only the dtype byte differs");
    assert_eq!((f16[at[0]], int4[at[0]]), (1, 4));
    let mut future = int4.clone();
    future[at[0]] = 9;
    let err = Frame::decode(&future).expect_err("unknown code");
    assert_eq!(err, WireError::UnknownDtype(9));
    assert_eq!(err.error_code(), ErrorCode::MalformedFrame);
    assert_eq!(err.to_string(), "unknown hidden dtype code 9");
    assert!(matches!(Frame::decode(&int4), Ok(Frame::Open(o)) if o.dtype == HiddenDtype::Int4));
}
