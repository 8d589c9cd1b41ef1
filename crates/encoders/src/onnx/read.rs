//! Reading an ONNX file into a checked [`Graph`] (what every loader shares), and
//! [`OnnxFunction`]: a graph run forward only from an input of any type.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Tensor};
use gradcam_kernels::Rule;

use super::plan::Plan;
use super::proto::{self, Node};
use super::tensor::External;
use super::{bad, check, ops, tensor, MAX_FILE_BYTES, SUPPORTED};
use crate::{Error, Result};

/// The checked contents of an ONNX file: nodes in order, constants (initializers and what
/// depends on them alone, evaluated), the one non-constant input and the first output.
pub(super) struct Graph {
    pub(super) nodes: Vec<Node>,
    pub(super) constants: HashMap<String, Tensor>,
    pub(super) input: proto::ValueInfo,
    pub(super) output: String,
    pub(super) producer: HashMap<String, usize>,
}

impl Graph {
    pub(super) fn read(path: &Path) -> Result<Graph> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        if !meta.is_file() {
            return Err(bad(path, "not a regular file"));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(bad(path, format!("{} bytes; the limit is {MAX_FILE_BYTES} (protobuf's: larger weights go in external data)", meta.len())));
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let model = proto::Model::decode(&bytes).map_err(|e| bad(path, format!("not an ONNX model, or a truncated one ({})", e.0)))?;
        drop(bytes);
        let mut graph = model.graph.ok_or_else(|| bad(path, "not an ONNX model (no graph in the file)"))?;
        if graph.nodes.is_empty() || graph.outputs.is_empty() {
            return Err(bad(path, "not an ONNX model, or an empty one (the graph has no nodes or no output)"));
        }
        check::graph_size(&graph).map_err(|e| bad(path, e))?;
        if graph.sparse_initializers > 0 {
            return Err(bad(path, "sparse initializers are not supported"));
        }
        let opset = model.opsets.iter().find(|(d, _)| d.is_empty() || d == "ai.onnx").map(|(_, v)| *v).unwrap_or(0);
        if !(7..=22).contains(&opset) {
            return Err(bad(path, format!("opset {opset} of the ONNX domain is not supported (7 to 22 are)")));
        }
        for n in &graph.nodes {
            if !(n.domain.is_empty() || n.domain == "ai.onnx") {
                return Err(bad(path, format!("node {:?} uses op {}::{} of a custom domain; only standard ONNX ops are supported", n.name, n.domain, n.op_type)));
            }
            if !SUPPORTED.contains(&n.op_type.as_str()) {
                return Err(bad(
                    path,
                    format!("op {} (node {:?}, producing {:?}) is not supported; supported ops: {}", n.op_type, n.name, n.outputs.first().cloned().unwrap_or_default(), SUPPORTED.join(", ")),
                ));
            }
        }
        let mut external = External::new(path);
        let mut constants = HashMap::new();
        let mut weights = 0usize;
        for t in std::mem::take(&mut graph.initializers) {
            let value = tensor(&t, Some(&mut external)).map_err(|e| bad(path, e))?;
            weights = weights.saturating_add(check::bytes(&value));
            if weights as u64 > check::MAX_WEIGHT_BYTES {
                return Err(bad(path, format!("the initializers take more than {} bytes (at {:?})", check::MAX_WEIGHT_BYTES, t.name)));
            }
            // NaN weights would give finite-looking logits and empty maps; infinities are kept
            // (attention masks hold -inf).
            if holds_nan(&value)? {
                return Err(bad(path, format!("initializer {:?} holds NaN; are the weights corrupt?", t.name)));
            }
            if constants.insert(t.name.clone(), value).is_some() {
                return Err(bad(path, format!("initializer {:?} is defined twice", t.name)));
            }
        }
        drop(external);
        let inputs: Vec<_> = graph.inputs.iter().filter(|i| !constants.contains_key(&i.name)).collect();
        let [input] = inputs.as_slice() else {
            let names: Vec<&str> = inputs.iter().take(8).map(|i| i.name.as_str()).collect();
            return Err(bad(path, format!("the graph has {} inputs ({}); gradcam explains models with one image input", inputs.len(), names.join(", "))));
        };
        if let Some((i, d)) = input.invalid_dim {
            return Err(bad(path, format!("the graph's input {:?} has dimension {i} of size {d}; sizes must be positive (or symbolic, for a dynamic one)", input.name)));
        }
        let mut producer = HashMap::new();
        let mut known: HashSet<&str> = constants.keys().map(String::as_str).collect();
        known.insert(&input.name);
        known.insert("");
        for (i, n) in graph.nodes.iter().enumerate() {
            check::node(n, &constants).map_err(|e| bad(path, format!("node {:?} ({}): {e}", n.name, n.op_type)))?;
            if let Some(missing) = n.inputs.iter().find(|v| !known.contains(v.as_str())) {
                return Err(bad(path, format!("node {:?} ({}) reads {missing:?}, which no earlier node produces (the nodes are not in topological order, or the graph is cut)", n.name, n.op_type)));
            }
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                if constants.contains_key(o) || *o == input.name {
                    return Err(bad(path, format!("node {:?} ({}) redefines {o:?}, which is {}", n.name, n.op_type, if *o == input.name { "the graph's input" } else { "an initializer" })));
                }
                if producer.insert(o.clone(), i).is_some() {
                    return Err(bad(path, format!("value {o:?} is produced twice (node {:?} is its second producer)", n.name)));
                }
                known.insert(o);
            }
        }
        let output = graph.outputs[0].name.clone();
        if !producer.contains_key(&output) {
            return Err(bad(path, format!("the graph's output {output:?} is not produced by any node")));
        }
        // Nodes that read only constants (Constant, shape arithmetic on weights) are evaluated
        // once, and leave the graph.
        let folded = fold(&graph.nodes, &mut constants, &output).map_err(|e| bad(path, e))?;
        if constants.contains_key(&output) {
            return Err(bad(path, format!("the graph's output {output:?} does not depend on its input {:?}", input.name)));
        }
        let nodes: Vec<Node> = graph.nodes.into_iter().zip(folded).filter(|(_, f)| !f).map(|(n, _)| n).collect();
        let producer = nodes.iter().enumerate().flat_map(|(i, n)| n.outputs.iter().filter(|o| !o.is_empty()).map(move |o| (o.clone(), i))).collect();
        let input = (*input).clone();
        Ok(Graph { nodes, constants, input, output, producer })
    }
}

