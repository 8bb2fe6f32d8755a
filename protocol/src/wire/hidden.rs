//! `Hidden` frames and their payloads: the dtype codes, a borrowing decoder, and the
//! conversions between `f32` rows and each wire dtype.
//!
//! A payload is `rows × cols` values (rows = tokens, cols = hidden size), row-major,
//! little-endian. `int8` payloads start with one `f32` scale per row, then the `i8` values.
//! [`HiddenRef::decode`] borrows the payload from the received buffer (no copy);
//! [`hidden_to_f32`] is the one place that turns a payload into numbers, and it checks the
//! byte length and rejects NaN and infinity. Both conversions are one linear pass; decoding
//! allocates nothing beyond `out`, whose size is bounded by the payload it was given.

use super::cursor::{checked_len, Reader, Writer};
use super::{read_header, write_header, FrameType, Limits, WireError};

/// How hidden-state values are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HiddenDtype {
    /// IEEE 754 binary32 (code 0), 4 bytes per value.
    F32,
    /// IEEE 754 binary16 (code 1), 2 bytes per value.
    F16,
    /// bfloat16, the top half of a binary32 (code 2), 2 bytes per value.
    Bf16,
    /// Symmetric per-token int8 (code 3): one `f32` scale per row, then 1 byte per value;
    /// value = `i8 × scale`.
    Int8,
}

impl HiddenDtype {
    /// Every dtype, in code order.
    pub const ALL: [HiddenDtype; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Int8];

    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 2,
            Self::Int8 => 3,
        }
    }

    /// The dtype for a wire byte.
    pub fn from_code(code: u8) -> Result<Self, WireError> {
        match code {
            0 => Ok(Self::F32),
            1 => Ok(Self::F16),
            2 => Ok(Self::Bf16),
            3 => Ok(Self::Int8),
            other => Err(WireError::UnknownDtype(other)),
        }
    }

    /// The lowercase name (`"f32"`, `"f16"`, `"bf16"`, `"int8"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        }
    }

    /// Bytes per value, not counting int8's per-row scales.
    pub fn value_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Int8 => 1,
        }
    }

    /// The payload size of `rows × cols` values, or `None` if it overflows `usize`.
    pub fn payload_len(self, rows: usize, cols: usize) -> Option<usize> {
        let values = rows.checked_mul(cols)?.checked_mul(self.value_bytes())?;
        match self {
            Self::Int8 => values.checked_add(rows.checked_mul(4)?),
            _ => Some(values),
        }
    }
}

impl std::fmt::Display for HiddenDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A chunk of hidden states, device → cloud, owning its payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Hidden {
    /// 0 for the session's first `Hidden` frame, then +1 per frame.
    pub seq: u64,
    /// Position (in the whole sequence) of the chunk's first token.
    pub first_position: u32,
    /// Rows in the payload.
    pub token_count: u32,
    /// The prompt is complete: after this chunk the device waits for a `Token`.
    pub complete: bool,
    /// Speculation: the last `drafts` rows are tokens the device drafted itself (at most
    /// [`MAX_DRAFTS`]); the cloud samples after every row from the first one it keeps before
    /// them. Only on a complete decode frame, with `token_count == drafts + 1`.
    pub drafts: u8,
    pub dtype: HiddenDtype,
    /// `token_count × hidden_size` values encoded as `dtype` (see [`f32_to_hidden`]).
    pub payload: Vec<u8>,
}

/// A `Hidden` frame whose payload borrows the received bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HiddenRef<'a> {
    pub seq: u64,
    pub first_position: u32,
    pub token_count: u32,
    pub complete: bool,
    pub drafts: u8,
    pub dtype: HiddenDtype,
    pub payload: &'a [u8],
}

/// Byte offset of the payload in a `Hidden` frame (see the layout table).
pub const HIDDEN_PAYLOAD_OFFSET: usize = 28;

const COMPLETE_FLAG: u8 = 0x01;

/// The most draft rows one `Hidden` frame may carry.
pub const MAX_DRAFTS: u8 = 16;

impl Hidden {
    /// A borrowing view of this frame.
    pub fn borrowed(&self) -> HiddenRef<'_> {
        HiddenRef {
            seq: self.seq,
            first_position: self.first_position,
            token_count: self.token_count,
            complete: self.complete,
            drafts: self.drafts,
            dtype: self.dtype,
            payload: &self.payload,
        }
    }
}

