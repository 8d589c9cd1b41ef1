//! What the plan fuses: a convolution's constant weights, padding, BatchNormalization and
//! activation after it; Sigmoid * x (SiLU); GELU as torch exports it; a MatMul or Gemm by
//! constant weights as a [`Linear`].

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use gradcam_kernels::{Activation, Linear, Padding};

use super::ops::{self, attr_int, attr_ints, attr_str};
use super::plan::constant_f32;
use super::proto::Node;
use crate::Result;

/// The Sigmoid and Mul nodes (indices) that make `value` into SiLU(value), when nothing else reads
/// `value` or the sigmoid.
pub(super) fn silu_after(nodes: &[Node], in_set: &HashMap<&str, Vec<usize>>, value: &str, readers: &HashMap<&str, usize>, keep: &HashSet<String>, output: &str, trace: bool) -> Option<(usize, usize)> {
    if trace || keep.contains(value) || value == output || readers.get(value) != Some(&2) {
        return None;
    }
    let set = in_set.get(value)?;
    let s = set.iter().copied().find(|&j| nodes[j].op_type == "Sigmoid" && nodes[j].inputs[0] == value)?;
    let sig = &nodes[s].outputs[0];
    if keep.contains(sig) || sig == output || readers.get(sig.as_str()) != Some(&1) {
        return None;
    }
    let m = set.iter().copied().find(|&j| nodes[j].op_type == "Mul" && nodes[j].inputs.iter().any(|v| v == value) && nodes[j].inputs.contains(sig))?;
    Some((s, m))
}

/// Gemm (no transposed A, alpha = beta = 1) or MatMul of a 2-D input by constant weights, as our
/// frozen [`Linear`] (whose backward computes the input gradient only).
pub(super) fn linear_of(node: &Node, constants: &HashMap<String, Tensor>, matmul_bias: Option<&Tensor>) -> Result<Option<(Linear, (usize, usize))>> {
    let gemm = node.op_type == "Gemm";
    if !(gemm || node.op_type == "MatMul") {
        return Ok(None);
    }
    let Some(b) = node.inputs.get(1).and_then(|n| constants.get(n)) else { return Ok(None) };
    if b.rank() != 2 || (gemm && (attr_int(node, "transA", 0) != 0 || ops::attr_float(node, "alpha", 1.0) != 1.0 || ops::attr_float(node, "beta", 1.0) != 1.0)) {
        return Ok(None);
    }
    let b = b.to_dtype(candle_core::DType::F32)?;
    let weight = if gemm && attr_int(node, "transB", 0) != 0 { b } else { b.t()?.contiguous()? }; // [out, in]
    let bias = match node.inputs.get(2).filter(|s| gemm && !s.is_empty()) {
        Some(name) => match constants.get(name) {
            Some(c) if c.elem_count() == weight.dim(0)? && c.dims().iter().rev().skip(1).all(|&d| d == 1) => Some(c.clone()),
            _ => return Ok(None),
        },
        None => match matmul_bias {
            Some(b) if b.elem_count() == weight.dim(0)? => Some(b.to_dtype(candle_core::DType::F32)?),
            Some(_) => return Ok(None),
            None => None,
        },
    };
    let width = (weight.dim(1)?, weight.dim(0)?);
    Ok(Some((Linear::new(&weight, bias.as_ref(), Activation::Identity)?, width)))
}

/// The nodes after `nodes[i]` that make GELU of its input with it, `x * (1 + erf(x / sqrt 2)) *
/// 0.5` as torch exports `nn.GELU` (Div, Erf, Add 1, Mul x, Mul 0.5), each value read only by the
/// next; and the last node's output.
pub(super) fn gelu_from(nodes: &[Node], i: usize, constants: &HashMap<String, Tensor>, sole_reader: &dyn Fn(&str) -> Option<usize>) -> Option<(Vec<usize>, String)> {
    let scalar = |v: &str| -> Option<f32> { constant_f32(constants, v).filter(|c| c.len() == 1).map(|c| c[0]) };
    let near = |v: &str, c: f32| scalar(v).is_some_and(|s| (s - c).abs() < 1e-4);
    let div = &nodes[i];
    if !(div.op_type == "Div" && div.inputs.len() == 2 && near(&div.inputs[1], std::f32::consts::SQRT_2)) {
        return None;
    }
    let x = &div.inputs[0];
    let erf = sole_reader(&div.outputs[0]).filter(|&j| nodes[j].op_type == "Erf")?;
    let add = sole_reader(&nodes[erf].outputs[0]).filter(|&j| nodes[j].op_type == "Add" && nodes[j].inputs.iter().any(|v| near(v, 1.0)))?;
    let mul = sole_reader(&nodes[add].outputs[0]).filter(|&j| nodes[j].op_type == "Mul" && nodes[j].inputs.contains(x))?;
    let half = sole_reader(&nodes[mul].outputs[0]).filter(|&j| nodes[j].op_type == "Mul" && nodes[j].inputs.iter().any(|v| near(v, 0.5)))?;
    Some((vec![erf, add, mul, half], nodes[half].outputs[0].clone()))
}

/// (weight, bias) of a convolution whose weights (and bias) are constants.
pub(super) fn conv_weights(node: &Node, constants: &HashMap<String, Tensor>) -> Option<(Tensor, Tensor)> {
    let w = constants.get(node.inputs.get(1)?)?.to_dtype(candle_core::DType::F32).ok()?;
    if w.rank() != 4 {
        return None;
    }
    let out = w.dim(0).ok()?;
    let b = match node.inputs.get(2).filter(|s| !s.is_empty()) {
        Some(name) => constants.get(name)?.to_dtype(candle_core::DType::F32).ok()?,
        None => Tensor::zeros(out, candle_core::DType::F32, w.device()).ok()?,
    };
    Some((w, b))
}

