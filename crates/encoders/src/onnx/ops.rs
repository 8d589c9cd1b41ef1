//! ONNX ops as differentiable candle ops (plus the project's Relu / Relu6 and max-pool, whose
//! backward is exact and obeys Guided Backpropagation). Floats are F32 tensors, integers
//! (shapes, indices) I64 tensors.

use candle_core::{DType, Tensor};
use gradcam_kernels::{Activation, MaxPool2d, Pointwise, Rule};

use super::proto::{Attribute, Node};

pub(super) type R<T> = candle_core::Result<T>;

/// The op types this evaluator runs (with [`super::tokens::OPS`], the transformers' ops).
pub const SUPPORTED: &[&str] = &[
    "Add", "ArgMax", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Dropout", "Equal", "Erf", "Exp",
    "Expand", "Flatten", "Gather", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "LogSoftmax", "MatMul", "MaxPool", "Mod", "Mul", "Neg", "Not", "Pad", "Pow", "Range", "ReduceMean",
    "Relu", "Reshape", "ScatterND", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where",
];

pub(super) use super::check::check_size;

pub(super) fn fail<T>(msg: impl std::fmt::Display) -> R<T> {
    Err(candle_core::Error::Msg(msg.to_string()))
}

pub(super) fn attr_int(node: &Node, name: &str, default: i64) -> i64 {
    match node.attributes.get(name) {
        Some(Attribute::Int(v)) => *v,
        _ => default,
    }
}

pub(super) fn attr_float(node: &Node, name: &str, default: f32) -> f32 {
    match node.attributes.get(name) {
        Some(Attribute::Float(v)) => *v,
        _ => default,
    }
}

pub(super) fn attr_ints(node: &Node, name: &str) -> Option<Vec<i64>> {
    match node.attributes.get(name) {
        Some(Attribute::Ints(v)) => Some(v.clone()),
        _ => None,
    }
}

pub(super) fn attr_str(node: &Node, name: &str) -> Option<String> {
    match node.attributes.get(name) {
        Some(Attribute::String(v)) => Some(v.clone()),
        _ => None,
    }
}

/// The pointwise op a node is, for fusing after a convolution.
pub(super) fn pointwise_of(node: &Node) -> Option<Pointwise> {
    match node.op_type.as_str() {
        "Sigmoid" => Some(Pointwise::Sigmoid),
        "HardSwish" => Some(Pointwise::HardSwish),
        "HardSigmoid" => Some(Pointwise::HardSigmoid { alpha: attr_float(node, "alpha", 0.2), beta: attr_float(node, "beta", 0.5) }),
        _ => None,
    }
}

/// Clip's bounds when they are constants (inputs 1 and 2 since opset 11, attributes before).
pub(super) fn clip_bounds(node: &Node, constants: &std::collections::HashMap<String, Tensor>) -> Option<(f32, f32)> {
    let bound = |k: usize, attr: &str, default: f32| -> Option<f32> {
        match node.inputs.get(k).filter(|s| !s.is_empty()) {
            Some(name) => values::<f32>(&constants.get(name)?.to_dtype(DType::F32).ok()?).ok()?.first().copied(),
            None => Some(attr_float(node, attr, default)),
        }
    };
    Some((bound(1, "min", f32::NEG_INFINITY)?, bound(2, "max", f32::INFINITY)?))
}

pub(super) fn arg<'a>(args: &'a [Option<Tensor>], k: usize, node: &Node) -> R<&'a Tensor> {
    match args.get(k) {
        Some(Some(t)) => Ok(t),
        _ => fail(format!("input {k} of {} is missing", node.op_type)),
    }
}

pub(super) fn opt(args: &[Option<Tensor>], k: usize) -> Option<&Tensor> {
    args.get(k).and_then(|a| a.as_ref())
}

pub(super) fn ints_of(t: &Tensor) -> R<Vec<i64>> {
    values(&t.to_dtype(DType::I64)?)
}

/// The elements of `t` in order: none for an empty tensor (candle's `to_vec1` panics on an empty
/// view that starts past the end of its storage, as a Slice of an empty value makes).
pub(super) fn values<T: candle_core::WithDType>(t: &Tensor) -> R<Vec<T>> {
    if t.elem_count() == 0 {
        return Ok(Vec::new());
    }
    t.flatten_all()?.to_vec1()
}

