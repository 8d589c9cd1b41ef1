//! Pointwise activations as differentiable ops with exact backward (ReLU passes no gradient at
//! 0), and the backward [`Rule`] of every op here that ends in a ReLU or ReLU6.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, CResult};

/// The pointwise non-linearity fused after a convolution or linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None.
    Identity,
    /// max(x, 0).
    Relu,
    /// min(max(x, 0), 6), as MobileNets and EfficientNet-Lite use.
    Relu6,
}

impl Activation {
    #[inline(always)]
    pub(super) fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Identity => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
        }
    }

    /// Derivative, read from the activation's output (its input is not kept). ReLU6's output is
    /// 0 or 6 exactly where the input was clipped, so both derivatives are exact from the output.
    #[inline]
    pub(super) fn derivative_from_output(self, out: f32) -> f32 {
        match self {
            Activation::Identity => 1.0,
            Activation::Relu => (out > 0.0) as u8 as f32,
            Activation::Relu6 => (out > 0.0 && out < 6.0) as u8 as f32,
        }
    }

    /// The gradient through the activation, read from its output; with [`Rule::Guided`] a ReLU
    /// or ReLU6 also stops every negative gradient.
    #[inline]
    pub(super) fn backward(self, out: f32, grad: f32, rule: Rule) -> f32 {
        if rule == Rule::Guided && self != Activation::Identity && grad <= 0.0 {
            return 0.0;
        }
        grad * self.derivative_from_output(out)
    }

    /// Applies the activation as a standalone differentiable op with the exact backward.
    pub fn forward(self, x: &Tensor) -> CResult<Tensor> {
        self.forward_with(x, Rule::Exact)
    }

    /// Applies the activation as a standalone differentiable op whose backward follows `rule`.
    pub fn forward_with(self, x: &Tensor, rule: Rule) -> CResult<Tensor> {
        if self == Activation::Identity {
            return Ok(x.clone());
        }
        x.contiguous()?.apply_op1(ActivationOp(self, rule))
    }
}

/// How the backward of an op that ends in a ReLU or ReLU6 treats the gradient. It is chosen when
/// the op is built into the graph (the forward), so a graph is either a model's ordinary graph or
/// its guided twin: nothing global decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Rule {
    /// The exact gradient (no gradient where the unit was clipped, none at 0).
    #[default]
    Exact,
    /// Guided Backpropagation's rule (Springenberg et al. 2015; the paper's section 3.2): the
    /// gradient passes only where it is positive and the unit's input was positive (for ReLU6,
    /// also below 6). The forward is unchanged.
    Guided,
}

struct ActivationOp(Activation, Rule);

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
        let (act, rule) = (self.0, self.1);
        let g: Vec<f32> = out
            .par_iter()
            .zip(grad.par_iter())
            .with_min_len(4096)
            .map(|(&o, &g)| act.backward(o, g, rule))
            .collect();
        Ok(Some(Tensor::from_vec(g, res.shape(), res.device())?))
    }
}


/// The smooth pointwise activations of newer CNNs (EfficientNet's SiLU, MobileNetV3's hard
/// swish and hard sigmoid, squeeze-and-excitation gates), each one pass over the data with an
/// exact backward computed from the input. Guided Backpropagation leaves them alone, as it does
/// in PyTorch (its rule is for ReLUs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pointwise {
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// x * sigmoid(x).
    Silu,
    /// x * min(max(x + 3, 0), 6) / 6.
    HardSwish,
    /// min(max(alpha * x + beta, 0), 1).
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// erf(x), the Gauss error function (Numerical Recipes' `erfcc`, relative error about 2e-7).
    Erf,
    /// x * (1 + erf(x / sqrt 2)) / 2: GELU, the exact (erf) form.
    Gelu,
}

use crate::fastmath::erfc;

impl Pointwise {
    #[inline(always)]
    pub(super) fn apply(self, v: f32) -> f32 {
        match self {
            Pointwise::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Pointwise::Silu => v / (1.0 + (-v).exp()),
            Pointwise::HardSwish => v * (v + 3.0).clamp(0.0, 6.0) / 6.0,
            Pointwise::HardSigmoid { alpha, beta } => (alpha * v + beta).clamp(0.0, 1.0),
            Pointwise::Erf => 1.0 - erfc(v),
            Pointwise::Gelu => 0.5 * v * erfc(-v * std::f32::consts::FRAC_1_SQRT_2),
        }
    }

