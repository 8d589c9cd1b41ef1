//! Fully-connected layers and the fused LSTM cell, frozen: their backward gives the input
//! gradient only.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{f32_slice, CResult};
use super::kernels::{linear_rows, linear_rows_backward, matmul, FEW_ROWS};
use super::packed::{self, Columns, PackedWeights};
use super::{Activation, Avx512, Rule};

/// Rows from which a batch (a transformer's tokens) runs on the packed kernel of the 1x1
/// convolutions: the weights packed once instead of by every call of the general GEMM.
const PACKED_ROWS: usize = 32;


/// A frozen fully-connected layer `y = x W^T + b`, W `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    out_features: usize,
    in_features: usize,
    activation: Activation,
    rule: Rule,
    /// The weights packed for the AVX-512 kernel, made at the first batch that uses them.
    packed: Arc<OnceLock<Option<(Avx512, PackedWeights)>>>,
    /// W^T packed alike, for the backward of token batches.
    packed_t: Arc<OnceLock<Option<(Avx512, PackedWeights)>>>,
}

/// `[n, rows]` (channel-major) = the packed `[n, k]` weights times the columns `cols` (`rows`
/// of them), bias and activation in the epilogue.
fn product(cpu: Avx512, p: &PackedWeights, cols: Columns<'_>, rows: usize, n: usize, act: Activation) -> Vec<f32> {
    let mut yt: Vec<f32> = Vec::with_capacity(n * rows);
    packed::conv(cpu, p, cols, rows, act, None, &mut yt.spare_capacity_mut()[..n * rows]);
    // SAFETY: `packed::conv` writes every value of `dst[..m * plane]` (its doc; the kernel
    // tests compare every value, partial tiles included).
    unsafe { yt.set_len(n * rows) };
    yt
}

/// `[n, rows]` to `[rows, n]`.
fn token_major(yt: &[f32], n: usize, rows: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * rows];
    transpose(yt, n, rows, &mut y);
    y
}

/// `src` `[rows, cols]` to `dst` `[cols, rows]`, in 32 x 32 tiles, rows of tiles in parallel.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const T: usize = 32;
    dst.par_chunks_mut(T * rows).enumerate().for_each(|(cb, out)| {
        let c0 = cb * T;
        let cn = T.min(cols - c0);
        for r0 in (0..rows).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                let row = &src[r * cols + c0..r * cols + c0 + cn];
                for (c, &v) in row.iter().enumerate() {
                    out[c * rows + r] = v;
                }
            }
        }
    });
}

