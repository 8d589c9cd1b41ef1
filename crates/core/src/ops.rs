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
//! - Guided Backpropagation's rule in every ReLU / ReLU6 backward above, inside [`guided`].
//!
//! Every backward here is checked against finite differences in `tests/integration/gradients.rs`.

use std::cell::Cell;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Planes per rayon task when work is split by channel plane: enough for about 16k values, so
/// that the 7x7 and 14x14 planes of a network's last stages do not pay a task per channel.
fn planes_per_task(plane: usize) -> usize {
    (16384 / plane.max(1)).max(1)
}

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

    /// The gradient through the activation, read from its output; with Guided Backpropagation's
    /// rule a ReLU or ReLU6 also stops every negative gradient.
    #[inline]
    fn backward(self, out: f32, grad: f32, guided: bool) -> f32 {
        if guided && self != Activation::Identity && grad <= 0.0 {
            return 0.0;
        }
        grad * self.derivative_from_output(out)
    }

    /// Applies the activation as a standalone differentiable op.
    pub fn forward(self, x: &Tensor) -> CResult<Tensor> {
        if self == Activation::Identity {
            return Ok(x.clone());
        }
        x.contiguous()?.apply_op1(ActivationOp(self))
    }
}

thread_local! {
    static GUIDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with Guided Backpropagation's rule (Springenberg et al. 2015; the paper's section
/// 3.2) in the backward of every ReLU and ReLU6 of these ops on this thread: the gradient passes
/// only where it is positive and the unit's input was positive (for ReLU6, also below 6). The
/// forward is unchanged; run the backward inside `f`. The previous rule is restored afterwards,
/// even on a panic.
pub fn guided<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GUIDED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GUIDED.with(|g| g.replace(true)));
    f()
}

/// Whether [`guided`] is in force on this thread (read once per backward, before any work is
/// handed to other threads).
fn is_guided() -> bool {
    GUIDED.with(Cell::get)
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
        let (act, guided) = (self.0, is_guided());
        let g: Vec<f32> = out
            .par_iter()
            .zip(grad.par_iter())
            .with_min_len(4096)
            .map(|(&o, &g)| act.backward(o, g, guided))
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
    kh: usize,
    kw: usize,
    stride: usize,
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
        geometry(dims, self.in_channels, self.kernel, self.stride, self.padding)
    }

    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.groups == self.out_channels
    }

    fn is_pointwise(&self, g: &ConvGeometry) -> bool {
        self.kernel == (1, 1) && self.stride == 1 && g.oh == g.h && g.ow == g.w && g.pad_top == 0
    }

    fn forward_image(&self, x: &[f32], g: &ConvGeometry, out: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let plane = g.oh * g.ow;
        if self.is_depthwise() {
            let act = self.activation;
            out.par_chunks_mut(plane).enumerate().with_min_len(planes_per_task(plane)).for_each_init(Default::default, |buf, (c, dst)| {
                let src = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
                let wk = &self.weight[c * kh * kw..(c + 1) * kh * kw];
                depthwise_channel(src, wk, self.bias[c], act, g, self.stride, kh, kw, dst, buf);
            });
            return;
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
                    im2col(x, g, grp * cg, &mut col);
                    (&col[..], k)
                };
                let w = &self.weight[grp * og * k..(grp + 1) * og * k];
                let dst = &mut out[grp * og * plane..(grp + 1) * og * plane];
                // dst[og, plane] = w[og, k] @ rhs[k, plane]
                matmul(dst, w, (k as isize, 1), rhs, (plane as isize, 1), og, plane, rhs_len);
            }
        }
        let act = self.activation;
        out.par_chunks_mut(plane).enumerate().with_min_len(planes_per_task(plane)).for_each(|(o, dst)| {
            let b = self.bias[o];
            dst.iter_mut().for_each(|v| *v = act.apply(*v + b));
        });
    }

    /// Input gradient of one image, given the gradient at the pre-activation output.
    fn backward_image(&self, gpre: &[f32], g: &ConvGeometry, dx: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let plane = g.oh * g.ow;
        if self.is_depthwise() {
            dx.par_chunks_mut(g.h * g.w).enumerate().with_min_len(planes_per_task(g.h * g.w)).for_each(|(c, dst)| {
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
                col2im(&col, g, grp * cg, cg, dx);
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
        let (act, guided) = (self.activation, is_guided());
        let gpre: Vec<f32> = if act == Activation::Identity {
            grad
        } else {
            out.par_iter().zip(grad.par_iter()).map(|(&o, &d)| act.backward(o, d, guided)).collect()
        };
        let (in_len, out_len) = (g.c * g.h * g.w, self.out_channels * g.oh * g.ow);
        let mut dx = vec![0.0f32; g.batch * in_len];
        for b in 0..g.batch {
            self.backward_image(&gpre[b * out_len..(b + 1) * out_len], &g, &mut dx[b * in_len..(b + 1) * in_len]);
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// A dense (ungrouped) convolution whose weight and bias are inputs too, for training, with the
/// activation fused: the backward gives the input, weight and bias gradients by im2col + GEMM
/// (candle's input gradient goes through a naive transposed convolution, and separate bias and
/// ReLU ops cost a pass over memory each, forward and backward).
#[derive(Debug, Clone, Copy)]
pub struct TrainableConv2d {
    pub stride: usize,
    pub padding: Padding,
    pub activation: Activation,
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
            matmul(&mut y[b * out * plane..(b + 1) * out * plane], w, (k as isize, 1), &col, (plane as isize, 1), out, plane, k);
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
        let (act, guided) = (self.activation, is_guided());
        gs.par_iter_mut().zip(ys.par_iter()).for_each(|(d, &o)| *d = act.backward(o, *d, guided));
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
            matmul(&mut dw_b, go, (plane as isize, 1), &col, (1, plane as isize), out, k, plane);
            dw.iter_mut().zip(&dw_b).for_each(|(a, b)| *a += b);
            // dcol[k, plane] = W^T[k, out] @ g[out, plane], scattered back by col2im.
            matmul(&mut col, &ws, (1, k as isize), go, (plane as isize, 1), k, plane, out);
            col2im(&col, &g, 0, g.c, &mut dx[b * in_len..(b + 1) * in_len]);
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, bias.shape(), bias.device())?),
        ))
    }
}

