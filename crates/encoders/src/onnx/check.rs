//! The loader's defences against crafted graphs (issue 34): budgets on the graph's size, each
//! node's arity and attributes against the ONNX specification (checked at load, before any
//! shape is computed from them), and every op's output shape computed with checked arithmetic
//! and held to [`MAX_ELEMENTS`] before anything is allocated.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};

use super::ops::{attr_int, attr_ints, attr_str, axis, fail, ints_of, R};
use super::proto::{Attribute, Graph, Node};

/// Most nodes a graph may have: the largest exports of the ONNX model zoo have some tens of
/// thousands (transformer decoders unrolled); vision models a few thousand.
pub const MAX_NODES: usize = 100_000;
/// Most initializers.
pub const MAX_INITIALIZERS: usize = 100_000;
/// Most inputs and outputs of one node (a Concat of a few hundred values is the most a real
/// network has), and of all the nodes together.
pub const MAX_NODE_EDGES: usize = 65_536;
pub const MAX_EDGES: usize = 1_000_000;
/// Most dimensions of a value.
pub const MAX_RANK: usize = 16;
/// Most elements of one value: 2^28 (1 GiB of f32), far above any CNN's activations at 4096 px.
pub const MAX_ELEMENTS: usize = 1 << 28;
/// Most bytes of values held at once: during a run (activations and shape values), and of the
/// constants computed at load (a ConstantOfShape folded).
pub const MAX_HELD_BYTES: usize = 2 << 30;
/// Most bytes of the constants computed at load (what reads only initializers and constants).
pub const MAX_FOLDED_BYTES: usize = 1 << 30;
/// Most bytes of initializer data (in the file and in external files) in all.
pub const MAX_WEIGHT_BYTES: u64 = 2 << 30;
/// Largest stride, dilation, kernel side and padding a convolution or pooling may have: beyond
/// them a value is no network's, and shapes computed from it would overflow or allocate without
/// bound.
pub const MAX_WINDOW: i64 = 4096;

/// The element count of `dims` against [`MAX_ELEMENTS`], and their rank against [`MAX_RANK`].
pub(super) fn check_size(dims: &[usize], op: &str) -> R<()> {
    if dims.len() > MAX_RANK {
        return fail(format!("{op} would create a value of rank {}; at most {MAX_RANK} dimensions are supported", dims.len()));
    }
    match elements(dims) {
        Some(n) if n <= MAX_ELEMENTS => Ok(()),
        _ => fail(format!("{op} would create a tensor of shape {dims:?}, more than {MAX_ELEMENTS} elements")),
    }
}

/// The product of `dims`, `None` when it overflows.
pub(super) fn elements(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// The numpy broadcast of two shapes.
pub(super) fn broadcast(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let r = a.len().max(b.len());
    let at = |s: &[usize], i: usize| if i + s.len() >= r { s[i + s.len() - r] } else { 1 };
    (0..r)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => fail(format!("shapes {a:?} and {b:?} do not broadcast (dimension {i}: {x} and {y})")),
        })
        .collect()
}

/// The graph's size against the budgets, before anything is computed from it.
pub(super) fn graph_size(g: &Graph) -> std::result::Result<(), String> {
    if g.nodes.len() > MAX_NODES {
        return Err(format!("the graph has {} nodes; at most {MAX_NODES} are loaded", g.nodes.len()));
    }
    if g.initializers.len() > MAX_INITIALIZERS {
        return Err(format!("the graph has {} initializers; at most {MAX_INITIALIZERS} are loaded", g.initializers.len()));
    }
    // The initializers' data, as their shapes declare it, before any is read.
    let mut declared = 0u64;
    for t in g.initializers.iter().filter(|t| t.dims.iter().all(|&d| d >= 0)) {
        let count = t.dims.iter().try_fold(1u64, |a, &d| u64::try_from(d).ok().and_then(|d| a.checked_mul(d)));
        declared = declared.saturating_add(count.unwrap_or(u64::MAX).saturating_mul(4));
        if declared > MAX_WEIGHT_BYTES {
            return Err(format!("the initializers declare more than {MAX_WEIGHT_BYTES} bytes of weights (at {:?}, of shape {:?})", t.name, t.dims));
        }
    }
    let mut edges = 0usize;
    for n in &g.nodes {
        let e = n.inputs.len() + n.outputs.len();
        if e > MAX_NODE_EDGES {
            return Err(format!("node {:?} ({}) has {} inputs and {} outputs; at most {MAX_NODE_EDGES} in all are supported", n.name, n.op_type, n.inputs.len(), n.outputs.len()));
        }
        edges += e;
    }
    if edges > MAX_EDGES {
        return Err(format!("the graph's nodes have {edges} inputs and outputs in all; at most {MAX_EDGES} are loaded"));
    }
    Ok(())
}

