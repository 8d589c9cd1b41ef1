//! [`TrainableConv2d`]: a dense convolution whose weight and bias are inputs, for training.

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{geometry, ConvGeometry, Padding};
use super::kernels::{col2im, im2col, matmul};
use super::{f32_slice, planes_per_task, Activation, CResult, Rule};

/// A dense (ungrouped) convolution whose weight and bias are inputs too, for training, with the
/// activation fused: the backward gives the input, weight and bias gradients by im2col + GEMM
/// (candle's input gradient goes through a naive transposed convolution, and separate bias and
/// ReLU ops cost a pass over memory each, forward and backward).
#[derive(Debug, Clone, Copy)]
pub struct TrainableConv2d {
    /// Stride in both directions.
    pub stride: usize,
    /// Spatial padding.
    pub padding: Padding,
    /// Fused after the bias.
    pub activation: Activation,
    /// The backward rule of the activation.
    pub rule: Rule,
}

impl TrainableConv2d {
    /// # Shapes
    /// `x`: `[batch, in, h, w]`, `weight`: `[out, in, kh, kw]`, `bias`: `[out]` ->
    /// `[batch, out, oh, ow]`.
    pub fn forward(&self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, *self)
    }

    fn geometry(&self, x: &[usize], w: &[usize]) -> CResult<(ConvGeometry, usize)> {
        let &[out, cin, kh, kw] = w else {
            candle_core::bail!("conv2d weight must be [out, in, kh, kw], got {w:?}");
        };
        Ok((geometry(x, cin, (kh, kw), self.stride, self.padding)?, out))
    }
}

impl candle_core::CustomOp3 for TrainableConv2d {
    fn name(&self) -> &'static str {
        "gradcam-trainable-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (x, w, bias) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?, f32_slice(s3, l3, self.name())?);
        let (g, out) = self.geometry(l1.dims(), l2.dims())?;
        if bias.len() != out {
            candle_core::bail!("conv2d bias has {} values for {out} channels", bias.len());
        }
        let (k, plane) = (g.c * g.kh * g.kw, g.oh * g.ow);
        let mut y = vec![0.0f32; g.batch * out * plane];
        let mut col = vec![0.0f32; k * plane];
        for b in 0..g.batch {
            im2col(&x[b * g.c * g.h * g.w..(b + 1) * g.c * g.h * g.w], &g, 0, &mut col);
            matmul(&mut y[b * out * plane..(b + 1) * out * plane], w, (k, 1), &col, (plane, 1), out, plane, k);
        }
        let act = self.activation;
        y.par_chunks_mut(plane).enumerate().with_min_len(planes_per_task(plane)).for_each(|(i, dst)| {
            let b = bias[i % out];
            dst.iter_mut().for_each(|v| *v = act.apply(*v + b));
        });
        Ok((CpuStorage::F32(y), Shape::from((g.batch, out, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, bias: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g, out) = self.geometry(x.dims(), w.dims())?;
        let (k, plane, in_len) = (g.c * g.kh * g.kw, g.oh * g.ow, g.c * g.h * g.w);
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ys = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut gs = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (act, rule) = (self.activation, self.rule);
        gs.par_iter_mut().zip(ys.par_iter()).for_each(|(d, &o)| *d = act.backward(o, *d, rule));
        let mut db = vec![0.0f32; out];
        for (i, chunk) in gs.chunks(plane).enumerate() {
            db[i % out] += chunk.iter().sum::<f32>();
        }
        let mut dx = vec![0.0f32; g.batch * in_len];
        let mut dw = vec![0.0f32; out * k];
        let mut dw_b = vec![0.0f32; out * k];
        let mut col = vec![0.0f32; k * plane];
        for b in 0..g.batch {
            let go = &gs[b * out * plane..(b + 1) * out * plane];
            // dW += g[out, plane] @ col^T[plane, k]
            im2col(&xs[b * in_len..(b + 1) * in_len], &g, 0, &mut col);
            matmul(&mut dw_b, go, (plane, 1), &col, (1, plane), out, k, plane);
            dw.iter_mut().zip(&dw_b).for_each(|(a, b)| *a += b);
            // dcol[k, plane] = W^T[k, out] @ g[out, plane], scattered back by col2im.
            matmul(&mut col, &ws, (1, k), go, (plane, 1), k, plane, out);
            col2im(&col, &g, 0, g.c, &mut dx[b * in_len..(b + 1) * in_len]);
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, bias.shape(), bias.device())?),
        ))
    }
}

