//! The wire format's contract: round trips, totality of decoding, typed errors, payload
//! conversions and the exact bytes of a few frames.

use proptest::prelude::*;
use tandem_protocol::wire::{
    MAX_DRAFTS, MAX_ERROR_MESSAGE_LEN, MAX_MANIFEST_ID_LEN, MAX_PROMPT_ID_LEN, MAX_STOP_STRINGS,
    MAX_STOP_STRING_LEN, MAX_TEXT_DELTA_LEN, MAX_TRACEPARENT_LEN,
};
use tandem_protocol::{
    f32_to_hidden, hidden_to_f32, peek_frame_type, Done, DoneReason, ErrorCode, ErrorFrame,
    FinishReason, Frame, FrameType, Hidden, HiddenDtype, HiddenRef, Limits, ManifestId, Open,
    Opened, Resume, ResumeToken, SamplingParams, SessionId, Token, WireError,
};

// ---------------------------------------------------------------------------------------
// Strategies

/// Strings of at most `max_bytes` bytes of UTF-8 (any chars, multi-byte included).
fn text(max_bytes: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..=max_bytes / 4).prop_map(String::from_iter)
}

/// Any f32 but NaN (NaN != NaN would break `==`; NaN bits are checked separately).
fn float() -> impl Strategy<Value = f32> {
    any::<u32>()
        .prop_map(f32::from_bits)
        .prop_filter("not NaN", |f| !f.is_nan())
}

fn dtype() -> impl Strategy<Value = HiddenDtype> {
    prop::sample::select(HiddenDtype::ALL.to_vec())
}

fn finish() -> impl Strategy<Value = DoneReason> {
    prop_oneof![
        Just(DoneReason::Finished(FinishReason::Eos)),
        Just(DoneReason::Finished(FinishReason::StopString)),
        Just(DoneReason::Finished(FinishReason::Length)),
        Just(DoneReason::Cancelled),
    ]
}

fn sampling() -> impl Strategy<Value = SamplingParams> {
    (
        float(),
        prop::option::of(any::<u32>().prop_map(|k| k as usize)),
        prop::option::of(float()),
        prop::option::of(float()),
        any::<u64>(),
        float(),
    )
        .prop_map(
            |(temperature, top_k, top_p, min_p, seed, repetition_penalty)| SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed,
                repetition_penalty,
            },
        )
}

fn open() -> impl Strategy<Value = Open> {
    (
        prop::collection::vec(any::<u8>(), 1..=MAX_MANIFEST_ID_LEN),
        any::<u32>(),
        any::<u32>(),
        dtype(),
        sampling(),
        any::<u32>(),
        prop::collection::vec(text(MAX_STOP_STRING_LEN), 0..=MAX_STOP_STRINGS),
        prop::option::of(text(MAX_PROMPT_ID_LEN)),
        prop::option::of(text(MAX_TRACEPARENT_LEN)),
    )
        .prop_map(
            |(manifest, split, hidden_size, dtype, sampling, max_tokens, stop, prompt_id, tp)| {
                Open {
                    manifest: ManifestId::new(manifest).expect("1..=64 bytes"),
                    split,
                    hidden_size,
                    dtype,
                    sampling,
                    max_tokens,
                    stop,
                    prompt_id,
                    traceparent: tp,
                }
            },
        )
}

fn hidden() -> impl Strategy<Value = Hidden> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
        dtype(),
        prop::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(
            |(seq, first_position, token_count, complete, dtype, payload)| Hidden {
                seq,
                first_position,
                token_count,
                complete,
                // Drafts only where they are allowed: a complete frame of drafts + 1 rows.
                drafts: if complete && (2..=u32::from(MAX_DRAFTS) + 1).contains(&token_count) {
                    (token_count - 1) as u8
                } else {
                    0
                },
                dtype,
                payload,
            },
        )
}