/// (fewest, most) inputs of each op, as the specification has them (the optional ones counted).
fn arity(op: &str) -> (usize, usize) {
    match op {
        "Constant" => (0, 0),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "MatMul" | "Gather" | "Expand" | "Tile" => (2, 2),
        "Where" | "Range" | "ScatterND" => (3, 3),
        "BatchNormalization" => (5, 5),
        "Conv" | "Gemm" | "LayerNormalization" => (2, 3),
        "Clip" | "Dropout" => (1, 3),
        "Pad" => (1, 4),
        "Slice" => (1, 5),
        "Unsqueeze" | "Squeeze" | "Reshape" | "Split" | "ReduceMean" => (1, 2),
        "Concat" => (1, MAX_NODE_EDGES),
        _ => (1, 1),
    }
}

/// One node against the specification of its op, at load: its inputs and outputs, then its
/// attributes (strides, dilations and kernel sides 1 to [`MAX_WINDOW`], pads 0 to it, `group`
/// dividing a constant weight's output channels, axes in range and not repeated, a permutation,
/// finite floats).
pub(super) fn node(n: &Node, constants: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
    let (low, high) = arity(&n.op_type);
    if n.inputs.len() < low || n.inputs.len() > high {
        let want = if low == high { low.to_string() } else { format!("{low} to {high}") };
        return Err(format!("has {} inputs; {} takes {want}", n.inputs.len(), n.op_type));
    }
    if let Some(k) = (0..low).find(|&k| n.inputs[k].is_empty()) {
        return Err(format!("its input {k} is required but empty"));
    }
    if n.outputs.first().is_none_or(|o| o.is_empty()) {
        return Err("has no output".into());
    }
    for (name, a) in &n.attributes {
        match a {
            Attribute::Float(v) if v.is_nan() => return Err(format!("attribute {name} is NaN")),
            Attribute::Floats(v) if v.iter().any(|v| v.is_nan()) => return Err(format!("attribute {name} holds NaN")),
            Attribute::Ints(v) if v.len() > MAX_NODE_EDGES => return Err(format!("attribute {name} holds {} integers", v.len())),
            _ => {}
        }
    }
    match n.op_type.as_str() {
        "Conv" | "MaxPool" | "AveragePool" => window(n, constants)?,
        "Unsqueeze" | "Squeeze" | "ReduceMean" => {
            let given = attr_ints(n, "axes").or_else(|| n.inputs.get(1).and_then(|a| constants.get(a)).and_then(|t| ints_of(t).ok()));
            if let Some(axes) = given {
                distinct_axes(&axes, &n.op_type).map_err(|e| e.to_string())?;
            }
        }
        "Transpose" => {
            if let Some(p) = attr_ints(n, "perm") {
                let mut seen = vec![false; p.len()];
                if p.len() > MAX_RANK || p.iter().any(|&a| a < 0 || a as usize >= p.len() || std::mem::replace(&mut seen[a as usize], true)) {
                    return Err(format!("perm {:?} is not a permutation of 0..{}", &p[..p.len().min(32)], p.len()));
                }
            }
        }
        "Gemm" => {
            for t in ["transA", "transB"] {
                if !matches!(attr_int(n, t, 0), 0 | 1) {
                    return Err(format!("{t} is {}; it must be 0 or 1", attr_int(n, t, 0)));
                }
            }
        }
        "Reshape" => {
            if let Some(s) = attr_ints(n, "shape").filter(|s| s.len() > MAX_RANK) {
                return Err(format!("its shape has {} dimensions; at most {MAX_RANK} are supported", s.len()));
            }
        }
        "Slice" if attr_ints(n, "steps").is_some_and(|s| s.contains(&0)) => return Err("a step is 0".into()),
        "Split" => {
            if let Some(v) = attr_ints(n, "split").and_then(|s| s.into_iter().find(|&v| v < 0)) {
                return Err(format!("split holds {v}; sizes must be at least 0"));
            }
        }
        "ConstantOfShape" => {
            if let Some(Attribute::Tensor(t)) = n.attributes.get("value") {
                if t.dims.iter().product::<i64>() != 1 || t.dims.len() > 1 {
                    return Err(format!("its value has shape {:?}; it must hold one element", t.dims));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Axes (of Unsqueeze, Squeeze, ReduceMean) at most [`MAX_RANK`] and none twice.
pub(super) fn distinct_axes(axes: &[i64], op: &str) -> R<()> {
    if axes.len() > MAX_RANK {
        return fail(format!("{op} with {} axes; at most {MAX_RANK} are supported", axes.len()));
    }
    let mut seen = HashSet::new();
    if let Some(a) = axes.iter().find(|&&a| !seen.insert(a)) {
        return fail(format!("{op} names axis {a} twice"));
    }
    Ok(())
}

/// The convolution and pooling attributes, before any shape is computed from them.
fn window(n: &Node, constants: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
    for (name, low) in [("strides", 1), ("dilations", 1), ("kernel_shape", 1), ("pads", 0)] {
        if let Some(v) = attr_ints(n, name).and_then(|v| v.into_iter().find(|&x| !(low..=MAX_WINDOW).contains(&x))) {
            return Err(format!("{name} holds {v}; they must be {low} to {MAX_WINDOW}"));
        }
    }
    let auto = attr_str(n, "auto_pad").unwrap_or_else(|| "NOTSET".into());
    if !matches!(auto.as_str(), "NOTSET" | "VALID" | "SAME_UPPER" | "SAME_LOWER") {
        return Err(format!("auto_pad {auto:?} is none of NOTSET, VALID, SAME_UPPER, SAME_LOWER"));
    }
    if n.op_type != "Conv" && attr_ints(n, "kernel_shape").is_none() {
        return Err("it has no kernel_shape".into());
    }
    if !matches!(attr_int(n, "ceil_mode", 0), 0 | 1) || !matches!(attr_int(n, "count_include_pad", 0), 0 | 1) {
        return Err("ceil_mode and count_include_pad must be 0 or 1".into());
    }
    if n.op_type == "Conv" {
        let group = attr_int(n, "group", 1);
        if !(1..=1 << 20).contains(&group) {
            return Err(format!("group {group} must be 1 to {}", 1 << 20));
        }
        if let Some(w) = n.inputs.get(1).and_then(|w| constants.get(w)) {
            let out = w.dims().first().copied().unwrap_or(0) as i64;
            if out == 0 || w.elem_count() == 0 {
                return Err("its weights have no output channel".into());
            }
            if out % group != 0 {
                return Err(format!("group {group} does not divide its weights' {out} output channels"));
            }
            if let (Some(k), [_, _, ks @ ..]) = (attr_ints(n, "kernel_shape"), w.dims()) {
                if k.iter().map(|&v| v as usize).ne(ks.iter().copied()) {
                    return Err(format!("kernel_shape {k:?} is not its weights' {ks:?}"));
                }
            }
            if w.dims().iter().skip(2).any(|&k| k as i64 > MAX_WINDOW) {
                return Err(format!("its weights' kernel {:?} is larger than {MAX_WINDOW}", &w.dims()[2..]));
            }
        }
    }
    Ok(())
}

/// The output shape of a 2-D convolution or pooling window of side `k` (dilated by `d`), stride
/// `s`, padded by `before` and `after` (checked: a window larger than the padded input is an
/// error, not a wrapped size).
fn side(input: usize, k: usize, d: usize, s: usize, before: usize, after: usize, what: &str) -> R<usize> {
    let span = k.checked_sub(1).and_then(|k| k.checked_mul(d)).and_then(|v| v.checked_add(1));
    let padded = input.checked_add(before).and_then(|v| v.checked_add(after));
    match (span, padded, s) {
        (Some(span), Some(padded), 1..) if span <= padded => Ok((padded - span) / s + 1),
        (_, _, 0) => fail(format!("{what} with stride 0")),
        _ => fail(format!("{what}'s window ({k} dilated by {d}) is larger than its padded input ({input} + {before} + {after})")),
    }
}

/// Strides, dilations and pads of a 2-D window node, with their defaults; `extra` pads added
/// (a Pad folded into the convolution).
fn geometry(n: &Node, kernel: [usize; 2], input: [usize; 2], extra: [usize; 4]) -> R<[usize; 2]> {
    let ints = |name: &str, default: i64, len: usize| -> R<Vec<usize>> {
        let v = attr_ints(n, name).unwrap_or_else(|| vec![default; len]);
        if v.len() != len || v.iter().any(|&x| x < 0) {
            return fail(format!("{} {name} {v:?}: {len} values expected for a 2-D input", n.op_type));
        }
        Ok(v.into_iter().map(|x| x as usize).collect())
    };
    let (s, d) = (ints("strides", 1, 2)?, ints("dilations", 1, 2)?);
    let auto = attr_str(n, "auto_pad").unwrap_or_else(|| "NOTSET".into());
    let p = if auto == "NOTSET" { ints("pads", 0, 4)? } else { vec![0; 4] };
    let mut out = [0; 2];
    for i in 0..2 {
        if s[i] == 0 {
            return fail(format!("{} with stride 0", n.op_type));
        }
        out[i] = match auto.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => input[i].div_ceil(s[i]),
            _ => side(input[i], kernel[i], d[i], s[i], p[i].saturating_add(extra[i]), p[i + 2].saturating_add(extra[i + 2]), &n.op_type)?,
        };
    }
    Ok(out)
}

/// A convolution's output shape for an input `x` and weights `w`, checked (channels, groups,
/// window against the padded input).
pub(super) fn conv_dims(n: &Node, x: &[usize], w: &[usize], extra: [usize; 4]) -> R<Vec<usize>> {
    let ([b, c, h, wd], [o, cg, kh, kw]) = (x, w) else {
        return fail(format!("Conv of a {}-D input by {}-D weights: only 2-D convolutions ([n, c, h, w] by [out, in, kh, kw]) are supported", x.len(), w.len()));
    };
    let group = attr_int(n, "group", 1).max(1) as usize;
    if *o == 0 || *cg == 0 {
        return fail(format!("Conv by weights of shape {w:?}: no output channel or no input channel"));
    }
    if o % group != 0 || cg.checked_mul(group) != Some(*c) {
        return fail(format!("Conv of {c} channels by weights {w:?} in {group} groups: the channels do not match"));
    }
    if let Some(k) = attr_ints(n, "kernel_shape").filter(|k| *k != [*kh as i64, *kw as i64]) {
        return fail(format!("Conv with kernel_shape {k:?} by weights of shape {w:?}"));
    }
    let [oh, ow] = geometry(n, [*kh, *kw], [*h, *wd], extra)?;
    Ok(vec![*b, *o, oh, ow])
}

/// Ops that compute on floats: integer inputs (shapes, indices) are converted to F32 for them
/// (candle's float functions have no integer version, and panic on one).
const FLOAT_OPS: &[&str] = &[
    "AveragePool", "BatchNormalization", "Clip", "Conv", "Erf", "Exp", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "LayerNormalization",
    "LeakyRelu", "LogSoftmax", "MatMul", "MaxPool", "Pow", "ReduceMean", "Relu", "Sigmoid", "Softmax", "Sqrt", "Tanh",
];

/// Ops that reduce over their first input's elements, which must not be empty.
const REDUCING_OPS: &[&str] = &[
    "ArgMax", "AveragePool", "BatchNormalization", "Conv", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "LayerNormalization", "LogSoftmax", "MatMul", "MaxPool", "ReduceMean", "Softmax",
];

/// `args` with their integer tensors as F32 when `node` computes on floats; `None` when nothing
/// changes.
pub(super) fn float_inputs(node: &Node, args: &[Option<Tensor>]) -> R<Option<Vec<Option<Tensor>>>> {
    if !FLOAT_OPS.contains(&node.op_type.as_str()) || args.iter().flatten().all(|t| t.dtype() != DType::I64) {
        return Ok(None);
    }
    Ok(Some(args.iter().map(|a| a.as_ref().map(|t| t.to_dtype(DType::F32)).transpose()).collect::<R<_>>()?))
}

/// The shape of the first output of `node` on `args`, for every op whose output may be larger
/// than its inputs (`None` for the others), with checked arithmetic; held to [`MAX_ELEMENTS`].
pub(super) fn output(node: &Node, args: &[Option<Tensor>]) -> R<Option<Vec<usize>>> {
    let dims = |k: usize| args.get(k).and_then(|a| a.as_ref()).map(|t| t.dims());
    let x = dims(0).unwrap_or(&[]);
    let op = node.op_type.as_str();
    if REDUCING_OPS.contains(&op) && x.contains(&0) {
        return fail(format!("{op} of an empty value (shape {x:?})"));
    }
    // Integer division by zero panics.
    if op == "Div" && args.iter().flatten().all(|t| t.dtype() == DType::I64) {
        if let Some(Some(d)) = args.get(1) {
            if ints_of(d)?.contains(&0) {
                return fail("Div of integers by zero");
            }
        }
    }
    let shape = match op {
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Where" => {
            let mut shape = Vec::new();
            for t in args.iter().flatten() {
                shape = broadcast(&shape, t.dims())?;
            }
            shape
        }
        "Concat" => {
            let parts: Vec<&[usize]> = args.iter().flatten().map(|t| t.dims()).collect();
            let Some(first) = parts.first().filter(|f| !f.is_empty()) else { return fail("Concat of nothing, or of scalars") };
            let a = axis(attr_int(node, "axis", 0), first.len())?;
            let mut shape = first.to_vec();
            let mut total = 0usize;
            for p in &parts {
                if p.len() != first.len() || p.iter().zip(first.iter()).enumerate().any(|(i, (x, y))| i != a && x != y) {
                    return fail(format!("Concat of shapes {first:?} and {p:?} on axis {a}"));
                }
                total = total.saturating_add(p[a]);
            }
            shape[a] = total;
            shape
        }
        "Expand" => {
            let target: Vec<usize> = ints_of(args.get(1).and_then(|a| a.as_ref()).ok_or_else(|| candle_core::Error::Msg("Expand without a shape".into()))?)?
                .iter()
                .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
                .collect();
            check_size(&target, op)?;
            broadcast(x, &target)?
        }
        "Tile" => {
            let reps = ints_of(args.get(1).and_then(|a| a.as_ref()).ok_or_else(|| candle_core::Error::Msg("Tile without repeats".into()))?)?;
            if reps.len() != x.len() || reps.iter().any(|&r| r < 0) {
                return fail(format!("Tile of a value of shape {x:?} by repeats {reps:?}"));
            }
            x.iter().zip(&reps).map(|(&d, &r)| d.saturating_mul(r as usize)).collect()
        }
        "ConstantOfShape" => {
            let shape = ints_of(args.first().and_then(|a| a.as_ref()).ok_or_else(|| candle_core::Error::Msg("ConstantOfShape without a shape".into()))?)?;
            if let Some(d) = shape.iter().find(|&&d| d < 0) {
                return fail(format!("ConstantOfShape of shape {shape:?}: dimension {d}"));
            }
            shape.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect()
        }
        "Conv" => match (dims(1), x.len()) {
            (Some(w), 4) => conv_dims(node, x, w, [0; 4])?,
            _ => return fail("only 2-D convolutions ([n, c, h, w] by [out, in, kh, kw]) are supported"),
        },
        "MaxPool" | "AveragePool" => {
            let k = attr_ints(node, "kernel_shape").unwrap_or_default();
            let ([n, c, h, w], [kh, kw]) = (x, k.as_slice()) else {
                return fail(format!("{op} of shape {x:?} with kernel {k:?}: only 2-D windows on [n, c, h, w] are supported"));
            };
            let [oh, ow] = geometry(node, [*kh as usize, *kw as usize], [*h, *w], [0; 4])?;
            vec![*n, *c, oh, ow]
        }
        "MatMul" | "Gemm" => {
            let (Some(a), Some(b)) = (dims(0), dims(1)) else { return Ok(None) };
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            if op == "Gemm" {
                if a.len() != 2 || b.len() != 2 {
                    return fail(format!("Gemm of shapes {a:?} and {b:?}: both must be 2-D"));
                }
                if attr_int(node, "transA", 0) != 0 {
                    a.reverse();
                }
                if attr_int(node, "transB", 0) != 0 {
                    b.reverse();
                }
            }
            if a.is_empty() || b.is_empty() {
                return fail(format!("{op} of a scalar"));
            }
            let (va, vb) = (a.len() == 1, b.len() == 1);
            if va {
                a.insert(0, 1);
            }
            if vb {
                b.push(1);
            }
            let (m, k1) = (a[a.len() - 2], a[a.len() - 1]);
            let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
            if k1 != k2 {
                return fail(format!("{op} of shapes {a:?} and {b:?}: inner dimensions {k1} and {k2} differ"));
            }
            let mut shape = broadcast(&a[..a.len() - 2], &b[..b.len() - 2])?;
            shape.extend([m, n]);
            shape
        }
        "Gather" => {
            let idx = dims(1).unwrap_or(&[]);
            if x.is_empty() {
                return fail("Gather from a scalar");
            }
            let a = axis(attr_int(node, "axis", 0), x.len())?;
            let mut shape = x[..a].to_vec();
            shape.extend(idx);
            shape.extend(&x[a + 1..]);
            shape
        }
        "Unsqueeze" | "Squeeze" => {
            if let Some(t) = args.get(1).and_then(|a| a.as_ref()) {
                distinct_axes(&ints_of(t)?, op)?;
            }
            let added = if op == "Unsqueeze" { attr_ints(node, "axes").map_or(0, |a| a.len()) + args.get(1).and_then(|a| a.as_ref()).map_or(0, |t| t.elem_count()) } else { 0 };
            if x.len() + added > MAX_RANK {
                return fail(format!("{op} to rank {}; at most {MAX_RANK} dimensions are supported", x.len() + added));
            }
            return Ok(None);
        }
        "Range" => {
            let scalar = |k: usize| -> R<f64> {
                let t = args.get(k).and_then(|a| a.as_ref()).ok_or_else(|| candle_core::Error::Msg(format!("input {k} of Range is missing")))?;
                if t.elem_count() != 1 {
                    return fail(format!("Range's input {k} has shape {:?}; it must be a scalar", t.dims()));
                }
                Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
            };
            let (s, l, d) = (scalar(0)?, scalar(1)?, scalar(2)?);
            let count = ((l - s) / d).ceil();
            if !count.is_finite() || d == 0.0 {
                return fail(format!("Range({s}, {l}, {d})"));
            }
            vec![count.max(0.0) as usize]
        }
        _ => return Ok(None),
    };
    check_size(&shape, op)?;
    Ok(Some(shape))
}

/// Most work a run may do, in units of about a multiply-add of our convolution kernel: 2^36,
/// some seconds (ResNet-50 at 224 px takes 2^32, ViT-B/16 2^33.5, ViT-L/16 2^35; ResNet-50 at
/// 1024 px, 2^36.5, is refused).
pub const MAX_WORK: u64 = 1 << 36;

/// The work of running `node` on `args` into an output of `shape` (when known), in units of
/// [`MAX_WORK`]: multiply-adds for the convolutions and products (candle's convolution counted
/// four times, sixteen when grouped), sixteen per window element of a pooling, 32 for each
/// element of any other op (memory-bound: a Pad of 175 million elements takes a second).
pub(super) fn work(node: &Node, args: &[Option<Tensor>], shape: Option<&[usize]>) -> u64 {
    let out = shape.map_or(0, |s| elements(s).unwrap_or(usize::MAX)) as u64;
    let dims = |k: usize| args.get(k).and_then(|a| a.as_ref()).map(|t| t.dims());
    let inner = |d: Option<&[usize]>, skip: usize| d.map_or(1, |d| d.iter().skip(skip).product::<usize>()) as u64;
    let window = || attr_ints(node, "kernel_shape").map_or(1, |k| k.iter().map(|&v| v.max(1) as u64).product::<u64>());
    match node.op_type.as_str() {
        "Conv" => out.saturating_mul(inner(dims(1), 1)).saturating_mul(if attr_int(node, "group", 1) > 1 { 16 } else { 4 }),
        "MatMul" | "Gemm" => {
            let a = dims(0).unwrap_or(&[]);
            let k = if node.op_type == "Gemm" && attr_int(node, "transA", 0) != 0 { a.first() } else { a.last() };
            out.saturating_mul(k.copied().unwrap_or(1) as u64)
        }
        "AveragePool" | "MaxPool" => out.saturating_mul(window()).saturating_mul(16),
        _ => {
            let inputs: u64 = args.iter().flatten().map(|t| t.elem_count() as u64).fold(0, u64::saturating_add);
            out.max(inputs).saturating_mul(32)
        }
    }
}

/// Integer division truncating toward zero, as ONNX's Div of integers (candle's panics on
/// i64::MIN / -1; the divisor holds no zero: [`output`] checked).
pub(super) fn int_div(a: &Tensor, b: &Tensor) -> R<Tensor> {
    let shape = broadcast(a.dims(), b.dims())?;
    let (x, y) = (super::ops::values::<i64>(&a.broadcast_as(shape.clone())?)?, super::ops::values::<i64>(&b.broadcast_as(shape.clone())?)?);
    let q: Vec<i64> = x.iter().zip(&y).map(|(&x, &y)| if y == 0 { 0 } else { x.wrapping_div(y) }).collect();
    Tensor::from_vec(q, shape, a.device())
}

/// Bytes of a tensor's elements.
pub(super) fn bytes(t: &Tensor) -> usize {
    t.elem_count().saturating_mul(t.dtype().size_in_bytes())
}

/// Bytes a value of `shape` would take, as the dtype of the op's first input (F32 if none).
pub(super) fn estimate(shape: &[usize], args: &[Option<Tensor>]) -> usize {
    let width = args.iter().flatten().next().map_or(DType::F32, |t| t.dtype()).size_in_bytes().max(4);
    elements(shape).unwrap_or(usize::MAX).saturating_mul(width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_larger_than_their_padded_input_and_overflowing_shapes_are_errors() {
        assert_eq!(side(16, 3, 1, 1, 1, 1, "Conv").unwrap(), 16);
        assert_eq!(side(16, 3, 2, 2, 0, 0, "Conv").unwrap(), 6);
        assert!(side(16, 33, 1, 1, 0, 0, "Conv").unwrap_err().to_string().contains("larger than its padded input"));
        assert!(side(16, 3, 1 << 62, 1, 0, 0, "Conv").is_err(), "dilation 2^62");
        assert!(side(16, 3, 1, 1, usize::MAX, 1, "Conv").is_err(), "pads that wrap");
        assert!(side(16, 3, 1, 0, 0, 0, "Conv").is_err(), "stride 0");
        assert!(check_size(&[1 << 20, 1 << 20, 1 << 30], "Reshape").is_err());
        assert!(check_size(&[usize::MAX, 2], "Reshape").is_err(), "a product that wraps");
        assert!(check_size(&[1; 17], "Unsqueeze").is_err(), "rank 17");
        assert!(check_size(&[1, 3, 224, 224], "Conv").is_ok());
        assert_eq!(broadcast(&[65536, 1], &[1, 65536]).unwrap(), [65536, 65536]);
        assert!(distinct_axes(&[0; 300_000], "Unsqueeze").is_err());
        assert!(distinct_axes(&[0, 0], "Unsqueeze").unwrap_err().to_string().contains("twice"));
    }
}
