//! `Hidden` frames and their payloads: the dtype codes, a borrowing decoder, and the
//! conversions between `f32` rows and each wire dtype.
//!
//! A payload is `rows × cols` values (rows = tokens, cols = hidden size), row-major,
//! little-endian. `int8` payloads start with one `f32` scale per row, then the `i8` values.
//! `int4` payloads are one block per row: the row's largest values exactly (index and f16),
//! then an f16 scale per group of [`INT4_GROUP`] values, then the 4-bit values (see
//! [`f32_to_hidden`] for the rule and its error bound).
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
    /// 4-bit groups with exact outliers (code 4), per row: [`INT4_OUTLIERS`] `(u16 index, f16
    /// value)` pairs, one f16 scale per [`INT4_GROUP`] values, then two values per byte;
    /// value = `(nibble − 8) × scale of its group`, or the outlier's value at its index.
    Int4,
}

/// Values per int4 group (one f16 scale each).
pub const INT4_GROUP: usize = 32;

/// Outliers per int4 row (fewer when the row is narrower): the values of largest magnitude,
/// sent as f16 so that a row's massive activations do not set its groups' scales.
pub const INT4_OUTLIERS: usize = 8;

/// The widest row int4 can index (outlier indices are `u16`).
pub const INT4_MAX_COLS: usize = 1 << 16;

impl HiddenDtype {
    /// Every dtype, in code order.
    pub const ALL: [HiddenDtype; 5] = [Self::F32, Self::F16, Self::Bf16, Self::Int8, Self::Int4];

    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 2,
            Self::Int8 => 3,
            Self::Int4 => 4,
        }
    }

    /// The dtype for a wire byte.
    pub fn from_code(code: u8) -> Result<Self, WireError> {
        match code {
            0 => Ok(Self::F32),
            1 => Ok(Self::F16),
            2 => Ok(Self::Bf16),
            3 => Ok(Self::Int8),
            4 => Ok(Self::Int4),
            other => Err(WireError::UnknownDtype(other)),
        }
    }

    /// The lowercase name (`"f32"`, `"f16"`, `"bf16"`, `"int8"`, `"int4"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        }
    }

    /// The dtype for its lowercase name ([`HiddenDtype::as_str`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bits per value, not counting int8's per-row scales nor int4's scales and outliers.
    pub fn value_bits(self) -> usize {
        match self {
            Self::F32 => 32,
            Self::F16 | Self::Bf16 => 16,
            Self::Int8 => 8,
            Self::Int4 => 4,
        }
    }

    /// The payload size of `rows × cols` values, or `None` if it overflows `usize`.
    pub fn payload_len(self, rows: usize, cols: usize) -> Option<usize> {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => {
                rows.checked_mul(cols)?.checked_mul(self.value_bits() / 8)
            }
            Self::Int8 => rows.checked_mul(cols.checked_add(4)?),
            Self::Int4 => rows.checked_mul(int4_row_len(cols)),
        }
    }
}

impl std::fmt::Display for HiddenDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outliers in an int4 row of `cols` values.
fn int4_outliers(cols: usize) -> usize {
    cols.min(INT4_OUTLIERS)
}

