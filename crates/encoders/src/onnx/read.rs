//! Reading an ONNX file into a checked [`Graph`] (what every loader shares), and
//! [`OnnxFunction`]: a graph run forward only from an input of any type.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Tensor};
use gradcam_kernels::Rule;

use super::plan::Plan;
use super::proto::{self, Node};
use super::{bad, ops, tensor, MAX_FILE_BYTES, SUPPORTED};
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
            return Err(bad(path, format!("{} bytes; the limit is {MAX_FILE_BYTES}", meta.len())));
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let model = proto::Model::decode(&bytes).map_err(|e| bad(path, format!("not an ONNX model, or a truncated one ({})", e.0)))?;
        drop(bytes);
        let graph = model.graph.ok_or_else(|| bad(path, "not an ONNX model (no graph in the file)"))?;
        if graph.nodes.is_empty() || graph.outputs.is_empty() {
            return Err(bad(path, "not an ONNX model, or an empty one (the graph has no nodes or no output)"));
        }
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
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut constants = HashMap::new();
        for t in &graph.initializers {
            let value = tensor(t, folder).map_err(|e| bad(path, e))?;
            // NaN weights would give finite-looking logits and empty maps; infinities are kept
            // (attention masks hold -inf).
            if value.dtype().is_float() && value.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().any(|v| v.is_nan()) {
                return Err(bad(path, format!("initializer {:?} holds NaN; are the weights corrupt?", t.name)));
            }
            constants.insert(t.name.clone(), value);
        }
        let inputs: Vec<_> = graph.inputs.iter().filter(|i| !constants.contains_key(&i.name)).collect();
        let [input] = inputs.as_slice() else {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(bad(path, format!("the graph has {} inputs ({}); gradcam explains models with one image input", names.len(), names.join(", "))));
        };
        let mut producer = HashMap::new();
        let mut known: HashSet<&str> = constants.keys().map(String::as_str).collect();
        known.insert(&input.name);
        known.insert("");
        for (i, n) in graph.nodes.iter().enumerate() {
            if let Some(missing) = n.inputs.iter().find(|v| !known.contains(v.as_str())) {
                return Err(bad(path, format!("node {:?} ({}) reads {missing:?}, which no earlier node produces (the nodes are not in topological order, or the graph is cut)", n.name, n.op_type)));
            }
            check_attributes(n, &constants).map_err(|e| bad(path, format!("node {:?} ({}): {e}", n.name, n.op_type)))?;
            for o in &n.outputs {
                if constants.contains_key(o) || *o == input.name {
                    return Err(bad(path, format!("node {:?} ({}) redefines {o:?}, which is {}", n.name, n.op_type, if *o == input.name { "the graph's input" } else { "an initializer" })));
                }
                if producer.insert(o.clone(), i).is_some() {
                    return Err(bad(path, format!("value {o:?} is produced twice")));
                }
                known.insert(o);
            }
        }
        // Nodes that read only constants (Constant, shape arithmetic on weights) are evaluated once.
        for n in &graph.nodes {
            if n.inputs.iter().all(|v| v.is_empty() || constants.contains_key(v)) {
                let args: Vec<Option<Tensor>> = n.inputs.iter().map(|v| constants.get(v).cloned()).collect();
                let values = ops::eval(n, &args, Rule::Exact).map_err(|e| bad(path, format!("node {:?} ({}): {e}", n.name, n.op_type)))?;
                for (o, v) in n.outputs.iter().zip(values) {
                    constants.insert(o.clone(), v);
                }
            }
        }
        let output = graph.outputs[0].name.clone();
        if !producer.contains_key(&output) {
            return Err(bad(path, format!("the graph's output {output:?} is not produced by any node")));
        }
        let input = (*input).clone();
        Ok(Graph { nodes: graph.nodes, constants, input, output, producer })
    }
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

/// Largest stride, dilation, kernel side and padding a convolution or pooling may have: beyond
/// them a value is no network's, and shapes computed from it would overflow or allocate without
/// bound.
const MAX_WINDOW: i64 = 4096;

/// The convolution and pooling attributes against the ONNX specification, before any shape is
/// computed from them: strides, dilations and kernel sides 1 to [`MAX_WINDOW`], pads 0 to it,
/// `group` at least 1 and dividing a constant weight's output channels (at least one).
fn check_attributes(n: &Node, constants: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
    if !matches!(n.op_type.as_str(), "Conv" | "MaxPool" | "AveragePool" | "LpPool") {
        return Ok(());
    }
    for (name, low) in [("strides", 1), ("dilations", 1), ("kernel_shape", 1), ("pads", 0)] {
        if let Some(v) = ops::attr_ints(n, name).and_then(|v| v.into_iter().find(|&x| !(low..=MAX_WINDOW).contains(&x))) {
            return Err(format!("{name} holds {v}; they must be {low} to {MAX_WINDOW}"));
        }
    }
    if n.op_type == "Conv" {
        let group = ops::attr_int(n, "group", 1);
        if !(1..=1 << 20).contains(&group) {
            return Err(format!("group {group} must be at least 1"));
        }
        if let Some(w) = n.inputs.get(1).and_then(|w| constants.get(w)) {
            let out = w.dims().first().copied().unwrap_or(0) as i64;
            if out == 0 {
                return Err("its weights have no output channel".into());
            }
            if out % group != 0 {
                return Err(format!("group {group} does not divide its weights' {out} output channels"));
            }
        }
    }
    Ok(())
}
