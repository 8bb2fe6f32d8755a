//! The two error vocabularies of the wire: [`WireError`], what went wrong while encoding or
//! decoding bytes on *this* side, and [`ErrorCode`], the stable number an `Error` frame tells
//! the *other* side.
//!
//! [`WireError::error_code`] maps the first onto the second, so a receiver answers any bad
//! frame with one line. Codes are stable forever: a code is never renumbered or reused, new
//! codes only get new numbers, and a code this build does not know decodes to
//! [`ErrorCode::Unknown`] rather than failing.

use super::{FrameType, HiddenDtype};

/// Why bytes could not be encoded into, or decoded from, a frame.
///
/// Decoding never panics: every malformed input ends up as one of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame ended before a field did.
    #[error("frame truncated at byte {offset}: needed {needed} more bytes, {remaining} left")]
    Truncated {
        offset: usize,
        needed: usize,
        remaining: usize,
    },
    /// The first two bytes are not `b"TD"`.
    #[error("bad magic {0:02x?}, expected \"TD\" (54 44)")]
    BadMagic([u8; 2]),
    /// The version byte names a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The frame type byte is not one of the known frame types.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// A frame of another type was given to a decoder for one type.
    #[error("expected a {expected:?} frame, got {got:?}")]
    WrongFrameType { expected: FrameType, got: FrameType },
    /// Bytes were left after the last field of the frame.
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(usize),
    /// The whole frame is larger than the receiver's [`Limits`](super::Limits).
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    /// A string, byte string or list is longer than the protocol allows.
    #[error("{field} has length {len}, more than the maximum {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A field that must not be empty is.
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    /// A string field is not valid UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    /// A boolean or presence flag is neither 0 nor 1, or a reserved field is not 0.
    #[error("{field} has invalid value {value}")]
    InvalidFlag { field: &'static str, value: u8 },
    /// A number is out of the range the wire can carry (encoding) or allows (decoding).
    #[error("{field} is out of range")]
    OutOfRange { field: &'static str },
    /// The hidden-state dtype code is unknown.
    #[error("unknown hidden dtype code {0}")]
    UnknownDtype(u8),
    /// The `Done` finish-reason code is unknown.
    #[error("unknown finish reason code {0}")]
    UnknownFinishReason(u8),
    /// A hidden-state payload does not have the size its shape and dtype call for.
    #[error("hidden payload has {got} bytes, the shape calls for {expected}")]
    HiddenShape { expected: usize, got: usize },
    /// An `f32` slice to encode does not hold `rows × cols` values.
    #[error("{got} values given for a shape of {expected}")]
    ValueCount { expected: usize, got: usize },
    /// A hidden-state value (after dequantisation) is NaN or infinite.
    #[error("hidden value at row {row}, column {col} is not finite")]
    NonFinite { row: usize, col: usize },
    /// An int4 row's outlier index is not below the hidden size or not above the previous
    /// one (indices are strictly increasing, so none repeats).
    #[error("int4 outlier {slot} of row {row} has index {index}: out of range or not increasing")]
    BadOutlier {
        row: usize,
        slot: usize,
        index: usize,
    },
    /// A finite `f32` does not fit in the target dtype (it would become infinite).
    #[error("hidden value at row {row}, column {col} overflows {dtype:?}")]
    Overflow {
        dtype: HiddenDtype,
        row: usize,
        col: usize,
    },
}

impl WireError {
    /// The code to put in the `Error` frame sent back when a received frame fails this way.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::WrongFrameType { .. } => ErrorCode::UnexpectedFrame,
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::HiddenShape { .. } | Self::ValueCount { .. } => ErrorCode::HiddenShape,
            Self::NonFinite { .. } | Self::Overflow { .. } => ErrorCode::NonFinite,
            Self::Truncated { .. }
            | Self::BadMagic(_)
            | Self::UnknownFrameType(_)
            | Self::TrailingBytes(_)
            | Self::TooLong { .. }
            | Self::Empty { .. }
            | Self::InvalidUtf8 { .. }
            | Self::InvalidFlag { .. }
            | Self::OutOfRange { .. }
            | Self::UnknownDtype(_)
            | Self::BadOutlier { .. }
            | Self::UnknownFinishReason(_) => ErrorCode::MalformedFrame,
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $num:literal, $str:literal; )*) => {
        /// A stable error code, carried as a `u16` in `Error` frames.
        ///
        /// Numbers are grouped: `1xx` the frame or request is wrong (do not retry it as is),
        /// `2xx` the session cannot continue, `3xx` the cloud is busy or going away (retry
        /// later, possibly elsewhere), `5xx` a bug on the cloud.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name, )*
            /// A code this build does not know (sent by a newer peer). Never holds a known
            /// code: [`ErrorCode::from_u16`] maps those to their variants.
            Unknown(u16),
        }

        impl ErrorCode {
            /// Every known code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The number on the wire.
            pub fn as_u16(self) -> u16 {
                match self {
                    $( Self::$name => $num, )*
                    Self::Unknown(n) => n,
                }
            }

            /// The code for a wire number; total (unknown numbers give [`ErrorCode::Unknown`]).
            pub fn from_u16(n: u16) -> Self {
                match n {
                    $( $num => Self::$name, )*
                    n => Self::Unknown(n),
                }
            }

            /// The stable snake_case name (for logs, metrics and JSON errors).
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$name => $str, )*
                    Self::Unknown(_) => "unknown",
                }
            }
        }
    };
}

