//! Where the cloud part computes: `cpu` or `cuda[:N]` (`--device` on `tandem serve`, `bench`
//! and `generate`). The edge part always runs on the CPU, as it does on a user's device.

use candle_core::{DType, Device};

use crate::error::{ModelError, Result};
use crate::weights::DtypeName;

/// A device as the user names it: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceName {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceName {
    /// Opens the device. `cuda` in a build without the `cuda` feature is an error that says
    /// how to build one.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(n) => Device::new_cuda(n)
                .map_err(|e| ModelError::Input(format!("opening CUDA device {n}: {e}"))),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(ModelError::Input(
                "this build has no CUDA support: build with `--features cuda` \
                 (scripts/install-cuda.sh installs the toolkit it needs)"
                    .into(),
            )),
        }
    }

    /// The weights' dtype `--dtype auto` picks here: bf16 on a GPU (the tensor cores' input),
    /// and on the CPU what [`crate::weights::auto_dtype`] finds.
    pub fn auto_dtype(self) -> DType {
        match self {
            Self::Cpu => crate::weights::auto_dtype(),
            Self::Cuda(_) => DType::BF16,
        }
    }

    /// The weights' dtype `name` means here: as [`DtypeName::resolve`], except that `auto`
    /// is bf16 on a GPU.
    pub fn resolve_dtype(self, name: DtypeName) -> DType {
        match name {
            DtypeName::Auto => self.auto_dtype(),
            other => other.resolve(),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceName {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("unknown device `{s}` (cpu, cuda or cuda:N)");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl serde::Serialize for DeviceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        assert_eq!("cpu".parse::<DeviceName>(), Ok(DeviceName::Cpu));
        assert_eq!("CUDA".parse::<DeviceName>(), Ok(DeviceName::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceName>(), Ok(DeviceName::Cuda(3)));
        assert_eq!(DeviceName::Cuda(3).to_string(), "cuda:3");
        for bad in ["", "cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let err = bad.parse::<DeviceName>().expect_err("refused");
            assert!(err.contains("unknown device"), "{bad}: {err}");
        }
    }

    #[test]
    fn auto_dtype_is_bf16_on_a_gpu() {
        assert_eq!(DeviceName::Cuda(0).auto_dtype(), DType::BF16);
        assert_eq!(DeviceName::Cpu.auto_dtype(), crate::weights::auto_dtype());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let err = DeviceName::Cuda(0).open().expect_err("no cuda").to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(DeviceName::Cpu.open().expect("cpu").is_cpu());
    }
}
