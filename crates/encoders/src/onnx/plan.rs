//! A part of an ONNX graph compiled for execution: convolutions with constant weights become the
//! project's [`Conv2d`] kernels (a zero Pad before them and a BatchNormalization and Relu /
//! Clip(0, 6) after them folded in, when nothing else reads the values in between), every other
//! node runs through [`super::ops::eval`]; values are dropped after their last use.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use gradcam_kernels::{Activation, Conv2d, Linear, Mlp, Padding, Pointwise, Rule};

use super::check;
use super::fuse::{conv_padding, conv_stride, conv_weights, fold_bn, fusable_activation, gelu_from, linear_of, silu_after, zero_spatial_pads};
use super::ops::{self, attr_int};
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
    /// A convolution on our kernel: its node, weights' shape and the padding folded into it
    /// (for its output shape, checked before it runs).
    conv: Option<(Node, Vec<usize>, [usize; 4])>,
    /// A Linear or MLP: the widths of its input and output rows.
    width: Option<(usize, usize)>,
}

impl Step {
    fn new(kernel: Kernel, label: &str, inputs: Vec<String>, outputs: Vec<String>) -> Step {
        Step { kernel, label: label.to_string(), inputs, outputs, free: vec![], conv: None, width: None }
    }
}

/// Sees a value by name as it is computed, and gives the one the later steps read.
pub(super) type Tap<'a> = &'a dyn Fn(&str, Tensor) -> candle_core::Result<Tensor>;

/// Compiled nodes from one value (the input) to another (the output).
pub(super) struct Plan {
    steps: Vec<Step>,
    constants: HashMap<String, Tensor>,
    input: String,
}

