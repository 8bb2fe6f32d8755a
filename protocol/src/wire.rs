//! The binary frames of the edge ↔ cloud WebSocket (DESIGN.md §5).
//!
//! Role: [`Frame`] is every message either side sends; [`Frame::encode`] and
//! [`Frame::decode`] are the only way bytes become frames and back. The hot path has a
//! borrowing decoder, [`HiddenRef::decode`], and the payload conversions [`hidden_to_f32`]
//! and [`f32_to_hidden`].
//!
//! Invariants: decoding is total (any byte string gives `Ok` or a typed [`WireError`], never a
//! panic), allocates at most a small constant factor of the input's size, and is canonical
//! (`decode(b) == Ok(f)` implies `encode(f) == b`). Encoding refuses what decoding would
//! refuse, so `decode(encode(f)) == f`.
//!
//! Costs: one pass over the input; `Frame::decode` copies a `Hidden` payload once,
//! `HiddenRef::decode` not at all.
//!
//! Layout: this file holds the header, the frames and their bodies; `wire/hidden.rs` the
//! `Hidden` frame and payload conversions; `wire/error.rs` [`WireError`] and [`ErrorCode`];
//! `wire/cursor.rs` the bounds-checked reader and writer. The byte-level specification
//! follows (it is also `docs/protocol.md` in the repository).
//!
//! ```
//! use tandem_protocol::wire::{peek_frame_type, Frame, FrameType, HiddenDtype, HiddenRef, Limits};
//!
//! // Cloud side: a `Ping` is 12 bytes…
//! let bytes = Frame::Ping { nonce: 0x0102_0304_0506_0708 }.encode()?;
//! assert_eq!(bytes, [0x54, 0x44, 2, 9, 8, 7, 6, 5, 4, 3, 2, 1]);
//!
//! // …and a `Hidden` frame is decoded without copying its payload.
//! let mut payload = Vec::new();
//! tandem_protocol::f32_to_hidden(HiddenDtype::F16, 1, 2, &[1.0, -2.0], &mut payload)?;
//! let frame = HiddenRef { seq: 0, first_position: 0, token_count: 1, complete: true,
//!                         drafts: 0, dtype: HiddenDtype::F16, payload: &payload }.encode()?;
//! assert_eq!(peek_frame_type(&frame)?, FrameType::Hidden);
//! let hidden = HiddenRef::decode(&frame, &Limits::default())?;
//! let mut rows = Vec::new();
//! hidden.to_f32(2, &mut rows)?;
//! assert_eq!(rows, [1.0, -2.0]);
//! # Ok::<(), tandem_protocol::WireError>(())
//! ```
//!
#![doc = include_str!("../../docs/protocol.md")]

mod cursor;
mod error;
mod hidden;

use crate::{FinishReason, SamplingParams};
use cursor::{checked_len, Reader, Writer};

pub use error::{ErrorCode, WireError};
pub use hidden::{
    f32_to_hidden, hidden_to_f32, Hidden, HiddenDtype, HiddenRef, HIDDEN_PAYLOAD_OFFSET,
    INT4_GROUP, INT4_MAX_COLS, INT4_OUTLIERS, MAX_DRAFTS,
};

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"TD";
/// The protocol version this build speaks (the third byte of every frame).
pub const VERSION: u8 = 2;

/// `Token` flags bit 0: sampled after a draft row.
const TOKEN_DRAFT: u8 = 0x01;
/// `Token` flags bit 1: ends the generation if it counts.
const TOKEN_LAST: u8 = 0x02;
/// Magic, version and frame type.
pub const HEADER_LEN: usize = 4;

/// The WebSocket read buffer each end should use, in bytes.
///
/// tungstenite's default is 128 KiB, and every read first zero-fills the buffer's free
/// space up to that size: a 2.3 KB decode `Hidden` frame cost a 128 KiB memset, and page
/// faults whenever the buffer was reallocated (the frame just read still held the old one).
/// On the server that was half of the I/O threads' CPU at 64 decoding devices. A frame
/// larger than this still arrives whole (the buffer grows to the frame's length); it only
/// takes more read calls.
pub const WS_READ_BUFFER_BYTES: usize = 16 << 10;

