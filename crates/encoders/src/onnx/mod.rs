//! Any ONNX CNN classifier as a [`Network`] split at one of its values: the graph up to the
//! explained value runs forward only, the sub-graph from it to the output is the head that the
//! explanation differentiates. Convolutions with constant weights run on the project's own kernels
//! ([`gradcam_kernels::Conv2d`]) with a following BatchNormalization folded in and a following
//! Relu or Clip(0, 6) fused; every other op is a differentiable candle op ([`ops`]).
//!
//! The file is decoded by [`proto`], a protobuf reader of the fields a CNN needs (no protoc at
//! build time). External-data tensors are read from files beside the model, never outside its
//! folder.

mod check;
mod fuse;
mod ops;
mod read;
mod grid;
mod plan;
pub mod proto;
mod rows;
mod tensor;
mod tokens;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use gradcam_kernels::Rule;

use crate::network::{Layer, Network};
use gradcam_core::Layout;
use crate::preprocess::Preprocess;
use crate::{Error, Result};
use gradcam_core::SettingError;
pub use grid::{TokenGrid, ValueLayout};
pub use ops::SUPPORTED;
use plan::{Part, Plan};
use read::Graph;
pub use read::OnnxFunction;
pub(crate) use tensor::tensor;
use proto::Node;

/// Largest ONNX file read (protobuf's limit; external data has its own budget,
/// [`check::MAX_WEIGHT_BYTES`]); beyond it the file is refused before reading.
pub const MAX_FILE_BYTES: u64 = 2 << 30;

/// Most values tried as the default layer (from the output back).
const MAX_DEFAULT_TRIES: usize = 64;

/// How an ONNX model's input is made, when the graph does not say.
#[derive(Debug, Clone, Default)]
pub struct OnnxOptions {
    /// (height, width) when the graph's input size is dynamic (default 224 x 224).
    pub input_size: Option<(usize, usize)>,
    /// Per-channel mean and std of the normalisation (default ImageNet's).
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    /// A file with one class name per line.
    pub labels: Option<PathBuf>,
    /// The explained token value's layout: P prefix tokens, then an H x W grid (default: from
    /// the input size and the patch embedding).
    pub tokens: Option<TokenGrid>,
    /// The explained 4-D value is channels-last `[1, h, w, C]` (default: guessed from the shapes
    /// and the graph).
    pub channels_last: bool,
}

/// [`OnnxOptions`] as command-line flags (feature `cli`), for every command that loads a classifier.
#[cfg(feature = "cli")]
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OnnxArgs {
    /// ONNX: class names, one per line (default: ImageNet's for 1000 classes, else "class N").
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// ONNX: per-channel mean, R,G,B of values in [0, 1] (default: ImageNet's).
    #[arg(long, value_delimiter = ',')]
    pub mean: Option<Vec<f32>>,
    /// ONNX: per-channel std (default: ImageNet's).
    #[arg(long, value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
    /// ONNX with a dynamic input size: HxW or one side (default 224).
    #[arg(long)]
    pub input_size: Option<String>,
    /// ONNX transformers: the explained token value holds P prefix tokens (class,
    /// distillation, registers), then an HxW grid, row-major (default: guessed from the input
    /// size and the patch embedding).
    #[arg(long, value_name = "P:HxW")]
    pub tokens: Option<TokenGrid>,
    /// ONNX: the explained 4-D value is channels-last [1, h, w, C] (Swin; default: guessed from
    /// the shapes and the graph).
    #[arg(long)]
    pub channels_last: bool,
}

#[cfg(feature = "cli")]
impl OnnxArgs {
    /// The options these flags give.
    pub fn options(&self) -> Result<OnnxOptions> {
        let mut o = OnnxOptions::parse(self.labels.clone(), self.mean.as_deref(), self.std.as_deref(), self.input_size.as_deref())?;
        (o.tokens, o.channels_last) = (self.tokens, self.channels_last);
        if o.tokens.is_some() && o.channels_last {
            return Err(SettingError::new(vec!["tokens", "channels_last"], "describe two different layouts: give one").into());
        }
        Ok(o)
    }
}

