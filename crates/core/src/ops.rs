//! Differentiable CPU ops for frozen (inference) networks, written because stock candle gets them
//! wrong or slow on the paths we differentiate:
//!
//! - [`Conv2d`]: im2col + GEMM for dense convolutions, a direct kernel for depthwise ones (candle
//!   loops over groups, ~30x slower), asymmetric TensorFlow "SAME" padding, bias and activation
//!   fused. Its backward computes the input gradient only: the weights are constants here, and
//!   candle's conv backward always pays for a weight gradient nobody reads.
//! - [`Linear`]: the same for fully-connected layers.
//! - [`MaxPool2d`]: candle's max-pool backward scales by 1/k^2 and fails when kernel != stride;
//!   ours routes the gradient to the first maximum of each window, as PyTorch does, with padding.
//! - [`AdaptiveAvgPool2d`] and [`Activation`] ops with exact backward (ReLU passes no gradient at 0).
//!
//! Every backward here is checked against finite differences in `tests/integration/gradients.rs`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// The pointwise non-linearity fused after a convolution or linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Relu6,
}

impl Activation {
    #[inline]
    fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Identity => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
        }
    }

    /// Derivative, read from the activation's output (its input is not kept). ReLU6's output is
    /// 0 or 6 exactly where the input was clipped, so both derivatives are exact from the output.
    #[inline]
    fn derivative_from_output(self, out: f32) -> f32 {
        match self {
            Activation::Identity => 1.0,
            Activation::Relu => (out > 0.0) as u8 as f32,
            Activation::Relu6 => (out > 0.0 && out < 6.0) as u8 as f32,
        }
    }

    /// Applies the activation as a standalone differentiable op.
    pub fn forward(self, x: &Tensor) -> CResult<Tensor> {
        if self == Activation::Identity {
            return Ok(x.clone());
        }
        x.contiguous()?.apply_op1(ActivationOp(self))
    }
}

struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "gradcam-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let act = self.0;
        let out: Vec<f32> = x.par_iter().with_min_len(4096).map(|&v| act.apply(v)).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let out = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let act = self.0;
        let g: Vec<f32> = out
            .par_iter()
            .zip(grad.par_iter())
            .with_min_len(4096)
            .map(|(&o, &g)| g * act.derivative_from_output(o))
            .collect();
        Ok(Some(Tensor::from_vec(g, res.shape(), res.device())?))
    }
}

/// Spatial padding of a convolution or pooling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same number of pixels on every side (PyTorch's `padding=p`).
    Symmetric(usize),
    /// TensorFlow "SAME": output = ceil(input / stride), the odd pixel of padding goes to the
    /// bottom and right. Computed from the actual input size, so any image size works.
    Same,
}

impl Padding {
    /// (before, after) padding and output length along one axis.
    fn resolve(self, input: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
        match self {
            Padding::Symmetric(p) => {
                let out = (input + 2 * p).saturating_sub(kernel) / stride + 1;
                (p, p, out)
            }
            Padding::Same => {
                let out = input.div_ceil(stride);
                let total = ((out - 1) * stride + kernel).saturating_sub(input);
                (total / 2, total - total / 2, out)
            }
        }
    }
}

/// A frozen 2-D convolution with bias and fused activation. Weights are `[out, in / groups, kh, kw]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    out_channels: usize,
    in_channels: usize,
    groups: usize,
    kernel: (usize, usize),
    stride: usize,
    padding: Padding,
    activation: Activation,
}

/// Geometry of one convolution call, resolved from the input size.
#[derive(Debug, Clone, Copy)]
struct ConvGeometry {
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    pad_top: usize,
    pad_left: usize,
}

