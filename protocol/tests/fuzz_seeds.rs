//! The fuzz targets' committed seeds (`protocol/fuzz/seeds/<target>/`) run through the same
//! property functions the fuzzer calls ([`tandem_protocol::fuzzing`]), so every `cargo test`
//! re-checks them without a nightly toolchain.
//!
//! The seeds are written by `cargo test -p tandem-protocol --test fuzz_seeds -- --ignored`
//! (one frame of every type, and `Open` frames that pass and fail validation).

use std::path::{Path, PathBuf};

use tandem_protocol::fuzzing;
use tandem_protocol::wire::{
    f32_to_hidden, Done, DoneReason, ErrorCode, ErrorFrame, Frame, Hidden, HiddenDtype, ManifestId,
    Open, Opened, Resume, ResumeToken, SessionId, Token,
};
use tandem_protocol::{FinishReason, SamplingParams};

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
}

fn read_seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = seeds_dir(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            let bytes = std::fs::read(&path).expect("seed");
            (path.display().to_string(), bytes)
        })
        .collect();
    seeds.sort();
    seeds
}

fn open(manifest: &str) -> Open {
    Open {
        manifest: ManifestId::try_from(manifest).expect("id"),
        split: 2,
        hidden_size: 64,
        dtype: HiddenDtype::F16,
        sampling: SamplingParams::default(),
        max_tokens: 32,
        stop: Vec::new(),
        prompt_id: None,
        traceparent: None,
    }
}

fn hidden(dtype: HiddenDtype, rows: u32, cols: usize) -> Frame {
    let values: Vec<f32> = (0..rows as usize * cols)
        .map(|i| (i as f32 - 3.0) * 0.25)
        .collect();
    let mut payload = Vec::new();
    f32_to_hidden(dtype, rows as usize, cols, &values, &mut payload).expect("encodes");
    Frame::Hidden(Hidden {
        seq: 3,
        first_position: 7,
        token_count: rows,
        complete: true,
        drafts: 0,
        dtype,
        payload,
    })
}

/// One frame of every type, with optional fields both present and absent.
fn frame_seeds() -> Vec<(&'static str, Frame)> {
    vec![
        ("open", Frame::Open(open(fuzzing::SERVED_MANIFEST))),
        (
            "open_full",
            Frame::Open(Open {
                sampling: SamplingParams {
                    temperature: 0.7,
                    top_k: Some(40),
                    top_p: Some(0.9),
                    min_p: Some(0.05),
                    seed: 7,
                    repetition_penalty: 1.1,
                },
                stop: vec!["\n\n".into(), "END".into()],
                prompt_id: Some(format!("tkt_{}", "ab".repeat(32))),
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                ..open(fuzzing::SERVED_MANIFEST)
            }),
        ),
        (
            "opened",
            Frame::Opened(Opened {
                session: SessionId(42),
                resume_token: ResumeToken([9; 32]),
                next_hidden_seq: 3,
            }),
        ),
        ("hidden_f32", hidden(HiddenDtype::F32, 2, 4)),
        ("hidden_f16", hidden(HiddenDtype::F16, 1, 8)),
        ("hidden_bf16", hidden(HiddenDtype::Bf16, 3, 2)),
        ("hidden_int8", hidden(HiddenDtype::Int8, 2, 3)),
        ("hidden_int4", hidden(HiddenDtype::Int4, 2, 9)),
        ("hidden_int4_groups", hidden(HiddenDtype::Int4, 1, 33)),
        ("hidden_drafts", {
            let Frame::Hidden(mut h) = hidden(HiddenDtype::F16, 4, 2) else {
                unreachable!("hidden() builds a Hidden frame")
            };
            h.drafts = 3;
            Frame::Hidden(h)
        }),
        (
            "token",
            Frame::Token(Token {
                seq: 5,
                input_seq: 4,
                token_id: 1234,
                draft: true,
                last: true,
                draft_cap: 3,
                text: Some("héllo".into()),
            }),
        ),
        (
            "token_no_text",
            Frame::Token(Token {
                seq: 0,
                input_seq: 0,
                token_id: 0,
                draft: false,
                last: false,
                draft_cap: 0,
                text: None,
            }),
        ),
        (
            "done",
            Frame::Done(Done {
                reason: DoneReason::Finished(FinishReason::StopString),
                prompt_tokens: 12,
                output_tokens: 30,
            }),
        ),
        (
            "error",
            Frame::Error(ErrorFrame {
                code: ErrorCode::Moved,
                seq: Some(4),
                message: "ws://127.0.0.1:1/v1/edge/ws".into(),
                retry_after_ms: None,
            }),
        ),
        (
            "resume",
            Frame::Resume(Resume {
                session: SessionId(42),
                resume_token: ResumeToken([9; 32]),
                last_token_seq: Some(17),
            }),
        ),
        ("cancel", Frame::Cancel),
        ("ping", Frame::Ping { nonce: 1 }),
        ("pong", Frame::Pong { nonce: u64::MAX }),
    ]
}