/// Resolves the output size and padding of a convolution for an input of `dims`.
fn geometry(dims: &[usize], in_channels: usize, kernel: (usize, usize), stride: usize, padding: Padding) -> CResult<ConvGeometry> {
    let &[batch, c, h, w] = dims else {
        candle_core::bail!("conv2d expects a [batch, channels, h, w] input, got {dims:?}");
    };
    if c != in_channels {
        candle_core::bail!("conv2d expects {in_channels} input channels, got {c}");
    }
    let (kh, kw) = kernel;
    let (pad_top, pad_bottom, oh) = padding.resolve(h, kh, stride);
    let (pad_left, pad_right, ow) = padding.resolve(w, kw, stride);
    if h + pad_top + pad_bottom < kh || w + pad_left + pad_right < kw {
        candle_core::bail!("conv2d: input {h}x{w} is smaller than the {kh}x{kw} kernel");
    }
    Ok(ConvGeometry { kh, kw, stride, batch, c, h, w, oh, ow, pad_top, pad_left })
}

/// im2col for one group (channels from `c0`) of one image: `[cg * kh * kw, oh * ow]`.
fn im2col(x: &[f32], g: &ConvGeometry, c0: usize, col: &mut [f32]) {
    let (kh, kw, stride) = (g.kh, g.kw, g.stride);
    let plane = g.oh * g.ow;
    col.par_chunks_mut(plane).enumerate().with_min_len(planes_per_task(plane)).for_each(|(row, dst)| {
        let ci = c0 + row / (kh * kw);
        let ky = (row / kw) % kh;
        let kx = row % kw;
        let src = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for oy in 0..g.oh {
            let iy = (oy * stride + ky) as isize - g.pad_top as isize;
            let drow = &mut dst[oy * g.ow..(oy + 1) * g.ow];
            if iy < 0 || iy >= g.h as isize {
                drow.fill(0.0);
                continue;
            }
            let srow = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
            for (ox, d) in drow.iter_mut().enumerate() {
                let ix = (ox * stride + kx) as isize - g.pad_left as isize;
                *d = if ix >= 0 && (ix as usize) < g.w { srow[ix as usize] } else { 0.0 };
            }
        }
    });
}