/// Evaluates the nodes that read only constants, in order, into `constants` (which keeps only
/// what the other nodes read; each value is dropped after its last reader); which nodes those
/// were. The values computed are held to [`check::MAX_FOLDED_BYTES`] at once.
fn fold(nodes: &[Node], constants: &mut HashMap<String, Tensor>, output: &str) -> std::result::Result<Vec<bool>, String> {
    let mut constant: HashSet<&str> = constants.keys().map(String::as_str).collect();
    let mut folded = vec![false; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        if n.inputs.iter().all(|v| v.is_empty() || constant.contains(v.as_str())) {
            folded[i] = true;
            constant.extend(n.outputs.iter().map(String::as_str));
        }
    }
    // Reads left by the folded nodes, and the values the others (and the output) need.
    let mut pending: HashMap<&str, usize> = HashMap::new();
    let mut needed: HashSet<&str> = HashSet::from([output]);
    for (n, f) in nodes.iter().zip(&folded) {
        for v in n.inputs.iter().filter(|v| !v.is_empty()) {
            if *f {
                *pending.entry(v).or_default() += 1;
            } else {
                needed.insert(v);
            }
        }
    }
    let made: HashSet<&str> = nodes.iter().zip(&folded).filter(|(_, f)| **f).flat_map(|(n, _)| n.outputs.iter().map(String::as_str)).collect();
    let mut held = 0usize;
    for (n, _) in nodes.iter().zip(&folded).filter(|(_, f)| **f) {
        let what = |e: &dyn std::fmt::Display| format!("node {:?} ({}): {e}", n.name, n.op_type);
        let args: Vec<Option<Tensor>> = n.inputs.iter().map(|v| constants.get(v).cloned()).collect();
        let shape = check::output(n, &args).map_err(|e| what(&e))?;
        let more = shape.map_or(0, |s| check::estimate(&s, &args));
        if held.saturating_add(more) > check::MAX_FOLDED_BYTES {
            return Err(what(&format!("the constants computed at load would take more than {} bytes", check::MAX_FOLDED_BYTES)));
        }
        let values = ops::eval(n, &args, Rule::Exact).map_err(|e| what(&e))?;
        drop(args);
        for (o, v) in n.outputs.iter().zip(values) {
            held += check::bytes(&v);
            constants.insert(o.clone(), v);
        }
        if held > check::MAX_FOLDED_BYTES {
            return Err(what(&format!("the constants computed at load would take more than {} bytes", check::MAX_FOLDED_BYTES)));
        }
        let mut done: Vec<&str> = n.outputs.iter().map(String::as_str).filter(|o| !pending.contains_key(o)).collect();
        for v in n.inputs.iter().filter(|v| !v.is_empty()) {
            if let Some(p) = pending.get_mut(v.as_str()) {
                *p -= 1;
                if *p == 0 {
                    done.push(v);
                }
            }
        }
        for v in done.into_iter().filter(|v| !needed.contains(v)) {
            if let Some(t) = constants.remove(v).filter(|_| made.contains(v)) {
                held = held.saturating_sub(check::bytes(&t));
            }
        }
    }
    constants.retain(|k, _| needed.contains(k.as_str()));
    Ok(folded)
}