/// Drafts ride only on a complete frame that holds exactly the token before them and them.
fn check_drafts(drafts: u8, complete: bool, token_count: u32) -> Result<(), WireError> {
    if drafts == 0 {
        return Ok(());
    }
    if drafts > MAX_DRAFTS || !complete || token_count != u32::from(drafts) + 1 {
        return Err(WireError::InvalidFlag {
            field: "hidden.drafts",
            value: drafts,
        });
    }
    Ok(())
}

impl<'a> HiddenRef<'a> {
    /// Decodes a whole frame that must be a `Hidden` frame, without copying the payload.
    ///
    /// Checks the same things as [`Frame::decode_with`](super::Frame::decode_with); another
    /// frame type gives [`WireError::WrongFrameType`].
    pub fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, WireError> {
        limits.check(bytes.len())?;
        let mut r = Reader::new(bytes);
        let got = read_header(&mut r)?;
        if got != FrameType::Hidden {
            return Err(WireError::WrongFrameType {
                expected: FrameType::Hidden,
                got,
            });
        }
        let hidden = Self::decode_body(&mut r)?;
        r.finish()?;
        Ok(hidden)
    }

    pub(crate) fn decode_body(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let seq = r.u64()?;
        let first_position = r.u32()?;
        let token_count = r.u32()?;
        let dtype = HiddenDtype::from_code(r.u8()?)?;
        let flags = r.u8()?;
        if flags & !COMPLETE_FLAG != 0 {
            return Err(WireError::InvalidFlag {
                field: "hidden.flags",
                value: flags,
            });
        }
        let drafts = r.u8()?;
        let complete = flags & COMPLETE_FLAG != 0;
        check_drafts(drafts, complete, token_count)?;
        let value = r.u8()?;
        if value != 0 {
            return Err(WireError::InvalidFlag {
                field: "hidden.reserved",
                value,
            });
        }
        let payload = r.byte_slice("hidden.payload", u32::MAX as usize)?;
        Ok(Self {
            seq,
            first_position,
            token_count,
            complete,
            drafts,
            dtype,
            payload,
        })
    }

    /// Appends the whole frame (header included) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        // Check first so that a refused frame leaves `out` untouched.
        checked_len("hidden.payload", self.payload.len(), u32::MAX as usize)?;
        check_drafts(self.drafts, self.complete, self.token_count)?;
        out.reserve(HIDDEN_PAYLOAD_OFFSET + self.payload.len());
        let mut w = Writer::new(out);
        write_header(&mut w, FrameType::Hidden);
        self.encode_body(&mut w)
    }

    /// The whole frame as a new buffer.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    pub(crate) fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        check_drafts(self.drafts, self.complete, self.token_count)?;
        w.u64(self.seq);
        w.u32(self.first_position);
        w.u32(self.token_count);
        w.u8(self.dtype.code());
        w.u8(if self.complete { COMPLETE_FLAG } else { 0 });
        w.u8(self.drafts);
        w.u8(0);
        w.byte_slice("hidden.payload", self.payload, u32::MAX as usize)
    }

    /// Copies the payload into an owned [`Hidden`].
    pub fn to_hidden(&self) -> Hidden {
        Hidden {
            seq: self.seq,
            first_position: self.first_position,
            token_count: self.token_count,
            complete: self.complete,
            drafts: self.drafts,
            dtype: self.dtype,
            payload: self.payload.to_vec(),
        }
    }

    /// Rows the cloud samples after: the drafts and the row before them (1 for a plain
    /// decode step or a prompt's last chunk, 0 for a chunk that does not end the prompt).
    pub fn sampled_rows(&self) -> usize {
        if self.complete {
            usize::from(self.drafts) + 1
        } else {
            0
        }
    }

    /// Dequantises the payload as `token_count × hidden_size` values into `out`
    /// (see [`hidden_to_f32`]).
    pub fn to_f32(&self, hidden_size: usize, out: &mut Vec<f32>) -> Result<(), WireError> {
        hidden_to_f32(
            self.dtype,
            self.token_count as usize,
            hidden_size,
            self.payload,
            out,
        )
    }
}

/// Shows the payload's length, never its contents (activations stay out of logs).
fn debug_hidden(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    h: &HiddenRef<'_>,
) -> std::fmt::Result {
    f.debug_struct(name)
        .field("seq", &h.seq)
        .field("first_position", &h.first_position)
        .field("token_count", &h.token_count)
        .field("complete", &h.complete)
        .field("drafts", &h.drafts)
        .field("dtype", &h.dtype)
        .field("payload_len", &h.payload.len())
        .finish()
}

impl std::fmt::Debug for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_hidden(f, "Hidden", &self.borrowed())
    }
}

impl std::fmt::Debug for HiddenRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_hidden(f, "HiddenRef", self)
    }
}

