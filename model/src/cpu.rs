//! The model's bridge to the CPU kernels (`tandem_kernels::ops`): a contiguous CPU tensor's
//! contents as a slice, and the fused passes themselves under their old name.

use candle_core::Tensor;

use crate::error::{ModelError, Result};

pub(crate) use tandem_kernels::ops::*;

/// Calls `f` with the contents of a contiguous f32 CPU tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_slice(t, f)
}

/// Calls `f` with the contents of a contiguous CPU tensor of element type `T` (a view is
/// copied to a contiguous tensor first).
pub(crate) fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    if t.dtype() != T::DTYPE {
        return Err(ModelError::Input(format!(
            "the CPU {:?} path got a {:?} tensor",
            T::DTYPE,
            t.dtype()
        )));
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Input(
            "the CPU path got a tensor on another device".into(),
        ));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        drop(storage);
        return with_slice(&t.contiguous()?, f);
    };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).expect("test setup")
    }

    #[test]
    fn with_f32_reads_views_and_refuses_other_dtypes() {
        let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let col = x.narrow(1, 1, 2).expect("test setup"); // not contiguous: copied first
        assert_eq!(
            with_f32(&col, <[f32]>::to_vec).expect("test setup"),
            [2.0, 3.0, 5.0, 6.0]
        );
        let row = x.narrow(0, 1, 1).expect("test setup"); // contiguous at an offset
        assert_eq!(
            with_f32(&row, <[f32]>::to_vec).expect("test setup"),
            [4.0, 5.0, 6.0]
        );
        let half = x.to_dtype(DType::F16).expect("test setup");
        assert!(with_f32(&half, |_| ()).is_err());
    }
}