impl OnnxOptions {
    /// From the command line's strings: `mean` and `std` as three numbers each, `input_size` as
    /// `HxW` or one side.
    pub fn parse(labels: Option<PathBuf>, mean: Option<&[f32]>, std: Option<&[f32]>, input_size: Option<&str>) -> Result<Self> {
        let three = |v: Option<&[f32]>, what: &'static str| -> Result<Option<[f32; 3]>> {
            v.map(|v| v.try_into().map_err(|_| SettingError::new(vec![what], format!("takes three numbers (R,G,B), got {}", v.len())).into())).transpose()
        };
        let input_size = input_size
            .map(|s| {
                let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|&n| (8..=4096).contains(&n));
                let size = match s.split_once(['x', 'X']) {
                    Some((h, w)) => parse(h).zip(parse(w)),
                    None => parse(s).map(|n| (n, n)),
                };
                size.ok_or_else(|| Error::from(SettingError::value("input_size", format!("{s:?}"), "give HxW or one side, each 8 to 4096")))
            })
            .transpose()?;
        Ok(Self { input_size, mean: three(mean, "mean")?, std: three(std, "std")?, labels, tokens: None, channels_last: false })
    }

    /// The names of the options that are set (for the models that take none of them).
    pub fn given(&self) -> Vec<&'static str> {
        let set = [self.labels.is_some(), self.mean.is_some(), self.std.is_some(), self.input_size.is_some(), self.tokens.is_some(), self.channels_last];
        ["labels", "mean", "std", "input_size", "tokens", "channels_last"].into_iter().zip(set).filter(|(_, s)| *s).map(|(n, _)| n).collect()
    }
}

/// One value of the graph, as `gradcam layers --model FILE.onnx` lists it.
#[derive(Debug, Clone)]
pub struct ValueRow {
    /// The value's name (what `--layer` takes).
    pub name: String,
    /// The op that produces it ("input" for the graph's input).
    pub op: String,
    /// Its shape on a batch of one image of the model's input size.
    pub shape: Vec<usize>,
    /// How it lies on the image when it is not `[1, C, h, w]` (tokens on a grid, channels-last).
    pub layout: Option<ValueLayout>,
}

/// A loaded ONNX model: its nodes in topological order and its constants.
pub struct OnnxModel {
    name: String,
    nodes: Arc<Vec<Node>>,
    constants: HashMap<String, Tensor>,
    input: String,
    output: String,
    input_size: (usize, usize),
    /// Shapes of every value on one image of `input_size` (from a run on zeros at load).
    shapes: HashMap<String, Vec<usize>>,
    /// Their dtypes (F32 for activations, I64 for shapes and indices).
    dtypes: HashMap<String, DType>,
    /// The user's layout overrides.
    tokens: Option<TokenGrid>,
    channels_last: bool,
    /// Whether the graph's batch dimension is fixed at 1 (heads then run one row at a time).
    fixed_batch: bool,
    producer: HashMap<String, usize>,
    /// The patch grid of a transformer ([`OnnxModel::find_patch_grid`]).
    patch: Option<(usize, usize)>,
    preprocess: Preprocess,
    labels: Option<Arc<Vec<String>>>,
    num_classes: usize,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel").field("name", &self.name).field("nodes", &self.nodes.len()).finish()
    }
}

fn bad(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Onnx(format!("{}: {message}", path.display()))
}

