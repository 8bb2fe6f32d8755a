//! Typed access to a GGUF file's `tokenizer.ggml.*` metadata: each getter checks the value's
//! type (and, for token ids, its range) and reports a mismatch as an error that names the key
//! and the file. An absent key is `Ok(None)`; what absence means is the caller's business.

use std::fmt;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{ModelError, Result};

/// Typed access to GGUF metadata, with errors that name the key and the file.
pub(super) struct Meta<'a> {
    pub(super) content: &'a Content,
    pub(super) path: &'a Path,
}

impl<'a> Meta<'a> {
    pub(super) fn err(&self, key: &str, reason: impl fmt::Display) -> ModelError {
        ModelError::Tokenizer(format!(
            "{}: GGUF metadata `{key}` {reason}",
            self.path.display()
        ))
    }

    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(
                key,
                format!("should be a string, found {:?}", v.value_type()),
            )),
        }
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => match value_as_i64(v) {
                Some(0) => Ok(Some(false)),
                Some(1) => Ok(Some(true)),
                _ => Err(self.err(key, format!("should be a bool, found {v:?}"))),
            },
        }
    }

    /// A token id: any non-negative integer below `vocab_len`. Negative values (some
    /// converters write -1 for "none") count as absent.
    pub(super) fn token_id(&self, key: &str, vocab_len: usize) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = value_as_i64(v)
            .ok_or_else(|| self.err(key, format!("should be an integer, found {v:?}")))?;
        if n < 0 {
            return Ok(None);
        }
        match u32::try_from(n) {
            Ok(id) if (id as usize) < vocab_len => Ok(Some(id)),
            _ => Err(self.err(
                key,
                format!("is {n}, outside the vocabulary of {vocab_len} tokens"),
            )),
        }
    }

    pub(super) fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.err(
                key,
                format!("should be an array, found {:?}", v.value_type()),
            )),
        }
    }

    pub(super) fn string_array(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.err(key, format!("element {i} should be a string, found {v:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(super) fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                value_as_i64(v).ok_or_else(|| {
                    self.err(
                        key,
                        format!("element {i} should be an integer, found {v:?}"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(super) fn float_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(f64::from(*x)),
                Value::F64(x) => Ok(*x),
                v => value_as_i64(v).map(|x| x as f64).ok_or_else(|| {
                    self.err(key, format!("element {i} should be a number, found {v:?}"))
                }),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}