/// An ONNX graph run forward only, from its one input (of any type: a text tower's int64 token
/// ids) to its first output: nothing explained, no gradient.
pub struct OnnxFunction {
    name: String,
    plan: Plan,
    input: proto::ValueInfo,
    output: String,
}

impl std::fmt::Debug for OnnxFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxFunction").field("name", &self.name).field("input", &self.input.name).finish()
    }
}

impl OnnxFunction {
    /// Reads and checks an ONNX file as [`OnnxModel::load`] does, without its image input.
    pub fn load(path: &Path) -> Result<OnnxFunction> {
        let Graph { nodes, constants, input, output, .. } = Graph::read(path)?;
        let all: Vec<usize> = (0..nodes.len()).collect();
        let plan = Plan::compile(&nodes, &all, &constants, &input.name, &output, &HashSet::new(), false)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(OnnxFunction { name, plan, input, output })
    }

    /// The input's name, ONNX element type (1 float, 7 int64) and shape (`None`: dynamic).
    pub fn input(&self) -> (&str, i32, Option<&[Option<usize>]>) {
        (&self.input.name, self.input.elem_type, self.input.shape.as_deref())
    }

    /// The first output for `x`, as F32.
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.plan.run_to(x, &self.output).map_err(|e| Error::Onnx(format!("{}: {e}", self.name)))?;
        Ok(y.to_dtype(DType::F32)?)
    }
}

/// Whether a float tensor holds a NaN: an F32 one read in place (weights are most of a model's
/// bytes, and a copy of each would double them at load), any other float type converted.
fn holds_nan(value: &Tensor) -> candle_core::Result<bool> {
    if value.dtype() == DType::F32 && value.is_contiguous() {
        let (storage, layout) = value.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let start = layout.start_offset();
            return Ok(cpu.as_slice::<f32>()?[start..start + value.elem_count()].iter().any(|v| v.is_nan()));
        }
    }
    Ok(value.dtype().is_float() && value.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().any(|v| v.is_nan()))
}
