//! The properties the fuzz targets check (`protocol/fuzz`), as plain functions: the fuzzer
//! calls them with its inputs, and `tests/fuzz_seeds.rs` runs the committed seed corpus
//! through the same code in every `cargo test`. Each function panics when a property fails,
//! which is what the fuzzer reports as a crash.

use crate::open::Served;
use crate::wire::{peek_frame_type, Frame, FrameType, HiddenRef, Limits, ManifestId};
use crate::Sampling;

/// Decoding is total and canonical: any input decodes to a frame or a typed error without
/// panicking, and a frame that decodes re-encodes to exactly the same bytes.
pub fn decode_frame(data: &[u8]) {
    let peeked = peek_frame_type(data);
    match Frame::decode(data) {
        Ok(frame) => {
            assert_eq!(peeked, Ok(frame.frame_type()));
            let bytes = frame.encode().expect("a decoded frame re-encodes");
            assert_eq!(bytes, data, "non-canonical encoding of {frame:?}");
        }
        Err(err) => {
            // Every error maps to a code the receiver can send back.
            let _ = err.error_code();
        }
    }
    if let Ok(hidden) = HiddenRef::decode(data, &Limits::default()) {
        assert_eq!(peeked, Ok(FrameType::Hidden));
        assert_eq!(hidden.encode().expect("re-encodes"), data);
        // Try the payload as every shape it could have (int4: narrower than its outlier
        // count, one group, an odd width, several groups).
        let rows = hidden.token_count as usize;
        let mut out = Vec::new();
        for cols in [0, 1, 2, 3, 4, 8, 9, 16, 33, 64, 65] {
            if hidden.to_f32(cols, &mut out).is_ok() {
                assert_eq!(out.len(), rows * cols);
                assert!(out.iter().all(|v| v.is_finite()));
            }
        }
    }
}

/// The manifest id the served pair has when the control byte does not copy the frame's.
pub const SERVED_MANIFEST: &str = "fuzz-pair";

/// `Open` validation is total, and what it accepts is what the server can run.
///
/// Input: one control byte, then the frame. The control byte picks the served pair: bit 0
/// copies the frame's manifest id (else [`SERVED_MANIFEST`]), bit 1 copies its split and
/// hidden size (else 2 and 64), and the other six bits give the token cap (`1 + 64·n`).
pub fn open_check(data: &[u8]) {
    let Some((&control, frame)) = data.split_first() else {
        return;
    };
    let open = match Frame::decode(frame) {
        Ok(Frame::Open(open)) => open,
        _ => return,
    };
    let served = Served {
        manifest: if control & 1 != 0 {
            open.manifest.clone()
        } else {
            ManifestId::try_from(SERVED_MANIFEST).expect("a valid id")
        },
        split: if control & 2 != 0 { open.split } else { 2 },
        hidden_size: if control & 2 != 0 {
            open.hidden_size
        } else {
            64
        },
        max_tokens_cap: 1 + 64 * u32::from(control >> 2),
    };
    match open.check(&served) {
        Ok(valid) => {
            assert_eq!(open.manifest, served.manifest);
            assert_eq!(
                (open.split, open.hidden_size),
                (served.split, served.hidden_size)
            );
            assert!((1..=served.max_tokens_cap).contains(&valid.max_tokens));
            assert_eq!(valid.stop, open.stop);
            match valid.sampling {
                Sampling::Greedy { repetition_penalty } => {
                    assert!(repetition_penalty.is_finite() && repetition_penalty > 0.0);
                    assert_eq!(open.sampling.temperature, 0.0);
                }
                Sampling::Random {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repetition_penalty,
                    ..
                } => {
                    assert!(temperature.is_finite() && temperature > 0.0);
                    assert!(top_k.is_none_or(|k| k > 0));
                    assert!(top_p.is_none_or(|p| p > 0.0 && p < 1.0));
                    assert!(min_p.is_none_or(|p| p > 0.0 && p <= 1.0));
                    assert!(repetition_penalty.is_finite() && repetition_penalty > 0.0);
                }
            }
        }
        Err(e) => {
            let code = e.error_code();
            assert!(!code.is_retryable(), "{e} must not be retried");
            assert!(!e.to_string().is_empty());
        }
    }
}