/// col2im, the adjoint of [`Self::im2col`]: accumulates `col` into `dx`.
fn col2im(col: &[f32], g: &ConvGeometry, c0: usize, cg: usize, dx: &mut [f32]) {
    let (kh, kw, stride) = (g.kh, g.kw, g.stride);
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
                        let iy = (oy * stride + ky) as isize - g.pad_top as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let drow = &mut dst[iy as usize * g.w..(iy as usize + 1) * g.w];
                        for ox in 0..g.ow {
                            let ix = (ox * stride + kx) as isize - g.pad_left as isize;
                            if ix >= 0 && (ix as usize) < g.w {
                                drow[ix as usize] += src[oy * g.ow + ox];
                            }
                        }
                    }
                }
            }
        });
}


/// One channel of a depthwise convolution with its bias and activation. The input is first copied
/// into zero-padded planes split by row and column phase (`stride^2` planes; phase (p, q) holds
/// the padded pixels (p + stride i, q + stride j)), so that for every kernel tap the whole output
/// plane reads one contiguous run of one phase plane: computed on a grid as wide as the phase
/// planes (the extra columns are thrown away), each tap is a single long multiply-add that
/// vectorises even for 7x7 outputs. `buf` and `ext` are scratch space reused across channels.
#[allow(clippy::too_many_arguments)]
fn depthwise_channel(
    src: &[f32],
    wk: &[f32],
    bias: f32,
    act: Activation,
    g: &ConvGeometry,
    stride: usize,
    kh: usize,
    kw: usize,
    dst: &mut [f32],
    (buf, ext): &mut (Vec<f32>, Vec<f32>),
) {
    let s = stride;
    let (rows, cols) = ((g.oh - 1) * s + kh, (g.ow - 1) * s + kw); // padded extent used
    let (prow, pcol) = (rows.div_ceil(s), cols.div_ceil(s)); // one phase plane
    let plane = prow * pcol;
    buf.clear();
    buf.resize(s * s * plane, 0.0);
    let n = g.w.min(cols.saturating_sub(g.pad_left)); // input columns inside the padded extent
    for r in 0..rows {
        let iy = r as isize - g.pad_top as isize;
        if iy < 0 || iy >= g.h as isize {
            continue;
        }
        let srow = &src[iy as usize * g.w..iy as usize * g.w + n];
        let (rp, ri) = (r % s, r / s);
        for q in 0..s {
            let dst = &mut buf[(rp * s + q) * plane + ri * pcol..(rp * s + q) * plane + (ri + 1) * pcol];
            // Padded column j = c * s + q holds input column j - pad_left.
            let c0 = g.pad_left.saturating_sub(q).div_ceil(s);
            let first = (c0 * s + q).saturating_sub(g.pad_left).min(n);
            for (d, &v) in dst[c0..].iter_mut().zip(srow[first..].iter().step_by(s)) {
                *d = v;
            }
        }
    }
    let len = (g.oh - 1) * pcol + g.ow;
    ext.clear();
    ext.resize(len, bias);
    for ky in 0..kh {
        for kx in 0..kw {
            let wv = wk[ky * kw + kx];
            let start = ((ky % s) * s + kx % s) * plane + (ky / s) * pcol + kx / s;
            for (d, &v) in ext.iter_mut().zip(&buf[start..start + len]) {
                *d += wv * v;
            }
        }
    }
    for (oy, drow) in dst.chunks_mut(g.ow).enumerate() {
        for (d, &v) in drow.iter_mut().zip(&ext[oy * pcol..oy * pcol + g.ow]) {
            *d = act.apply(v);
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

/// `out = W x` for row-major `W` `[out.len(), x.len()]`: the small matrix-vector products of
/// recurrent heads, where a GEMM's setup costs more than the product. With AVX2 + FMA when the
/// CPU has them (detected at run time; the build targets baseline x86-64).
pub fn matvec(w: &[f32], x: &[f32], out: &mut [f32]) {
    assert!(w.len() >= out.len() * x.len(), "matvec: W too small");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { matvec_avx2(w, x, out) };
    }
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len().max(1))) {
        *o = dot_portable(row, x);
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Eight partial sums, so that the compiler vectorises the reduction.
#[inline(always)]
fn dot_portable(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn matvec_avx2(w: &[f32], x: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len().max(1))) {
        *o = dot_fma(row, x);
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_fma(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_ptr());
    let mut i = 0;
    // SAFETY: only inlined into functions compiled with AVX2 + FMA, which run after the CPU was
    // checked for them; every load reads 8 floats below n of both slices, and `lanes` holds 8.
    unsafe {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i + 8)), _mm256_loadu_ps(py.add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)), acc0);
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1));
        lanes.iter().sum::<f32>() + x[i..n].iter().zip(&y[i..n]).map(|(a, b)| a * b).sum::<f32>()
    }
}