impl Linear {
    /// The layer from PyTorch's `weight` `[out, in]` and `bias` `[out]` (zeros when `None`).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, activation: Activation) -> CResult<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let bias = match bias {
            Some(b) => b.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; out_features],
        };
        if bias.len() != out_features {
            candle_core::bail!("linear bias has {} values for {out_features} outputs", bias.len());
        }
        Ok(Self {
            weight: Arc::new(weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?),
            bias: Arc::new(bias),
            out_features,
            in_features,
            activation,
            rule: Rule::Exact,
            packed: Arc::new(OnceLock::new()),
            packed_t: Arc::new(OnceLock::new()),
        })
    }

    /// The weights packed for the AVX-512 kernel (made once), when this CPU has it.
    fn packed(&self) -> Option<(Avx512, &PackedWeights)> {
        self.packed.get_or_init(|| Avx512::detect().map(|cpu| (cpu, PackedWeights::new(&self.weight, &self.bias, self.out_features, self.in_features)))).as_ref().map(|(c, p)| (*c, p))
    }

    /// `dx [batch, in] = g [batch, out] @ W` by the packed kernel (W^T packed once).
    fn backward_packed(&self, g: &[f32], batch: usize) -> Option<Vec<f32>> {
        let (cpu, p) = self
            .packed_t
            .get_or_init(|| {
                Avx512::detect().map(|cpu| {
                    let (o, i) = (self.out_features, self.in_features);
                    let mut wt = vec![0f32; o * i];
                    transpose(&self.weight, o, i, &mut wt);
                    (cpu, PackedWeights::new(&wt, &vec![0.0; i], i, o))
                })
            })
            .as_ref()?;
        let dxt = product(*cpu, p, Columns::Rows(&g[..self.out_features * batch]), batch, self.in_features, Activation::Identity);
        Some(token_major(&dxt, self.in_features, batch))
    }

    pub(crate) fn in_features(&self) -> usize {
        self.in_features
    }

    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }

    /// `[batch, out]` for the rows `x` (`[batch, in]`), bias and activation applied.
    pub(crate) fn rows_forward(&self, x: &[f32], batch: usize) -> Vec<f32> {
        let (n, inf) = (self.out_features, self.in_features);
        if let Some(yt) = self.rows_forward_channel_major(x, batch) {
            return token_major(&yt, n, batch);
        }
        let mut out = vec![0.0f32; batch * n];
        if batch <= FEW_ROWS {
            linear_rows(x, batch, &self.weight, n, inf, &mut out);
        } else {
            // out[batch, n] = x[batch, in] @ W^T[in, n]
            matmul(&mut out, x, (inf, 1), &self.weight, (1, inf), batch, n, inf);
        }
        let act = self.activation;
        out.chunks_mut(n).for_each(|row| {
            row.iter_mut().zip(self.bias.iter()).for_each(|(v, b)| *v = act.apply(*v + b));
        });
        out
    }

    /// `[out, batch]` (channel-major) for the rows `x`, by the packed kernel only (`None` where it
    /// does not run: few rows, no AVX-512).
    pub(crate) fn rows_forward_channel_major(&self, x: &[f32], batch: usize) -> Option<Vec<f32>> {
        if batch < PACKED_ROWS || self.out_features == 0 || self.in_features == 0 {
            return None;
        }
        let (cpu, p) = self.packed()?;
        Some(product(cpu, p, Columns::Rows(&x[..self.in_features * batch]), batch, self.out_features, self.activation))
    }

    /// `[batch, out]` from channel-major input `h` (`[in, batch]`), by the packed kernel only.
    pub(crate) fn channel_major_forward(&self, h: &[f32], batch: usize) -> Option<Vec<f32>> {
        let (cpu, p) = self.packed()?;
        let yt = product(cpu, p, Columns::Input(&h[..self.in_features * batch]), batch, self.out_features, self.activation);
        Some(token_major(&yt, self.out_features, batch))
    }

    /// `dx [batch, in] = g [batch, out] @ W`, `g` the gradient before the activation.
    pub(crate) fn rows_backward(&self, gpre: &[f32], batch: usize) -> Vec<f32> {
        if batch >= PACKED_ROWS && self.in_features > 0 && self.out_features > 0 {
            if let Some(dx) = self.backward_packed(gpre, batch) {
                return dx;
            }
        }
        let mut dx = vec![0.0f32; batch * self.in_features];
        let (n, k) = (self.in_features, self.out_features);
        if batch <= FEW_ROWS {
            linear_rows_backward(gpre, batch, &self.weight, k, n, &mut dx);
        } else {
            matmul(&mut dx, gpre, (k, 1), &self.weight, (n, 1), batch, n, k);
        }
        dx
    }

    /// # Shapes
    /// `x`: `[batch, in]` -> `[batch, out]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.forward_with(x, Rule::Exact)
    }

    /// [`Linear::forward`] with the backward of its activation following `rule`.
    pub fn forward_with(&self, x: &Tensor, rule: Rule) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(Linear { rule, ..self.clone() })
    }
}

impl CustomOp1 for Linear {
    fn name(&self) -> &'static str {
        "gradcam-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let &[batch, inf] = layout.dims() else {
            candle_core::bail!("linear expects a [batch, features] input, got {:?}", layout.dims());
        };
        if inf != self.in_features {
            candle_core::bail!("linear expects {} input features, got {inf}", self.in_features);
        }
        Ok((CpuStorage::F32(self.rows_forward(x, batch)), Shape::from((batch, self.out_features))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let batch = arg.dim(0)?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (act, rule) = (self.activation, self.rule);
        let gpre: Vec<f32> = if act == Activation::Identity {
            grad
        } else {
            let out = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            out.iter().zip(&grad).map(|(&o, &d)| act.backward(o, d, rule)).collect()
        };
        Ok(Some(Tensor::from_vec(self.rows_backward(&gpre, batch), arg.shape(), arg.device())?))
    }
}


