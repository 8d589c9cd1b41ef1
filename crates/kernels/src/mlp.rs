//! A transformer's MLP, `fc2(act(fc1(x)))` on token rows, as one op: the hidden activations stay
//! in the packed kernel's channel-major layout between the two layers (no transposes of the
//! widest tensor of the block), and the backward recomputes them rather than keeping them.

use rayon::prelude::*;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::linear::Linear;
use crate::{f32_slice, CResult, Pointwise};

/// `fc2(act(fc1(x)))`, differentiable with respect to `x` (frozen weights).
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    act: Pointwise,
    fc2: Linear,
}

impl Mlp {
    /// The MLP of two layers (each `[out, in]` with its bias and no activation of its own) and the
    /// pointwise activation between them.
    pub fn new(fc1: Linear, act: Pointwise, fc2: Linear) -> CResult<Self> {
        if fc1.out_features() != fc2.in_features() {
            candle_core::bail!("mlp: fc1 gives {} features, fc2 takes {}", fc1.out_features(), fc2.in_features());
        }
        Ok(Mlp { fc1, act, fc2 })
    }

    /// # Shapes
    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }

    /// `act` of the hidden values (any layout), in parallel chunks.
    fn activate(&self, h: &[f32]) -> Vec<f32> {
        let mut a = vec![0f32; h.len()];
        a.par_chunks_mut(8192).zip(h.par_chunks(8192)).for_each(|(a, h)| self.act.apply_slice(h, a));
        a
    }
}

impl CustomOp1 for Mlp {
    fn name(&self) -> &'static str {
        "gradcam-mlp"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let &[rows, inf] = layout.dims() else {
            candle_core::bail!("mlp expects a [rows, features] input, got {:?}", layout.dims());
        };
        if inf != self.fc1.in_features() {
            candle_core::bail!("mlp expects {} input features, got {inf}", self.fc1.in_features());
        }
        let out = match self.fc1.rows_forward_channel_major(x, rows) {
            // Channel-major hidden [hidden, rows]: the activation in place, then fc2 reads it as
            // a 1x1 convolution's input.
            Some(h) => self.fc2.channel_major_forward(&self.activate(&h), rows).expect("the packed kernel ran for fc1"),
            None => self.fc2.rows_forward(&self.activate(&self.fc1.rows_forward(x, rows)), rows),
        };
        Ok((CpuStorage::F32(out), Shape::from((rows, self.fc2.out_features()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let (rows, _) = arg.dims2()?;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let pre = self.fc1.rows_forward(&x, rows);
        let mut gh = self.fc2.rows_backward(&g, rows);
        self.act.scale_by_derivative(&pre, &mut gh);
        let dx = self.fc1.rows_backward(&gh, rows);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::Mlp;
    use crate::{Activation, Linear, Pointwise};

    /// The fused MLP equals its three ops, forward and backward, on token-sized and small batches.
    #[test]
    fn the_fused_mlp_equals_its_layers() {
        let val = |i: usize, s: usize| (((i * 2654435761 + s * 40503) % 1000) as f32 / 500.0) - 1.0;
        let t = |shape: &[usize], s: usize| Tensor::from_vec((0..shape.iter().product()).map(|i| val(i, s) * 0.3).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap();
        let (inp, hid, out) = (40, 70, 30);
        let fc1 = Linear::new(&t(&[hid, inp], 1), Some(&t(&[hid], 2)), Activation::Identity).unwrap();
        let fc2 = Linear::new(&t(&[out, hid], 3), Some(&t(&[out], 4)), Activation::Identity).unwrap();
        let mlp = Mlp::new(fc1.clone(), Pointwise::Gelu, fc2.clone()).unwrap();
        for rows in [3, 37, 75] {
            let xv = Var::from_tensor(&t(&[rows, inp], 5 + rows)).unwrap();
            let w = t(&[rows, out], 9);
            let fused = mlp.forward(xv.as_tensor()).unwrap();
            let apart = fc2.forward(&Pointwise::Gelu.forward(&fc1.forward(xv.as_tensor()).unwrap()).unwrap()).unwrap();
            let d = (&fused - &apart).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{rows} rows: forward differs by {d}");
            let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap().get(xv.as_tensor()).unwrap().clone();
            let g2 = (apart * &w).unwrap().sum_all().unwrap().backward().unwrap().get(xv.as_tensor()).unwrap().clone();
            let d = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{rows} rows: backward differs by {d}");
        }
    }
}