/// `dst[m, n] = lhs[m, k] @ rhs[k, n]` with (row stride, column stride) for the operands;
/// `dst` is row-major and overwritten. Panics if `dst` is too small.
#[allow(clippy::too_many_arguments)]
pub fn matmul(dst: &mut [f32], lhs: &[f32], lhs_strides: (isize, isize), rhs: &[f32], rhs_strides: (isize, isize), m: usize, n: usize, k: usize) {
    assert!(dst.len() >= m * n);
    let reach = |(rs, cs): (isize, isize), rows: usize, cols: usize| (rows.saturating_sub(1) as isize * rs + cols.saturating_sub(1) as isize * cs) as usize;
    assert!(m * k == 0 || reach(lhs_strides, m, k) < lhs.len(), "matmul: lhs too small");
    assert!(k * n == 0 || reach(rhs_strides, k, n) < rhs.len(), "matmul: rhs too small");
    // Below about 2M multiply-adds, waking the pool costs more than a second thread saves.
    let parallelism = if m * n * k > 128 * 128 * 128 {
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
        let (act, guided) = (self.activation, is_guided());
        let gpre: Vec<f32> = out.iter().zip(&grad).map(|(&o, &d)| act.backward(o, d, guided)).collect();
        let mut dx = vec![0.0f32; batch * self.in_features];
        // dx[batch, in] = g[batch, out] @ W[out, in]
        let (n, k) = (self.in_features, self.out_features);
        matmul(&mut dx, &gpre, (k as isize, 1), &self.weight, (n as isize, 1), batch, n, k);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
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
        matmul(&mut gates, &xh, (k as isize, 1), &self.weight, (1, k as isize), batch, 4 * hh, k);
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
        matmul(&mut dxh, &dpre, ((4 * hh) as isize, 1), &self.weight, (k as isize, 1), batch, k, 4 * hh);
        for b in 0..batch {
            dx[b * width..b * width + k].copy_from_slice(&dxh[b * k..(b + 1) * k]);
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Global average and max pooling side by side, in one pass with one backward (candle's max
/// backward builds an equality mask over the whole input); the first maximum gets the gradient.
#[derive(Debug, Clone, Copy)]
pub struct GlobalAvgMaxPool;

impl GlobalAvgMaxPool {
    /// # Shapes
    /// `[n, C, h, w]` -> `[n, 2C]`: averages, then maxima.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(*self)
    }
}

impl CustomOp1 for GlobalAvgMaxPool {
    fn name(&self) -> &'static str {
        "gradcam-global-avg-max-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let plane = h * w;
        let mut out = vec![0.0f32; n * 2 * c];
        for (p, src) in x.chunks(plane).enumerate() {
            let (b, k) = (p / c, p % c);
            out[b * 2 * c + k] = src.iter().sum::<f32>() / plane as f32;
            out[b * 2 * c + c + k] = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, 2 * c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let plane = h * w;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0.0f32; n * c * plane];
        for (p, (dst, src)) in dx.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
            let (b, k) = (p / c, p % c);
            dst.fill(g[b * 2 * c + k] / plane as f32);
            let arg = src.iter().enumerate().fold(0, |best, (i, &v)| if v > src[best] { i } else { best });
            dst[arg] += g[b * 2 * c + c + k];
        }
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
        out.par_chunks_mut(oh * ow).enumerate().with_min_len(planes_per_task(oh * ow)).for_each(|(p, dst)| {
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
        dx.par_chunks_mut(h * w).enumerate().with_min_len(planes_per_task(h * w)).for_each(|(p, dst)| {
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
        dx.par_chunks_mut(h * w).enumerate().with_min_len(planes_per_task(h * w)).for_each(|(p, dst)| {
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
