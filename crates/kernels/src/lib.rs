//! The CPU backend of gradcam: differentiable candle ops written because stock candle gets them
//! wrong or slow on the paths Grad-CAM differentiates, and the numeric kernels behind them. Every
//! `unsafe` of the project lives in this crate, behind a safe API.
//!
//! - [`activation`]: ReLU / ReLU6 with an exact backward (no gradient at 0), and their guided
//!   twins ([`Rule::Guided`]) whose backward follows Guided Backpropagation's rule (the paper's
//!   section 3.2); the smooth activations of newer CNNs ([`Pointwise`]).
//! - [`conv`]: [`Conv2d`] (frozen weights: the packed AVX-512 kernels for dense convolutions,
//!   im2col + GEMM without AVX-512, a direct kernel for depthwise ones where candle loops over
//!   groups, ~30x slower; TensorFlow "SAME" padding; bias, activation and a residual sum fused; a
//!   backward that computes the input gradient only, where candle's always pays for a weight
//!   gradient nobody reads) and [`TrainableConv2d`] (weights as inputs, for training).
//! - [`linear`]: [`Linear`] and the fused [`LstmCell`], frozen, input gradient only.
//! - [`pool`]: [`MaxPool2d`] (candle's max-pool backward scales by 1/k^2 and fails when kernel !=
//!   stride; ours routes the gradient to the first maximum of each window, as PyTorch does, with
//!   padding), [`AdaptiveAvgPool2d`] and [`GlobalAvgMaxPool`].
//! - [`matmul`], [`matvec`]: the GEMM and matrix-vector products the ops use, with their
//!   bounds checked.
//! - `packed` (private): dense convolutions on weights packed at load, column-panel GEMM,
//!   pixel-major and Winograd F(2x2, 3x3) AVX-512 kernels; they take an [`Avx512`] token, the
//!   proof that the CPU has the instructions, so they are sound to call from safe code.
//!
//! Every backward here is checked against finite differences (`tests/integration/gradients.rs`
//! and this crate's unit tests).
#![deny(missing_docs)]

pub mod activation;
pub mod conv;
mod cpu;
mod fastmath;
mod kernels;
mod lanes;
pub mod linear;
mod mlp;
mod packed;
pub mod pool;
mod softmax;
mod tap;
mod trainable;
#[cfg(test)]
mod tests;

pub use activation::{Activation, Pointwise, Rule};
pub use cpu::{keep_freed_memory, Avx512};
pub use conv::{Conv2d, Padding, TrainableConv2d};
pub use kernels::{matmul, matvec};
pub use linear::{Linear, LstmCell};
pub use mlp::Mlp;
pub use pool::{AdaptiveAvgPool2d, GlobalAvgMaxPool, MaxPool2d};
pub use softmax::softmax_last;
pub use tap::tap;

use candle_core::{CpuStorage, Layout};
use rayon::iter::ParallelExtend;

type CResult<T> = candle_core::Result<T>;

/// Planes per rayon task when work is split by channel plane: enough for about 16k values, so
/// that the 7x7 and 14x14 planes of a network's last stages do not pay a task per channel.
fn planes_per_task(plane: usize) -> usize {
    (16384 / plane.max(1)).max(1)
}

/// `n` zeros, written by all the threads when `n` is large: every op's output starts as zeros,
/// and a single thread's memset of the activations would be the one serial part of a forward
/// (about a tenth of ResNet-50's at 2 threads).
fn zeros(n: usize) -> Vec<f32> {
    if n < 1 << 16 {
        return vec![0.0; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0.0f32, n));
    v
}

/// The contiguous f32 data of a custom op's input.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} supports f32 tensors only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} needs a contiguous input"),
    }
}
