//! Only the rows the score reads: a ViT's logits read one token (the class token's row, a
//! Gather on the token axis), so the per-token ops between the last attention and that Gather
//! (the residual add, the last MLP, the LayerNorms) need run on that row alone. The head is
//! rewritten with the row sliced out where those ops start: the same logits, the same gradient
//! at the explained layer, without the last MLP over every token and its backward.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};

use super::ops::attr_int;
use super::proto::Node;
use super::OnnxModel;

/// The head's nodes rewritten (the row sliced out, the ops after it on that row) and the
/// constants they add; `None` when the head has no such Gather or nothing to gain.
pub(super) fn hoist(model: &OnnxModel, head: &[usize]) -> Option<(Vec<Node>, HashMap<String, Tensor>)> {
    let nodes = &model.nodes;
    let in_head: HashSet<usize> = head.iter().copied().collect();
    let mut reading: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, n) in nodes.iter().enumerate() {
        for v in &n.inputs {
            reading.entry(v.as_str()).or_default().push(j);
        }
    }
    let readers = |v: &str| -> &[usize] { reading.get(v).map_or(&[], Vec::as_slice) };
    let token_value = |v: &str| matches!(model.shapes.get(v).map(Vec::as_slice), Some([1, t, _]) if *t > 1) && model.dtypes.get(v) == Some(&DType::F32);
    let constant = |v: &str| v.is_empty() || model.constants.contains_key(v);
    // The Gather of one token: axis 1 of a token value, a constant index.
    let (g, row) = head.iter().find_map(|&i| {
        let n = &nodes[i];
        if n.op_type != "Gather" || attr_int(n, "axis", 0) != 1 || !token_value(&n.inputs[0]) {
            return None;
        }
        let idx = model.constants.get(n.inputs.get(1)?)?;
        let c = super::ops::values::<i64>(&idx.to_dtype(DType::I64).ok()?).ok()?;
        let t = model.shapes[&n.inputs[0]][1] as i64;
        (c.len() == 1 && idx.elem_count() == 1).then(|| (i, if c[0] < 0 { c[0] + t } else { c[0] }))
    })?;
    // A per-token op: the same thing on each row (LayerNorm over the last axis, a MatMul by
    // weights, element-wise ops whose constants do not vary over the tokens).
    let row_wise = |n: &Node| -> bool {
        let flat_constants = n.inputs.iter().filter(|v| !v.is_empty() && model.constants.contains_key(v.as_str())).all(|v| {
            let s = model.constants[v.as_str()].dims();
            s.len() <= 1 || s[..s.len() - 1].iter().all(|&d| d == 1)
        });
        let values_ok = n.inputs.iter().all(|v| constant(v) || token_value(v));
        match n.op_type.as_str() {
            "LayerNormalization" => matches!(attr_int(n, "axis", -1), -1 | 2) && values_ok,
            "MatMul" => n.inputs.get(1).is_some_and(|w| model.constants.get(w).is_some_and(|w| w.rank() == 2)) && token_value(&n.inputs[0]),
            "Add" | "Sub" | "Mul" | "Div" | "Pow" => values_ok && flat_constants,
            "Erf" | "Sqrt" | "Relu" | "Sigmoid" | "Tanh" | "Gelu" | "Identity" => values_ok,
            _ => false,
        }
    };
    // Grow the set back from the Gather's input while every value inside it is read only inside.
    let mut set: HashSet<usize> = HashSet::new();
    let start = *model.producer.get(&nodes[g].inputs[0])?;
    let mut queue = vec![start];
    while let Some(i) = queue.pop() {
        if set.contains(&i) || !in_head.contains(&i) || !row_wise(&nodes[i]) || !token_value(&nodes[i].outputs[0]) {
            continue;
        }
        // Its readers must end up inside the set (or be the Gather): checked once it is complete.
        set.insert(i);
        for v in &nodes[i].inputs {
            if let Some(&p) = model.producer.get(v) {
                if token_value(v) {
                    queue.push(p);
                }
            }
        }
    }
    // Drop nodes whose output is read outside the set (repeat until stable).
    loop {
        let outside: Vec<usize> = set.iter().copied().filter(|&i| readers(&nodes[i].outputs[0]).iter().any(|&j| j != g && !set.contains(&j))).collect();
        if outside.is_empty() {
            break;
        }
        for i in outside {
            set.remove(&i);
        }
        // What is left must still reach the Gather.
        let mut reach: HashSet<usize> = HashSet::new();
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            if set.contains(&i) && reach.insert(i) {
                stack.extend(nodes[i].inputs.iter().filter_map(|v| model.producer.get(v)).copied());
            }
        }
        set = reach;
    }
    // Worth it only when a MatMul (the MLP) runs on the row alone.
    if !set.iter().any(|&i| nodes[i].op_type == "MatMul") {
        return None;
    }
    let produced: HashSet<&str> = set.iter().map(|&i| nodes[i].outputs[0].as_str()).collect();
    let frontier: Vec<String> = {
        let mut f: Vec<String> = set.iter().flat_map(|&i| nodes[i].inputs.iter()).filter(|v| !constant(v) && !produced.contains(v.as_str())).cloned().collect();
        f.sort();
        f.dedup();
        f
    };
    let renamed = |v: &str| format!("{v}#row");
    let mut constants = HashMap::new();
    let cpu = &candle_core::Device::Cpu;
    let (starts, ends, axes, zero) = ("#row/starts", "#row/ends", "#row/axes", "#row/zero");
    constants.insert(starts.to_string(), Tensor::new(&[row], cpu).ok()?);
    constants.insert(ends.to_string(), Tensor::new(&[row + 1], cpu).ok()?);
    constants.insert(axes.to_string(), Tensor::new(&[1i64], cpu).ok()?);
    let idx = &model.constants[&nodes[g].inputs[1]];
    constants.insert(zero.to_string(), Tensor::zeros(idx.dims(), DType::I64, cpu).ok()?);
    let mut out = Vec::with_capacity(head.len() + frontier.len());
    let mut sliced: HashSet<&str> = HashSet::new();
    for &i in head {
        if set.contains(&i) {
            // The row of each value the set reads from outside it, before its first reader.
            for f in nodes[i].inputs.iter().filter(|v| frontier.contains(v)) {
                if sliced.insert(f) {
                    out.push(Node { name: renamed(f), op_type: "Slice".into(), inputs: vec![f.clone(), starts.into(), ends.into(), axes.into()], outputs: vec![renamed(f)], ..Default::default() });
                }
            }
        }
        let mut n = nodes[i].clone();
        if set.contains(&i) {
            n.inputs = n.inputs.iter().map(|v| if produced.contains(v.as_str()) || frontier.contains(v) { renamed(v) } else { v.clone() }).collect();
            n.outputs = n.outputs.iter().map(|v| renamed(v)).collect();
        } else if i == g {
            n.inputs = vec![renamed(&n.inputs[0]), zero.into()];
        }
        out.push(n);
    }
    Some((out, constants))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::super::{OnnxModel, OnnxOptions};

    fn model(name: &str) -> Arc<OnnxModel> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/onnx").join(name);
        Arc::new(OnnxModel::load(&path, &OnnxOptions::default()).unwrap())
    }

    /// The ViT's head from the last attention input: the MLP after the attention runs on the
    /// class token's row (Slices before it), the logits unchanged; DeiT reads two rows (class
    /// and distillation tokens) and keeps its head.
    #[test]
    fn a_class_token_head_runs_its_last_mlp_on_one_row() {
        let vit = model("vit.onnx");
        let layer = vit.default_layer().unwrap();
        let mut head = vit.head_set(&layer).unwrap();
        vit.side_values(&layer, &mut head).unwrap();
        let (nodes, constants) = super::hoist(&vit, &head).expect("the ViT's head is rewritten");
        assert!(nodes.iter().filter(|n| n.op_type == "Slice" && n.name.ends_with("#row")).count() >= 2);
        assert!(nodes.iter().any(|n| n.op_type == "MatMul" && n.outputs[0].ends_with("#row")), "the MLP runs on the row");
        assert_eq!(constants.len(), 4);
        let deit = model("deit.onnx");
        let layer = deit.default_layer().unwrap();
        let mut head = deit.head_set(&layer).unwrap();
        deit.side_values(&layer, &mut head).unwrap();
        assert!(super::hoist(&deit, &head).is_none(), "two rows read: no rewrite");
    }
}
