//! The ops transformer exports add to a CNN's (torchvision ViT / Swin, timm ViT / DeiT at opsets
//! 13-18): LayerNormalization, Erf and Gelu, Pow, the comparisons and Where, Expand, Split,
//! Range, Mod, Tile, ArgMax, ScatterND. The float ops on the path to the output are plain candle
//! ops, differentiable; the index ops (comparisons, Range, Mod, ScatterND, ArgMax) compute masks
//! and shapes, not activations, and have no gradient.

use candle_core::{DType, Tensor};
use gradcam_kernels::Pointwise;

use super::check::broadcast;
use super::ops::{arg, attr_float, attr_int, attr_ints, attr_str, axis, check_size, fail, ints_of, opt, values, R};
use super::proto::Node;

/// The op types of this file.
pub const OPS: &[&str] = &[
    "ArgMax", "Equal", "Erf", "Expand", "Gelu", "Greater", "GreaterOrEqual", "LayerNormalization", "Less", "LessOrEqual", "Mod", "Not", "Pow", "Range", "ScatterND", "Split", "Tile",
    "Where",
];

fn same_dtype(a: &Tensor, b: &Tensor) -> R<(Tensor, Tensor)> {
    if a.dtype() == b.dtype() {
        return Ok((a.clone(), b.clone()));
    }
    Ok((a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?))
}