/// Longest model-pair manifest id, in bytes.
pub const MAX_MANIFEST_ID_LEN: usize = 64;
/// Most stop strings in one `Open`.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_STRING_LEN: usize = 256;
/// Longest prompt id, in bytes.
pub const MAX_PROMPT_ID_LEN: usize = 128;
/// Longest `traceparent`, in bytes.
pub const MAX_TRACEPARENT_LEN: usize = 256;
/// Longest `Token` text delta, in bytes.
pub const MAX_TEXT_DELTA_LEN: usize = 4096;
/// Longest `Error` message, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;
/// Default [`Limits::max_frame_bytes`]: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 << 20;

/// What a receiver accepts beyond the protocol's fixed caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole frame, header included (in practice: the largest `Hidden` chunk).
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

impl Limits {
    pub(crate) fn check(&self, len: usize) -> Result<(), WireError> {
        if len > self.max_frame_bytes {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        Ok(())
    }
}

/// The fourth byte of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// Device → cloud, first frame of a new session.
    Open = 0x01,
    /// Cloud → device, answer to `Open` or `Resume`.
    Opened = 0x02,
    /// Device → cloud, a chunk of hidden states.
    Hidden = 0x03,
    /// Cloud → device, one generated token.
    Token = 0x04,
    /// Cloud → device, the generation ended.
    Done = 0x05,
    /// Either way, something went wrong.
    Error = 0x06,
    /// Device → cloud, first frame of a reconnection.
    Resume = 0x07,
    /// Device → cloud, stop the generation now.
    Cancel = 0x08,
    /// Either way, liveness probe.
    Ping = 0x09,
    /// Either way, answer to `Ping`.
    Pong = 0x0a,
}

impl FrameType {
    /// Every frame type, in code order.
    pub const ALL: [FrameType; 10] = [
        Self::Open,
        Self::Opened,
        Self::Hidden,
        Self::Token,
        Self::Done,
        Self::Error,
        Self::Resume,
        Self::Cancel,
        Self::Ping,
        Self::Pong,
    ];

    /// The byte on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The frame type for a wire byte.
    pub fn from_code(code: u8) -> Result<Self, WireError> {
        Self::ALL
            .into_iter()
            .find(|t| t.code() == code)
            .ok_or(WireError::UnknownFrameType(code))
    }
}

/// A cloud session's id: 128 random bits (unguessable; `tandem serve` never issues 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u128);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The 32 random bytes that prove a reconnecting device owns a session.
///
/// `Debug` does not print it; compare received tokens with [`ResumeToken::verify`].
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeToken(pub [u8; 32]);

impl ResumeToken {
    /// Constant-time comparison (the time taken does not depend on where they differ).
    pub fn verify(&self, presented: &ResumeToken) -> bool {
        self.0
            .iter()
            .zip(presented.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeToken(..)")
    }
}

/// The id of an edge/cloud manifest pair (today its hex content hash): 1 to
/// [`MAX_MANIFEST_ID_LEN`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ManifestId(Vec<u8>);

impl ManifestId {
    /// Fails with [`WireError::Empty`] or [`WireError::TooLong`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, WireError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(WireError::Empty { field: "manifest" });
        }
        checked_len("manifest", bytes.len(), MAX_MANIFEST_ID_LEN)?;
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The id as text, if it is UTF-8 (a hex id always is).
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl TryFrom<&str> for ManifestId {
    type Error = WireError;
    fn try_from(s: &str) -> Result<Self, WireError> {
        Self::new(s.as_bytes())
    }
}

/// Device → cloud: start a session.
#[derive(Clone, Debug, PartialEq)]
pub struct Open {
    /// Which edge/cloud manifest pair the device runs.
    pub manifest: ManifestId,
    /// Split point `k`: the device ran the embedding and layers `[0, k)`.
    pub split: u32,
    /// Columns of every hidden-state row.
    pub hidden_size: u32,
    /// The dtype every `Hidden` frame of the session uses.
    pub dtype: HiddenDtype,
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Stop strings (at most [`MAX_STOP_STRINGS`]).
    pub stop: Vec<String>,
    /// The ticket of an accepted partner prompt (`tkt_` + 64 hex digits, from the REST
    /// inbox's accept), if this generation answers one: the cloud then applies that prompt's
    /// `max_tokens` and sampling and stores the output as the user's result.
    pub prompt_id: Option<String>,
    /// W3C trace context, to join the device's trace.
    pub traceparent: Option<String>,
}

/// Cloud → device: the session exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub session: SessionId,
    /// Needed to `Resume`; keep it secret.
    pub resume_token: ResumeToken,
    /// Sequence number of the first `Hidden` the cloud wants next: 0 for a new session; on
    /// `Resume`, the next one it expects when it kept the session's state, or 0 when it lost
    /// it (another replica, a restart): the device then replays every `Hidden` from 0.
    pub next_hidden_seq: u64,
}