fn token() -> BoxedStrategy<ResumeToken> {
    any::<[u8; 32]>().prop_map(ResumeToken).boxed()
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        open().prop_map(Frame::Open),
        (any::<u128>(), token(), any::<u64>()).prop_map(|(s, t, n)| Frame::Opened(Opened {
            session: SessionId(s),
            resume_token: t,
            next_hidden_seq: n,
        })),
        hidden().prop_map(Frame::Hidden),
        (
            (any::<u64>(), any::<u64>(), any::<u32>()),
            (0u8..3, 0..=MAX_DRAFTS),
            prop::option::of(text(MAX_TEXT_DELTA_LEN))
        )
            .prop_map(
                |((seq, input_seq, token_id), (kind, draft_cap), text)| Frame::Token(Token {
                    seq,
                    input_seq,
                    token_id,
                    draft: kind > 0,
                    last: kind == 2,
                    draft_cap,
                    text
                })
            ),
        (finish(), any::<u32>(), any::<u32>()).prop_map(|(reason, p, o)| Frame::Done(Done {
            reason,
            prompt_tokens: p,
            output_tokens: o,
        })),
        (
            any::<u16>().prop_map(ErrorCode::from_u16),
            prop::option::of(any::<u64>()),
            text(MAX_ERROR_MESSAGE_LEN),
            prop::option::of(any::<u32>()),
        )
            .prop_map(
                |(code, seq, message, retry_after_ms)| Frame::Error(ErrorFrame {
                    code,
                    seq,
                    message,
                    retry_after_ms,
                })
            ),
        (any::<u128>(), token(), prop::option::of(any::<u64>())).prop_map(|(s, t, last)| {
            Frame::Resume(Resume {
                session: SessionId(s),
                resume_token: t,
                last_token_seq: last,
            })
        }),
        Just(Frame::Cancel),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
    ]
}

fn encode(f: &Frame) -> Vec<u8> {
    f.encode().expect("generated frames respect the caps")
}

/// A decoder that accepted `bytes` must give them back unchanged (canonical encoding).
fn assert_canonical(bytes: &[u8]) {
    if let Ok(f) = Frame::decode(bytes) {
        assert_eq!(encode(&f), bytes, "{f:?}");
    }
    if let Ok(h) = HiddenRef::decode(bytes, &Limits::default()) {
        assert_eq!(h.encode().expect("re-encode"), bytes);
    }
}

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).expect("ascii"), 16).expect("hex"))
        .collect()
}

fn ping() -> Vec<u8> {
    encode(&Frame::Ping { nonce: 1 })
}

// ---------------------------------------------------------------------------------------
// Round trips and totality