/// `Open` frames for `open_check`, each behind a control byte (see
/// [`fuzzing::open_check`]): accepted ones, and each kind of refusal.
fn open_seeds() -> Vec<(&'static str, u8, Open)> {
    let random = SamplingParams {
        temperature: 0.8,
        top_k: Some(0),
        top_p: Some(1.0),
        min_p: Some(0.0),
        seed: 1,
        repetition_penalty: 1.0,
    };
    vec![
        ("valid_greedy", 3 | (1 << 2), open("pair-a")),
        (
            "valid_random",
            3 | (2 << 2),
            Open {
                sampling: random.clone(),
                stop: vec!["x".into()],
                ..open("pair-a")
            },
        ),
        (
            "served_manifest",
            0b10 | (1 << 2),
            open(fuzzing::SERVED_MANIFEST),
        ),
        ("other_manifest", 0b10 | (1 << 2), open("pair-b")),
        (
            "other_shape",
            1 | (1 << 2),
            Open {
                split: 5,
                ..open("pair-a")
            },
        ),
        (
            "zero_tokens",
            3,
            Open {
                max_tokens: 0,
                ..open("pair-a")
            },
        ),
        (
            "over_cap",
            3,
            Open {
                max_tokens: 2,
                ..open("pair-a")
            },
        ),
        (
            "nan_temperature",
            3 | (4 << 2),
            Open {
                sampling: SamplingParams {
                    temperature: f32::NAN,
                    ..random.clone()
                },
                ..open("pair-a")
            },
        ),
        (
            "bad_top_p",
            3 | (4 << 2),
            Open {
                sampling: SamplingParams {
                    top_p: Some(1.5),
                    ..random
                },
                ..open("pair-a")
            },
        ),
    ]
}

#[test]
fn decode_frame_seeds_hold() {
    let seeds = read_seeds("decode_frame");
    assert!(seeds.len() >= frame_seeds().len(), "{} seeds", seeds.len());
    for (name, bytes) in seeds {
        eprintln!("{name}");
        fuzzing::decode_frame(&bytes);
    }
    // The truncated and corrupted forms too.
    for (_, frame) in frame_seeds() {
        let bytes = frame.encode().expect("encodes");
        for cut in 0..bytes.len() {
            fuzzing::decode_frame(&bytes[..cut]);
        }
        let mut flipped = bytes.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            fuzzing::decode_frame(&flipped);
            flipped[i] ^= 0xff;
        }
    }
}

#[test]
fn open_check_seeds_hold() {
    let seeds = read_seeds("open_check");
    assert!(seeds.len() >= open_seeds().len(), "{} seeds", seeds.len());
    for (name, bytes) in seeds {
        eprintln!("{name}");
        fuzzing::open_check(&bytes);
    }
}

/// Writes the seed corpora (run when the frames change; the files are committed).
#[test]
#[ignore]
fn write_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = seeds_dir(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };
    for (name, frame) in frame_seeds() {
        write("decode_frame", name, &frame.encode().expect("encodes"));
    }
    for (name, control, o) in open_seeds() {
        let mut bytes = vec![control];
        bytes.extend(Frame::Open(o).encode().expect("encodes"));
        write("open_check", name, &bytes);
    }
}