    /// d apply / dx at `v`.
    #[inline(always)]
    pub(super) fn derivative(self, v: f32) -> f32 {
        match self {
            Pointwise::Sigmoid => {
                let s = 1.0 / (1.0 + (-v).exp());
                s * (1.0 - s)
            }
            Pointwise::Silu => {
                let s = 1.0 / (1.0 + (-v).exp());
                s * (1.0 + v * (1.0 - s))
            }
            // PyTorch's hardswish_backward: 0 below -3, 1 above 3, (2x + 3) / 6 between (ends included).
            Pointwise::HardSwish => {
                if v < -3.0 {
                    0.0
                } else if v <= 3.0 {
                    (2.0 * v + 3.0) / 6.0
                } else {
                    1.0
                }
            }
            Pointwise::HardSigmoid { alpha, beta } => {
                let y = alpha * v + beta;
                if y > 0.0 && y < 1.0 {
                    alpha
                } else {
                    0.0
                }
            }
            Pointwise::Erf => std::f32::consts::FRAC_2_SQRT_PI * crate::fastmath::exp(-v * v),
            // Phi(x) + x phi(x).
            Pointwise::Gelu => 0.5 * erfc(-v * std::f32::consts::FRAC_1_SQRT_2) + v * crate::fastmath::exp(-0.5 * v * v) * (0.5 * std::f32::consts::FRAC_1_SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI),
        }
    }

    /// `o[i] = apply(x[i])`, the op chosen once per slice (so that the loop vectorises), 16
    /// lanes wide where the CPU has AVX-512.
    pub(crate) fn apply_slice(self, x: &[f32], o: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = crate::Avx512::detect() {
            return wide::apply(cpu, self, x, o);
        }
        self.apply_slice_generic(x, o)
    }

    /// `g[i] *= derivative(x[i])`, 16 lanes wide where the CPU has AVX-512.
    pub(crate) fn scale_by_derivative(self, x: &[f32], g: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = crate::Avx512::detect() {
            return wide::scale(cpu, self, x, g);
        }
        self.scale_by_derivative_generic(x, g)
    }

    #[inline(always)]
    fn apply_slice_generic(self, x: &[f32], o: &mut [f32]) {
        #[inline(always)]
        fn each(x: &[f32], o: &mut [f32], f: impl Fn(f32) -> f32) {
            o.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v));
        }
        match self {
            Pointwise::Gelu => each(x, o, |v| Pointwise::Gelu.apply(v)),
            Pointwise::Erf => each(x, o, |v| Pointwise::Erf.apply(v)),
            op => each(x, o, |v| op.apply(v)),
        }
    }

    #[inline(always)]
    fn scale_by_derivative_generic(self, x: &[f32], g: &mut [f32]) {
        #[inline(always)]
        fn each(x: &[f32], g: &mut [f32], f: impl Fn(f32) -> f32) {
            g.iter_mut().zip(x).for_each(|(g, &v)| *g *= f(v));
        }
        match self {
            Pointwise::Gelu => each(x, g, |v| Pointwise::Gelu.derivative(v)),
            Pointwise::Erf => each(x, g, |v| Pointwise::Erf.derivative(v)),
            op => each(x, g, |v| op.derivative(v)),
        }
    }

    /// Applies it as a differentiable op (f32).
    pub fn forward(self, x: &Tensor) -> CResult<Tensor> {
        x.contiguous()?.apply_op1(self)
    }
}

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        "gradcam-pointwise"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let op = *self;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(8192).zip(x.par_chunks(8192)).for_each(|(o, x)| op.apply_slice(x, o));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> CResult<Option<Tensor>> {
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let op = *self;
        let mut g = grad;
        g.par_chunks_mut(8192).zip(x.par_chunks(8192)).for_each(|(g, x)| op.scale_by_derivative(x, g));
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// The pointwise loops compiled for AVX-512 (the same code, 16 lanes).
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::Pointwise;
    use crate::Avx512;

    pub(super) fn apply(_cpu: Avx512, op: Pointwise, x: &[f32], o: &mut [f32]) {
        // SAFETY: the token proves that the CPU has AVX-512F, the only feature enabled.
        unsafe { apply_avx512(op, x, o) }
    }

    pub(super) fn scale(_cpu: Avx512, op: Pointwise, x: &[f32], g: &mut [f32]) {
        // SAFETY: as above.
        unsafe { scale_avx512(op, x, g) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn apply_avx512(op: Pointwise, x: &[f32], o: &mut [f32]) {
        op.apply_slice_generic(x, o)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn scale_avx512(op: Pointwise, x: &[f32], g: &mut [f32]) {
        op.scale_by_derivative_generic(x, g)
    }
}