impl OnnxModel {
    /// Reads and checks an ONNX file; every failure names the file and what is wrong.
    pub fn load(path: &Path, options: &OnnxOptions) -> Result<OnnxModel> {
        let Graph { nodes, constants, input, output, producer } = Graph::read(path)?;
        // Pixels are floats: an integer, boolean or string input would be fed floats it does not
        // declare (0: unspecified, 1 float, 10 float16, 11 double, 16 bfloat16).
        if !matches!(input.elem_type, 0 | 1 | 10 | 11 | 16) {
            return Err(bad(path, format!("the graph's input {:?} holds values of ONNX type {}, not floats; gradcam feeds images as float pixels", input.name, input.elem_type)));
        }
        let dims = input.shape.clone().unwrap_or_default();
        let input_size = match dims.as_slice() {
            [_, Some(3), Some(h), Some(w)] => {
                if let Some((oh, ow)) = options.input_size {
                    if (oh, ow) != (*h, *w) {
                        return Err(SettingError::value("input_size", format!("{oh}x{ow}"), format!("the graph's input is fixed at {h}x{w} ({})", path.display())).into());
                    }
                }
                (*h, *w)
            }
            [_, Some(3), _, _] => options.input_size.unwrap_or((224, 224)),
            [_, c, _, _] => return Err(bad(path, format!("the graph's input {:?} has {} channels; gradcam feeds RGB images (3 channels, NCHW)", input.name, c.map_or("a dynamic number of".into(), |c| c.to_string())))),
            _ => return Err(bad(path, format!("the graph's input {:?} has shape {dims:?}; gradcam feeds images as [batch, 3, height, width]", input.name))),
        };
        if input_size.0 < 8 || input_size.1 < 8 || input_size.0 > 4096 || input_size.1 > 4096 {
            return Err(bad(path, format!("input size {}x{} is outside 8..=4096", input_size.0, input_size.1)));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.onnx".into());
        let preprocess = Preprocess {
            size: input_size,
            mean: options.mean.unwrap_or(crate::preprocess::IMAGENET_MEAN),
            std: options.std.unwrap_or(crate::preprocess::IMAGENET_STD),
        };
        if preprocess.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || preprocess.mean.iter().any(|m| !m.is_finite()) {
            let setting = if preprocess.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) { ("std", "positive") } else { ("mean", "finite") };
            return Err(SettingError::new(vec![setting.0], format!("must be three {} numbers ({})", setting.1, path.display())).into());
        }
        let mut model = OnnxModel {
            name,
            nodes: Arc::new(nodes),
            constants,
            input: input.name.clone(),
            output,
            input_size,
            shapes: HashMap::new(),
            dtypes: HashMap::new(),
            tokens: options.tokens,
            channels_last: options.channels_last,
            fixed_batch: matches!(dims.first(), Some(Some(1))),
            producer,
            patch: None,
            preprocess,
            labels: None,
            num_classes: 0,
        };
        (model.shapes, model.dtypes) = model.trace().map_err(|e| bad(path, format!("running the graph on a {}x{} input: {e}", input_size.0, input_size.1)))?;
        model.patch = model.find_patch_grid();
        if let Some(dtype) = model.dtypes.get(&model.output).filter(|d| !d.is_float()) {
            return Err(bad(path, format!("the output {:?} is {dtype:?}, not scores; gradcam explains a float output", model.output)));
        }
        let Some(out_shape) = model.shapes.get(&model.output) else { return Err(bad(path, format!("the run on zeros did not compute the output {:?}", model.output))) };
        if out_shape.first() != Some(&1) || out_shape.iter().product::<usize>() < 2 {
            return Err(bad(path, format!("the output {:?} has shape {out_shape:?}; a classifier's is [batch, classes]", model.output)));
        }
        model.num_classes = out_shape[1..].iter().product();
        if let Some(file) = &options.labels {
            let text = std::fs::read_to_string(file).map_err(|source| Error::Io { path: file.clone(), source })?;
            let labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
            if labels.len() != model.num_classes {
                return Err(bad(file, format!("{} labels for a model with {} classes", labels.len(), model.num_classes)));
            }
            model.labels = Some(Arc::new(labels));
        }
        Ok(model)
    }

