//! A part of an ONNX graph compiled for execution: convolutions with constant weights become the
//! project's [`Conv2d`] kernels (a zero Pad before them and a BatchNormalization and Relu /
//! Clip(0, 6) after them folded in, when nothing else reads the values in between), every other
//! node runs through [`super::ops::eval`]; values are dropped after their last use.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use gradcam_kernels::{Activation, Conv2d, Linear, Mlp, Padding, Pointwise, Rule};

use super::ops::{self, attr_int, attr_ints, attr_str};
use super::proto::Node;
use crate::{Error, Result};

enum Kernel {
    Conv(Conv2d),
    Linear(Linear),
    Mlp(Mlp),
    Pointwise(Pointwise),
    Op(Node),
}

struct Step {
    kernel: Kernel,
    /// Name of the first node of the step, and its op (for errors).
    label: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Values no later step reads.
    free: Vec<String>,
}

/// Sees a value by name as it is computed, and gives the one the later steps read.
pub(super) type Tap<'a> = &'a dyn Fn(&str, Tensor) -> candle_core::Result<Tensor>;

/// Compiled nodes from one value (the input) to another (the output).
pub(super) struct Plan {
    steps: Vec<Step>,
    constants: HashMap<String, Tensor>,
    input: String,
}

fn constant_f32(constants: &HashMap<String, Tensor>, name: &str) -> Option<Vec<f32>> {
    constants.get(name)?.to_dtype(candle_core::DType::F32).ok()?.flatten_all().ok()?.to_vec1().ok()
}

