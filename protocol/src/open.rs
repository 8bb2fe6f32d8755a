//! Checking an [`Open`] against what a cloud serves: the one place that turns a decoded
//! `Open` into a [`ValidOpen`] the server's inner code runs, or into the [`OpenError`] (and
//! so the [`ErrorCode`]) the device is told.
//!
//! Decoding ([`Frame::decode`](crate::Frame::decode)) already bounds every field's size; this
//! checks what depends on the server (its model pair, split, hidden size and token cap) and
//! the values decoding cannot judge (sampling ranges, a zero token limit). It is pure and
//! total, so it is fuzzed together with the decoder (`protocol/fuzz`, target `open_check`).

use crate::wire::{ErrorCode, ManifestId, Open};
use crate::{Sampling, SamplingError};

/// What a cloud serves, as far as an `Open` must match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The model pair's id; the device's must be equal.
    pub manifest: ManifestId,
    /// The split point `k`.
    pub split: u32,
    /// Columns of every hidden-state row.
    pub hidden_size: u32,
    /// Largest `max_tokens` an `Open` may ask for.
    pub max_tokens_cap: u32,
}

/// An `Open` whose values this cloud can run.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidOpen {
    pub sampling: Sampling,
    /// In `1..=Served::max_tokens_cap`.
    pub max_tokens: u32,
    pub stop: Vec<String>,
}

/// Why an `Open` was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OpenError {
    #[error("this cloud serves another model pair")]
    ManifestMismatch,
    #[error("this cloud serves split {split} with hidden size {hidden_size}")]
    ShapeMismatch { split: u32, hidden_size: u32 },
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("max tokens must be in 1..={cap}")]
    MaxTokens { cap: u32 },
}

impl OpenError {
    /// The code the `Error` frame carries.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::ManifestMismatch | Self::ShapeMismatch { .. } => ErrorCode::ManifestMismatch,
            Self::Sampling(_) | Self::MaxTokens { .. } => ErrorCode::BadSamplingParams,
        }
    }
}

impl Open {
    /// Checks this `Open` against `served`.
    pub fn check(&self, served: &Served) -> Result<ValidOpen, OpenError> {
        if self.manifest != served.manifest {
            return Err(OpenError::ManifestMismatch);
        }
        if self.split != served.split || self.hidden_size != served.hidden_size {
            return Err(OpenError::ShapeMismatch {
                split: served.split,
                hidden_size: served.hidden_size,
            });
        }
        let sampling = self.sampling.validate()?;
        let cap = served.max_tokens_cap;
        if self.max_tokens == 0 || self.max_tokens > cap {
            return Err(OpenError::MaxTokens { cap });
        }
        Ok(ValidOpen {
            sampling,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HiddenDtype, SamplingParams};

    fn served() -> Served {
        Served {
            manifest: ManifestId::try_from("pair").expect("id"),
            split: 2,
            hidden_size: 64,
            max_tokens_cap: 100,
        }
    }

    fn open() -> Open {
        Open {
            manifest: ManifestId::try_from("pair").expect("id"),
            split: 2,
            hidden_size: 64,
            dtype: HiddenDtype::F16,
            sampling: SamplingParams::default(),
            max_tokens: 10,
            stop: vec!["\n".into()],
            prompt_id: None,
            traceparent: None,
        }
    }

    #[test]
    fn a_matching_open_is_valid() {
        let v = open().check(&served()).expect("valid");
        assert_eq!(v.max_tokens, 10);
        assert_eq!(v.stop, ["\n"]);
        assert!(matches!(v.sampling, Sampling::Greedy { .. }));
    }

    #[test]
    fn each_refusal_has_its_code() {
        let cases: [(Open, ErrorCode); 5] = [
            (
                Open {
                    manifest: ManifestId::try_from("other").expect("id"),
                    ..open()
                },
                ErrorCode::ManifestMismatch,
            ),
            (Open { split: 3, ..open() }, ErrorCode::ManifestMismatch),
            (
                Open {
                    max_tokens: 0,
                    ..open()
                },
                ErrorCode::BadSamplingParams,
            ),
            (
                Open {
                    max_tokens: 101,
                    ..open()
                },
                ErrorCode::BadSamplingParams,
            ),
            (
                Open {
                    sampling: SamplingParams {
                        temperature: f32::NAN,
                        ..Default::default()
                    },
                    ..open()
                },
                ErrorCode::BadSamplingParams,
            ),
        ];
        for (o, code) in cases {
            assert_eq!(o.check(&served()).expect_err("refused").error_code(), code);
        }
    }
}