/// A frozen LSTM cell (PyTorch's gate order i, f, g, o) fused into one op, so that decoding and
/// explaining a caption cost one op per step instead of a dozen, with an input-only backward.
#[derive(Debug, Clone)]
pub struct LstmCell {
    /// `[4 * hidden, input + hidden]`: PyTorch's `weight_ih` and `weight_hh` side by side.
    weight: Arc<Vec<f32>>,
    /// `bias_ih + bias_hh`, `[4 * hidden]`.
    bias: Arc<Vec<f32>>,
    input: usize,
    hidden: usize,
}

#[inline]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl LstmCell {
    /// The cell from PyTorch's `LSTMCell` parameters.
    pub fn new(weight_ih: &Tensor, weight_hh: &Tensor, bias_ih: &Tensor, bias_hh: &Tensor) -> CResult<Self> {
        let (four_h, input) = weight_ih.dims2()?;
        let hidden = four_h / 4;
        if weight_hh.dims() != [four_h, hidden] || four_h % 4 != 0 {
            candle_core::bail!("LSTM weights {:?} and {:?} do not match", weight_ih.dims(), weight_hh.dims());
        }
        let weight = Tensor::cat(&[weight_ih, weight_hh], 1)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let bias = (bias_ih + bias_hh)?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        Ok(Self { weight: Arc::new(weight), bias: Arc::new(bias), input, hidden })
    }

    /// The hidden size.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// One step.
    ///
    /// # Shapes
    /// `x`: `[batch, input]`, `h`, `c`: `[batch, hidden]` -> (`h'`, `c'`), each `[batch, hidden]`.
    pub fn step(&self, x: &Tensor, h: &Tensor, c: &Tensor) -> CResult<(Tensor, Tensor)> {
        let packed = Tensor::cat(&[x, h, c], 1)?.apply_op1(self.clone())?; // [batch, 2 hidden]
        Ok((packed.narrow(1, 0, self.hidden)?, packed.narrow(1, self.hidden, self.hidden)?))
    }

    /// Gate activations (i, f, g, o) of each row: `[batch, 4 hidden]`.
    fn gates(&self, xhc: &[f32], batch: usize) -> Vec<f32> {
        let (k, hh) = (self.input + self.hidden, self.hidden);
        let width = k + hh;
        let mut xh = vec![0.0f32; batch * k];
        for b in 0..batch {
            xh[b * k..(b + 1) * k].copy_from_slice(&xhc[b * width..b * width + k]);
        }
        let mut gates = vec![0.0f32; batch * 4 * hh];
        // gates[batch, 4h] = xh[batch, k] @ W^T[k, 4h]
        matmul(&mut gates, &xh, (k, 1), &self.weight, (1, k), batch, 4 * hh, k);
        for row in gates.chunks_mut(4 * hh) {
            for (j, v) in row.iter_mut().enumerate() {
                let z = *v + self.bias[j];
                *v = if (2 * hh..3 * hh).contains(&j) { z.tanh() } else { sigmoid(z) };
            }
        }
        gates
    }
}

