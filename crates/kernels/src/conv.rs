//! 2-D convolutions: [`Conv2d`] for frozen layers (input gradient only) and [`TrainableConv2d`]
//! for training (input, weight and bias gradients), both by im2col + GEMM, depthwise ones by a
//! direct kernel, with TensorFlow "SAME" padding and a fused bias and activation.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, zeros, CResult};
use super::kernels::{col2im, conv_tiled, depthwise_channel, depthwise_channel_backward, im2col, matmul, tiling_pays};
use super::packed::{self, Blocks, ChannelBlocks, Columns, PackedWeights, Winograd};
use super::{lanes, Avx512};
pub use super::trainable::TrainableConv2d;
use super::{planes_per_task, Activation, Pointwise, Rule};

/// Spatial padding of a convolution or pooling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same number of pixels on every side (PyTorch's `padding=p`).
    Symmetric(usize),
    /// TensorFlow "SAME": output = ceil(input / stride), the odd pixel of padding goes to the
    /// bottom and right. Computed from the actual input size, so any image size works.
    Same,
    /// Explicit pixels before and after each axis, as ONNX's `pads` (top, left, bottom, right).
    Explicit {
        /// Rows above.
        top: usize,
        /// Columns on the left.
        left: usize,
        /// Rows below.
        bottom: usize,
        /// Columns on the right.
        right: usize,
    },
}