    /// The file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of classes of the output.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Runs every node once on zeros and returns every value's shape and dtype.
    #[allow(clippy::type_complexity)]
    fn trace(&self) -> Result<(HashMap<String, Vec<usize>>, HashMap<String, DType>)> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let plan = Plan::compile(&self.nodes, &all, &self.constants, &self.input, &self.output, &HashSet::new(), true)?;
        let x = Tensor::zeros((1, 3, self.input_size.0, self.input_size.1), DType::F32, &Device::Cpu)?;
        let (values, y) = plan.run_shapes(&x, &self.output)?;
        // Scores that are not finite on a plain input: weights or ops that overflow.
        if let Some(y) = y.filter(|y| y.dtype().is_float()) {
            if let Some(v) = ops::values::<f32>(&y.to_dtype(DType::F32)?)?.into_iter().find(|v| !v.is_finite()) {
                return Err(Error::Onnx(format!("the output {:?} holds {v} (on an input of zeros); are the weights corrupt?", self.output)));
            }
        }
        Ok((values.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect(), values.into_iter().map(|(k, v)| (k, v.1)).collect()))
    }

    /// Every value of the graph in order (input first), with its op and shape.
    pub fn values(&self) -> Vec<ValueRow> {
        let mut rows = vec![ValueRow { name: self.input.clone(), op: "input".into(), shape: self.shapes.get(&self.input).cloned().unwrap_or_default(), layout: None }];
        for n in self.nodes.iter() {
            for o in &n.outputs {
                if let Some(shape) = self.shapes.get(o) {
                    let layout = self.guess(o).filter(|l| *l != ValueLayout::Nchw && self.dtypes.get(o) == Some(&DType::F32));
                    rows.push(ValueRow { name: o.clone(), op: n.op_type.clone(), shape: shape.clone(), layout });
                }
            }
        }
        rows
    }

    /// Nodes whose outputs the graph's output needs.
    fn ancestors(&self, value: &str) -> HashSet<usize> {
        let mut seen = HashSet::new();
        let mut stack = vec![value.to_string()];
        while let Some(v) = stack.pop() {
            if let Some(&i) = self.producer.get(&v) {
                if seen.insert(i) {
                    stack.extend(self.nodes[i].inputs.iter().filter(|s| !s.is_empty()).cloned());
                }
            }
        }
        seen
    }

    /// Nodes that read `value`, directly or not.
    fn descendants(&self, value: &str) -> HashSet<usize> {
        let mut reached: HashSet<&str> = HashSet::from([value]);
        let mut out = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.inputs.iter().any(|v| reached.contains(v.as_str())) {
                out.insert(i);
                reached.extend(n.outputs.iter().map(String::as_str));
            }
        }
        out
    }

    /// The default explained value: the last 4-D value with more than one spatial position on
    /// the path from the input to the output that splits the graph (the input of the global pooling).
    pub fn default_layer(&self) -> Result<String> {
        if let Some(layer) = self.transformer_default() {
            return Ok(layer);
        }
        let needed = self.ancestors(&self.output);
        let from_input = self.descendants(&self.input);
        // The last candidates only (each is a walk over the graph): a crafted graph of
        // thousands of 4-D values with skip connections would take quadratic time.
        let mut tries = 0;
        for i in (0..self.nodes.len()).rev() {
            if !(needed.contains(&i) && from_input.contains(&i)) {
                continue;
            }
            for o in &self.nodes[i].outputs {
                let Some(s) = self.shapes.get(o) else { continue };
                if s.len() == 4 && s[2] * s[3] > 1 && self.guess(o) == Some(ValueLayout::Nchw) {
                    if self.head_nodes(o).is_ok() {
                        return Ok(o.clone());
                    }
                    tries += 1;
                    if tries == MAX_DEFAULT_TRIES {
                        return Err(Error::NoDefaultLayer { model: self.name.clone() });
                    }
                }
            }
        }
        Err(Error::NoDefaultLayer { model: self.name.clone() })
    }

    /// Nodes of the head from `layer` to the output, and the constants it needs; an error when the
    /// output does not depend on `layer`, or the head also reads another value of the image.
    fn head_nodes(&self, layer: &str) -> Result<Vec<usize>> {
        let head = self.head_set(layer)?;
        let from_input = self.descendants(&self.input);
        let head_set: HashSet<usize> = head.iter().copied().collect();
        for &i in &head {
            for v in &self.nodes[i].inputs {
                let Some(&p) = self.producer.get(v) else { continue };
                if v != layer && !head_set.contains(&p) && (from_input.contains(&p)) {
                    return Err(Error::Data(format!(
                        "{}: the head from {layer:?} also reads {v:?} (node {:?}), computed from the image without passing through {layer:?} (a skip connection around it); explain a value that everything after it passes through, such as a block's output",
                        self.name, self.nodes[i].name
                    )));
                }
            }
        }
        Ok(head)
    }

    /// Nodes from `layer` to the output (an error when the output does not depend on it).
    fn head_set(&self, layer: &str) -> Result<Vec<usize>> {
        let needed = self.ancestors(&self.output);
        let after = self.descendants(layer);
        let head: Vec<usize> = (0..self.nodes.len()).filter(|i| needed.contains(i) && after.contains(i)).collect();
        if head.is_empty() && layer != self.output {
            return Err(Error::Data(format!("{}: the output {:?} is not reachable from {layer:?}; pick a value on the path to the output", self.name, self.output)));
        }
        Ok(head)
    }

    /// The classifier split at `layer` (default: [`OnnxModel::default_layer`]).
    pub fn network(self: &Arc<Self>, layer: Option<&str>) -> Result<Network> {
        let layer = match layer {
            Some(l) => l.to_string(),
            None => self.default_layer()?,
        };
        if !self.shapes.contains_key(&layer) {
            return Err(Error::UnknownLayer { layer: layer.clone(), model: self.name.clone(), valid: self.nearest(&layer) });
        }
        let layout = self.layout_of(&layer)?;
        let (mut head, sides) = match layout {
            ValueLayout::Nchw => (self.head_nodes(&layer)?, Vec::new()),
            _ => {
                let mut head = self.head_set(&layer)?;
                let sides = self.side_values(&layer, &mut head)?;
                (head, sides)
            }
        };
        head.sort_unstable();
        let forward: Vec<usize> = {
            let mut a = self.ancestors(&layer);
            for v in &sides {
                a.extend(self.ancestors(v));
            }
            (0..self.nodes.len()).filter(|i| a.contains(i)).collect()
        };
        // Head nodes that read only constants (shape arithmetic) are part of it: the plan evaluates them.
        let mut keep: HashSet<String> = HashSet::from([layer.clone(), self.output.clone()]);
        keep.extend(sides.iter().cloned());
        let forward = Arc::new(Part::new(self.nodes.clone(), forward, &self.constants, &self.input, &layer, keep.clone())?);
        // A class-token head: the ops after the last attention on the class token's row alone.
        let head = match rows::hoist(self, &head).filter(|_| std::env::var_os("GRADCAM_NO_ROW_HOIST").is_none()) {
            Some((nodes, extra)) => {
                let mut constants = self.constants.clone();
                constants.extend(extra);
                let set = (0..nodes.len()).collect();
                Arc::new(Part::new(Arc::new(nodes), set, &constants, &layer, &self.output, keep)?)
            }
            None => Arc::new(Part::new(self.nodes.clone(), head, &self.constants, &layer, &self.output, keep)?),
        };
        let output = [self.output.clone()];
        let (f, h, core_layout): (Box<dyn Layer>, Box<dyn Layer>, Layout) = match layout {
            ValueLayout::Nchw => {
                let f = move |x: &Tensor, rule: Rule| forward.run(x, rule);
                let h = move |a: &Tensor, rule: Rule| head.run(a, rule).and_then(|y| y.flatten_from(1));
                (Box::new(f), Box::new(h), Layout::Grid)
            }
            ValueLayout::Tokens { .. } | ValueLayout::ChannelsLast { .. } => {
                // Each image's row: the layer's values, then each value the head reads around it.
                let mut names = vec![layer.clone()];
                names.extend(sides.iter().cloned());
                let shapes: Vec<Vec<usize>> = names.iter().map(|v| self.shapes.get(v).map(|s| s[1..].to_vec()).unwrap_or_default()).collect();
                let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
                let f = move |x: &Tensor, rule: Rule| -> candle_core::Result<Tensor> {
                    let values = forward.run_with(x, &[], rule, &names, None)?;
                    let rows: Vec<Tensor> = values.iter().map(|v| v.to_dtype(DType::F32)?.flatten_from(1)).collect::<candle_core::Result<_>>()?;
                    Tensor::cat(&rows, 1)
                };
                let sides = sides.clone();
                let h = move |a: &Tensor, rule: Rule| -> candle_core::Result<Tensor> {
                    let n = a.dim(0)?;
                    let mut start = 0;
                    let mut parts = Vec::with_capacity(sizes.len());
                    for (size, shape) in sizes.iter().zip(&shapes) {
                        let mut dims = vec![n];
                        dims.extend(shape);
                        parts.push(a.narrow(1, start, *size)?.reshape(dims)?);
                        start += size;
                    }
                    let extra: Vec<(String, Tensor)> = sides.iter().cloned().zip(parts.drain(1..)).collect();
                    head.run_with(&parts[0], &extra, rule, &output, None)?.remove(0).flatten_from(1)
                };
                let l = match layout {
                    ValueLayout::Tokens { prefix, h, w, dim } => Layout::Packed { start: prefix * dim, h, w, channels: dim },
                    ValueLayout::ChannelsLast { h, w, channels } => Layout::Packed { start: 0, h, w, channels },
                    ValueLayout::Nchw => Layout::Grid,
                };
                (Box::new(f), Box::new(h), l)
            }
        };
        let (f, h) = if self.fixed_batch { (row_by_row(f), row_by_row(h)) } else { (f, h) };
        // Scores that are not finite: an error, as the built-in models give (not an empty map).
        let (scores, name) = (self.output.clone(), self.name.clone());
        let h: Box<dyn Layer> = Box::new(move |a: &Tensor, rule: Rule| {
            let y = h.forward(a, rule)?;
            if let Some(v) = ops::values::<f32>(&y.to_dtype(DType::F32)?)?.into_iter().find(|v| !v.is_finite()) {
                return Err(candle_core::Error::Msg(format!("{name}: the output {scores:?} holds {v}; the scores must be finite")));
            }
            Ok(y)
        });
        // An input of another size than the graph was traced at: say so beside the node's error.
        let traced = self.input_size;
        let f: Box<dyn Layer> = Box::new(move |x: &Tensor, rule: Rule| {
            f.forward(x, rule).map_err(|e| match x.dims() {
                [_, _, h, w] if (*h, *w) != traced => candle_core::Error::Msg(format!("{e} (the graph was loaded for a {}x{} input and this one is {h}x{w}; a transformer's token count is fixed by its size: resize the image to it)", traced.0, traced.1)),
                _ => e,
            })
        });
        let mut net = Network::new(self.name.clone(), vec![(layer.clone(), f)], h, &layer, self.num_classes).with_preprocess(self.preprocess.clone()).with_layout(core_layout);
        // The whole graph with its attention tapped, compiled when rollout or relevance first
        // asks for it (a ViT-B/16's compile takes a second).
        let (model, probe) = (self.clone(), Arc::new(std::sync::OnceLock::new()));
        net = net.with_attention(Arc::new(move |x: &Tensor, score: Option<gradcam_core::attention::ScoreFn<'_>>| {
            match probe.get_or_init(|| grid::AttentionProbe::new(&model)) {
                Ok(probe) => probe.run(x, score),
                Err(why) => Err(gradcam_core::Error::NoAttention { reason: format!("{}: {why}", model.name) }),
            }
        }));
        if let Some(labels) = &self.labels {
            net = net.with_labels(labels.clone());
        }
        Ok(net)
    }

    /// The 4-D and token values whose names are closest to `name` (edit distance), at most 8.
    fn nearest(&self, name: &str) -> Vec<String> {
        let mut rows: Vec<(usize, String)> =
            self.values().into_iter().filter(|r| (r.shape.len() == 4 || r.layout.is_some()) && r.name != name).map(|r| (edit_distance(&r.name, name), r.name)).collect();
        rows.sort();
        rows.into_iter().take(8).map(|(_, n)| n).collect()
    }
}

/// A graph exported for a batch of one, run one row at a time.
fn row_by_row(layer: Box<dyn Layer>) -> Box<dyn Layer> {
    Box::new(move |x: &Tensor, rule: Rule| -> candle_core::Result<Tensor> {
        if x.dim(0)? <= 1 {
            return layer.forward(x, rule);
        }
        let rows: Vec<Tensor> = (0..x.dim(0)?).map(|i| layer.forward(&x.narrow(0, i, 1)?, rule)).collect::<candle_core::Result<_>>()?;
        Tensor::cat(&rows, 0)
    })
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + (ca != cb) as usize).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
