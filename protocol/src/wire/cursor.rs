//! Little-endian readers and writers for frame bodies.
//!
//! [`Reader`] is the only place that reads bytes off the wire. Every read checks the remaining
//! length first, and every length-prefixed read checks the prefix against both a protocol cap
//! and the bytes actually left *before* it allocates, so no length field can make the decoder
//! allocate more than the frame it was given. [`Writer`] appends to a caller's `Vec<u8>` and
//! refuses values that the decoder would refuse, so what is encoded always decodes.

use super::WireError;

/// A bounds-checked cursor over one frame.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Takes the next `n` bytes, or fails with [`WireError::Truncated`].
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let remaining = self.bytes.len() - self.pos;
        if n > remaining {
            return Err(WireError::Truncated {
                offset: self.pos,
                needed: n,
                remaining,
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn u128(&mut self) -> Result<u128, WireError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    pub(crate) fn f32(&mut self) -> Result<f32, WireError> {
        Ok(f32::from_le_bytes(self.array()?))
    }

    pub(crate) fn bytes32(&mut self) -> Result<[u8; 32], WireError> {
        self.array()
    }

    /// A `u8` that must be 0 (`false`) or 1 (`true`).
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::InvalidFlag { field, value }),
        }
    }

    /// A presence flag followed, when 1, by the value `read` parses.
    pub(crate) fn option<T>(
        &mut self,
        field: &'static str,
        read: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        if self.bool(field)? {
            read(self).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A `u32` length (at most `max`) followed by that many bytes, borrowed.
    pub(crate) fn byte_slice(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a [u8], WireError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(WireError::TooLong { field, len, max });
        }
        self.take(len)
    }

    /// A `u32` length (at most `max`) followed by that many bytes of UTF-8.
    pub(crate) fn string(&mut self, field: &'static str, max: usize) -> Result<String, WireError> {
        let raw = self.byte_slice(field, max)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(WireError::InvalidUtf8 { field }),
        }
    }

    /// Whether every byte was read (for a trailing field a frame may leave out).
    pub(crate) fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    /// Fails with [`WireError::TrailingBytes`] unless every byte was read.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        let left = self.bytes.len() - self.pos;
        if left == 0 {
            Ok(())
        } else {
            Err(WireError::TrailingBytes(left))
        }
    }
}

/// Appends little-endian fields to a buffer.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u128(&mut self, v: u128) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn f32(&mut self, v: f32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn raw(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// A presence flag, then the value when there is one.
    pub(crate) fn option<T>(
        &mut self,
        v: Option<T>,
        write: impl FnOnce(&mut Self, T) -> Result<(), WireError>,
    ) -> Result<(), WireError> {
        match v {
            None => {
                self.bool(false);
                Ok(())
            }
            Some(v) => {
                self.bool(true);
                write(self, v)
            }
        }
    }

    /// A `u32` length then the bytes; refuses more than `max` bytes.
    pub(crate) fn byte_slice(
        &mut self,
        field: &'static str,
        v: &[u8],
        max: usize,
    ) -> Result<(), WireError> {
        let len = checked_len(field, v.len(), max)?;
        self.u32(len);
        self.raw(v);
        Ok(())
    }

    pub(crate) fn string(
        &mut self,
        field: &'static str,
        v: &str,
        max: usize,
    ) -> Result<(), WireError> {
        self.byte_slice(field, v.as_bytes(), max)
    }
}

/// `len` as the `u32` the wire carries, if it is at most `max` (and fits in a `u32`).
pub(crate) fn checked_len(field: &'static str, len: usize, max: usize) -> Result<u32, WireError> {
    match u32::try_from(len) {
        Ok(l) if len <= max => Ok(l),
        _ => Err(WireError::TooLong { field, len, max }),
    }
}