pub(super) fn conv_stride(node: &Node) -> Result<usize> {
    let s = attr_ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
    Ok(s.first().copied().unwrap_or(1).max(1) as usize)
}

/// The convolution's padding on our kernel, or `None` when our kernel cannot run it (dilation,
/// unequal strides, SAME_LOWER): then it runs through candle.
pub(super) fn conv_padding(node: &Node, weight: &Tensor, extra: [usize; 4]) -> Result<Option<Padding>> {
    let (_, _, kh, kw) = weight.dims4()?;
    let dil = attr_ints(node, "dilations").unwrap_or_else(|| vec![1, 1]);
    let strides = attr_ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
    if dil.iter().any(|&d| d != 1) || strides.len() != 2 || strides[0] != strides[1] {
        return Ok(None);
    }
    if let Some(k) = attr_ints(node, "kernel_shape") {
        if k != [kh as i64, kw as i64] {
            return Ok(None);
        }
    }
    let pads = match attr_str(node, "auto_pad").as_deref().unwrap_or("NOTSET") {
        "NOTSET" => attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]),
        "VALID" => vec![0; 4],
        "SAME_UPPER" if extra == [0; 4] => return Ok(Some(Padding::Same)),
        _ => return Ok(None),
    };
    if pads.len() != 4 || pads.iter().any(|&p| p < 0) {
        return Ok(None);
    }
    let p: Vec<usize> = pads.iter().zip(extra).map(|(&a, b)| a as usize + b).collect();
    // Padding as wide as the kernel or wider (no network's; a crafted graph's) runs through
    // candle, whose convolution pads the input first.
    if p[0] >= kh || p[2] >= kh || p[1] >= kw || p[3] >= kw {
        return Ok(None);
    }
    Ok(Some(if p.iter().all(|&v| v == p[0]) { Padding::Symmetric(p[0]) } else { Padding::Explicit { top: p[0], left: p[1], bottom: p[2], right: p[3] } }))
}

/// A Pad node that adds zeros on the two spatial axes only: (top, left, bottom, right).
pub(super) fn zero_spatial_pads(node: &Node, constants: &HashMap<String, Tensor>) -> Option<[usize; 4]> {
    if attr_str(node, "mode").as_deref().unwrap_or("constant") != "constant" {
        return None;
    }
    let pads: Vec<i64> = match node.inputs.get(1).filter(|s| !s.is_empty()) {
        Some(name) => ops::values(&constants.get(name)?.to_dtype(candle_core::DType::I64).ok()?).ok()?,
        None => attr_ints(node, "pads")?,
    };
    if let Some(name) = node.inputs.get(2).filter(|s| !s.is_empty()) {
        if constant_f32(constants, name)?.iter().any(|&v| v != 0.0) {
            return None;
        }
    }
    if node.inputs.get(3).is_some_and(|s| !s.is_empty()) || node.attributes.get("value").is_some_and(|v| !matches!(v, super::proto::Attribute::Float(f) if *f == 0.0)) {
        return None;
    }
    match pads.as_slice() {
        [0, 0, t, l, 0, 0, b, r] if [t, l, b, r].iter().all(|&&v| v >= 0) => Some([*t as usize, *l as usize, *b as usize, *r as usize]),
        _ => None,
    }
}

/// A BatchNormalization with constant parameters folded into a convolution's weight and bias.
pub(super) fn fold_bn(bn: &Node, constants: &HashMap<String, Tensor>, weight: &Tensor, bias: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let get = |k: usize| bn.inputs.get(k).and_then(|n| constant_f32(constants, n));
    let (Some(gamma), Some(beta), Some(mean), Some(var)) = (get(1), get(2), get(3), get(4)) else { return Ok(None) };
    let eps = match bn.attributes.get("epsilon") {
        Some(super::proto::Attribute::Float(e)) => *e,
        _ => 1e-5,
    };
    let out = weight.dim(0)?;
    if [&gamma, &beta, &mean, &var].iter().any(|v| v.len() != out) {
        return Ok(None);
    }
    let scale: Vec<f32> = gamma.iter().zip(&var).map(|(g, v)| g / (v + eps).sqrt()).collect();
    let b = ops::values::<f32>(bias)?;
    let new_bias: Vec<f32> = (0..out).map(|c| beta[c] + (b[c] - mean[c]) * scale[c]).collect();
    let scale_t = Tensor::from_vec(scale, (out, 1, 1, 1), weight.device())?;
    Ok(Some((weight.broadcast_mul(&scale_t)?, Tensor::from_vec(new_bias, out, weight.device())?)))
}

/// Relu, or Clip to [0, 6], as the convolution's fused activation.
pub(super) fn fusable_activation(node: &Node, constants: &HashMap<String, Tensor>) -> Option<Activation> {
    match node.op_type.as_str() {
        "Relu" => Some(Activation::Relu),
        "Clip" => {
            let (lo, hi) = ops::clip_bounds(node, constants)?;
            if lo == 0.0 && hi == 6.0 {
                Some(Activation::Relu6)
            } else if lo == 0.0 && hi == f32::INFINITY {
                Some(Activation::Relu)
            } else {
                None
            }
        }
        _ => None,
    }
}