impl Plan {
    /// Compiles the nodes `set` (indices into `nodes`, in graph order). `keep`: values that must
    /// stay visible (not fused away); `trace`: no fusion at all (every value is materialised).
    pub(super) fn compile(
        nodes: &[Node],
        set: &[usize],
        constants: &HashMap<String, Tensor>,
        input: &str,
        output: &str,
        keep: &HashSet<String>,
        trace: bool,
    ) -> Result<Plan> {
        let mut readers: HashMap<&str, usize> = HashMap::new();
        for n in nodes {
            for v in &n.inputs {
                *readers.entry(v.as_str()).or_default() += 1;
            }
        }
        // The one node of the set that reads `value`, when nothing else does and it may vanish.
        let sole_reader = |value: &str| -> Option<usize> {
            if trace || keep.contains(value) || value == output || readers.get(value) != Some(&1) {
                return None;
            }
            set.iter().copied().find(|&j| nodes[j].inputs.iter().any(|v| v == value))
        };
        let ours = |conv: &Node, extra: [usize; 4]| -> Option<(Tensor, Tensor, Padding)> {
            let (w, b) = conv_weights(conv, constants)?;
            let padding = conv_padding(conv, &w, extra).ok()??;
            Some((w, b, padding))
        };
        let mut skip: HashSet<usize> = HashSet::new();
        let mut steps = Vec::new();
        for &i in set {
            if skip.contains(&i) || nodes[i].outputs.iter().all(|o| constants.contains_key(o)) {
                continue;
            }
            let node = &nodes[i];
            let label = format!("node {:?} ({})", node.name, node.op_type);
            // A convolution on our kernel, with a zero Pad before it that nothing else reads.
            let conv = match node.op_type.as_str() {
                "Pad" => zero_spatial_pads(node, constants).zip(sole_reader(&node.outputs[0])).and_then(|(pads, j)| {
                    let c = &nodes[j];
                    (c.op_type == "Conv" && c.inputs[0] == node.outputs[0]).then_some(())?;
                    ours(c, pads).map(|found| (j, found))
                }),
                "Conv" => ours(node, [0; 4]).map(|found| (i, found)),
                _ => None,
            };
            // Sigmoid(x) * x, read by nothing else: SiLU in one pass.
            if node.op_type == "Sigmoid" {
                let x = &node.inputs[0];
                if let Some(j) = sole_reader(&node.outputs[0]).filter(|&j| nodes[j].op_type == "Mul" && nodes[j].inputs.contains(x) && nodes[j].inputs.contains(&node.outputs[0])) {
                    skip.insert(j);
                    steps.push(Step { kernel: Kernel::Pointwise(Pointwise::Silu), label, inputs: vec![x.clone()], outputs: nodes[j].outputs.clone(), free: vec![] });
                    continue;
                }
            }
            // GELU exported as x * (1 + erf(x / sqrt 2)) * 0.5: one pass.
            if let Some((nodes_used, out)) = gelu_from(nodes, i, constants, &sole_reader) {
                skip.extend(nodes_used);
                steps.push(Step { kernel: Kernel::Pointwise(Pointwise::Gelu), label, inputs: vec![node.inputs[0].clone()], outputs: vec![out], free: vec![] });
                continue;
            }
            // A MatMul by constant weights (with the Add of a constant bias after it, folded in).
            let bias_add = (node.op_type == "MatMul")
                .then(|| sole_reader(&node.outputs[0]))
                .flatten()
                .filter(|&k| nodes[k].op_type == "Add" && nodes[k].inputs.len() == 2 && nodes[k].inputs.contains(&node.outputs[0]))
                .and_then(|k| {
                    let other = nodes[k].inputs.iter().find(|v| **v != node.outputs[0])?;
                    let b = constants.get(other)?;
                    (b.rank() == 1).then(|| (k, b.clone()))
                });
            let fused = match &bias_add {
                Some((k, b)) => linear_of(node, constants, Some(b))?.map(|l| (l, nodes[*k].outputs.clone(), Some(*k))),
                None => None,
            };
            let plain = match fused {
                Some(f) => Some(f),
                None => linear_of(node, constants, None)?.map(|l| (l, node.outputs.clone(), None)),
            };
            if let Some((linear, outputs, folded)) = plain {
                skip.extend(folded);
                steps.push(Step { kernel: Kernel::Linear(linear), label, inputs: vec![node.inputs[0].clone()], outputs, free: vec![] });
                continue;
            }
            let Some((j, (mut weight, mut bias, padding))) = conv else {
                steps.push(Step { kernel: Kernel::Op(node.clone()), label, inputs: node.inputs.clone(), outputs: node.outputs.clone(), free: vec![] });
                continue;
            };
            skip.insert(j);
            let conv_node = &nodes[j];
            let mut out = conv_node.outputs[0].clone();
            // BatchNormalization (inference) folded into the weights.
            if let Some(k) = sole_reader(&out).filter(|&k| nodes[k].op_type == "BatchNormalization" && nodes[k].inputs[0] == out) {
                if let Some((w2, b2)) = fold_bn(&nodes[k], constants, &weight, &bias)? {
                    (weight, bias) = (w2, b2);
                    out = nodes[k].outputs[0].clone();
                    skip.insert(k);
                }
            }
            let mut activation = Activation::Identity;
            if let Some(k) = sole_reader(&out).filter(|&k| nodes[k].inputs[0] == out) {
                if let Some(a) = fusable_activation(&nodes[k], constants) {
                    activation = a;
                    out = nodes[k].outputs[0].clone();
                    skip.insert(k);
                }
            }
            // Or a smooth activation: HardSwish, HardSigmoid, Sigmoid, or Sigmoid(x) * x (SiLU).
            let mut smooth = None;
            if activation == Activation::Identity {
                if let Some(k) = sole_reader(&out).filter(|&k| nodes[k].inputs[0] == out) {
                    smooth = ops::pointwise_of(&nodes[k]);
                    if smooth.is_some() {
                        out = nodes[k].outputs[0].clone();
                        skip.insert(k);
                    }
                } else if let Some((s, m)) = silu_after(nodes, set, &out, &readers, keep, output, trace) {
                    smooth = Some(Pointwise::Silu);
                    out = nodes[m].outputs[0].clone();
                    skip.extend([s, m]);
                }
            }
            let groups = attr_int(conv_node, "group", 1) as usize;
            let mut conv = Conv2d::new(&weight, Some(&bias), groups, conv_stride(conv_node)?, padding, activation).map_err(|e| Error::Data(format!("{label}: {e}")))?;
            if let Some(p) = smooth {
                conv = conv.with_pointwise(p)?;
            }
            steps.push(Step { kernel: Kernel::Conv(conv), label, inputs: vec![node.inputs[0].clone()], outputs: vec![out], free: vec![] });
        }
        // Linear -> pointwise -> Linear whose values between are read by nothing else: one MLP
        // op (the hidden activations stay channel-major between the two layers).
        if !trace {
            let mut k = 0;
            while k < steps.len() {
                let reads = |v: &str, steps: &[Step]| steps.iter().filter(|s| s.inputs.iter().any(|i| i == v)).count();
                let private = |v: &str, steps: &[Step]| !keep.contains(v) && v != output && reads(v, steps) == 1;
                let found = match &steps[k].kernel {
                    Kernel::Linear(_) if private(&steps[k].outputs[0], &steps) => steps.iter().position(|s| matches!(s.kernel, Kernel::Pointwise(_)) && s.inputs == steps[k].outputs).and_then(|j| {
                        (private(&steps[j].outputs[0], &steps)).then_some(j).and_then(|j| steps.iter().position(|s| matches!(s.kernel, Kernel::Linear(_)) && s.inputs == steps[j].outputs).map(|l| (j, l)))
                    }),
                    _ => None,
                };
                if let Some((j, l)) = found {
                    if let (Kernel::Linear(fc1), Kernel::Pointwise(act), Kernel::Linear(fc2)) = (&steps[k].kernel, &steps[j].kernel, &steps[l].kernel) {
                        if let Ok(mlp) = Mlp::new(fc1.clone(), *act, fc2.clone()) {
                            let outputs = steps[l].outputs.clone();
                            steps[k].kernel = Kernel::Mlp(mlp);
                            steps[k].outputs = outputs;
                            let (a, b) = (j.max(l), j.min(l));
                            steps.remove(a);
                            steps.remove(b);
                        }
                    }
                }
                k += 1;
            }
        }
        // Free each value after its last reader.
        let mut last: HashMap<String, usize> = HashMap::new();
        for (k, s) in steps.iter().enumerate() {
            for v in &s.inputs {
                last.insert(v.clone(), k);
            }
        }
        for (v, k) in last {
            if v != output && !trace {
                steps[k].free.push(v);
            }
        }
        let mut needed = HashMap::new();
        for s in &steps {
            for v in &s.inputs {
                if let Some(t) = constants.get(v) {
                    needed.insert(v.clone(), t.clone());
                }
            }
        }
        if output != input && !steps.iter().any(|s| s.outputs.iter().any(|o| o == output)) && !constants.contains_key(output) {
            return Err(Error::Data(format!("no node of this part of the graph produces {output:?}")));
        }
        if profiling() {
            let convs = steps.iter().filter(|s| matches!(s.kernel, Kernel::Conv(_))).count();
            let ops: Vec<&str> = steps.iter().filter_map(|s| if let Kernel::Op(n) = &s.kernel { Some(n.op_type.as_str()) } else { None }).collect();
            eprintln!("plan {input:?} -> {output:?}: {} steps, {convs} on our convolution kernel, other ops: {ops:?}", steps.len());
        }
        Ok(Plan { steps, constants: needed, input: input.to_string() })
    }