error_codes! {
    /// The frame could not be parsed: bad magic, truncated, trailing bytes, a length over
    /// its cap, invalid UTF-8, an unknown frame type or enum code.
    MalformedFrame = 100, "malformed_frame";
    /// The header's version byte is not one the cloud speaks.
    UnsupportedVersion = 101, "unsupported_version";
    /// A well-formed frame that is not allowed in the connection's current state (e.g.
    /// `Hidden` before `Opened`, or a second `Open`).
    UnexpectedFrame = 102, "unexpected_frame";
    /// `Open` names a model pair, split point, hidden size or dtype that the cloud does not
    /// serve.
    ManifestMismatch = 103, "manifest_mismatch";
    /// A `Hidden` payload does not match its token count, dtype and the session's hidden
    /// size, or its positions do not follow the previous chunk.
    HiddenShape = 104, "hidden_shape";
    /// A `Hidden` payload holds NaN or infinity (after dequantisation).
    NonFinite = 105, "non_finite";
    /// A sequence number is not the next one expected.
    SequenceOutOfOrder = 106, "sequence_out_of_order";
    /// The frame is larger than the cloud accepts.
    FrameTooLarge = 107, "frame_too_large";
    /// `Open`'s sampling parameters, max tokens or stop strings are out of range.
    BadSamplingParams = 108, "bad_sampling_params";
    /// The prompt plus `max_tokens` do not fit in the model's context.
    ContextLengthExceeded = 109, "context_length_exceeded";
    /// `Resume` names a session the cloud does not know (expired or never existed).
    UnknownSession = 200, "unknown_session";
    /// `Resume`'s token does not match the session's. Not sent by `tandem serve`, which
    /// answers a wrong token as it answers an unknown session (`unknown_session`), so that
    /// session ids cannot be probed.
    BadResumeToken = 201, "bad_resume_token";
    /// The session already finished; nothing more can be sent to it.
    Finished = 202, "finished";
    /// `Open`'s prompt id is not a live ticket of an accepted partner prompt: unknown,
    /// already used, or its prompt expired or was cancelled.
    BadPromptTicket = 203, "bad_prompt_ticket";
    /// The session waited for the device longer than the cloud allows (no `Hidden` answered
    /// its last token, or no prompt came after `Opened`); it is closed and its slot freed.
    IdleTimeout = 204, "idle_timeout";
    /// Another connection resumed this session (with its resume token); this connection no
    /// longer receives its frames.
    SessionTakenOver = 205, "session_taken_over";
    /// The device sends frames faster than it is allowed to.
    RateLimited = 300, "rate_limited";
    /// The cloud is at capacity and refused a new session (admission control).
    Overloaded = 301, "overloaded";
    /// A backing service (the session store) is unavailable.
    Unavailable = 302, "unavailable";
    /// The cloud replica is shutting down; resume on another one.
    ShuttingDown = 303, "shutting_down";
    /// Another replica, alive, holds the session: the message is the WebSocket URL to
    /// reconnect to and `Resume` there (the device should do so at once).
    Moved = 304, "moved";
    /// The device's user already holds as many sessions as the cloud allows one user
    /// (admission control); retry after one of them ends.
    TooManySessions = 305, "too_many_sessions";
    /// A bug on the cloud; the message says no more than that.
    Internal = 500, "internal";
}

impl ErrorCode {
    /// Whether the same request may succeed later (the `3xx` group).
    pub fn is_retryable(self) -> bool {
        (300..400).contains(&self.as_u16())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown(n) => write!(f, "unknown({n})"),
            known => f.write_str(known.as_str()),
        }
    }
}
