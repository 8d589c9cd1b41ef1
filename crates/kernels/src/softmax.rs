//! Softmax over the last axis in one pass per row, rows in parallel, with its exact backward
//! (candle's fused `softmax_last_dim` has none): dx = y * (g - sum(g * y)).

use candle_core::{CpuStorage, CustomOp1, Layout, Result as CResult, Shape, Tensor};
use rayon::prelude::*;

use crate::f32_slice;

/// Softmax over the last axis of `x` (f32), differentiable.
pub fn softmax_last(x: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

/// One row: exps in one vectorisable pass, their sum, the scaling.
#[inline(always)]
fn row(r: &[f32], o: &mut [f32]) {
    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    o.iter_mut().zip(r).for_each(|(o, &v)| *o = crate::fastmath::exp(v - max));
    // Sixteen partial sums (a vector's lanes), then theirs.
    let mut lanes = [0f32; 16];
    let chunks = o.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v);
    }
    let inv = 1.0 / (lanes.iter().sum::<f32>() + tail);
    o.iter_mut().for_each(|v| *v *= inv);
}

/// [`row`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512(r: &[f32], o: &mut [f32]) {
    row(r, o)
}

/// Rows per parallel task at least (about 16K values).
fn rows_per_task(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "gradcam-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let n = *layout.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; x.len()];
        if n > 0 {
            let wide = crate::Avx512::detect();
            out.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(rows_per_task(n)).for_each(|(o, r)| match wide {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the token proves that the CPU has AVX-512F.
                Some(_) => unsafe { row_avx512(r, o) },
                _ => row(r, o),
            });
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let n = res.dim(candle_core::D::Minus1)?;
        let y = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).with_min_len(rows_per_task(n)).for_each(|(d, (y, g))| {
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            d.iter_mut().zip(y.iter().zip(g)).for_each(|(d, (y, g))| *d = y * (g - dot));
        });
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn softmax_and_its_gradient_equal_the_plain_ops() {
        let v: Vec<f32> = (0..24).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
        let x = Var::from_tensor(&Tensor::from_vec(v, (2, 3, 4), &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::from_vec((0..24).map(|i| (i as f32 * 0.3).sin()).collect::<Vec<_>>(), (2, 3, 4), &Device::Cpu).unwrap();
        let ours = super::softmax_last(x.as_tensor()).unwrap();
        let plain = candle_nn_free_softmax(x.as_tensor());
        let d = (&ours - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
        let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let g2 = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let d = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
    }

    fn candle_nn_free_softmax(x: &Tensor) -> Tensor {
        let e = x.broadcast_sub(&x.max_keepdim(2).unwrap()).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(2).unwrap()).unwrap()
    }
}