    /// Runs the steps on `x`; values are dropped after their last reader unless `retain` says
    /// to keep them (the output always stays).
    fn execute(&self, x: &Tensor, extra: &[(String, Tensor)], rule: Rule, retain: &dyn Fn(&str) -> bool, tap: Option<Tap<'_>>) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut env: HashMap<String, Tensor> = HashMap::from([(self.input.clone(), x.clone())]);
        env.extend(extra.iter().cloned());
        let profile = profiling();
        for s in &self.steps {
            let t0 = profile.then(std::time::Instant::now);
            let args: Vec<Option<Tensor>> = s.inputs.iter().map(|v| if v.is_empty() { None } else { env.get(v).or_else(|| self.constants.get(v)).cloned() }).collect();
            let first = || args[0].as_ref().ok_or_else(|| candle_core::Error::Msg(format!("its input {:?} was not computed", s.inputs[0])));
            let result = match &s.kernel {
                Kernel::Conv(c) => c.forward_with(first()?, rule).map(|y| vec![y]),
                Kernel::Pointwise(p) => p.forward(&first()?.to_dtype(candle_core::DType::F32)?).map(|y| vec![y]),
                Kernel::Linear(l) => over_rows(first()?, |x| l.forward_with(x, rule)),
                Kernel::Mlp(m) => over_rows(first()?, |x| m.forward(x)),
                Kernel::Op(node) => ops::eval(node, &args, rule),
            }
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", s.label)))?;
            if let Some(t0) = t0 {
                let kernel = match s.kernel {
                    Kernel::Conv(_) => "conv kernel",
                    Kernel::Linear(_) => "linear kernel",
                    Kernel::Mlp(_) => "mlp kernel",
                    Kernel::Pointwise(_) => "pointwise kernel",
                    Kernel::Op(_) => "op",
                };
                eprintln!("{:8.3} ms {} ({kernel})", t0.elapsed().as_secs_f64() * 1e3, s.label);
            }
            for (name, value) in s.outputs.iter().zip(result) {
                let value = match tap {
                    Some(tap) => tap(name, value)?,
                    None => value,
                };
                env.insert(name.clone(), value);
            }
            for v in s.free.iter().filter(|v| *v != &self.input && !retain(v)) {
                env.remove(v);
            }
        }
        Ok(env)
    }