impl Padding {
    /// (before, after) padding and output length along one axis.
    fn resolve(self, input: usize, kernel: usize, stride: usize, horizontal: bool) -> (usize, usize, usize) {
        match self {
            Padding::Explicit { top, left, bottom, right } => {
                let (a, b) = if horizontal { (left, right) } else { (top, bottom) };
                (a, b, (input + a + b).saturating_sub(kernel) / stride + 1)
            }
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
    /// The backward rule of `activation` in the graphs this convolution is built into.
    rule: Rule,
    /// A smooth activation (SiLU, hard swish) fused after the bias instead of `activation`; its
    /// derivative needs the pre-activation, which the backward recomputes.
    smooth: Option<Pointwise>,
    /// The weights in the AVX-512 kernels' layouts (dense convolutions on CPUs that have
    /// AVX-512F), shared by the clones.
    packs: Option<Arc<Packs>>,
    /// Whether Winograd F(2x2, 3x3) may take this convolution (dense, 3x3, stride 1, enough
    /// input channels); the input size decides.
    winograd: bool,
}

/// The weights in the AVX-512 kernels' layouts, each made the first time a call needs it: a
/// layer runs one kernel for a given input size, so only that layout is kept beside the
/// original weights (which the backward reads).
#[derive(Debug)]
struct Packs {
    /// The proof that the kernels that read these layouts can run here.
    cpu: Avx512,
    /// Per group, for the column-panel GEMM.
    panels: OnceLock<Vec<PackedWeights>>,
    /// Per group, for the pixel-major kernel.
    pixel: OnceLock<Vec<ChannelBlocks>>,
    /// Transformed for Winograd.
    winograd: OnceLock<Winograd>,
}

/// Batches of at least this many images take [`lanes::depthwise_batch`] for their depthwise
/// convolutions.
const LANES_MIN_BATCH: usize = 8;

/// Geometry of one convolution call, resolved from the input size.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvGeometry {
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: usize,
    pub(super) batch: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) pad_top: usize,
    pub(super) pad_left: usize,
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
        let weight: Vec<f32> = weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let depthwise = groups > 1 && groups == in_per_group * groups && groups == out_channels;
        let packs = Avx512::detect().filter(|_| !depthwise).map(|cpu| Arc::new(Packs { cpu, panels: OnceLock::new(), pixel: OnceLock::new(), winograd: OnceLock::new() }));
        let winograd = groups == 1 && (kh, kw, stride) == (3, 3, 1) && in_per_group >= packed::WINOGRAD_MIN_CHANNELS;
        Ok(Self {
            weight: Arc::new(weight),
            bias: Arc::new(bias),
            out_channels,
            in_channels: in_per_group * groups,
            groups,
            kernel: (kh, kw),
            stride,
            padding,
            activation,
            rule: Rule::Exact,
            smooth: None,
            packs,
            winograd,
        })
    }

    /// Each group's weights packed in blocks of R rows.
    fn group_blocks<const R: usize>(&self) -> Vec<Blocks<R>> {
        let og = self.out_channels / self.groups;
        let k = self.weight.len() / self.out_channels;
        (0..self.groups).map(|grp| Blocks::new(&self.weight[grp * og * k..(grp + 1) * og * k], &self.bias[grp * og..(grp + 1) * og], og, k)).collect()
    }

    /// The same convolution with `p` (SiLU, hard swish, a sigmoid) fused after the bias, in place
    /// of the activation given to [`Conv2d::new`] (which must be `Identity`).
    pub fn with_pointwise(mut self, p: Pointwise) -> CResult<Self> {
        if self.activation != Activation::Identity {
            candle_core::bail!("conv2d: a pointwise epilogue replaces the activation, which is {:?}", self.activation);
        }
        self.smooth = Some(p);
        Ok(self)
    }

    /// The same convolution (sharing its weights) with another activation fused after the bias.
    pub fn with_activation(&self, activation: Activation) -> CResult<Self> {
        if self.smooth.is_some() {
            candle_core::bail!("conv2d: this convolution ends in a smooth activation");
        }
        Ok(Self { activation, ..self.clone() })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// # Shapes
    /// `x`: `[batch, in, h, w]` -> `[batch, out, oh, ow]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.forward_with(x, Rule::Exact)
    }

    /// [`Conv2d::forward`] with the backward of its activation following `rule`.
    pub fn forward_with(&self, x: &Tensor, rule: Rule) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(Conv2d { rule, ..self.clone() })
    }

    /// The forward of a batch `x` (`[batch, in, h, w]` values), with an optional residual (and
    /// the activation after it): `[batch, out, oh, ow]` values.
    fn forward_batch(&self, x: &[f32], g: &ConvGeometry, residual: Option<(&[f32], Activation)>) -> Vec<f32> {
        let (in_len, out_len) = (g.c * g.h * g.w, self.out_channels * g.oh * g.ow);
        let n = g.batch * out_len;
        if let (Some(packs), true) = (&self.packs, out_len > 0) {
            // The packed kernels write every output value, so the buffer is not zeroed first:
            // ResNet-50's forward zeroed about 46 MB, 2.6 ms of 38 at 2 threads.
            let mut out = Vec::with_capacity(n);
            // The images of a batch side by side over the threads (each image's kernel still
            // splits its work, for a thread that runs out of images): a batch of small planes
            // would otherwise wait for all the threads at the end of every image.
            let image = |(b, dst): (usize, &mut [std::mem::MaybeUninit<f32>])| {
                let res = residual.map(|(r, act)| (&r[b * out_len..(b + 1) * out_len], act));
                self.forward_packed(packs, &x[b * in_len..(b + 1) * in_len], g, res, dst);
            };
            match g.batch {
                1 => image((0, &mut out.spare_capacity_mut()[..n])),
                _ => out.spare_capacity_mut()[..n].par_chunks_exact_mut(out_len).enumerate().for_each(image),
            }
            // SAFETY: `forward_packed` wrote every value of each image's `out_len` values (each
            // kernel covers all of its output's tiles and channels, as its doc says; the
            // convolution tests compare every value with candle's, partial tiles included).
            unsafe { out.set_len(n) };
            if let Some(p) = self.smooth {
                out.par_iter_mut().for_each(|v| *v = p.apply(*v));
            }
            return out;
        }
        let mut out = zeros(n);
        if self.is_depthwise() {
            // The whole batch's planes in one parallel loop: a late 7x7 layer has too few
            // planes per image to keep the threads busy; with 8 images or more, in the vector
            // lanes.
            if g.batch >= LANES_MIN_BATCH {
                let d = lanes::Depthwise { weight: &self.weight, bias: &self.bias, act: self.activation, smooth: self.smooth };
                lanes::depthwise_batch(Avx512::detect(), &d, x, g, &mut out);
            } else {
                self.depthwise_planes(x, g, &mut out);
            }
            if let Some((r, act)) = residual {
                out.par_iter_mut().zip(r.par_iter()).for_each(|(v, &q)| *v = act.apply(*v + q));
            }
            return out;
        }
        for b in 0..g.batch {
            let res = residual.map(|(r, act)| (&r[b * out_len..(b + 1) * out_len], act));
            self.forward_image(&x[b * in_len..(b + 1) * in_len], g, res, &mut out[b * out_len..(b + 1) * out_len]);
        }
        out
    }

    /// A depthwise convolution's planes with the bias and activation, for any batch: `x`
    /// `[batch, c, h, w]`, `out` `[batch, c, oh, ow]`.
    fn depthwise_planes(&self, x: &[f32], g: &ConvGeometry, out: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let plane = g.oh * g.ow;
        let (act, smooth, c) = (self.activation, self.smooth, self.out_channels);
        out.par_chunks_mut(plane).enumerate().with_min_len(planes_per_task(plane)).for_each_init(Default::default, |buf, (i, dst)| {
            let ch = i % c;
            let src = &x[i * g.h * g.w..(i + 1) * g.h * g.w];
            let wk = &self.weight[ch * kh * kw..(ch + 1) * kh * kw];
            depthwise_channel(src, wk, self.bias[ch], act, g, self.stride, kh, kw, dst, buf);
            if let Some(p) = smooth {
                dst.iter_mut().for_each(|v| *v = p.apply(*v));
            }
        });
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

    /// `out = conv(x)`, or with `residual` = (r, act): `out = act(conv(x) + r)` (the convolution's
    /// own activation is then the identity).
    /// Without packed weights: depthwise convolutions by their direct kernel, the others by
    /// im2col (or tiles of it) and GEMM.
    fn forward_image(&self, x: &[f32], g: &ConvGeometry, residual: Option<(&[f32], Activation)>, out: &mut [f32]) {
        self.forward_portable(x, g, out);
        if let Some((r, act)) = residual {
            out.par_iter_mut().zip(r.par_iter()).for_each(|(v, &q)| *v = act.apply(*v + q));
        }
    }

    /// `out = conv(x)` with the bias and activation, without the packed kernels.
    fn forward_portable(&self, x: &[f32], g: &ConvGeometry, out: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let plane = g.oh * g.ow;
        if self.is_depthwise() {
            return self.depthwise_planes(x, g, out);
        }
        {
            let cg = g.c / self.groups;
            let og = self.out_channels / self.groups;
            let k = cg * kh * kw;
            if !self.is_pointwise(g) && tiling_pays(k, plane) {
                let (act, smooth) = (self.activation, self.smooth);
                for grp in 0..self.groups {
                    let bias = &self.bias[grp * og..(grp + 1) * og];
                    let epilogue = |o: usize, row: &mut [f32]| {
                        let b = bias[o];
                        match smooth {
                            Some(p) => row.iter_mut().for_each(|v| *v = p.apply(*v + b)),
                            None => row.iter_mut().for_each(|v| *v = act.apply(*v + b)),
                        }
                    };
                    let w = &self.weight[grp * og * k..(grp + 1) * og * k];
                    conv_tiled(x, g, grp * cg, cg, w, og, &epilogue, &mut out[grp * og * plane..(grp + 1) * og * plane]);
                }
                return;
            }
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
                matmul(dst, w, (k, 1), rhs, (plane, 1), og, plane, rhs_len);
            }
        }
        let (act, smooth) = (self.activation, self.smooth);
        out.par_chunks_mut(plane).enumerate().with_min_len(planes_per_task(plane)).for_each(|(o, dst)| {
            let b = self.bias[o];
            match smooth {
                Some(p) => dst.iter_mut().for_each(|v| *v = p.apply(*v + b)),
                None => dst.iter_mut().for_each(|v| *v = act.apply(*v + b)),
            }
        });
    }

    /// One image's `out = conv(x)` (with `residual`: `act(conv(x) + r)`) by the packed AVX-512
    /// kernels, which write every value of `out` (so it may start uninitialised); the smooth
    /// activation, if any, is left to the caller.
    fn forward_packed(&self, packs: &Packs, x: &[f32], g: &ConvGeometry, residual: Option<(&[f32], Activation)>, out: &mut [std::mem::MaybeUninit<f32>]) {
        let plane = g.oh * g.ow;
        let cpu = packs.cpu;
        let cg = g.c / self.groups;
        let og = self.out_channels / self.groups;
        let act = match residual {
            Some((_, act)) => act,
            None if self.smooth.is_some() => Activation::Identity,
            None => self.activation,
        };
        if self.winograd && packed::winograd_pays(g) {
            let wg = packs.winograd.get_or_init(|| Winograd::new(&self.weight, &self.bias, self.out_channels, self.in_channels));
            packed::conv_winograd(cpu, wg, x, g, act, residual.map(|(r, _)| r), out);
            return;
        }
        if self.kernel == (1, 1) && g.stride > 1 && (g.pad_top, g.pad_left) == (0, 0) && self.groups == 1 {
            // A strided 1x1 convolution is a pointwise one on the pixels it reads: those are
            // copied out first (a quarter of the input at stride 2), so that the kernels
            // read the plane as one contiguous row (measured on ResNet-50's downsampling).
            let mut sub = vec![0f32; g.c * g.oh * g.ow];
            sub.par_chunks_mut(g.oh * g.ow).enumerate().for_each(|(ci, dst)| {
                let src = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
                for (oy, row) in dst.chunks_mut(g.ow).enumerate() {
                    let line = &src[oy * g.stride * g.w..];
                    row.iter_mut().enumerate().for_each(|(ox, v)| *v = line[ox * g.stride]);
                }
            });
            let pointwise = ConvGeometry { stride: 1, h: g.oh, w: g.ow, ..*g };
            return self.forward_packed(packs, &sub, &pointwise, residual, out);
        }
        let pixel_major = packed::pixel_major_pays(g);
        for grp in 0..self.groups {
            let part = grp * og * plane..(grp + 1) * og * plane;
            let res = residual.map(|(r, _)| &r[part.clone()]);
            if pixel_major {
                let pixel = packs.pixel.get_or_init(|| self.group_blocks());
                packed::conv_pixel_major(cpu, &pixel[grp], x, g, grp * cg, act, res, &mut out[part]);
                continue;
            }
            let panels = packs.panels.get_or_init(|| self.group_blocks());
            let cols = if self.is_pointwise(g) { Columns::Input(&x[grp * cg * plane..(grp + 1) * cg * plane]) } else { Columns::Im2col { x, g, c0: grp * cg } };
            packed::conv(cpu, &panels[grp], cols, plane, act, res, &mut out[part]);
        }
    }

    /// `act(conv(x) + residual)` in one op: a residual block's last convolution, its skip
    /// connection and activation, with the sum added in the convolution's epilogue (ResNet's
    /// `relu(bn3(conv3(.)) + identity)`). The convolution's own activation must be the identity.
    ///
    /// # Shapes
    /// `x`: `[batch, in, h, w]`, `residual`: `[batch, out, oh, ow]` -> `[batch, out, oh, ow]`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor, act: Activation) -> CResult<Tensor> {
        self.forward_residual_with(x, residual, act, Rule::Exact)
    }

    /// [`Conv2d::forward_residual`] with the backward of `act` following `rule`.
    pub fn forward_residual_with(&self, x: &Tensor, residual: &Tensor, act: Activation, rule: Rule) -> CResult<Tensor> {
        if self.activation != Activation::Identity || self.smooth.is_some() {
            candle_core::bail!("conv2d with a residual: the convolution's own activation must be the identity");
        }
        x.contiguous()?.apply_op2(&residual.contiguous()?, ResidualConv { conv: Conv2d { rule, ..self.clone() }, act })
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
            matmul(&mut col, w, (1, k), go, (plane, 1), k, plane, og);
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
        let out = self.forward_batch(x, &g, None);
        Ok((CpuStorage::F32(out), Shape::from((g.batch, self.out_channels, g.oh, g.ow))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let g = self.geometry(arg.dims())?;
        let out = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (act, rule) = (self.activation, self.rule);
        let gpre: Vec<f32> = if let Some(p) = self.smooth {
            // The pre-activation, recomputed: the derivative of a smooth activation needs it.
            let plain = Conv2d { smooth: None, ..self.clone() };
            let pre = plain.forward(&arg.detach())?.flatten_all()?.to_vec1::<f32>()?;
            pre.par_iter().zip(grad.par_iter()).map(|(&z, &d)| d * p.derivative(z)).collect()
        } else if act == Activation::Identity {
            grad
        } else {
            out.par_iter().zip(grad.par_iter()).map(|(&o, &d)| act.backward(o, d, rule)).collect()
        };
        let (in_len, out_len) = (g.c * g.h * g.w, self.out_channels * g.oh * g.ow);
        let mut dx = vec![0.0f32; g.batch * in_len];
        for b in 0..g.batch {
            self.backward_image(&gpre[b * out_len..(b + 1) * out_len], &g, &mut dx[b * in_len..(b + 1) * in_len]);
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// [`Conv2d::forward_residual`]'s op.
#[derive(Debug, Clone)]
struct ResidualConv {
    conv: Conv2d,
    act: Activation,
}

impl candle_core::CustomOp2 for ResidualConv {
    fn name(&self) -> &'static str {
        "gradcam-conv2d-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (x, r) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        let g = self.conv.geometry(l1.dims())?;
        let shape = [g.batch, self.conv.out_channels, g.oh, g.ow];
        if l2.dims() != shape {
            candle_core::bail!("conv2d residual is {:?}, the output {shape:?}", l2.dims());
        }
        let out = self.conv.forward_batch(x, &g, Some((r, self.act)));
        Ok((CpuStorage::F32(out), Shape::from(shape.to_vec())))
    }

    fn bwd(&self, arg: &Tensor, residual: &Tensor, res: &Tensor, grad_res: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = self.conv.geometry(arg.dims())?;
        let out = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (act, rule) = (self.act, self.conv.rule);
        let gpre: Vec<f32> = out.par_iter().zip(grad.par_iter()).map(|(&o, &d)| act.backward(o, d, rule)).collect();
        let (in_len, out_len) = (g.c * g.h * g.w, self.conv.out_channels * g.oh * g.ow);
        let mut dx = vec![0.0f32; g.batch * in_len];
        for b in 0..g.batch {
            self.conv.backward_image(&gpre[b * out_len..(b + 1) * out_len], &g, &mut dx[b * in_len..(b + 1) * in_len]);
        }
        Ok((Some(Tensor::from_vec(dx, arg.shape(), arg.device())?), Some(Tensor::from_vec(gpre, residual.shape(), residual.device())?)))
    }
}

/// Resolves the output size and padding of a convolution for an input of `dims`.
pub(super) fn geometry(dims: &[usize], in_channels: usize, kernel: (usize, usize), stride: usize, padding: Padding) -> CResult<ConvGeometry> {
    let &[batch, c, h, w] = dims else {
        candle_core::bail!("conv2d expects a [batch, channels, h, w] input, got {dims:?}");
    };
    if c != in_channels {
        candle_core::bail!("conv2d expects {in_channels} input channels, got {c}");
    }
    let (kh, kw) = kernel;
    let (pad_top, pad_bottom, oh) = padding.resolve(h, kh, stride, false);
    let (pad_left, pad_right, ow) = padding.resolve(w, kw, stride, true);
    if h + pad_top + pad_bottom < kh || w + pad_left + pad_right < kw {
        candle_core::bail!("conv2d: input {h}x{w} is smaller than the {kh}x{kw} kernel");
    }
    Ok(ConvGeometry { kh, kw, stride, batch, c, h, w, oh, ow, pad_top, pad_left })
}