impl Conv2d {
    /// `weight`: `[out, in / groups, kh, kw]`; `bias`: `[out]` (zeros when `None`).
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        groups: usize,
        stride: usize,
        padding: Padding,
        activation: Activation,
    ) -> CResult<Self> {
        let (out_channels, in_per_group, kh, kw) = weight.dims4()?;
        if groups == 0 || out_channels % groups != 0 || stride == 0 {
            candle_core::bail!("conv2d: {out_channels} output channels, {groups} groups, stride {stride}");
        }
        let bias = match bias {
            Some(b) => {
                let b = b.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
                if b.len() != out_channels {
                    candle_core::bail!("conv2d bias has {} values for {out_channels} channels", b.len());
                }
                b
            }
            None => vec![0.0; out_channels],
        };
        Ok(Self {
            weight: Arc::new(weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?),
            bias: Arc::new(bias),
            out_channels,
            in_channels: in_per_group * groups,
            groups,
            kernel: (kh, kw),
            stride,
            padding,
            activation,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// # Shapes
    /// `x`: `[batch, in, h, w]` -> `[batch, out, oh, ow]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }

    fn geometry(&self, dims: &[usize]) -> CResult<ConvGeometry> {
        let &[batch, c, h, w] = dims else {
            candle_core::bail!("conv2d expects a [batch, channels, h, w] input, got {dims:?}");
        };
        if c != self.in_channels {
            candle_core::bail!("conv2d expects {} input channels, got {c}", self.in_channels);
        }
        let (kh, kw) = self.kernel;
        let (pad_top, pad_bottom, oh) = self.padding.resolve(h, kh, self.stride);
        let (pad_left, pad_right, ow) = self.padding.resolve(w, kw, self.stride);
        if h + pad_top + pad_bottom < kh || w + pad_left + pad_right < kw {
            candle_core::bail!("conv2d: input {h}x{w} is smaller than the {kh}x{kw} kernel");
        }
        Ok(ConvGeometry { batch, c, h, w, oh, ow, pad_top, pad_left })
    }

    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.groups == self.out_channels
    }

    fn is_pointwise(&self, g: &ConvGeometry) -> bool {
        self.kernel == (1, 1) && self.stride == 1 && g.oh == g.h && g.ow == g.w && g.pad_top == 0
    }

    /// im2col for one group (channels from `c0`) of one image: `[cg * kh * kw, oh * ow]`.
    fn im2col(&self, x: &[f32], g: &ConvGeometry, c0: usize, col: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let plane = g.oh * g.ow;
        col.par_chunks_mut(plane).enumerate().for_each(|(row, dst)| {
            let ci = c0 + row / (kh * kw);
            let ky = (row / kw) % kh;
            let kx = row % kw;
            let src = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for oy in 0..g.oh {
                let iy = (oy * self.stride + ky) as isize - g.pad_top as isize;
                let drow = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                if iy < 0 || iy >= g.h as isize {
                    drow.fill(0.0);
                    continue;
                }
                let srow = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
                for (ox, d) in drow.iter_mut().enumerate() {
                    let ix = (ox * self.stride + kx) as isize - g.pad_left as isize;
                    *d = if ix >= 0 && (ix as usize) < g.w { srow[ix as usize] } else { 0.0 };
                }
            }
        });
    }

    /// col2im, the adjoint of [`Self::im2col`]: accumulates `col` into `dx`.
    fn col2im(&self, col: &[f32], g: &ConvGeometry, c0: usize, cg: usize, dx: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let plane = g.oh * g.ow;
        dx[c0 * g.h * g.w..(c0 + cg) * g.h * g.w]
            .par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(cl, dst)| {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let row = (cl * kh + ky) * kw + kx;
                        let src = &col[row * plane..(row + 1) * plane];
                        for oy in 0..g.oh {
                            let iy = (oy * self.stride + ky) as isize - g.pad_top as isize;
                            if iy < 0 || iy >= g.h as isize {
                                continue;
                            }
                            let drow = &mut dst[iy as usize * g.w..(iy as usize + 1) * g.w];
                            for ox in 0..g.ow {
                                let ix = (ox * self.stride + kx) as isize - g.pad_left as isize;
                                if ix >= 0 && (ix as usize) < g.w {
                                    drow[ix as usize] += src[oy * g.ow + ox];
                                }
                            }
                        }
                    }
                }
            });
    }

    fn forward_image(&self, x: &[f32], g: &ConvGeometry, out: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let plane = g.oh * g.ow;
        if self.is_depthwise() {
            out.par_chunks_mut(plane).enumerate().for_each(|(c, dst)| {
                let src = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
                let wk = &self.weight[c * kh * kw..(c + 1) * kh * kw];
                depthwise_channel(src, wk, g, self.stride, kh, kw, dst);
            });
        } else {
            let cg = g.c / self.groups;
            let og = self.out_channels / self.groups;
            let k = cg * kh * kw;
            let mut col = Vec::new();
            for grp in 0..self.groups {
                let (rhs, rhs_len) = if self.is_pointwise(g) {
                    (&x[grp * cg * plane..(grp + 1) * cg * plane], k)
                } else {
                    col.resize(k * plane, 0.0);
                    self.im2col(x, g, grp * cg, &mut col);
                    (&col[..], k)
                };
                let w = &self.weight[grp * og * k..(grp + 1) * og * k];
                let dst = &mut out[grp * og * plane..(grp + 1) * og * plane];
                // dst[og, plane] = w[og, k] @ rhs[k, plane]
                matmul(dst, w, (k as isize, 1), rhs, (plane as isize, 1), og, plane, rhs_len);
            }
        }
        let act = self.activation;
        out.par_chunks_mut(plane).enumerate().for_each(|(o, dst)| {
            let b = self.bias[o];
            dst.iter_mut().for_each(|v| *v = act.apply(*v + b));
        });
    }

    /// Input gradient of one image, given the gradient at the pre-activation output.
    fn backward_image(&self, gpre: &[f32], g: &ConvGeometry, dx: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let plane = g.oh * g.ow;
        if self.is_depthwise() {
            dx.par_chunks_mut(g.h * g.w).enumerate().for_each(|(c, dst)| {
                let src = &gpre[c * plane..(c + 1) * plane];
                let wk = &self.weight[c * kh * kw..(c + 1) * kh * kw];
                depthwise_channel_backward(src, wk, g, self.stride, kh, kw, dst);
            });
            return;
        }
        let cg = g.c / self.groups;
        let og = self.out_channels / self.groups;
        let k = cg * kh * kw;
        let mut col = vec![0.0f32; k * plane];
        for grp in 0..self.groups {
            let w = &self.weight[grp * og * k..(grp + 1) * og * k];
            let go = &gpre[grp * og * plane..(grp + 1) * og * plane];
            // col[k, plane] = w^T[k, og] @ go[og, plane]
            matmul(&mut col, w, (1, k as isize), go, (plane as isize, 1), k, plane, og);
            if self.is_pointwise(g) {
                dx[grp * cg * plane..(grp + 1) * cg * plane].copy_from_slice(&col);
            } else {
                self.col2im(&col, g, grp * cg, cg, dx);
            }
        }
    }
}

