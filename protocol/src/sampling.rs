//! Sampling parameters as a caller writes them, and the validated form the sampler runs.
//!
//! [`SamplingParams`] is the loose, serialisable request (`temperature`, `top_k`, …);
//! [`SamplingParams::validate`] turns it into a [`Sampling`] whose variants carry only the
//! data that makes sense together, so the sampler never sees a negative temperature or a
//! `top_p` of 3.

use serde::{Deserialize, Serialize};

/// How the next token is chosen, as requested.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 means greedy (the default).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 or absent: no limit).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability mass reaches `p` (absent: 1.0).
    pub top_p: Option<f32>,
    /// Drop tokens whose probability is below `min_p` times the top token's (absent: 0).
    pub min_p: Option<f32>,
    /// Seed of the random stream; the same seed gives the same tokens.
    pub seed: u64,
    /// Divides positive logits (and multiplies negative ones) of tokens already generated;
    /// 1.0 (the default) leaves them alone.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            seed: 0,
            repetition_penalty: 1.0,
        }
    }
}

/// A validated sampling rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// Always the most likely token (ties: the lowest id).
    Greedy { repetition_penalty: f32 },
    /// Softmax at `temperature`, restricted by `top_k`, `top_p` then `min_p`, drawn from a
    /// seeded RNG.
    Random {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        seed: u64,
        repetition_penalty: f32,
    },
}

/// Why a [`SamplingParams`] was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("repetition_penalty must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
}

impl SamplingParams {
    /// Checks the ranges and picks the variant.
    pub fn validate(&self) -> Result<Sampling, SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(SamplingError::TopP(p));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(SamplingError::MinP(p));
            }
        }
        let rp = self.repetition_penalty;
        if !(rp.is_finite() && rp > 0.0) {
            return Err(SamplingError::RepetitionPenalty(rp));
        }
        if self.temperature == 0.0 {
            return Ok(Sampling::Greedy {
                repetition_penalty: rp,
            });
        }
        Ok(Sampling::Random {
            temperature: self.temperature,
            top_k: self.top_k.filter(|&k| k > 0),
            top_p: self.top_p.filter(|&p| p < 1.0),
            min_p: self.min_p.filter(|&p| p > 0.0),
            seed: self.seed,
            repetition_penalty: rp,
        })
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// The output reached one of the requested stop strings.
    StopString,
    /// The token limit was reached.
    Length,
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Eos => "eos",
            Self::StopString => "stop_string",
            Self::Length => "length",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_temperature_is_greedy() {
        let s = SamplingParams::default().validate().expect("valid");
        assert_eq!(
            s,
            Sampling::Greedy {
                repetition_penalty: 1.0
            }
        );
    }

    #[test]
    fn random_drops_no_op_limits() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: Some(0),
            top_p: Some(1.0),
            seed: 5,
            ..Default::default()
        };
        assert_eq!(
            p.validate().expect("valid"),
            Sampling::Random {
                temperature: 0.7,
                top_k: None,
                top_p: None,
                min_p: None,
                seed: 5,
                repetition_penalty: 1.0
            }
        );
    }

    #[test]
    fn refuses_out_of_range_values() {
        let bad = |p: SamplingParams| p.validate().expect_err("must refuse");
        assert_eq!(
            bad(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            }),
            SamplingError::Temperature(-1.0)
        );
        assert!(matches!(
            bad(SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            }),
            SamplingError::Temperature(_)
        ));
        assert_eq!(
            bad(SamplingParams {
                temperature: 1.0,
                top_p: Some(0.0),
                ..Default::default()
            }),
            SamplingError::TopP(0.0)
        );
        assert_eq!(
            bad(SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            }),
            SamplingError::RepetitionPenalty(0.0)
        );
    }

    #[test]
    fn params_json_rejects_unknown_fields() {
        let ok: SamplingParams = serde_json::from_str(r#"{"temperature": 0.5}"#).expect("valid");
        assert_eq!(ok.temperature, 0.5);
        assert!(serde_json::from_str::<SamplingParams>(r#"{"temprature": 0.5}"#).is_err());
        assert_eq!(
            serde_json::to_string(&FinishReason::StopString).expect("ser"),
            "\"stop_string\""
        );
    }
}