    /// The value `output` of a forward run on `x`.
    pub(super) fn run_to(&self, x: &Tensor, output: &str) -> Result<Tensor> {
        let mut env = self.execute(x, &[], Rule::Exact, &|v| v == output, None)?;
        env.remove(output).ok_or_else(|| Error::Onnx(format!("the run did not compute {output:?}")))
    }

    /// Every value, for shapes.
    pub(super) fn run_keep_all(&self, x: &Tensor) -> Result<HashMap<String, Tensor>> {
        Ok(self.execute(x, &[], Rule::Exact, &|_| true, None)?)
    }
}

/// A layer of rows `[r, d] -> [r, d']` on a float value of rank 2 or more (a transformer's tokens
/// `[n, T, d]` as `n * T` rows).
fn over_rows(x: &Tensor, layer: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Vec<Tensor>> {
    if x.rank() < 2 || x.dtype() != candle_core::DType::F32 {
        return Err(candle_core::Error::Msg(format!("expects a float input of rank 2 or more, got {:?}", x.dims())));
    }
    if x.rank() == 2 {
        return Ok(vec![layer(x)?]);
    }
    let mut dims = x.dims().to_vec();
    let d = dims.pop().unwrap_or(0);
    let y = layer(&x.reshape(((), d))?)?;
    dims.push(y.dim(1)?);
    Ok(vec![y.reshape(dims)?])
}

/// Whether `GRADCAM_ONNX_PROFILE` is set (read once): each compiled part and step time to stderr.
fn profiling() -> bool {
    static PROFILE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROFILE.get_or_init(|| std::env::var_os("GRADCAM_ONNX_PROFILE").is_some())
}

/// The Sigmoid and Mul nodes (indices) that make `value` into SiLU(value), when nothing else reads
/// `value` or the sigmoid.
fn silu_after(nodes: &[Node], set: &[usize], value: &str, readers: &HashMap<&str, usize>, keep: &HashSet<String>, output: &str, trace: bool) -> Option<(usize, usize)> {
    if trace || keep.contains(value) || value == output || readers.get(value) != Some(&2) {
        return None;
    }
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
fn linear_of(node: &Node, constants: &HashMap<String, Tensor>, matmul_bias: Option<&Tensor>) -> Result<Option<Linear>> {
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
    Ok(Some(Linear::new(&weight, bias.as_ref(), Activation::Identity)?))
}

/// The nodes after `nodes[i]` that make GELU of its input with it, `x * (1 + erf(x / sqrt 2)) *
/// 0.5` as torch exports `nn.GELU` (Div, Erf, Add 1, Mul x, Mul 0.5), each value read only by the
/// next; and the last node's output.
fn gelu_from(nodes: &[Node], i: usize, constants: &HashMap<String, Tensor>, sole_reader: &dyn Fn(&str) -> Option<usize>) -> Option<(Vec<usize>, String)> {
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

/// A part of the graph specialised to each input shape it meets: values computed from shapes
/// only (Shape -> Gather -> ... -> Pad's pads, Reshape's shape) become constants, so a padding
/// that PyTorch exports as shape arithmetic folds into the convolution as a constant one does.
pub(super) struct Part {
    nodes: std::sync::Arc<Vec<Node>>,
    set: Vec<usize>,
    constants: HashMap<String, Tensor>,
    input: String,
    output: String,
    keep: HashSet<String>,
    generic: Plan,
    /// Outputs of the nodes that read shapes only.
    shape_values: Vec<String>,
    /// Specialised plans by input shape (at most [`Part::CACHE`]).
    cache: std::sync::Mutex<Vec<(Vec<Vec<usize>>, std::sync::Arc<Plan>)>>,
}

impl Part {
    const CACHE: usize = 16;

    pub(super) fn new(nodes: std::sync::Arc<Vec<Node>>, set: Vec<usize>, constants: &HashMap<String, Tensor>, input: &str, output: &str, keep: HashSet<String>) -> Result<Part> {
        let generic = Plan::compile(&nodes, &set, constants, input, output, &keep, false)?;
        let mut shape_only: HashSet<&str> = HashSet::new();
        let mut shape_values = Vec::new();
        for &i in &set {
            let n = &nodes[i];
            let derived = n.op_type == "Shape"
                || (n.inputs.iter().any(|v| shape_only.contains(v.as_str())) && n.inputs.iter().all(|v| v.is_empty() || constants.contains_key(v) || shape_only.contains(v.as_str())));
            if derived && !n.outputs.iter().any(|o| constants.contains_key(o)) {
                for o in &n.outputs {
                    shape_only.insert(o);
                    shape_values.push(o.clone());
                }
            }
        }
        Ok(Part { set, constants: constants.clone(), input: input.into(), output: output.into(), keep, generic, shape_values, cache: Default::default(), nodes })
    }

    pub(super) fn run(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        let output = [self.output.clone()];
        Ok(self.run_with(x, &[], rule, &output, None)?.remove(0))
    }

    /// The values `names` for input `x`, with the values `extra` given beside it (what a head
    /// reads from the forward pass besides its input).
    /// `tap` sees each value computed and gives the one later steps read.
    pub(super) fn run_with(&self, x: &Tensor, extra: &[(String, Tensor)], rule: Rule, names: &[String], tap: Option<Tap<'_>>) -> candle_core::Result<Vec<Tensor>> {
        let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
        let pick = |mut env: HashMap<String, Tensor>| -> candle_core::Result<Vec<Tensor>> {
            names.iter().map(|n| env.remove(n).or_else(|| self.constants.get(n).cloned()).ok_or_else(|| candle_core::Error::Msg(format!("the graph did not produce {n:?}")))).collect()
        };
        if self.shape_values.is_empty() {
            return pick(self.generic.execute(x, extra, rule, &|v| wanted.contains(v), tap)?);
        }
        let mut dims = vec![x.dims().to_vec()];
        dims.extend(extra.iter().map(|(_, t)| t.dims().to_vec()));
        let hit = self.cache.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(d, _)| *d == dims).map(|(_, p)| p.clone());
        if let Some(plan) = hit {
            return pick(plan.execute(x, extra, rule, &|v| wanted.contains(v), tap)?);
        }
        // First input of this shape: the generic plan answers, and keeps the shape values (only
        // them: every activation of a batch kept at once could take gigabytes).
        let shape_values: HashSet<&str> = self.shape_values.iter().map(String::as_str).collect();
        let env = self.generic.execute(x, extra, rule, &|v| shape_values.contains(v) || wanted.contains(v), tap)?;
        let mut constants = self.constants.clone();
        for v in &self.shape_values {
            if let Some(t) = env.get(v) {
                constants.insert(v.clone(), t.clone());
            }
        }
        let plan = Plan::compile(&self.nodes, &self.set, &constants, &self.input, &self.output, &self.keep, false).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= Self::CACHE {
            cache.remove(0);
        }
        cache.push((dims, std::sync::Arc::new(plan)));
        pick(env)
    }
}

/// (weight, bias) of a convolution whose weights (and bias) are constants.
fn conv_weights(node: &Node, constants: &HashMap<String, Tensor>) -> Option<(Tensor, Tensor)> {
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

fn conv_stride(node: &Node) -> Result<usize> {
    let s = attr_ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
    Ok(s.first().copied().unwrap_or(1).max(1) as usize)
}

/// The convolution's padding on our kernel, or `None` when our kernel cannot run it (dilation,
/// unequal strides, SAME_LOWER): then it runs through candle.
fn conv_padding(node: &Node, weight: &Tensor, extra: [usize; 4]) -> Result<Option<Padding>> {
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
    Ok(Some(if p.iter().all(|&v| v == p[0]) { Padding::Symmetric(p[0]) } else { Padding::Explicit { top: p[0], left: p[1], bottom: p[2], right: p[3] } }))
}

/// A Pad node that adds zeros on the two spatial axes only: (top, left, bottom, right).
fn zero_spatial_pads(node: &Node, constants: &HashMap<String, Tensor>) -> Option<[usize; 4]> {
    if attr_str(node, "mode").as_deref().unwrap_or("constant") != "constant" {
        return None;
    }
    let pads: Vec<i64> = match node.inputs.get(1).filter(|s| !s.is_empty()) {
        Some(name) => constants.get(name)?.to_dtype(candle_core::DType::I64).ok()?.to_vec1().ok()?,
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
fn fold_bn(bn: &Node, constants: &HashMap<String, Tensor>, weight: &Tensor, bias: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
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
    let b = bias.to_vec1::<f32>()?;
    let new_bias: Vec<f32> = (0..out).map(|c| beta[c] + (b[c] - mean[c]) * scale[c]).collect();
    let scale_t = Tensor::from_vec(scale, (out, 1, 1, 1), weight.device())?;
    Ok(Some((weight.broadcast_mul(&scale_t)?, Tensor::from_vec(new_bias, out, weight.device())?)))
}

/// Relu, or Clip to [0, 6], as the convolution's fused activation.
fn fusable_activation(node: &Node, constants: &HashMap<String, Tensor>) -> Option<Activation> {
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