impl CustomOp1 for LstmCell {
    fn name(&self) -> &'static str {
        "gradcam-lstm-cell"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let xhc = f32_slice(storage, layout, self.name())?;
        let (batch, width) = layout.shape().dims2()?;
        let hh = self.hidden;
        if width != self.input + 2 * hh {
            candle_core::bail!("LSTM cell expects [x, h, c] of width {}, got {width}", self.input + 2 * hh);
        }
        let gates = self.gates(xhc, batch);
        let mut out = vec![0.0f32; batch * 2 * hh];
        for b in 0..batch {
            let (g, c) = (&gates[b * 4 * hh..(b + 1) * 4 * hh], &xhc[b * width + self.input + hh..(b + 1) * width]);
            for j in 0..hh {
                let c2 = g[hh + j] * c[j] + g[j] * g[2 * hh + j];
                out[b * 2 * hh + hh + j] = c2;
                out[b * 2 * hh + j] = g[3 * hh + j] * c2.tanh();
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, 2 * hh))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let (batch, width) = arg.dims2()?;
        let (hh, k) = (self.hidden, self.input + self.hidden);
        let xhc = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let out = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let gates = self.gates(&xhc, batch);
        let mut dpre = vec![0.0f32; batch * 4 * hh];
        let mut dx = vec![0.0f32; batch * width];
        for b in 0..batch {
            let g = &gates[b * 4 * hh..(b + 1) * 4 * hh];
            let c = &xhc[b * width + k..(b + 1) * width];
            let (dh2, dc2) = (&grad[b * 2 * hh..b * 2 * hh + hh], &grad[b * 2 * hh + hh..(b + 1) * 2 * hh]);
            let d = &mut dpre[b * 4 * hh..(b + 1) * 4 * hh];
            for j in 0..hh {
                let (i, f, gg, o) = (g[j], g[hh + j], g[2 * hh + j], g[3 * hh + j]);
                let tc = out[b * 2 * hh + hh + j].tanh();
                let dc = dc2[j] + dh2[j] * o * (1.0 - tc * tc);
                d[j] = dc * gg * i * (1.0 - i);
                d[hh + j] = dc * c[j] * f * (1.0 - f);
                d[2 * hh + j] = dc * i * (1.0 - gg * gg);
                d[3 * hh + j] = dh2[j] * tc * o * (1.0 - o);
                dx[b * width + k + j] = dc * f;
            }
        }
        // d[x, h] = dpre[batch, 4h] @ W[4h, k]
        let mut dxh = vec![0.0f32; batch * k];
        matmul(&mut dxh, &dpre, (4 * hh, 1), &self.weight, (k, 1), batch, k, 4 * hh);
        for b in 0..batch {
            dx[b * width..b * width + k].copy_from_slice(&dxh[b * k..(b + 1) * k]);
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod packed_tests {
    use candle_core::{Device, Tensor};

    use super::{Linear, PACKED_ROWS};
    use crate::Activation;

    /// Token-sized batches (the packed kernel where the CPU has it, partial tiles on both sides)
    /// equal the plain sum, every value.
    #[test]
    fn token_batches_equal_the_plain_sum() {
        let (batch, inp, out) = (PACKED_ROWS + 9, 70, 53);
        let val = |i: usize, s: usize| (((i * 2654435761 + s * 40503) % 1000) as f32 / 500.0) - 1.0;
        let x: Vec<f32> = (0..batch * inp).map(|i| val(i, 1)).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| val(i, 2)).collect();
        let b: Vec<f32> = (0..out).map(|i| val(i, 3)).collect();
        let lin = Linear::new(&Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap(), Some(&Tensor::from_vec(b.clone(), out, &Device::Cpu).unwrap()), Activation::Relu).unwrap();
        let xv = candle_core::Var::from_tensor(&Tensor::from_vec(x.clone(), (batch, inp), &Device::Cpu).unwrap()).unwrap();
        let yt = lin.forward(xv.as_tensor()).unwrap();
        let y = yt.to_vec2::<f32>().unwrap();
        for r in 0..batch {
            for o in 0..out {
                let e = (0..inp).map(|k| x[r * inp + k] * w[o * inp + k]).sum::<f32>() + b[o];
                assert!((y[r][o] - e.max(0.0)).abs() < 1e-4, "[{r}, {o}]: {} vs {}", y[r][o], e.max(0.0));
            }
        }
        // The backward (W^T packed): dx = (g * relu'(y)) @ W, every value.
        let g: Vec<f32> = (0..batch * out).map(|i| val(i, 4)).collect();
        let seed = Tensor::from_vec(g.clone(), (batch, out), &Device::Cpu).unwrap();
        let dx = (yt * seed).unwrap().sum_all().unwrap().backward().unwrap().get(xv.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        for r in 0..batch {
            for k in 0..inp {
                let e: f32 = (0..out).filter(|&o| y[r][o] > 0.0).map(|o| g[r * out + o] * w[o * inp + k]).sum();
                assert!((dx[r][k] - e).abs() < 1e-4, "dx[{r}, {k}]: {} vs {e}", dx[r][k]);
            }
        }
    }
}