pub(super) fn constant_f32(constants: &HashMap<String, Tensor>, name: &str) -> Option<Vec<f32>> {
    ops::values(&constants.get(name)?.to_dtype(candle_core::DType::F32).ok()?).ok()
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
        // The nodes of the set that read each value, in order.
        let mut in_set: HashMap<&str, Vec<usize>> = HashMap::new();
        for &j in set {
            for v in &nodes[j].inputs {
                let r = in_set.entry(v.as_str()).or_default();
                if r.last() != Some(&j) {
                    r.push(j);
                }
            }
        }
        // The one node of the set that reads `value`, when nothing else does and it may vanish.
        let sole_reader = |value: &str| -> Option<usize> {
            if trace || keep.contains(value) || value == output || readers.get(value) != Some(&1) {
                return None;
            }
            in_set.get(value).and_then(|r| r.first().copied())
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
                    ours(c, pads).map(|found| (j, found, pads))
                }),
                "Conv" => ours(node, [0; 4]).map(|found| (i, found, [0; 4])),
                _ => None,
            };
            // Sigmoid(x) * x, read by nothing else: SiLU in one pass.
            if node.op_type == "Sigmoid" {
                let x = &node.inputs[0];
                if let Some(j) = sole_reader(&node.outputs[0]).filter(|&j| nodes[j].op_type == "Mul" && nodes[j].inputs.contains(x) && nodes[j].inputs.contains(&node.outputs[0])) {
                    skip.insert(j);
                    steps.push(Step::new(Kernel::Pointwise(Pointwise::Silu), &label, vec![x.clone()], nodes[j].outputs.clone()));
                    continue;
                }
            }
            // GELU exported as x * (1 + erf(x / sqrt 2)) * 0.5: one pass.
            if let Some((nodes_used, out)) = gelu_from(nodes, i, constants, &sole_reader) {
                skip.extend(nodes_used);
                steps.push(Step::new(Kernel::Pointwise(Pointwise::Gelu), &label, vec![node.inputs[0].clone()], vec![out]));
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
            if let Some(((linear, width), outputs, folded)) = plain {
                skip.extend(folded);
                let mut step = Step::new(Kernel::Linear(linear), &label, vec![node.inputs[0].clone()], outputs);
                step.width = Some(width);
                steps.push(step);
                continue;
            }
            let Some((j, (mut weight, mut bias, padding), extra)) = conv else {
                steps.push(Step::new(Kernel::Op(node.clone()), &label, node.inputs.clone(), node.outputs.clone()));
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
                } else if let Some((s, m)) = silu_after(nodes, &in_set, &out, &readers, keep, output, trace) {
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
            let mut step = Step::new(Kernel::Conv(conv), &label, vec![node.inputs[0].clone()], vec![out]);
            step.conv = Some((conv_node.clone(), weight.dims().to_vec(), extra));
            steps.push(step);
        }
        // Linear -> pointwise -> Linear whose values between are read by nothing else: one MLP
        // op (the hidden activations stay channel-major between the two layers).
        if !trace {
            let mut reading: HashMap<&str, Vec<usize>> = HashMap::new();
            for (k, st) in steps.iter().enumerate() {
                for v in &st.inputs {
                    let r = reading.entry(v.as_str()).or_default();
                    if r.last() != Some(&k) {
                        r.push(k);
                    }
                }
            }
            let private = |v: &str| (!keep.contains(v) && v != output).then(|| reading.get(v).filter(|r| r.len() == 1).map(|r| r[0])).flatten();
            let mut fused: Vec<(usize, usize, usize)> = Vec::new();
            let mut gone = vec![false; steps.len()];
            for k in 0..steps.len() {
                if gone[k] || !matches!(steps[k].kernel, Kernel::Linear(_)) {
                    continue;
                }
                let Some(j) = private(&steps[k].outputs[0]).filter(|&j| matches!(steps[j].kernel, Kernel::Pointwise(_)) && steps[j].inputs == steps[k].outputs) else { continue };
                let Some(l) = private(&steps[j].outputs[0]).filter(|&l| matches!(steps[l].kernel, Kernel::Linear(_)) && steps[l].inputs == steps[j].outputs) else { continue };
                if !gone[j] && !gone[l] {
                    (gone[j], gone[l]) = (true, true);
                    fused.push((k, j, l));
                }
            }
            for (k, j, l) in fused {
                if let (Kernel::Linear(fc1), Kernel::Pointwise(act), Kernel::Linear(fc2)) = (&steps[k].kernel, &steps[j].kernel, &steps[l].kernel) {
                    match Mlp::new(fc1.clone(), *act, fc2.clone()) {
                        Ok(mlp) => {
                            steps[k].kernel = Kernel::Mlp(mlp);
                            steps[k].outputs = steps[l].outputs.clone();
                            steps[k].width = steps[k].width.zip(steps[l].width).map(|(a, b)| (a.0, b.1));
                        }
                        Err(_) => (gone[j], gone[l]) = (false, false),
                    }
                }
            }
            let mut k = 0;
            steps.retain(|_| {
                k += 1;
                !gone[k - 1]
            });
        }
        // Free each value after its last reader.
        let mut last: HashMap<String, usize> = HashMap::new();
        for (k, s) in steps.iter().enumerate() {
            for v in &s.inputs {
                last.insert(v.clone(), k);
            }
        }
        for (v, k) in last {
            if v != output {
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
        // Bytes of the values held: those the env holds, and those a gradient will be taken
        // through (kept by the graph of ops until the backward pass, which doubles them).
        let mut budget = Budget::default();
        let mut work = 0u64;
        for v in env.values() {
            budget.add(v);
        }
        for s in &self.steps {
            let t0 = profile.then(std::time::Instant::now);
            let args: Vec<Option<Tensor>> = s.inputs.iter().map(|v| if v.is_empty() { None } else { env.get(v).or_else(|| self.constants.get(v)).cloned() }).collect();
            let first = || args[0].as_ref().ok_or_else(|| candle_core::Error::Msg(format!("its input {:?} was not computed", s.inputs[0])));
            let label = |e: candle_core::Error| candle_core::Error::Msg(format!("{}: {e}", s.label));
            let shape = match &s.kernel {
                Kernel::Op(node) => check::output(node, &args).map_err(label)?,
                Kernel::Conv(_) => s.conv.as_ref().map(|(n, w, extra)| check::conv_dims(n, first()?.dims(), w, *extra)).transpose().map_err(label)?,
                Kernel::Linear(_) | Kernel::Mlp(_) => match (s.width, first()?.dims()) {
                    (Some((i, o)), [lead @ .., d]) if *d == i => Some(lead.iter().copied().chain([o]).collect()),
                    (_, dims) => return Err(label(candle_core::Error::Msg(format!("its input of shape {dims:?} is not rows of {:?} values", s.width.map(|w| w.0))))),
                },
                Kernel::Pointwise(_) => None,
            };
            if let Some(shape) = &shape {
                check::check_size(shape, &s.label).map_err(label)?;
                budget.fits(check::estimate(shape, &args), &s.label, shape)?;
            }
            // The work, before it is done.
            let elements = |d: &[usize]| d.iter().product::<usize>() as u64;
            work = work.saturating_add(match (&s.kernel, &shape, &s.conv) {
                (Kernel::Op(node), _, _) => check::work(node, &args, shape.as_deref()),
                (Kernel::Conv(_), Some(out), Some((_, w, _))) => elements(out).saturating_mul(elements(&w[1..])),
                (Kernel::Linear(_) | Kernel::Mlp(_), Some(out), _) => elements(out).saturating_mul(s.width.map_or(1, |w| w.0 as u64)).saturating_mul(2),
                _ => args.iter().flatten().map(|t| t.elem_count() as u64).sum::<u64>().saturating_mul(32),
            });
            if work > check::MAX_WORK {
                return Err(candle_core::Error::Msg(format!("{}: the run would do more than {} multiply-adds' work (up to this node); the graph asks too much computation", s.label, check::MAX_WORK)));
            }
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
                budget.add(&value);
                if let Some(old) = env.insert(name.clone(), value) {
                    budget.remove(&old);
                }
            }
            budget.fits(0, &s.label, &[])?;
            for v in s.free.iter().filter(|v| *v != &self.input && !retain(v)) {
                if let Some(old) = env.remove(v) {
                    budget.remove(&old);
                }
            }
        }
        Ok(env)
    }

    /// The value `output` of a forward run on `x`.
    pub(super) fn run_to(&self, x: &Tensor, output: &str) -> Result<Tensor> {
        let mut env = self.execute(x, &[], Rule::Exact, &|v| v == output, None)?;
        env.remove(output).ok_or_else(|| Error::Onnx(format!("the run did not compute {output:?}")))
    }

    /// The shape and dtype of every value computed from `x` (the input's included); each value
    /// is dropped after its last reader, as in any run.
    #[allow(clippy::type_complexity)]
    pub(super) fn run_shapes(&self, x: &Tensor, output: &str) -> Result<(HashMap<String, (Vec<usize>, candle_core::DType)>, Option<Tensor>)> {
        let seen = std::cell::RefCell::new(HashMap::from([(self.input.clone(), (x.dims().to_vec(), x.dtype()))]));
        let tap = |name: &str, t: Tensor| -> candle_core::Result<Tensor> {
            seen.borrow_mut().insert(name.to_string(), (t.dims().to_vec(), t.dtype()));
            Ok(t)
        };
        let mut env = self.execute(x, &[], Rule::Exact, &|v| v == output, Some(&tap))?;
        Ok((seen.into_inner(), env.remove(output)))
    }
}