/// Runs one node of [`OPS`]; `None` when the op is not one of them.
pub(super) fn eval(node: &Node, args: &[Option<Tensor>]) -> Option<R<Vec<Tensor>>> {
    let run = || -> R<Vec<Tensor>> {
        let x = || arg(args, 0, node);
        match node.op_type.as_str() {
            "LayerNormalization" => {
                if node.outputs.iter().skip(1).any(|o| !o.is_empty()) {
                    return fail("LayerNormalization's mean and inverse-deviation outputs are not supported");
                }
                let x = x()?.to_dtype(DType::F32)?;
                let a = axis(attr_int(node, "axis", -1), x.rank())?;
                let eps = attr_float(node, "epsilon", 1e-5) as f64;
                let dims = x.dims().to_vec();
                let (outer, inner): (usize, usize) = (dims[..a].iter().product(), dims[a..].iter().product());
                let flat = x.reshape((outer, inner))?;
                let centred = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
                let var = centred.sqr()?.mean_keepdim(1)?;
                let mut y = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.clone())?;
                y = y.broadcast_mul(&arg(args, 1, node)?.to_dtype(DType::F32)?)?;
                if let Some(b) = opt(args, 2) {
                    y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
                }
                Ok(vec![y])
            }
            "Erf" => Ok(vec![Pointwise::Erf.forward(&x()?.to_dtype(DType::F32)?)?]),
            "Gelu" => {
                let x = x()?.to_dtype(DType::F32)?;
                Ok(vec![match attr_str(node, "approximate").as_deref() {
                    None | Some("none") => Pointwise::Gelu.forward(&x)?,
                    Some("tanh") => x.gelu()?,
                    Some(other) => return fail(format!("Gelu with approximate={other:?}")),
                }])
            }
            "Pow" => {
                let (base, e) = (x()?.to_dtype(DType::F32)?, arg(args, 1, node)?.to_dtype(DType::F32)?);
                if e.elem_count() == 1 {
                    let p = e.flatten_all()?.to_vec1::<f32>()?[0];
                    return Ok(vec![match p {
                        1.0 => base,
                        2.0 => base.sqr()?,
                        0.5 => base.sqrt()?,
                        p => base.powf(p as f64)?,
                    }]);
                }
                Ok(vec![base.log()?.broadcast_mul(&e)?.exp()?])
            }
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" => {
                let (a, b) = same_dtype(x()?, arg(args, 1, node)?)?;
                let y = match node.op_type.as_str() {
                    "Equal" => a.broadcast_eq(&b)?,
                    "Less" => a.broadcast_lt(&b)?,
                    "Greater" => a.broadcast_gt(&b)?,
                    "LessOrEqual" => a.broadcast_le(&b)?,
                    _ => a.broadcast_ge(&b)?,
                };
                Ok(vec![y.to_dtype(DType::I64)?])
            }
            "Not" => Ok(vec![x()?.to_dtype(DType::I64)?.eq(0i64)?.to_dtype(DType::I64)?]),
            "Where" => {
                let (cond, a, b) = (x()?, arg(args, 1, node)?, arg(args, 2, node)?);
                let (a, b) = same_dtype(a, b)?;
                let shape = broadcast(&broadcast(cond.dims(), a.dims())?, b.dims())?;
                check_size(&shape, "Where")?;
                let cond = cond.ne(0i64)?.broadcast_as(shape.clone())?.contiguous()?;
                Ok(vec![cond.where_cond(&a.broadcast_as(shape.clone())?.contiguous()?, &b.broadcast_as(shape)?.contiguous()?)?])
            }
            "Expand" => {
                let x = x()?;
                let target: Vec<usize> = ints_of(arg(args, 1, node)?)?.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
                let shape = broadcast(x.dims(), &target)?;
                check_size(&shape, "Expand")?;
                Ok(vec![x.broadcast_as(shape)?.contiguous()?])
            }
            "Tile" => {
                let x = x()?;
                let reps: Vec<usize> = ints_of(arg(args, 1, node)?)?.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
                if reps.len() != x.rank() {
                    return fail(format!("Tile of a rank-{} value by {} repeats", x.rank(), reps.len()));
                }
                let shape: Vec<usize> = x.dims().iter().zip(&reps).map(|(d, r)| d.saturating_mul(*r)).collect();
                check_size(&shape, "Tile")?;
                Ok(vec![x.repeat(reps)?])
            }
            "Split" => {
                let x = x()?;
                let a = axis(attr_int(node, "axis", 0), x.rank())?;
                let n = x.dim(a)?;
                let parts = node.outputs.len();
                let sizes: Vec<usize> = match opt(args, 1).map(ints_of).transpose()?.or_else(|| attr_ints(node, "split")) {
                    Some(s) => s.iter().map(|&v| usize::try_from(v).unwrap_or(usize::MAX)).collect(),
                    None => {
                        let each = n.div_ceil(parts.max(1));
                        (0..parts).map(|i| each.min(n.saturating_sub(i * each))).collect()
                    }
                };
                if sizes.len() != parts || sizes.iter().try_fold(0usize, |s, &v| s.checked_add(v)) != Some(n) {
                    return fail(format!("Split of {n} into {sizes:?} for {parts} outputs"));
                }
                let mut start = 0;
                sizes.iter().map(|&len| {
                    let part = x.narrow(a, start, len);
                    start += len;
                    part
                }).collect()
            }
            "Range" => {
                let (s, l, d) = (x()?, arg(args, 1, node)?, arg(args, 2, node)?);
                let float = [s, l, d].iter().any(|t| t.dtype() != DType::I64);
                let scalar = |t: &Tensor| -> R<f64> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.first().copied().unwrap_or(0.0)) };
                let (s, l, d) = (scalar(s)?, scalar(l)?, scalar(d)?);
                let count = ((l - s) / d).ceil();
                if !(count.is_finite()) || d == 0.0 {
                    return fail(format!("Range({s}, {l}, {d})"));
                }
                let count = count.max(0.0) as usize;
                check_size(&[count], "Range")?;
                let values = (0..count).map(|i| s + i as f64 * d);
                Ok(vec![if float {
                    Tensor::new(values.map(|v| v as f32).collect::<Vec<_>>(), &candle_core::Device::Cpu)?
                } else {
                    Tensor::new(values.map(|v| v as i64).collect::<Vec<_>>(), &candle_core::Device::Cpu)?
                }])
            }
            "Mod" => {
                let (a, b) = same_dtype(x()?, arg(args, 1, node)?)?;
                let shape = broadcast(a.dims(), b.dims())?;
                check_size(&shape, "Mod")?;
                let fmod = attr_int(node, "fmod", 0) != 0;
                if a.dtype() == DType::I64 {
                    let (av, bv) = (values::<i64>(&a.broadcast_as(shape.clone())?)?, values::<i64>(&b.broadcast_as(shape.clone())?)?);
                    if bv.contains(&0) {
                        return fail("Mod by zero");
                    }
                    let out: Vec<i64> = av.iter().zip(&bv).map(|(&x, &y)| if fmod { x.wrapping_rem(y) } else { x.wrapping_rem(y).wrapping_add(y).wrapping_rem(y) }).collect();
                    return Ok(vec![Tensor::from_vec(out, shape, &candle_core::Device::Cpu)?]);
                }
                let (av, bv) = (values::<f32>(&a.broadcast_as(shape.clone())?)?, values::<f32>(&b.broadcast_as(shape.clone())?)?);
                let out: Vec<f32> = av.iter().zip(&bv).map(|(&x, &y)| if fmod { x % y } else { x - y * (x / y).floor() }).collect();
                Ok(vec![Tensor::from_vec(out, shape, &candle_core::Device::Cpu)?])
            }
            "ArgMax" => {
                let x = x()?.to_dtype(DType::F32)?;
                let a = axis(attr_int(node, "axis", 0), x.rank())?;
                if attr_int(node, "select_last_index", 0) != 0 {
                    return fail("ArgMax with select_last_index");
                }
                let y = x.argmax_keepdim(a)?.to_dtype(DType::I64)?;
                Ok(vec![if attr_int(node, "keepdims", 1) == 0 { y.squeeze(a)? } else { y }])
            }
            "ScatterND" => {
                if attr_str(node, "reduction").is_some_and(|r| r != "none") {
                    return fail("ScatterND with a reduction");
                }
                let (data, idx, upd) = (x()?, arg(args, 1, node)?, arg(args, 2, node)?);
                let dims = data.dims().to_vec();
                let k = *idx.dims().last().unwrap_or(&0);
                if k == 0 || k > dims.len() {
                    return fail(format!("ScatterND indices of shape {:?} into {dims:?}", idx.dims()));
                }
                let slice: usize = dims[k..].iter().product();
                let positions = ints_of(idx)?;
                let (dtype, upd) = (data.dtype(), upd.to_dtype(data.dtype())?.flatten_all()?);
                if upd.elem_count() != positions.len() / k * slice {
                    return fail(format!("ScatterND updates of shape {:?} for indices {:?}", upd.dims(), idx.dims()));
                }
                let offset = |p: &[i64]| -> R<usize> {
                    let mut o = 0usize;
                    for (j, &v) in p.iter().enumerate() {
                        let n = dims[j] as i64;
                        let v = if v < 0 { v + n } else { v };
                        if !(0..n).contains(&v) {
                            return fail(format!("ScatterND index {v} out of range for {n}"));
                        }
                        o = o * dims[j] + v as usize;
                    }
                    Ok(o * slice)
                };
                macro_rules! scatter {
                    ($t:ty) => {{
                        let mut out = values::<$t>(data)?;
                        let u = values::<$t>(&upd)?;
                        for (p, chunk) in positions.chunks_exact(k).zip(u.chunks_exact(slice.max(1))) {
                            let o = offset(p)?;
                            out[o..o + slice].copy_from_slice(chunk);
                        }
                        Tensor::from_vec(out, dims, &candle_core::Device::Cpu)?
                    }};
                }
                Ok(vec![if dtype == DType::I64 { scatter!(i64) } else { scatter!(f32) }])
            }
            other => fail(format!("op {other} is not supported")),
        }
    };
    OPS.contains(&node.op_type.as_str()).then(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    fn node(op: &str, outputs: usize) -> Node {
        Node { op_type: op.into(), outputs: (0..outputs).map(|i| format!("y{i}")).collect(), attributes: HashMap::new(), ..Default::default() }
    }

    /// LayerNormalization and Erf through finite differences: their backward is candle's.
    #[test]
    fn layer_norm_and_gelu_have_exact_gradients() {
        let x = Tensor::new(&[[0.3f32, -1.2, 0.7, 2.0], [0.1, 0.4, -0.5, -0.9]], &Device::Cpu).unwrap();
        let scale = Tensor::new(&[1.0f32, 0.5, -0.7, 1.3], &Device::Cpu).unwrap();
        let bias = Tensor::new(&[0.1f32, 0.0, 0.2, -0.3], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[0.2f32, -0.4, 0.9, 0.3], [1.0, 0.1, -0.6, 0.5]], &Device::Cpu).unwrap();
        let f = |x: &Tensor| -> Tensor {
            let y = eval(&node("LayerNormalization", 1), &[Some(x.clone()), Some(scale.clone()), Some(bias.clone())]).unwrap().unwrap().remove(0);
            let g = eval(&node("Erf", 1), &[Some(y)]).unwrap().unwrap().remove(0);
            (g * &w).unwrap().sum_all().unwrap()
        };
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let grads = f(v.as_tensor()).backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..base.len() {
            let at = |d: f32| {
                let mut p = base.clone();
                p[i] += d;
                f(&Tensor::from_vec(p, (2, 4), &Device::Cpu).unwrap()).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
            assert!((fd - g[i] as f64).abs() < 2e-3, "element {i}: finite difference {fd}, backward {}", g[i]);
        }
    }

    #[test]
    fn index_ops_follow_onnx() {
        let t = |v: &[i64]| Some(Tensor::new(v, &Device::Cpu).unwrap());
        let mut split = node("Split", 2);
        split.attributes.insert("axis".into(), super::super::proto::Attribute::Int(0));
        let parts = eval(&split, &[t(&[1, 2, 3, 4, 5])]).unwrap().unwrap();
        assert_eq!(parts[0].to_vec1::<i64>().unwrap(), [1, 2, 3]);
        assert_eq!(parts[1].to_vec1::<i64>().unwrap(), [4, 5]);
        let m = eval(&node("Mod", 1), &[t(&[-7, 7, 5]), t(&[3])]).unwrap().unwrap();
        assert_eq!(m[0].to_vec1::<i64>().unwrap(), [2, 1, 2]);
        let r = eval(&node("Range", 1), &[t(&[2]), t(&[9]), t(&[3])]).unwrap().unwrap();
        assert_eq!(r[0].to_vec1::<i64>().unwrap(), [2, 5, 8]);
        let s = eval(&node("ScatterND", 1), &[t(&[0, 0, 0, 0]), Some(Tensor::new(&[[3i64], [1]], &Device::Cpu).unwrap()), t(&[7, 9])]).unwrap().unwrap();
        assert_eq!(s[0].to_vec1::<i64>().unwrap(), [0, 9, 0, 7]);
        let e = eval(&node("Expand", 1), &[Some(Tensor::new(&[[1f32], [2.0]], &Device::Cpu).unwrap()), t(&[1, 3])]).unwrap().unwrap();
        assert_eq!(e[0].to_vec2::<f32>().unwrap(), [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]);
        let w = eval(&node("Where", 1), &[t(&[1, 0]), Some(Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()), Some(Tensor::new(&[-1f32], &Device::Cpu).unwrap())]).unwrap().unwrap();
        assert_eq!(w[0].to_vec1::<f32>().unwrap(), [1.0, -1.0]);
        assert!(eval(&node("Expand", 1), &[t(&[1, 2]), t(&[1 << 20, 1 << 20])]).unwrap().is_err(), "a huge Expand is refused");
        assert!(eval(&node("Relu", 1), &[t(&[1])]).is_none());
        assert!(OPS.iter().all(|op| super::super::ops::SUPPORTED.contains(op)), "every op here is listed as supported");
    }
}
