//! Decoding is total and canonical: any input decodes to a frame or a typed error without
//! panicking, and a frame that decodes re-encodes to exactly the same bytes.
//!
//! Run with `cargo fuzz run decode_frame` from `protocol/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_protocol::wire::{peek_frame_type, Frame, FrameType, HiddenRef, Limits};

fuzz_target!(|data: &[u8]| {
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
        // Try the payload as every shape it could have.
        let rows = hidden.token_count as usize;
        let mut out = Vec::new();
        for cols in [0, 1, 2, 3, 4, 8, 16] {
            if hidden.to_f32(cols, &mut out).is_ok() {
                assert_eq!(out.len(), rows * cols);
                assert!(out.iter().all(|v| v.is_finite()));
            }
        }
    }
});