/// Cloud → device: one generated token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// 0 for the session's first token, then +1 per token. A token sampled after a draft row
    /// has the number it gets if the drafts before it are accepted; when they are not, the
    /// tokens of the next answer reuse those numbers.
    pub seq: u64,
    /// Sequence number of the `Hidden` frame this token answers (a device that already sent
    /// a later complete frame ignores it: see docs/protocol.md §6).
    pub input_seq: u64,
    pub token_id: u32,
    /// Sampled after one of the device's draft rows: it counts only if every draft up to and
    /// including that row equals the token sampled before it.
    pub draft: bool,
    /// A draft token that ends the generation (end of sequence, stop string, token limit)
    /// if it counts; the cloud samples nothing after it, and sends `Done` once the device's
    /// next `Hidden` frame shows that it counts.
    pub last: bool,
    /// The most drafts the cloud wants in the device's next `Hidden` frame (0: do not
    /// speculate).
    pub draft_cap: u8,
    /// The text this token completes, if any (UTF-8 held back until it is whole, or by a
    /// possible stop string, comes with a later token).
    pub text: Option<String>,
}

/// Why a generation ended, as `Done` says it: a model-side [`FinishReason`] or the device's
/// `Cancel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoneReason {
    Finished(FinishReason),
    /// The device sent `Cancel`.
    Cancelled,
}

impl DoneReason {
    /// The stable snake_case name: `eos`, `stop_string`, `length` or `cancelled`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Finished(FinishReason::Eos) => "eos",
            Self::Finished(FinishReason::StopString) => "stop_string",
            Self::Finished(FinishReason::Length) => "length",
            Self::Cancelled => "cancelled",
        }
    }

    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::Finished(FinishReason::Eos) => 0,
            Self::Finished(FinishReason::StopString) => 1,
            Self::Finished(FinishReason::Length) => 2,
            Self::Cancelled => 3,
        }
    }

    /// The reason for a wire byte.
    pub fn from_code(code: u8) -> Result<Self, WireError> {
        match code {
            0 => Ok(Self::Finished(FinishReason::Eos)),
            1 => Ok(Self::Finished(FinishReason::StopString)),
            2 => Ok(Self::Finished(FinishReason::Length)),
            3 => Ok(Self::Cancelled),
            other => Err(WireError::UnknownFinishReason(other)),
        }
    }
}

impl From<FinishReason> for DoneReason {
    fn from(r: FinishReason) -> Self {
        Self::Finished(r)
    }
}

/// Cloud → device: the generation ended; no more frames follow for this session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub reason: DoneReason,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// Either way: a stable code and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// The sequence number of the frame the error is about, if any.
    pub seq: Option<u64>,
    /// For people; never parse it. Never carries prompt text or internals.
    pub message: String,
    /// How long to wait before trying again, in milliseconds: sent with admission refusals
    /// (`overloaded`, `too_many_sessions`). On the wire it follows the message and is left
    /// out (no bytes at all) when `None`, so frames without it are as before.
    pub retry_after_ms: Option<u32>,
}

/// Device → cloud: reattach to a session after a reconnection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub session: SessionId,
    pub resume_token: ResumeToken,
    /// The `seq` of the last `Token` the device received (`None`: none yet); the cloud
    /// resends every later one.
    pub last_token_seq: Option<u64>,
}

/// Every frame of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Open(Open),
    Opened(Opened),
    Hidden(Hidden),
    Token(Token),
    Done(Done),
    Error(ErrorFrame),
    Resume(Resume),
    /// Device → cloud: end the generation early; the cloud answers
    /// `Done { reason: Cancelled }`.
    Cancel,
    Ping {
        nonce: u64,
    },
    /// Carries the nonce of the `Ping` it answers.
    Pong {
        nonce: u64,
    },
}