/// The bytes of the values a run holds at once, against [`check::MAX_HELD_BYTES`].
#[derive(Default)]
struct Budget {
    held: usize,
    /// Values a gradient is taken through: the graph of ops keeps them (they are never freed
    /// here), and the backward pass makes as many bytes of gradients.
    tracked: usize,
}

impl Budget {
    fn add(&mut self, t: &Tensor) {
        if t.track_op() {
            self.tracked = self.tracked.saturating_add(2 * check::bytes(t));
        } else {
            self.held = self.held.saturating_add(check::bytes(t));
        }
    }

    fn remove(&mut self, t: &Tensor) {
        if !t.track_op() {
            self.held = self.held.saturating_sub(check::bytes(t));
        }
    }

    /// Whether `more` bytes fit beside what is held.
    fn fits(&self, more: usize, label: &str, shape: &[usize]) -> candle_core::Result<()> {
        let total = self.held.saturating_add(self.tracked).saturating_add(more);
        if total > check::MAX_HELD_BYTES {
            let what = if more > 0 { format!("its output of shape {shape:?} would bring") } else { "its output brings".into() };
            return Err(candle_core::Error::Msg(format!("{label}: {what} the values held at once to {total} bytes, beyond the budget of {} bytes", check::MAX_HELD_BYTES)));
        }
        Ok(())
    }
}

/// A layer of rows `[r, d] -> [r, d']` on a float value of rank 2 or more (a transformer's tokens
/// `[n, T, d]` as `n * T` rows).
fn over_rows(x: &Tensor, layer: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Vec<Tensor>> {
    if x.rank() == 1 {
        return Ok(vec![over_rows(&x.unsqueeze(0)?, layer)?.remove(0).squeeze(0)?]);
    }
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