impl CustomOp1 for Conv2d {
    fn name(&self) -> &'static str {
        "gradcam-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let g = self.geometry(layout.dims())?;
        let (in_len, out_len) = (g.c * g.h * g.w, self.out_channels * g.oh * g.ow);
        let mut out = vec![0.0f32; g.batch * out_len];
        for b in 0..g.batch {
            self.forward_image(&x[b * in_len..(b + 1) * in_len], &g, &mut out[b * out_len..(b + 1) * out_len]);
        }
        Ok((CpuStorage::F32(out), Shape::from((g.batch, self.out_channels, g.oh, g.ow))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let g = self.geometry(arg.dims())?;
        let out = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let act = self.activation;
        let gpre: Vec<f32> = if act == Activation::Identity {
            grad
        } else {
            out.par_iter().zip(grad.par_iter()).map(|(&o, &d)| d * act.derivative_from_output(o)).collect()
        };
        let (in_len, out_len) = (g.c * g.h * g.w, self.out_channels * g.oh * g.ow);
        let mut dx = vec![0.0f32; g.batch * in_len];
        for b in 0..g.batch {
            self.backward_image(&gpre[b * out_len..(b + 1) * out_len], &g, &mut dx[b * in_len..(b + 1) * in_len]);
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

fn depthwise_channel(src: &[f32], wk: &[f32], g: &ConvGeometry, stride: usize, kh: usize, kw: usize, dst: &mut [f32]) {
    for oy in 0..g.oh {
        let drow = &mut dst[oy * g.ow..(oy + 1) * g.ow];
        drow.fill(0.0);
        for ky in 0..kh {
            let iy = (oy * stride + ky) as isize - g.pad_top as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            let srow = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
            for kx in 0..kw {
                let wv = wk[ky * kw + kx];
                // Output columns whose input column ix = ox*stride + kx - pad_left is inside.
                let first = (g.pad_left.saturating_sub(kx)).div_ceil(stride);
                let last = ((g.w + g.pad_left).saturating_sub(kx + 1) / stride + 1).min(g.ow);
                if stride == 1 {
                    let off = first + kx - g.pad_left;
                    let n = last.saturating_sub(first);
                    for (d, s) in drow[first..first + n].iter_mut().zip(&srow[off..off + n]) {
                        *d += wv * s;
                    }
                } else {
                    for ox in first..last {
                        drow[ox] += wv * srow[ox * stride + kx - g.pad_left];
                    }
                }
            }
        }
    }
}

fn depthwise_channel_backward(
    gout: &[f32],
    wk: &[f32],
    g: &ConvGeometry,
    stride: usize,
    kh: usize,
    kw: usize,
    dst: &mut [f32],
) {
    dst.fill(0.0);
    for oy in 0..g.oh {
        let grow = &gout[oy * g.ow..(oy + 1) * g.ow];
        for ky in 0..kh {
            let iy = (oy * stride + ky) as isize - g.pad_top as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            let drow = &mut dst[iy as usize * g.w..(iy as usize + 1) * g.w];
            for kx in 0..kw {
                let wv = wk[ky * kw + kx];
                let first = (g.pad_left.saturating_sub(kx)).div_ceil(stride);
                let last = ((g.w + g.pad_left).saturating_sub(kx + 1) / stride + 1).min(g.ow);
                for ox in first..last {
                    drow[ox * stride + kx - g.pad_left] += wv * grow[ox];
                }
            }
        }
    }
}

/// `dst[m, n] = lhs[m, k] @ rhs[k, n]` with (row stride, column stride) for the operands;
/// `dst` is row-major and overwritten.
#[allow(clippy::too_many_arguments)]
fn matmul(dst: &mut [f32], lhs: &[f32], lhs_strides: (isize, isize), rhs: &[f32], rhs_strides: (isize, isize), m: usize, n: usize, k: usize) {
    assert!(dst.len() >= m * n);
    let parallelism = if m * n * k > 64 * 64 * 64 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices cover every element addressed by the given sizes and strides (checked
    // by the callers' shape arithmetic and the assert above); dst does not alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_strides.1,
            lhs_strides.0,
            rhs.as_ptr(),
            rhs_strides.1,
            rhs_strides.0,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A frozen fully-connected layer `y = x W^T + b`, W `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    out_features: usize,
    in_features: usize,
    activation: Activation,
}

impl Linear {
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
        })
    }

    /// # Shapes
    /// `x`: `[batch, in]` -> `[batch, out]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
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
        let n = self.out_features;
        let mut out = vec![0.0f32; batch * n];
        // out[batch, n] = x[batch, in] @ W^T[in, n]
        matmul(&mut out, x, (inf as isize, 1), &self.weight, (1, inf as isize), batch, n, inf);
        let act = self.activation;
        out.chunks_mut(n).for_each(|row| {
            row.iter_mut().zip(self.bias.iter()).for_each(|(v, b)| *v = act.apply(*v + b));
        });
        Ok((CpuStorage::F32(out), Shape::from((batch, n))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let batch = arg.dim(0)?;
        let out = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let act = self.activation;
        let gpre: Vec<f32> = out.iter().zip(&grad).map(|(&o, &d)| d * act.derivative_from_output(o)).collect();
        let mut dx = vec![0.0f32; batch * self.in_features];
        // dx[batch, in] = g[batch, out] @ W[out, in]
        let (n, k) = (self.in_features, self.out_features);
        matmul(&mut dx, &gpre, (k as isize, 1), &self.weight, (n as isize, 1), batch, n, k);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Max pooling with PyTorch semantics (padding counts as -inf, the first maximum of a window
/// receives the gradient).
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool2d {
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(*self)
    }

    fn out_size(&self, n: usize) -> CResult<usize> {
        if n + 2 * self.padding < self.kernel || self.stride == 0 {
            candle_core::bail!("max-pool: input side {n} is smaller than the kernel {}", self.kernel);
        }
        Ok((n + 2 * self.padding - self.kernel) / self.stride + 1)
    }

    /// Index (within the plane) of the first maximum of window (oy, ox).
    #[inline]
    fn argmax(&self, src: &[f32], h: usize, w: usize, oy: usize, ox: usize) -> usize {
        let mut best = f32::NEG_INFINITY;
        let mut best_i = usize::MAX;
        for ky in 0..self.kernel {
            let iy = (oy * self.stride + ky) as isize - self.padding as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            for kx in 0..self.kernel {
                let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                if ix < 0 || ix >= w as isize {
                    continue;
                }
                let i = iy as usize * w + ix as usize;
                let v = src[i];
                if best_i == usize::MAX || v > best || v.is_nan() {
                    best = v;
                    best_i = i;
                    if v.is_nan() {
                        return i;
                    }
                }
            }
        }
        best_i
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "gradcam-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (oh, ow) = (self.out_size(h)?, self.out_size(w)?);
        let mut out = vec![0.0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, dst)| {
            let src = &x[p * h * w..(p + 1) * h * w];
            for oy in 0..oh {
                for ox in 0..ow {
                    dst[oy * ow + ox] = src[self.argmax(src, h, w, oy, ox)];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let (b, c, h, w) = arg.dims4()?;
        let (oh, ow) = (self.out_size(h)?, self.out_size(w)?);
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0.0f32; b * c * h * w];
        dx.par_chunks_mut(h * w).enumerate().for_each(|(p, dst)| {
            let src = &x[p * h * w..(p + 1) * h * w];
            let g = &grad[p * oh * ow..(p + 1) * oh * ow];
            for oy in 0..oh {
                for ox in 0..ow {
                    dst[self.argmax(src, h, w, oy, ox)] += g[oy * ow + ox];
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// PyTorch's `AdaptiveAvgPool2d`: bin i covers [floor(i*H/OH), ceil((i+1)*H/OH)).
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveAvgPool2d {
    pub out_h: usize,
    pub out_w: usize,
}

impl AdaptiveAvgPool2d {
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if h == self.out_h && w == self.out_w {
            return Ok(x.clone());
        }
        x.contiguous()?.apply_op1(*self)
    }

    fn bins(n: usize, out: usize) -> Vec<(usize, usize)> {
        (0..out).map(|i| (i * n / out, ((i + 1) * n).div_ceil(out))).collect()
    }
}

impl CustomOp1 for AdaptiveAvgPool2d {
    fn name(&self) -> &'static str {
        "gradcam-adaptive-avg-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (ys, xs) = (Self::bins(h, self.out_h), Self::bins(w, self.out_w));
        let mut out = vec![0.0f32; b * c * self.out_h * self.out_w];
        out.par_chunks_mut(self.out_h * self.out_w).enumerate().for_each(|(p, dst)| {
            let src = &x[p * h * w..(p + 1) * h * w];
            for (oy, &(y0, y1)) in ys.iter().enumerate() {
                for (ox, &(x0, x1)) in xs.iter().enumerate() {
                    let mut s = 0.0;
                    for y in y0..y1 {
                        s += src[y * w + x0..y * w + x1].iter().sum::<f32>();
                    }
                    dst[oy * self.out_w + ox] = s / ((y1 - y0) * (x1 - x0)) as f32;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, self.out_h, self.out_w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let (b, c, h, w) = arg.dims4()?;
        let (ys, xs) = (Self::bins(h, self.out_h), Self::bins(w, self.out_w));
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0.0f32; b * c * h * w];
        dx.par_chunks_mut(h * w).enumerate().for_each(|(p, dst)| {
            let g = &grad[p * self.out_h * self.out_w..(p + 1) * self.out_h * self.out_w];
            for (oy, &(y0, y1)) in ys.iter().enumerate() {
                for (ox, &(x0, x1)) in xs.iter().enumerate() {
                    let share = g[oy * self.out_w + ox] / ((y1 - y0) * (x1 - x0)) as f32;
                    for y in y0..y1 {
                        dst[y * w + x0..y * w + x1].iter_mut().for_each(|d| *d += share);
                    }
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} supports f32 tensors only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} needs a contiguous input"),
    }
}