fn scalar_f32(t: &Tensor) -> R<f32> {
    match values::<f32>(&t.to_dtype(DType::F32)?)?.first() {
        Some(v) => Ok(*v),
        None => fail("empty scalar"),
    }
}

pub(super) fn axis(a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    if a < -r || a >= r.max(1) {
        return fail(format!("axis {a} out of range for rank {rank}"));
    }
    Ok(((a + r) % r.max(1)) as usize)
}

/// Same dtype for a binary op: integers meet floats as floats.
fn align(a: &Tensor, b: &Tensor) -> R<(Tensor, Tensor)> {
    if a.dtype() == b.dtype() {
        return Ok((a.clone(), b.clone()));
    }
    Ok((a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?))
}

fn softmax(x: &Tensor, dim: usize, log: bool) -> R<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(dim)?.detach())?;
    let e = shifted.exp()?;
    let sum = e.sum_keepdim(dim)?;
    if log {
        shifted.broadcast_sub(&sum.log()?)
    } else {
        e.broadcast_div(&sum)
    }
}

/// Runs one node on its inputs (`None` for an omitted optional input).
/// With [`Rule::Guided`], the ReLUs (Relu, Clip to [0, 6] or [0, inf)) build guided ops and the
/// rectifiers that Guided Backpropagation has no rule for (LeakyRelu, other Clips) are refused
/// rather than differentiated plainly.
pub(super) fn eval(node: &Node, args: &[Option<Tensor>], rule: Rule) -> R<Vec<Tensor>> {
    super::check::output(node, args)?;
    let converted = super::check::float_inputs(node, args)?;
    let args = converted.as_deref().unwrap_or(args);
    let x = || arg(args, 0, node);
    let one = |t: Tensor| Ok(vec![t]);
    let unguided = |what: &str| -> R<()> {
        match rule {
            Rule::Exact => Ok(()),
            Rule::Guided => Err(candle_core::Error::Msg(format!("guided backpropagation has no rule for {what}: only Relu and Clip to [0, 6] or [0, inf) can be guided"))),
        }
    };
    match node.op_type.as_str() {
        "Identity" | "Dropout" => one(x()?.clone()),
        "Relu" => one(Activation::Relu.forward_with(&x()?.to_dtype(DType::F32)?, rule)?),
        "LeakyRelu" => {
            unguided("LeakyRelu")?;
            let x = x()?;
            let alpha = attr_float(node, "alpha", 0.01) as f64;
            one((x.relu()? - (x.neg()?.relu()? * alpha)?)?)
        }
        "Clip" => {
            let x = x()?;
            let lo = match opt(args, 1) {
                Some(t) => scalar_f32(t)?,
                None => attr_float(node, "min", f32::NEG_INFINITY),
            };
            let hi = match opt(args, 2) {
                Some(t) => scalar_f32(t)?,
                None => attr_float(node, "max", f32::INFINITY),
            };
            match (lo, hi) {
                (0.0, 6.0) => one(Activation::Relu6.forward_with(x, rule)?),
                (0.0, f32::INFINITY) => one(Activation::Relu.forward_with(x, rule)?),
                (lo, hi) => {
                    unguided(&format!("Clip to [{lo}, {hi}]"))?;
                    match (lo, hi) {
                        (lo, f32::INFINITY) => one(x.maximum(lo)?),
                        (f32::NEG_INFINITY, hi) => one(x.minimum(hi)?),
                        (lo, hi) => one(x.clamp(lo, hi)?),
                    }
                }
            }
        }
        "Sigmoid" => one(Pointwise::Sigmoid.forward(&x()?.to_dtype(DType::F32)?)?),
        "HardSigmoid" => {
            let (alpha, beta) = (attr_float(node, "alpha", 0.2), attr_float(node, "beta", 0.5));
            one(Pointwise::HardSigmoid { alpha, beta }.forward(&x()?.to_dtype(DType::F32)?)?)
        }
        "HardSwish" => one(Pointwise::HardSwish.forward(&x()?.to_dtype(DType::F32)?)?),
        "Tanh" => one(x()?.tanh()?),
        "Exp" => one(x()?.exp()?),
        "Sqrt" => one(x()?.sqrt()?),
        "Neg" => one(x()?.zeros_like()?.sub(x()?)?),
        "Add" | "Sub" | "Mul" | "Div" => {
            let (a, b) = align(x()?, arg(args, 1, node)?)?;
            one(match node.op_type.as_str() {
                "Add" => a.broadcast_add(&b)?,
                "Sub" => a.broadcast_sub(&b)?,
                "Mul" => a.broadcast_mul(&b)?,
                _ if a.dtype() == DType::I64 => super::check::int_div(&a, &b)?,
                _ => a.broadcast_div(&b)?,
            })
        }
        "BatchNormalization" => {
            let x = x()?;
            let eps = attr_float(node, "epsilon", 1e-5) as f64;
            let c = x.dim(1)?;
            let p = |k| -> R<Tensor> { arg(args, k, node)?.to_dtype(DType::F32)?.reshape(c) };
            let (gamma, beta, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
            let scale = (gamma / (var + eps)?.sqrt()?)?;
            let shift = (beta - (mean * &scale)?)?;
            let mut shape = vec![1; x.rank()];
            shape[1] = c;
            one(x.broadcast_mul(&scale.reshape(shape.clone())?)?.broadcast_add(&shift.reshape(shape)?)?)
        }
        "Conv" => conv(node, x()?, arg(args, 1, node)?, opt(args, 2)),
        "MaxPool" => {
            let (k, s, p) = pool_geometry(node)?;
            if attr_int(node, "ceil_mode", 0) != 0 || attr_ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1)) || node.outputs.len() > 1 {
                return fail("MaxPool with ceil_mode, dilations or an indices output is not supported");
            }
            one(MaxPool2d { kernel: k, stride: s, padding: p }.forward(x()?)?)
        }
        "AveragePool" => {
            let (k, s, p) = pool_geometry(node)?;
            if attr_int(node, "ceil_mode", 0) != 0 {
                return fail("AveragePool with ceil_mode is not supported");
            }
            let x = x()?;
            if p == 0 && k == s {
                return one(x.avg_pool2d_with_stride(k, s)?);
            }
            // The mean over each window of the zero-padded input (candle's pooling: direct, fast
            // on any batch), divided by the share of real pixels in it without count_include_pad.
            let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
            let mean = padded.avg_pool2d_with_stride(k, s)?;
            if attr_int(node, "count_include_pad", 0) != 0 || p == 0 {
                return one(mean);
            }
            let (h, w) = (x.dim(2)?, x.dim(3)?);
            let share = Tensor::ones((1, 1, h, w), DType::F32, x.device())?.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?.avg_pool2d_with_stride(k, s)?;
            one(mean.broadcast_div(&share)?)
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let x = x()?;
            let (n, c) = (x.dim(0)?, x.dim(1)?);
            let flat = x.flatten_from(2)?;
            let pooled = if node.op_type == "GlobalAveragePool" { flat.mean_keepdim(2)? } else { flat.max_keepdim(2)? };
            let mut shape = vec![n, c];
            shape.resize(x.rank(), 1);
            one(pooled.reshape(shape)?)
        }
        "ReduceMean" => {
            let x = x()?;
            let axes = match opt(args, 1) {
                Some(t) => ints_of(t)?,
                None => attr_ints(node, "axes").unwrap_or_else(|| (0..x.rank() as i64).collect()),
            };
            let mut axes: Vec<usize> = axes.iter().map(|&a| axis(a, x.rank())).collect::<R<_>>()?;
            axes.sort_unstable();
            axes.dedup();
            let mut y = x.clone();
            for &a in axes.iter().rev() {
                y = y.mean_keepdim(a)?;
            }
            if attr_int(node, "keepdims", 1) == 0 {
                for &a in axes.iter().rev() {
                    y = y.squeeze(a)?;
                }
            }
            one(y)
        }
        "Flatten" => {
            let x = x()?;
            let a = axis(attr_int(node, "axis", 1), x.rank() + 1)?;
            let outer: usize = x.dims()[..a].iter().product();
            one(x.reshape((outer, x.elem_count() / outer.max(1)))?)
        }
        "Reshape" => {
            let x = x()?;
            let spec = match opt(args, 1) {
                Some(t) => ints_of(t)?,
                None => attr_ints(node, "shape").unwrap_or_default(),
            };
            if spec.len() > super::check::MAX_RANK {
                return fail(format!("Reshape to {} dimensions; at most {} are supported", spec.len(), super::check::MAX_RANK));
            }
            let allow_zero = attr_int(node, "allowzero", 0) != 0;
            let mut dims = Vec::with_capacity(spec.len());
            let mut infer = None;
            for (i, &d) in spec.iter().enumerate() {
                dims.push(match d {
                    0 if !allow_zero => *x.dims().get(i).ok_or_else(|| candle_core::Error::Msg(format!("Reshape copies dimension {i} of a rank-{} input", x.rank())))?,
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        1
                    }
                    d if d >= 0 => usize::try_from(d).unwrap_or(usize::MAX),
                    d => return fail(format!("Reshape to {spec:?}: dimension {d}")),
                });
            }
            check_size(&dims, "Reshape")?;
            if let Some(i) = infer {
                let known: usize = dims.iter().product();
                if known == 0 || x.elem_count() % known != 0 {
                    return fail(format!("Reshape of {:?} to {spec:?}", x.dims()));
                }
                dims[i] = x.elem_count() / known;
            }
            one(x.reshape(dims)?)
        }
        "Gemm" => {
            let (mut a, mut b) = (x()?.to_dtype(DType::F32)?, arg(args, 1, node)?.to_dtype(DType::F32)?);
            if attr_int(node, "transA", 0) != 0 {
                a = a.t()?;
            }
            if attr_int(node, "transB", 0) != 0 {
                b = b.t()?;
            }
            let mut y = a.matmul(&b.contiguous()?)?;
            let alpha = attr_float(node, "alpha", 1.0);
            if alpha != 1.0 {
                y = (y * alpha as f64)?;
            }
            if let Some(c) = opt(args, 2) {
                let beta = attr_float(node, "beta", 1.0) as f64;
                y = y.broadcast_add(&(c.to_dtype(DType::F32)? * beta)?)?;
            }
            one(y)
        }
        "MatMul" => {
            let (a, b) = align(x()?, arg(args, 1, node)?)?;
            // Attention products [.., T, d] x [.., d, T]: the leading dimensions in parallel
            // (candle's own runs them one after the other on one thread here).
            if a.rank() >= 3 && a.rank() == b.rank() && a.dims()[..a.rank() - 2] == b.dims()[..b.rank() - 2] {
                let lead: usize = a.dims()[..a.rank() - 2].iter().product();
                if lead > 1 {
                    use rayon::prelude::*;
                    let r = a.rank();
                    let a3 = a.reshape(((), a.dim(r - 2)?, a.dim(r - 1)?))?;
                    let b3 = b.reshape(((), b.dim(r - 2)?, b.dim(r - 1)?))?;
                    let parts: Vec<Tensor> = (0..lead).into_par_iter().map(|i| a3.get(i)?.matmul(&b3.get(i)?)).collect::<R<_>>()?;
                    let mut dims = a.dims()[..r - 1].to_vec();
                    dims.push(b.dim(r - 1)?);
                    return one(Tensor::stack(&parts, 0)?.reshape(dims)?);
                }
            }
            // A vector is a row (first operand) or a column (second), dropped from the product.
            let (va, vb) = (a.rank() == 1, b.rank() == 1);
            let (a, b) = (if va { a.unsqueeze(0)? } else { a }, if vb { b.unsqueeze(1)? } else { b });
            let y = if a.rank() == 2 && b.rank() == 2 { a.matmul(&b)? } else { a.broadcast_matmul(&b)? };
            let y = if vb { y.squeeze(y.rank() - 1)? } else { y };
            one(if va { y.squeeze(y.rank() - 1 - !vb as usize)? } else { y })
        }
        "Transpose" => {
            let x = x()?;
            let perm: Vec<usize> = match attr_ints(node, "perm") {
                Some(p) => p.iter().map(|&a| axis(a, x.rank())).collect::<R<_>>()?,
                None => (0..x.rank()).rev().collect(),
            };
            one(x.permute(perm)?.contiguous()?)
        }
        "Concat" => {
            let parts: Vec<&Tensor> = args.iter().flatten().collect();
            let first = parts.first().ok_or_else(|| candle_core::Error::Msg("Concat of nothing".into()))?;
            let a = axis(attr_int(node, "axis", 0), first.rank())?;
            let dtype = if parts.iter().all(|p| p.dtype() == first.dtype()) { first.dtype() } else { DType::F32 };
            let parts: Vec<Tensor> = parts.iter().map(|p| p.to_dtype(dtype)).collect::<R<_>>()?;
            one(Tensor::cat(&parts, a)?)
        }
        "Pad" => {
            let x = x()?;
            let pads = match opt(args, 1) {
                Some(t) => ints_of(t)?,
                None => attr_ints(node, "pads").unwrap_or_default(),
            };
            let value = match opt(args, 2) {
                Some(t) => scalar_f32(t)?,
                None => attr_float(node, "value", 0.0),
            };
            let mode = attr_str(node, "mode").unwrap_or_else(|| "constant".into());
            let r = x.rank();
            let axes: Vec<usize> = match opt(args, 3) {
                Some(t) => ints_of(t)?.iter().map(|&a| axis(a, r)).collect::<R<_>>()?,
                None => (0..r).collect(),
            };
            if pads.len() != 2 * axes.len() {
                return fail(format!("Pad has {} pads for {} axes", pads.len(), axes.len()));
            }
            let mut out_dims = x.dims().to_vec();
            for (i, &a) in axes.iter().enumerate() {
                let d = out_dims[a] as i64 + pads[i].clamp(-(1 << 40), 1 << 40) + pads[i + axes.len()].clamp(-(1 << 40), 1 << 40);
                out_dims[a] = usize::try_from(d).map_err(|_| candle_core::Error::Msg(format!("Pad by {pads:?} removes more than axis {a} of {:?} holds", x.dims())))?;
            }
            check_size(&out_dims, "Pad")?;
            let mut y = x.clone();
            for (i, &a) in axes.iter().enumerate() {
                let (before, after) = (pads[i], pads[i + axes.len()]);
                if before < 0 || after < 0 {
                    let n = y.dim(a)? as i64;
                    let (s, e) = (before.checked_neg().unwrap_or(i64::MAX).clamp(0, n), n - after.checked_neg().unwrap_or(i64::MAX).clamp(0, n));
                    y = y.narrow(a, s as usize, (e - s).max(0) as usize)?;
                }
                let (before, after) = (before.max(0) as usize, after.max(0) as usize);
                if before + after == 0 {
                    continue;
                }
                y = match mode.as_str() {
                    "constant" if value == 0.0 => y.pad_with_zeros(a, before, after)?,
                    "constant" => {
                        let mut shape = y.dims().to_vec();
                        let mut parts = Vec::new();
                        shape[a] = before;
                        parts.push((Tensor::ones(shape.clone(), y.dtype(), y.device())? * value as f64)?);
                        parts.push(y.clone());
                        shape[a] = after;
                        parts.push((Tensor::ones(shape, y.dtype(), y.device())? * value as f64)?);
                        Tensor::cat(&parts, a)?
                    }
                    "edge" => y.pad_with_same(a, before, after)?,
                    other => return fail(format!("Pad mode {other:?} is not supported (constant and edge are)")),
                };
            }
            one(y)
        }
        "Constant" => {
            let t = match node.attributes.get("value").or_else(|| node.attributes.get("value_float")).or_else(|| node.attributes.get("value_floats")).or_else(|| node.attributes.get("value_int")).or_else(|| node.attributes.get("value_ints")) {
                Some(Attribute::Tensor(t)) => super::tensor(t, None).map_err(candle_core::Error::Msg)?,
                Some(Attribute::Float(v)) => Tensor::new(*v, &candle_core::Device::Cpu)?,
                Some(Attribute::Floats(v)) => Tensor::new(v.as_slice(), &candle_core::Device::Cpu)?,
                Some(Attribute::Int(v)) => Tensor::new(*v, &candle_core::Device::Cpu)?,
                Some(Attribute::Ints(v)) => Tensor::new(v.as_slice(), &candle_core::Device::Cpu)?,
                _ => return fail("Constant without a supported value attribute"),
            };
            one(t)
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = ints_of(x()?)?.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
            check_size(&shape, "ConstantOfShape")?;
            let value = match node.attributes.get("value") {
                Some(Attribute::Tensor(t)) => super::tensor(t, None).map_err(candle_core::Error::Msg)?,
                _ => Tensor::new(&[0f32], &candle_core::Device::Cpu)?,
            };
            one(value.flatten_all()?.narrow(0, 0, 1)?.reshape(())?.broadcast_as(shape)?.contiguous()?)
        }
        "Shape" => {
            let dims: Vec<i64> = x()?.dims().iter().map(|&d| d as i64).collect();
            let r = dims.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (s, e) = (clampi(attr_int(node, "start", 0)), clampi(attr_int(node, "end", r)));
            one(Tensor::new(&dims[s..e.max(s)], &candle_core::Device::Cpu)?)
        }
        "Gather" => {
            let (data, idx) = (x()?, arg(args, 1, node)?);
            let a = axis(attr_int(node, "axis", 0), data.rank())?;
            let n = data.dim(a)? as i64;
            let raw = ints_of(idx)?;
            let fixed: Vec<i64> = raw.iter().map(|&i| if i < 0 { i + n } else { i }).collect();
            if let Some(bad) = fixed.iter().find(|&&i| i < 0 || i >= n) {
                return fail(format!("Gather index {bad} out of range for {n}"));
            }
            let flat = Tensor::new(fixed.as_slice(), data.device())?;
            let picked = data.index_select(&flat, a)?;
            let mut shape = data.dims()[..a].to_vec();
            shape.extend(idx.dims());
            shape.extend(&data.dims()[a + 1..]);
            one(picked.reshape(shape)?)
        }
        "Unsqueeze" => {
            let x = x()?;
            let axes = match opt(args, 1) {
                Some(t) => ints_of(t)?,
                None => attr_ints(node, "axes").unwrap_or_default(),
            };
            super::check::distinct_axes(&axes, "Unsqueeze")?;
            let out_rank = x.rank() + axes.len();
            let mut axes: Vec<usize> = axes.iter().map(|&a| axis(a, out_rank)).collect::<R<_>>()?;
            axes.sort_unstable();
            if axes.windows(2).any(|w| w[0] == w[1]) {
                return fail(format!("Unsqueeze names an axis twice ({axes:?})"));
            }
            let mut y = x.clone();
            for a in axes {
                y = y.unsqueeze(a)?;
            }
            one(y)
        }
        "Squeeze" => {
            let x = x()?;
            let axes = match opt(args, 1) {
                Some(t) => Some(ints_of(t)?),
                None => attr_ints(node, "axes"),
            };
            let mut axes: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&a| axis(a, x.rank())).collect::<R<_>>()?,
                None => (0..x.rank()).filter(|&d| x.dims()[d] == 1).collect(),
            };
            axes.sort_unstable();
            if axes.windows(2).any(|w| w[0] == w[1]) || axes.iter().any(|&a| x.dims()[a] != 1) {
                return fail(format!("Squeeze of axes {axes:?} of a value of shape {:?}: each must be a dimension of 1, named once", x.dims()));
            }
            let mut y = x.clone();
            for a in axes.into_iter().rev() {
                y = y.squeeze(a)?;
            }
            one(y)
        }
        "Slice" => {
            let x = x()?;
            let get = |k: usize, attr: &str| -> R<Option<Vec<i64>>> {
                match opt(args, k) {
                    Some(t) => Ok(Some(ints_of(t)?)),
                    None => Ok(attr_ints(node, attr)),
                }
            };
            let starts = get(1, "starts")?.unwrap_or_default();
            let ends = get(2, "ends")?.unwrap_or_default();
            let axes = get(3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
            let steps = get(4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
            let mut y = x.clone();
            for (k, (&s, &e)) in starts.iter().zip(&ends).enumerate() {
                let a = axis(*axes.get(k).unwrap_or(&(k as i64)), x.rank())?;
                let step = *steps.get(k).unwrap_or(&1);
                let n = y.dim(a)? as i64;
                let fix = |v: i64, lo: i64, hi: i64| (if v < 0 { v.saturating_add(n) } else { v }).clamp(lo, hi);
                if step == 1 || n == 0 {
                    let (s, e) = (fix(s, 0, n), fix(e, 0, n));
                    y = y.narrow(a, s as usize, (e - s).max(0) as usize)?;
                    continue;
                }
                if step == 0 {
                    return fail("Slice with step 0");
                }
                let (s, e) = if step > 0 { (fix(s, 0, n), fix(e, 0, n)) } else { (fix(s, 0, n - 1), fix(e, -1, n - 1)) };
                let picked: Vec<i64> = std::iter::successors(Some(s), |&i| i.checked_add(step)).take_while(|&i| if step > 0 { i < e } else { i > e }).collect();
                y = y.index_select(&Tensor::new(picked.as_slice(), y.device())?, a)?;
            }
            one(y)
        }
        "Softmax" | "LogSoftmax" => {
            let x = x()?;
            let a = axis(attr_int(node, "axis", -1), x.rank())?;
            if node.op_type == "Softmax" && a + 1 == x.rank() {
                // One pass per row, exact backward (a transformer's attention).
                return one(gradcam_kernels::softmax_last(&x.to_dtype(DType::F32)?)?);
            }
            one(softmax(x, a, node.op_type == "LogSoftmax")?)
        }
        "Cast" => {
            let to = attr_int(node, "to", 1);
            one(match to {
                1 | 10 | 11 | 16 => x()?.to_dtype(DType::F32)?,
                6 | 7 | 12 | 13 => x()?.to_dtype(DType::I64)?,
                9 => x()?.ne(0f32)?.to_dtype(DType::I64)?,
                other => return fail(format!("Cast to data type {other} is not supported")),
            })
        }
        _ => super::tokens::eval(node, args).unwrap_or_else(|| fail(format!("op {} is not supported", node.op_type))),
    }
}