proptest! {
    #[test]
    fn every_frame_round_trips(f in frame()) {
        let bytes = encode(&f);
        prop_assert_eq!(Frame::decode(&bytes), Ok(f.clone()));
        prop_assert_eq!(peek_frame_type(&bytes), Ok(f.frame_type()));
        // `encode_into` appends after what is already there.
        let mut buf = vec![0xaa, 0xbb];
        f.encode_into(&mut buf).expect("encode");
        prop_assert_eq!(&buf[..2], &[0xaa, 0xbb]);
        prop_assert_eq!(&buf[2..], &bytes[..]);
    }

    #[test]
    fn hidden_ref_round_trips_without_copying(h in hidden()) {
        let bytes = h.borrowed().encode().expect("encode");
        prop_assert_eq!(&bytes, &encode(&Frame::Hidden(h.clone())));
        let r = HiddenRef::decode(&bytes, &Limits::default()).expect("decode");
        prop_assert_eq!(r, h.borrowed());
        // The payload is a view into the received buffer, at the documented offset.
        prop_assert_eq!(
            r.payload.as_ptr(),
            bytes[tandem_protocol::wire::HIDDEN_PAYLOAD_OFFSET..].as_ptr()
        );
        prop_assert_eq!(Hidden::from(r), h);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        assert_canonical(&bytes);
        let _ = peek_frame_type(&bytes);
    }

    #[test]
    fn arbitrary_bodies_after_a_valid_header_never_panic(
        ty in prop::sample::select(FrameType::ALL.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = vec![b'T', b'D', 1, ty.code()];
        bytes.extend_from_slice(&body);
        assert_canonical(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(
        f in frame(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..4u8), 1..8),
    ) {
        let mut bytes = encode(&f);
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 if i < bytes.len() => bytes[i] ^= 1 << (byte % 8),
                2 => bytes.insert(i, byte),
                _ => bytes.truncate(i),
            }
        }
        assert_canonical(&bytes);
    }

    #[test]
    fn every_truncation_is_an_error(f in frame()) {
        let bytes = encode(&f);
        // The one field a frame may leave out: an Error's trailing retry_after. Cut just
        // before it, the frame is the same error without it.
        let optional_tail = match &f {
            Frame::Error(e) if e.retry_after_ms.is_some() => Some(bytes.len() - 4),
            _ => None,
        };
        for len in 0..bytes.len() {
            if Some(len) == optional_tail {
                let Frame::Error(e) = &f else { unreachable!() };
                let without = ErrorFrame { retry_after_ms: None, ..e.clone() };
                prop_assert_eq!(Frame::decode(&bytes[..len]), Ok(Frame::Error(without)));
                continue;
            }
            let err = Frame::decode(&bytes[..len]).expect_err("truncated frame decoded");
            prop_assert!(matches!(err, WireError::Truncated { .. }), "{:?} at {}", err, len);
            prop_assert_eq!(err.error_code(), ErrorCode::MalformedFrame);
            prop_assert!(HiddenRef::decode(&bytes[..len], &Limits::default()).is_err());
        }
    }

    #[test]
    fn trailing_bytes_are_an_error(f in frame(), extra in prop::collection::vec(any::<u8>(), 1..16)) {
        let mut bytes = encode(&f);
        bytes.extend_from_slice(&extra);
        match &f {
            // An Error without retry_after reads the next 4 bytes as one; only more are left.
            Frame::Error(e) if e.retry_after_ms.is_none() => {
                let got = Frame::decode(&bytes);
                if extra.len() < 4 {
                    prop_assert!(matches!(got, Err(WireError::Truncated { .. })), "{:?}", got);
                } else if extra.len() > 4 {
                    prop_assert_eq!(got, Err(WireError::TrailingBytes(extra.len() - 4)));
                } else {
                    prop_assert!(got.is_ok());
                }
            }
            _ => prop_assert_eq!(Frame::decode(&bytes), Err(WireError::TrailingBytes(extra.len()))),
        }
    }

    #[test]
    fn wrong_magic_and_version_are_typed(f in frame(), a in any::<u8>(), v in any::<u8>()) {
        let good = encode(&f);
        let mut bytes = good.clone();
        bytes[0] = a;
        if a != b'T' {
            prop_assert_eq!(Frame::decode(&bytes), Err(WireError::BadMagic([a, b'D'])));
            prop_assert_eq!(peek_frame_type(&bytes), Err(WireError::BadMagic([a, b'D'])));
        }
        let mut bytes = good;
        bytes[2] = v;
        if v != tandem_protocol::wire::VERSION {
            let err = Frame::decode(&bytes).expect_err("wrong version decoded");
            prop_assert_eq!(&err, &WireError::UnsupportedVersion(v));
            prop_assert_eq!(err.error_code(), ErrorCode::UnsupportedVersion);
        }
    }
}