/// Reads and checks magic and version; returns the frame type.
pub(crate) fn read_header(r: &mut Reader<'_>) -> Result<FrameType, WireError> {
    let magic = r.take(2)?;
    if magic != MAGIC {
        return Err(WireError::BadMagic([magic[0], magic[1]]));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    FrameType::from_code(r.u8()?)
}

pub(crate) fn write_header(w: &mut Writer<'_>, t: FrameType) {
    w.raw(&MAGIC);
    w.u8(VERSION);
    w.u8(t.code());
}

/// The type of the frame in `bytes`, checking only the 4-byte header.
///
/// Lets a receiver send `Hidden` frames to [`HiddenRef::decode`] and the rest to
/// [`Frame::decode`].
pub fn peek_frame_type(bytes: &[u8]) -> Result<FrameType, WireError> {
    read_header(&mut Reader::new(bytes))
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Open(_) => FrameType::Open,
            Self::Opened(_) => FrameType::Opened,
            Self::Hidden(_) => FrameType::Hidden,
            Self::Token(_) => FrameType::Token,
            Self::Done(_) => FrameType::Done,
            Self::Error(_) => FrameType::Error,
            Self::Resume(_) => FrameType::Resume,
            Self::Cancel => FrameType::Cancel,
            Self::Ping { .. } => FrameType::Ping,
            Self::Pong { .. } => FrameType::Pong,
        }
    }

    /// Decodes one whole frame under the default [`Limits`].
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        Self::decode_with(bytes, &Limits::default())
    }

    /// Decodes one whole frame; bytes after it are an error.
    pub fn decode_with(bytes: &[u8], limits: &Limits) -> Result<Self, WireError> {
        limits.check(bytes.len())?;
        let mut r = Reader::new(bytes);
        let frame = match read_header(&mut r)? {
            FrameType::Open => Self::Open(decode_open(&mut r)?),
            FrameType::Opened => Self::Opened(Opened {
                session: SessionId(r.u128()?),
                resume_token: ResumeToken(r.bytes32()?),
                next_hidden_seq: r.u64()?,
            }),
            FrameType::Hidden => Self::Hidden(HiddenRef::decode_body(&mut r)?.to_hidden()),
            FrameType::Token => Self::Token({
                let seq = r.u64()?;
                let input_seq = r.u64()?;
                let token_id = r.u32()?;
                let flags = r.u8()?;
                if flags & !(TOKEN_DRAFT | TOKEN_LAST) != 0
                    || (flags & TOKEN_LAST != 0 && flags & TOKEN_DRAFT == 0)
                {
                    return Err(WireError::InvalidFlag {
                        field: "token.flags",
                        value: flags,
                    });
                }
                let draft_cap = r.u8()?;
                if draft_cap > MAX_DRAFTS {
                    return Err(WireError::InvalidFlag {
                        field: "token.draft_cap",
                        value: draft_cap,
                    });
                }
                Token {
                    seq,
                    input_seq,
                    token_id,
                    draft: flags & TOKEN_DRAFT != 0,
                    last: flags & TOKEN_LAST != 0,
                    draft_cap,
                    text: r.option("token.text?", |r| {
                        r.string("token.text", MAX_TEXT_DELTA_LEN)
                    })?,
                }
            }),
            FrameType::Done => Self::Done(Done {
                reason: DoneReason::from_code(r.u8()?)?,
                prompt_tokens: r.u32()?,
                output_tokens: r.u32()?,
            }),
            FrameType::Error => Self::Error(ErrorFrame {
                code: ErrorCode::from_u16(r.u16()?),
                seq: r.option("error.seq?", Reader::u64)?,
                message: r.string("error.message", MAX_ERROR_MESSAGE_LEN)?,
                retry_after_ms: if r.at_end() { None } else { Some(r.u32()?) },
            }),
            FrameType::Resume => Self::Resume(Resume {
                session: SessionId(r.u128()?),
                resume_token: ResumeToken(r.bytes32()?),
                last_token_seq: r.option("resume.last_token_seq?", Reader::u64)?,
            }),
            FrameType::Cancel => Self::Cancel,
            FrameType::Ping => Self::Ping { nonce: r.u64()? },
            FrameType::Pong => Self::Pong { nonce: r.u64()? },
        };
        r.finish()?;
        Ok(frame)
    }

    /// The frame as a new buffer.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the frame to `out`. Fails (leaving `out` as it was) if a field is over its
    /// cap, or `top_k` does not fit in a `u32`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        let result = self.write(&mut Writer::new(out));
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        write_header(w, self.frame_type());
        match self {
            Self::Open(open) => encode_open(w, open)?,
            Self::Opened(o) => {
                w.u128(o.session.0);
                w.raw(&o.resume_token.0);
                w.u64(o.next_hidden_seq);
            }
            Self::Hidden(h) => h.borrowed().encode_body(w)?,
            Self::Token(t) => {
                if (t.last && !t.draft) || t.draft_cap > MAX_DRAFTS {
                    return Err(WireError::InvalidFlag {
                        field: "token.flags",
                        value: u8::from(t.draft) | u8::from(t.last) << 1,
                    });
                }
                w.u64(t.seq);
                w.u64(t.input_seq);
                w.u32(t.token_id);
                w.u8(if t.draft { TOKEN_DRAFT } else { 0 } | if t.last { TOKEN_LAST } else { 0 });
                w.u8(t.draft_cap);
                w.option(t.text.as_deref(), |w, s| {
                    w.string("token.text", s, MAX_TEXT_DELTA_LEN)
                })?;
            }
            Self::Done(d) => {
                w.u8(d.reason.code());
                w.u32(d.prompt_tokens);
                w.u32(d.output_tokens);
            }
            Self::Error(e) => {
                w.u16(e.code.as_u16());
                w.option(e.seq, |w, s| {
                    w.u64(s);
                    Ok(())
                })?;
                w.string("error.message", &e.message, MAX_ERROR_MESSAGE_LEN)?;
                if let Some(ms) = e.retry_after_ms {
                    w.u32(ms);
                }
            }
            Self::Resume(r) => {
                w.u128(r.session.0);
                w.raw(&r.resume_token.0);
                w.option(r.last_token_seq, |w, s| {
                    w.u64(s);
                    Ok(())
                })?;
            }
            Self::Cancel => {}
            Self::Ping { nonce } | Self::Pong { nonce } => w.u64(*nonce),
        }
        Ok(())
    }
}