/// (kernel, stride, padding) of a square pooling window with the same padding on every side.
fn pool_geometry(node: &Node) -> R<(usize, usize, usize)> {
    let k = attr_ints(node, "kernel_shape").unwrap_or_default();
    let s = attr_ints(node, "strides").unwrap_or_else(|| vec![1; k.len()]);
    let p = attr_ints(node, "pads").unwrap_or_else(|| vec![0; 2 * k.len()]);
    let auto = attr_str(node, "auto_pad").unwrap_or_else(|| "NOTSET".into());
    if k.len() != 2 || k[0] != k[1] || s.len() != 2 || s[0] != s[1] || p.iter().any(|&v| v != p[0]) || !(auto == "NOTSET" || auto == "VALID") || k[0] < 1 || s[0] < 1 || p[0] < 0 {
        return fail(format!("{} with kernel {k:?}, strides {s:?}, pads {p:?}, auto_pad {auto}: only square windows with equal strides and padding are supported", node.op_type));
    }
    Ok((k[0] as usize, s[0] as usize, p[0] as usize))
}

/// A convolution whose weights are not constants, or that our kernel does not run (dilation):
/// candle's, differentiable.
fn conv(node: &Node, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> R<Vec<Tensor>> {
    if w.rank() != 4 {
        return fail("only 2-D convolutions are supported");
    }
    let s = attr_ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
    let d = attr_ints(node, "dilations").unwrap_or_else(|| vec![1, 1]);
    let p = attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
    let auto = attr_str(node, "auto_pad").unwrap_or_else(|| "NOTSET".into());
    if s.len() != 2 || s[0] != s[1] || d.len() != 2 || d[0] != d[1] || p.len() != 4 || p.iter().any(|&v| v < 0) || auto != "NOTSET" {
        return fail(format!("Conv with strides {s:?}, dilations {d:?}, pads {p:?}, auto_pad {auto} is not supported"));
    }
    let groups = attr_int(node, "group", 1) as usize;
    let x = x.pad_with_zeros(2, p[0] as usize, p[2] as usize)?.pad_with_zeros(3, p[1] as usize, p[3] as usize)?;
    let mut y = x.conv2d(&w.to_dtype(DType::F32)?, 0, s[0] as usize, d[0] as usize, groups)?;
    if let Some(b) = b {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?.reshape((1, (), 1, 1))?)?;
    }
    Ok(vec![y])
}