/// Bytes of one int4 row: outliers (4 bytes each), group scales (2 bytes each), nibbles.
/// Cannot overflow: every term is at most `cols`, and `cols / 2 + cols / 16 + 33 ≤ usize::MAX`.
fn int4_row_len(cols: usize) -> usize {
    4 * int4_outliers(cols) + 2 * cols.div_ceil(INT4_GROUP) + cols.div_ceil(2)
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
    // `rows × cols ≤ 2 · bytes.len()` (int4 packs two values a byte), so this allocation is
    // bounded by the input.
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
        HiddenDtype::Int4 => {
            if let Err(e) = decode_int4(cols, bytes, out) {
                out.clear();
                return Err(e);
            }
        }
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
/// int4, per row: the `K = min(cols, INT4_OUTLIERS)` values of largest magnitude (ties to
/// the lower index) are outliers, sent as f16 (round to nearest) at their indices; every
/// other value `x` of a group `g` of [`INT4_GROUP`] columns becomes
/// `q = round(x / s_g)` in `[-7, 7]`, where `s_g` is `m_g / 7` rounded *up* to an f16 and
/// `m_g` the largest `|x|` of the group's non-outliers (outliers count as 0 there). Error:
///
/// * an outlier: `|x̂ − x| ≤ |x| · 2⁻¹¹ + 2⁻²⁵` (f16's half ulp, subnormals included);
/// * any other value: `|x̂ − x| ≤ s_g / 2 ≤ (1 + 2⁻¹⁰) · m_g / 14 + 2⁻²⁵`, and
///   `m_g ≤ min(M_g, R_{K+1})`, where `M_g` is the group's largest `|x|` and `R_{K+1}` the
///   row's `(K+1)`-th largest `|x|`: the outliers take a row's massive activations out of
///   every scale. (f32 rounding in `x / s_g` adds at most `7 · 2⁻²⁴ · s_g`; `q × s_g` is exact.)
///
/// Fails with [`WireError::ValueCount`] if `values.len() != rows × cols`, with
/// [`WireError::NonFinite`] on NaN or infinity, and with [`WireError::Overflow`] if a finite
/// value does not fit in f16/bf16 (for int4: an outlier beyond f16's range; no group scale
/// can overflow then, since `m_g` is at most the smallest outlier). int4 refuses rows wider than [`INT4_MAX_COLS`]
/// ([`WireError::OutOfRange`]). On error `out` is left as it was.
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
        HiddenDtype::Int4 => {
            if let Err(e) = encode_int4(cols, values, out) {
                out.truncate(start);
                return Err(e);
            }
        }
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

/// The smallest f16 that is ≥ `v` (`v` finite and ≥ 0); infinite if `v` exceeds f16's range.
fn f16_at_least(v: f32) -> half::f16 {
    let h = half::f16::from_f32(v);
    if h.to_f32() >= v {
        h
    } else {
        // Positive and finite below `v`: the next encoding up is the next larger value (the
        // one after 65504 is infinity).
        half::f16::from_bits(h.to_bits() + 1)
    }
}

/// Sets `top` to the `(index, |x|)` of `row`'s `k` values of largest magnitude (ties: the
/// lower index), in index order. O(len · k), with k at most [`INT4_OUTLIERS`].
fn largest(row: &[f32], k: usize, top: &mut Vec<(usize, f32)>) {
    top.clear();
    for (i, v) in row.iter().enumerate() {
        let a = v.abs();
        if top.len() == k && top.last().is_some_and(|&(_, b)| b >= a) {
            continue;
        }
        // After the equal ones already kept, so the lower index wins a tie.
        let at = top.iter().position(|&(_, b)| b < a).unwrap_or(top.len());
        top.insert(at, (i, a));
        top.truncate(k);
    }
    top.sort_unstable_by_key(|&(i, _)| i);
}

/// The int4 rule of [`f32_to_hidden`]; `values` are known finite and `rows × cols` long.
fn encode_int4(cols: usize, values: &[f32], out: &mut Vec<u8>) -> Result<(), WireError> {
    if cols == 0 {
        return Ok(());
    }
    if cols > INT4_MAX_COLS {
        return Err(WireError::OutOfRange {
            field: "int4 hidden size (at most 65536)",
        });
    }
    let k = int4_outliers(cols);
    let overflow = |row: usize, col: usize| WireError::Overflow {
        dtype: HiddenDtype::Int4,
        row,
        col,
    };
    let mut top: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    let mut is_outlier = vec![false; cols];
    let mut nibbles = vec![0u8; cols.div_ceil(2)];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        largest(row, k, &mut top);
        for &(i, _) in &top {
            let h = half::f16::from_f32(row[i]);
            if h.is_infinite() {
                return Err(overflow(r, i));
            }
            is_outlier[i] = true;
            // `i < cols ≤ 65536`, so it fits a u16.
            out.extend_from_slice(&(i as u16).to_le_bytes());
            out.extend_from_slice(&h.to_le_bytes());
        }
        nibbles.fill(0);
        for (g, group) in row.chunks(INT4_GROUP).enumerate() {
            let base = g * INT4_GROUP;
            let inliers = || {
                group
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| !is_outlier[base + j])
            };
            let (max_at, m) = inliers().fold((base, 0.0f32), |(at, m), (j, v)| {
                if v.abs() > m {
                    (base + j, v.abs())
                } else {
                    (at, m)
                }
            });
            let scale = f16_at_least(m / 7.0);
            // Unreachable once the outliers fit f16 (`m` is at most the smallest of them);
            // kept so that a change of the rule cannot put infinity on the wire.
            if scale.is_infinite() {
                return Err(overflow(r, max_at));
            }
            out.extend_from_slice(&scale.to_le_bytes());
            let s = scale.to_f32();
            for (j, &v) in inliers() {
                // 0 when the scale is (its group is all zeros or outliers).
                let q = if s > 0.0 {
                    (v / s).round().clamp(-7.0, 7.0) as i8
                } else {
                    0
                };
                let c = base + j;
                // q + 8 is in [1, 15]; the low nibble holds the even column.
                nibbles[c / 2] |= ((q + 8) as u8) << (4 * (c % 2));
            }
            for (j, _) in group.iter().enumerate() {
                if is_outlier[base + j] {
                    nibbles[(base + j) / 2] |= 8 << (4 * ((base + j) % 2));
                }
            }
        }
        for &(i, _) in &top {
            is_outlier[i] = false;
        }
        out.extend_from_slice(&nibbles);
    }
    Ok(())
}

/// Decodes int4 rows into `out` (already reserved); `bytes` is known to be
/// `rows × int4_row_len(cols)` long. On error the caller clears `out`.
fn decode_int4(cols: usize, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), WireError> {
    if cols == 0 {
        return Ok(());
    }
    let k = int4_outliers(cols);
    let groups = cols.div_ceil(INT4_GROUP);
    let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    for (r, row) in bytes.chunks_exact(int4_row_len(cols)).enumerate() {
        let (outliers, rest) = row.split_at(4 * k);
        let (scales, nibbles) = rest.split_at(2 * groups);
        if cols % 2 == 1 && nibbles[cols / 2] >> 4 != 0 {
            return Err(WireError::InvalidFlag {
                field: "hidden.int4.padding",
                value: nibbles[cols / 2],
            });
        }
        let start = out.len();
        for g in 0..groups {
            let s = f16_at(scales, 2 * g);
            if !s.is_finite() {
                return Err(WireError::NonFinite {
                    row: r,
                    col: g * INT4_GROUP,
                });
            }
            let end = cols.min((g + 1) * INT4_GROUP);
            out.extend((g * INT4_GROUP..end).map(|c| {
                let n = (nibbles[c / 2] >> (4 * (c % 2))) & 0x0f;
                f32::from(n as i8 - 8) * s
            }));
        }
        let mut next = 0usize;
        for (slot, o) in outliers.chunks_exact(4).enumerate() {
            let i = usize::from(u16::from_le_bytes([o[0], o[1]]));
            if i < next || i >= cols {
                return Err(WireError::BadOutlier {
                    row: r,
                    slot,
                    index: i,
                });
            }
            next = i + 1;
            out[start + i] = f16_at(o, 2);
        }
    }
    Ok(())
}