fn decode_open(r: &mut Reader<'_>) -> Result<Open, WireError> {
    let manifest = ManifestId::new(r.byte_slice("manifest", MAX_MANIFEST_ID_LEN)?)?;
    let split = r.u32()?;
    let hidden_size = r.u32()?;
    let dtype = HiddenDtype::from_code(r.u8()?)?;
    let sampling = SamplingParams {
        temperature: r.f32()?,
        top_k: r.option("sampling.top_k?", |r| r.u32().map(|k| k as usize))?,
        top_p: r.option("sampling.top_p?", Reader::f32)?,
        min_p: r.option("sampling.min_p?", Reader::f32)?,
        seed: r.u64()?,
        repetition_penalty: r.f32()?,
    };
    let max_tokens = r.u32()?;
    let count = r.u32()? as usize;
    if count > MAX_STOP_STRINGS {
        return Err(WireError::TooLong {
            field: "stop",
            len: count,
            max: MAX_STOP_STRINGS,
        });
    }
    let mut stop = Vec::with_capacity(count);
    for _ in 0..count {
        stop.push(r.string("stop[i]", MAX_STOP_STRING_LEN)?);
    }
    Ok(Open {
        manifest,
        split,
        hidden_size,
        dtype,
        sampling,
        max_tokens,
        stop,
        prompt_id: r.option("prompt_id?", |r| r.string("prompt_id", MAX_PROMPT_ID_LEN))?,
        traceparent: r.option("traceparent?", |r| {
            r.string("traceparent", MAX_TRACEPARENT_LEN)
        })?,
    })
}

fn encode_open(w: &mut Writer<'_>, o: &Open) -> Result<(), WireError> {
    // A `ManifestId` is valid by construction; the writer checks the cap anyway.
    w.byte_slice("manifest", o.manifest.as_bytes(), MAX_MANIFEST_ID_LEN)?;
    w.u32(o.split);
    w.u32(o.hidden_size);
    w.u8(o.dtype.code());
    let s = &o.sampling;
    w.f32(s.temperature);
    w.option(s.top_k, |w, k| {
        let k = u32::try_from(k).map_err(|_| WireError::OutOfRange {
            field: "sampling.top_k",
        })?;
        w.u32(k);
        Ok(())
    })?;
    for p in [s.top_p, s.min_p] {
        w.option(p, |w, p| {
            w.f32(p);
            Ok(())
        })?;
    }
    w.u64(s.seed);
    w.f32(s.repetition_penalty);
    w.u32(o.max_tokens);
    w.u32(checked_len("stop", o.stop.len(), MAX_STOP_STRINGS)?);
    for s in &o.stop {
        w.string("stop[i]", s, MAX_STOP_STRING_LEN)?;
    }
    w.option(o.prompt_id.as_deref(), |w, s| {
        w.string("prompt_id", s, MAX_PROMPT_ID_LEN)
    })?;
    w.option(o.traceparent.as_deref(), |w, s| {
        w.string("traceparent", s, MAX_TRACEPARENT_LEN)
    })
}