/// Session ids are 128 bits on the wire (issue 20: unguessable ids): `Opened` and `Resume`
/// carry all 16 bytes, little-endian, at offset 4 (docs/protocol.md §3).
#[test]
fn session_ids_take_sixteen_bytes() {
    let id = SessionId(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
    let le: Vec<u8> = (1..=16u8).rev().collect();
    let opened = Frame::Opened(Opened {
        session: id,
        resume_token: ResumeToken([0xAB; 32]),
        next_hidden_seq: 7,
    })
    .encode()
    .expect("encode");
    assert_eq!(opened.len(), 4 + 56);
    assert_eq!(&opened[4..20], &le[..]);
    assert_eq!(&opened[20..52], &[0xAB; 32][..]);
    assert_eq!(&opened[52..], &7u64.to_le_bytes());
    let resume = Frame::Resume(Resume {
        session: id,
        resume_token: ResumeToken([0xCD; 32]),
        last_token_seq: Some(3),
    })
    .encode()
    .expect("encode");
    assert_eq!(resume.len(), 4 + 57);
    assert_eq!(&resume[4..20], &le[..]);
    assert_eq!(id.to_string(), "0102030405060708090a0b0c0d0e0f10");
    // A 64-bit id (the old layout) is 8 bytes short.
    let mut old = opened[..12].to_vec();
    old.extend_from_slice(&opened[20..]);
    assert!(Frame::decode(&old).is_err());
}

#[test]
fn nan_bits_survive_a_round_trip() {
    let nan = f32::from_bits(0x7fc0_1234);
    let f = Frame::Open(Open {
        manifest: ManifestId::try_from("ab").expect("id"),
        split: 1,
        hidden_size: 8,
        dtype: HiddenDtype::F32,
        sampling: SamplingParams {
            temperature: nan,
            ..Default::default()
        },
        max_tokens: 1,
        stop: vec![],
        prompt_id: None,
        traceparent: None,
    });
    let bytes = encode(&f);
    let Ok(Frame::Open(o)) = Frame::decode(&bytes) else {
        panic!("not an Open");
    };
    assert_eq!(o.sampling.temperature.to_bits(), 0x7fc0_1234);
    assert_canonical(&bytes);
}

// ---------------------------------------------------------------------------------------
// Typed errors for specific bad input

#[test]
fn unknown_frame_type_is_typed() {
    for ty in [0u8, 0x0b, 0x7f, 0xff] {
        let bytes = [b'T', b'D', tandem_protocol::wire::VERSION, ty];
        assert_eq!(Frame::decode(&bytes), Err(WireError::UnknownFrameType(ty)));
    }
}

#[test]
fn frame_too_large_is_refused_before_parsing() {
    let bytes = ping();
    let limits = Limits {
        max_frame_bytes: bytes.len() - 1,
    };
    let err = Frame::decode_with(&bytes, &limits).expect_err("too large");
    assert_eq!(err, WireError::FrameTooLarge { len: 12, max: 11 });
    assert_eq!(err.error_code(), ErrorCode::FrameTooLarge);
    assert!(Frame::decode_with(
        &bytes,
        &Limits {
            max_frame_bytes: 12
        }
    )
    .is_ok());
    let h = encode(&Frame::Hidden(hidden_frame(HiddenDtype::F32, vec![0; 8])));
    assert!(matches!(
        HiddenRef::decode(
            &h,
            &Limits {
                max_frame_bytes: 35
            }
        ),
        Err(WireError::FrameTooLarge { len: 36, max: 35 })
    ));
}

#[test]
fn flags_must_be_zero_or_one() {
    // Token with text flag = 2.
    let bytes = hex("54440204 0700000000000000 0000000000000000 b2260000 00 00 02");
    assert_eq!(
        Frame::decode(&bytes),
        Err(WireError::InvalidFlag {
            field: "token.text?",
            value: 2
        })
    );
    let good = encode(&Frame::Hidden(hidden_frame(HiddenDtype::F16, vec![0; 4])));
    for (offset, value, field) in [(21, 2u8, "hidden.flags"), (21, 0x81, "hidden.flags")]
        .into_iter()
        .chain([
            (22, 1, "hidden.drafts"),
            (23, 1, "hidden.reserved"),
            (23, 0x80, "hidden.reserved"),
        ])
    {
        let mut bad = good.clone();
        bad[offset] = value;
        let want = WireError::InvalidFlag { field, value };
        assert_eq!(Frame::decode(&bad), Err(want.clone()));
        assert_eq!(HiddenRef::decode(&bad, &Limits::default()), Err(want));
    }
}

#[test]
fn invalid_utf8_is_refused() {
    // Token with text "\xff".
    let bytes = hex("54440204 0700000000000000 0000000000000000 b2260000 00 00 01 01000000 ff");
    assert_eq!(
        Frame::decode(&bytes),
        Err(WireError::InvalidUtf8 {
            field: "token.text"
        })
    );
}

#[test]
fn huge_length_fields_fail_without_allocating() {
    // Error frame whose message claims u32::MAX bytes: over the cap.
    let bytes = hex("54440206 6400 00 ffffffff");
    assert_eq!(
        Frame::decode(&bytes),
        Err(WireError::TooLong {
            field: "error.message",
            len: u32::MAX as usize,
            max: MAX_ERROR_MESSAGE_LEN,
        })
    );
    // Hidden payload claiming u32::MAX bytes with none present: truncated.
    let bytes = hex("54440203 0000000000000000 00000000 01000000 00 00 0000 ffffffff");
    assert!(matches!(
        HiddenRef::decode(&bytes, &Limits::default()),
        Err(WireError::Truncated {
            offset: 28,
            needed: 0xffff_ffff,
            remaining: 0
        })
    ));
    // Open with 17 stop strings declared.
    let mut open = open_example();
    open.stop.clear();
    let mut bytes = encode(&Frame::Open(open));
    let at = bytes.len() - 6; // count, prompt id flag, traceparent flag
    bytes[at..at + 4].copy_from_slice(&17u32.to_le_bytes());
    assert_eq!(
        Frame::decode(&bytes),
        Err(WireError::TooLong {
            field: "stop",
            len: 17,
            max: MAX_STOP_STRINGS
        })
    );
}

#[test]
fn caps_are_enforced_when_encoding() {
    let long = |n: usize| "x".repeat(n);
    let token = |text: String| {
        Frame::Token(Token {
            seq: 0,
            input_seq: 0,
            token_id: 0,
            draft: false,
            last: false,
            draft_cap: 0,
            text: Some(text),
        })
    };
    assert!(token(long(MAX_TEXT_DELTA_LEN)).encode().is_ok());
    let mut out = vec![1, 2, 3];
    let err = token(long(MAX_TEXT_DELTA_LEN + 1))
        .encode_into(&mut out)
        .expect_err("over cap");
    assert!(matches!(
        err,
        WireError::TooLong {
            field: "token.text",
            ..
        }
    ));
    assert_eq!(
        out,
        [1, 2, 3],
        "a refused frame leaves the buffer as it was"
    );

    let mut open = open_example();
    open.stop = vec![String::new(); MAX_STOP_STRINGS + 1];
    assert!(matches!(
        Frame::Open(open.clone()).encode(),
        Err(WireError::TooLong { field: "stop", .. })
    ));
    open.stop = vec![long(MAX_STOP_STRING_LEN + 1)];
    assert!(Frame::Open(open.clone()).encode().is_err());
    open.stop = vec![];
    open.traceparent = Some(long(MAX_TRACEPARENT_LEN + 1));
    assert!(Frame::Open(open.clone()).encode().is_err());
    open.traceparent = None;
    open.prompt_id = Some(long(MAX_PROMPT_ID_LEN + 1));
    assert!(Frame::Open(open.clone()).encode().is_err());
    open.prompt_id = None;
    open.sampling.top_k = Some(u32::MAX as usize);
    assert!(Frame::Open(open.clone()).encode().is_ok());
    if let Some(k) = (u32::MAX as usize).checked_add(1) {
        open.sampling.top_k = Some(k);
        assert_eq!(
            Frame::Open(open).encode(),
            Err(WireError::OutOfRange {
                field: "sampling.top_k"
            })
        );
    }
    let error = Frame::Error(ErrorFrame {
        code: ErrorCode::Internal,
        seq: None,
        message: long(MAX_ERROR_MESSAGE_LEN + 1),
        retry_after_ms: None,
    });
    assert!(error.encode().is_err());
}

#[test]
fn manifest_id_is_one_to_64_bytes() {
    assert_eq!(
        ManifestId::new(Vec::new()),
        Err(WireError::Empty { field: "manifest" })
    );
    assert!(ManifestId::new(vec![b'a'; 64]).is_ok());
    assert!(matches!(
        ManifestId::new(vec![b'a'; 65]),
        Err(WireError::TooLong {
            len: 65,
            max: 64,
            ..
        })
    ));
    let id = ManifestId::try_from("ab12").expect("id");
    assert_eq!(id.as_str(), Some("ab12"));
    // An empty manifest on the wire is refused too.
    let mut bytes = encode(&Frame::Open(open_example()));
    bytes.splice(4..10, 0u32.to_le_bytes());
    assert_eq!(
        Frame::decode(&bytes),
        Err(WireError::Empty { field: "manifest" })
    );
}

#[test]
fn unknown_enum_codes_are_refused_or_kept() {
    // Done with finish reason 4: refused.
    let bytes = hex("54440205 04 00000000 00000000");
    assert_eq!(
        Frame::decode(&bytes),
        Err(WireError::UnknownFinishReason(4))
    );
    // Hidden with dtype 5 (4 is int4): refused.
    let mut h = encode(&Frame::Hidden(hidden_frame(HiddenDtype::F32, vec![])));
    h[20] = 5;
    assert_eq!(Frame::decode(&h), Err(WireError::UnknownDtype(5)));
    // An admission refusal's retry_after follows the message; without it the frame ends there.
    let bytes = hex("54440206 2d01 00 04000000 62757379 d0070000");
    let busy = Frame::Error(ErrorFrame {
        code: ErrorCode::Overloaded,
        seq: None,
        message: "busy".into(),
        retry_after_ms: Some(2000),
    });
    assert_eq!(Frame::decode(&bytes), Ok(busy.clone()));
    assert_eq!(busy.encode().expect("encode"), bytes);
    assert_eq!(
        Frame::decode(&bytes[..bytes.len() - 1]),
        Err(WireError::Truncated {
            offset: 15,
            needed: 4,
            remaining: 3
        })
    );
    // An Error frame with an unknown code still decodes.
    let bytes = hex("54440206 e703 00 00000000");
    assert_eq!(
        Frame::decode(&bytes),
        Ok(Frame::Error(ErrorFrame {
            code: ErrorCode::Unknown(999),
            seq: None,
            message: String::new(),
            retry_after_ms: None,
        }))
    );
}

#[test]
fn hidden_ref_refuses_other_frames() {
    assert_eq!(
        HiddenRef::decode(&ping(), &Limits::default()),
        Err(WireError::WrongFrameType {
            expected: FrameType::Hidden,
            got: FrameType::Ping,
        })
    );
    assert_eq!(
        WireError::WrongFrameType {
            expected: FrameType::Hidden,
            got: FrameType::Ping
        }
        .error_code(),
        ErrorCode::UnexpectedFrame
    );
}

// ---------------------------------------------------------------------------------------
// Error codes

#[test]
fn error_codes_are_stable() {
    let table: &[(ErrorCode, u16, &str)] = &[
        (ErrorCode::MalformedFrame, 100, "malformed_frame"),
        (ErrorCode::UnsupportedVersion, 101, "unsupported_version"),
        (ErrorCode::UnexpectedFrame, 102, "unexpected_frame"),
        (ErrorCode::ManifestMismatch, 103, "manifest_mismatch"),
        (ErrorCode::HiddenShape, 104, "hidden_shape"),
        (ErrorCode::NonFinite, 105, "non_finite"),
        (ErrorCode::SequenceOutOfOrder, 106, "sequence_out_of_order"),
        (ErrorCode::FrameTooLarge, 107, "frame_too_large"),
        (ErrorCode::BadSamplingParams, 108, "bad_sampling_params"),
        (
            ErrorCode::ContextLengthExceeded,
            109,
            "context_length_exceeded",
        ),
        (ErrorCode::UnknownSession, 200, "unknown_session"),
        (ErrorCode::BadResumeToken, 201, "bad_resume_token"),
        (ErrorCode::Finished, 202, "finished"),
        (ErrorCode::BadPromptTicket, 203, "bad_prompt_ticket"),
        (ErrorCode::IdleTimeout, 204, "idle_timeout"),
        (ErrorCode::SessionTakenOver, 205, "session_taken_over"),
        (ErrorCode::RateLimited, 300, "rate_limited"),
        (ErrorCode::Overloaded, 301, "overloaded"),
        (ErrorCode::Unavailable, 302, "unavailable"),
        (ErrorCode::ShuttingDown, 303, "shutting_down"),
        (ErrorCode::Moved, 304, "moved"),
        (ErrorCode::TooManySessions, 305, "too_many_sessions"),
        (ErrorCode::Internal, 500, "internal"),
    ];
    assert_eq!(ErrorCode::ALL.len(), table.len());
    for &(code, n, name) in table {
        assert!(ErrorCode::ALL.contains(&code));
        assert_eq!(code.as_u16(), n);
        assert_eq!(ErrorCode::from_u16(n), code);
        assert_eq!(code.as_str(), name);
        assert_eq!(code.to_string(), name);
        assert_eq!(code.is_retryable(), (300..400).contains(&n));
    }
    assert_eq!(ErrorCode::from_u16(0), ErrorCode::Unknown(0));
    assert_eq!(ErrorCode::from_u16(499), ErrorCode::Unknown(499));
    assert_eq!(ErrorCode::Unknown(499).as_u16(), 499);
    assert_eq!(ErrorCode::Unknown(7).as_str(), "unknown");
}

proptest! {
    #[test]
    fn every_u16_decodes_to_an_error_code(n in any::<u16>()) {
        prop_assert_eq!(ErrorCode::from_u16(n).as_u16(), n);
    }
}

#[test]
fn done_reason_codes_are_stable() {
    let table = [
        (DoneReason::Finished(FinishReason::Eos), 0),
        (DoneReason::Finished(FinishReason::StopString), 1),
        (DoneReason::Finished(FinishReason::Length), 2),
        (DoneReason::Cancelled, 3),
    ];
    for (reason, code) in table {
        assert_eq!(reason.code(), code);
        assert_eq!(DoneReason::from_code(code), Ok(reason));
    }
    assert_eq!(
        DoneReason::from(FinishReason::Length),
        DoneReason::Finished(FinishReason::Length)
    );
}

#[test]
fn secrets_and_activations_stay_out_of_debug() {
    let t = ResumeToken([7; 32]);
    assert_eq!(format!("{t:?}"), "ResumeToken(..)");
    assert!(t.verify(&ResumeToken([7; 32])));
    let mut other = [7; 32];
    other[31] = 8;
    assert!(!t.verify(&ResumeToken(other)));
    let h = hidden_frame(HiddenDtype::F32, vec![0xab; 4096]);
    let dbg = format!("{h:?}");
    assert!(dbg.contains("payload_len: 4096"), "{dbg}");
    assert!(dbg.len() < 200, "{dbg}");
}

// ---------------------------------------------------------------------------------------
// Golden bytes: the layout cannot drift without these failing.

fn open_example() -> Open {
    Open {
        manifest: ManifestId::try_from("ab").expect("id"),
        split: 1,
        hidden_size: 576,
        dtype: HiddenDtype::Bf16,
        sampling: SamplingParams::default(),
        max_tokens: 16,
        stop: vec!["\n".into()],
        prompt_id: None,
        traceparent: None,
    }
}

#[test]
fn golden_frames() {
    let cases: Vec<(Frame, &str)> = vec![
        (
            Frame::Ping {
                nonce: 0x0102_0304_0506_0708,
            },
            "54440209 0807060504030201",
        ),
        (
            Frame::Token(Token {
                seq: 7,
                input_seq: 3,
                token_id: 9906,
                draft: true,
                last: false,
                draft_cap: 4,
                text: Some("Hi".into()),
            }),
            "54440204 0700000000000000 0300000000000000 b2260000 01 04 01 02000000 4869",
        ),
        (
            Frame::Hidden(Hidden {
                seq: 0,
                first_position: 0,
                token_count: 1,
                complete: true,
                drafts: 0,
                dtype: HiddenDtype::F16,
                payload: hex("003c 00c0"),
            }),
            "54440203 0000000000000000 00000000 01000000 01 01 0000 04000000 003c00c0",
        ),
        (
            Frame::Open(open_example()),
            "54440201 02000000 6162 01000000 40020000 02 \
             00000000 00 00 00 0000000000000000 0000803f \
             10000000 01000000 01000000 0a 00 00",
        ),
        (
            Frame::Error(ErrorFrame {
                code: ErrorCode::HiddenShape,
                seq: Some(3),
                message: "bad".into(),
                retry_after_ms: None,
            }),
            "54440206 6800 01 0300000000000000 03000000 626164",
        ),
        (
            Frame::Done(Done {
                reason: DoneReason::Finished(FinishReason::StopString),
                prompt_tokens: 12,
                output_tokens: 5,
            }),
            "54440205 01 0c000000 05000000",
        ),
        (Frame::Cancel, "54440208"),
    ];
    for (frame, want) in cases {
        let want = hex(want);
        assert_eq!(encode(&frame), want, "{frame:?}");
        assert_eq!(Frame::decode(&want), Ok(frame));
    }
}

fn hidden_frame(dtype: HiddenDtype, payload: Vec<u8>) -> Hidden {
    Hidden {
        seq: 0,
        first_position: 0,
        token_count: 1,
        complete: true,
        drafts: 0,
        dtype,
        payload,
    }
}

/// The int4 payload: layout, error bound, hostile payloads.
#[path = "wire/int4.rs"]
mod int4;
/// Payload conversion tests (kept apart to keep this file readable).
#[path = "wire/payload.rs"]
mod payload;

#[test]
fn drafts_ride_only_on_a_complete_frame_of_drafts_plus_one_rows() {
    let with = |complete: bool, token_count: u32, drafts: u8| Hidden {
        seq: 4,
        first_position: 9,
        token_count,
        complete,
        drafts,
        dtype: HiddenDtype::F32,
        payload: vec![0; token_count as usize * 4],
    };
    let ok = with(true, 4, 3);
    let bytes = encode(&Frame::Hidden(ok.clone()));
    assert_eq!(bytes[22], 3, "the drafts byte");
    assert_eq!(Frame::decode(&bytes), Ok(Frame::Hidden(ok.clone())));
    assert_eq!(ok.borrowed().sampled_rows(), 4);
    assert_eq!(with(true, 1, 0).borrowed().sampled_rows(), 1);
    assert_eq!(with(false, 5, 0).borrowed().sampled_rows(), 0);
    for (bad, value) in [
        (with(false, 4, 3), 3),                           // not complete
        (with(true, 5, 3), 3),                            // a prompt row before the drafts
        (with(true, 2, 3), 3),                            // fewer rows than drafts
        (with(true, 18, MAX_DRAFTS + 1), MAX_DRAFTS + 1), // over the cap
    ] {
        let want = WireError::InvalidFlag {
            field: "hidden.drafts",
            value,
        };
        assert_eq!(Frame::Hidden(bad.clone()).encode(), Err(want.clone()));
        // The same bytes built by hand are refused on decoding.
        let mut forged = encode(&Frame::Hidden(Hidden { drafts: 0, ..bad }));
        forged[22] = value;
        assert_eq!(Frame::decode(&forged), Err(want.clone()));
        assert_eq!(HiddenRef::decode(&forged, &Limits::default()), Err(want));
    }
}

#[test]
fn token_flags_and_draft_cap_are_checked() {
    let t = Token {
        seq: 1,
        input_seq: 2,
        token_id: 3,
        draft: true,
        last: true,
        draft_cap: MAX_DRAFTS,
        text: None,
    };
    let bytes = encode(&Frame::Token(t.clone()));
    assert_eq!(Frame::decode(&bytes), Ok(Frame::Token(t.clone())));
    // `last` without `draft`: a committed final token is followed by `Done` instead.
    let mut bad = bytes.clone();
    bad[24] = 0x02;
    assert_eq!(
        Frame::decode(&bad),
        Err(WireError::InvalidFlag {
            field: "token.flags",
            value: 2
        })
    );
    bad[24] = 0x04;
    assert!(Frame::decode(&bad).is_err(), "an unknown flag bit");
    let mut bad = bytes;
    bad[25] = MAX_DRAFTS + 1;
    assert_eq!(
        Frame::decode(&bad),
        Err(WireError::InvalidFlag {
            field: "token.draft_cap",
            value: MAX_DRAFTS + 1
        })
    );
    assert!(Frame::Token(Token {
        draft: false,
        ..t.clone()
    })
    .encode()
    .is_err());
    assert!(Frame::Token(Token { draft_cap: 17, ..t }).encode().is_err());
}