impl From<HiddenRef<'_>> for Hidden {
    fn from(h: HiddenRef<'_>) -> Self {
        h.to_hidden()
    }
}

/// Decodes a `rows × cols` payload of `dtype` into `out` (its old contents are replaced).
///
/// Fails with [`WireError::HiddenShape`] unless `bytes.len()` is exactly
/// [`HiddenDtype::payload_len`]`(rows, cols)`, and with [`WireError::NonFinite`] (naming the
/// first bad value) if any decoded value is NaN or infinite — for int8 that includes a
/// non-finite scale and a product that overflows. On error `out` is left empty.
pub fn hidden_to_f32(
    dtype: HiddenDtype,
    rows: usize,
    cols: usize,
    bytes: &[u8],
    out: &mut Vec<f32>,
) -> Result<(), WireError> {
    out.clear();
    let expected = dtype.payload_len(rows, cols).ok_or(WireError::OutOfRange {
        field: "hidden rows × cols",
    })?;
    if bytes.len() != expected {
        return Err(WireError::HiddenShape {
            expected,
            got: bytes.len(),
        });
    }
    // `rows × cols ≤ bytes.len()`, so this allocation is bounded by the input.
    out.reserve(rows * cols);
    match dtype {
        HiddenDtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        HiddenDtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        HiddenDtype::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        HiddenDtype::Int8 => {
            let (scales, values) = bytes.split_at(rows * 4);
            if cols > 0 {
                for (scale, row) in scales.chunks_exact(4).zip(values.chunks_exact(cols)) {
                    let scale = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
                    out.extend(row.iter().map(|&q| f32::from(q as i8) * scale));
                }
            }
        }
    }
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        out.clear();
        return Err(WireError::NonFinite {
            row: i / cols,
            col: i % cols,
        });
    }
    Ok(())
}

/// Encodes `rows × cols` values (row-major) as `dtype`, appending the payload to `out`.
///
/// f16 and bf16 round to nearest even; int8 is symmetric per row: `scale = max|x| / 127`,
/// `q = round(x / scale)` (half away from zero) clamped to `[-127, 127]`, so each value comes
/// back within `scale / 2`. A row of zeros (or one whose scale underflows to 0) gets scale 0
/// and decodes to zeros.
///
/// Fails with [`WireError::ValueCount`] if `values.len() != rows × cols`, with
/// [`WireError::NonFinite`] on NaN or infinity, and with [`WireError::Overflow`] if a finite
/// value does not fit in f16/bf16. On error `out` is left as it was.
pub fn f32_to_hidden(
    dtype: HiddenDtype,
    rows: usize,
    cols: usize,
    values: &[f32],
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let expected = rows.checked_mul(cols).ok_or(WireError::OutOfRange {
        field: "hidden rows × cols",
    })?;
    if values.len() != expected {
        return Err(WireError::ValueCount {
            expected,
            got: values.len(),
        });
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(WireError::NonFinite {
            row: i / cols,
            col: i % cols,
        });
    }
    let start = out.len();
    out.reserve(dtype.payload_len(rows, cols).unwrap_or(0));
    let overflow = |i: usize| WireError::Overflow {
        dtype,
        row: i / cols,
        col: i % cols,
    };
    match dtype {
        HiddenDtype::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        HiddenDtype::F16 => {
            for (i, &v) in values.iter().enumerate() {
                let h = half::f16::from_f32(v);
                if h.is_infinite() {
                    out.truncate(start);
                    return Err(overflow(i));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        HiddenDtype::Bf16 => {
            for (i, &v) in values.iter().enumerate() {
                let h = half::bf16::from_f32(v);
                if h.is_infinite() {
                    out.truncate(start);
                    return Err(overflow(i));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        HiddenDtype::Int8 => encode_int8(rows, cols, values, out),
    }
    Ok(())
}

/// The int8 rule of [`f32_to_hidden`]; `values` are known finite.
fn encode_int8(rows: usize, cols: usize, values: &[f32], out: &mut Vec<u8>) {
    if cols == 0 {
        // Zero-width rows: each still has its (zero) scale.
        out.resize(out.len() + rows * 4, 0);
        return;
    }
    let scales: Vec<f32> = values
        .chunks_exact(cols)
        .map(|row| row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0)
        .collect();
    for s in &scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for (row, &scale) in values.chunks_exact(cols).zip(&scales) {
        if scale == 0.0 {
            out.resize(out.len() + cols, 0);
            continue;
        }
        out.extend(row.iter().map(|&v| {
            // In [-127, 127] after the clamp, so the cast is exact.
            let q = (v / scale).round().clamp(-127.0, 127.0) as i8;
            q as u8
        }));
    }
}
