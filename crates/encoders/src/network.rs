//! A CNN classifier as a sequence of named layers, split at any of them for Grad-CAM.

use candle_core::Tensor;
use gradcam_core::Explainable;
use gradcam_kernels::{Activation, Conv2d, Padding, Rule};

use std::sync::Arc;

use crate::preprocess::Preprocess;
use crate::weights::Weights;
use crate::{Error, Result};

/// One named stage of a network.
pub trait Layer: Send + Sync {
    /// The layer's output, its ReLUs' backward following `rule` (Guided Backpropagation runs
    /// the network with [`Rule::Guided`]).
    ///
    /// # Shapes
    /// `[batch, c, h, w]` -> `[batch, c', h', w']` (the classifier tail returns `[batch, classes]`).
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor>;
}

impl<F: Fn(&Tensor, Rule) -> candle_core::Result<Tensor> + Send + Sync> Layer for F {
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        self(x, rule)
    }
}

impl Layer for Conv2d {
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        self.forward_with(x, rule)
    }
}

/// A classifier: named feature layers, then a tail (pooling and classifier) giving logits.
pub struct Network {
    arch: std::borrow::Cow<'static, str>,
    layers: Vec<(String, Box<dyn Layer>)>,
    /// `fused[i]`: layers i and i + 1 in one op (a convolution and the ReLU after it), taken
    /// when a pass runs through both.
    fused: Vec<Option<Box<dyn Layer>>>,
    aliases: Vec<(String, String)>,
    tail: Box<dyn Layer>,
    default_layer: String,
    num_classes: usize,
    preprocess: Preprocess,
    labels: Option<Arc<Vec<String>>>,
    resize: crate::preprocess::Resize,
    /// How the explained layer's activations hold its grid (a transformer's tokens).
    layout: gradcam_core::Layout,
    /// A transformer's attention probabilities for rollout and relevance (an ONNX graph's).
    attention: Option<AttentionFn>,
    /// The last head pass run through [`Split::head`], kept with its graph so that explaining
    /// the same activations right after (what every caller does: logits first, then the
    /// explanation of a class among them) runs the backward without a second forward. VGG-16's
    /// head reads 480 MB of weights per forward.
    last_head: std::sync::Mutex<Option<HeadPass>>,
    /// Whether a batch runs the layers with large activations a few images at a time (see
    /// [`Network::run`]); only for layers that treat each image on its own.
    batch_chunks: bool,
}

/// The bytes of a batch's activations above which [`Network::run`] splits the batch in chunks
/// (when the network asks for it).
const CHUNK_BYTES: usize = 2 << 20;

/// What [`gradcam_core::Explainable::attention`] runs.
pub(crate) type AttentionFn = Arc<dyn Fn(&Tensor, Option<gradcam_core::attention::ScoreFn<'_>>) -> gradcam_core::Result<gradcam_core::Attention> + Send + Sync>;

/// A head pass: the layer it starts after, its input's values, the variable it ran on and the
/// output (whose graph leads back to that variable).
struct HeadPass {
    index: usize,
    values: Vec<f32>,
    dims: Vec<usize>,
    input: candle_core::Var,
    output: Tensor,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("arch", &self.arch).field("layers", &self.layers.len()).finish()
    }
}

impl Network {
    pub(crate) fn new(
        arch: impl Into<std::borrow::Cow<'static, str>>,
        layers: Vec<(String, Box<dyn Layer>)>,
        tail: Box<dyn Layer>,
        default_layer: &str,
        num_classes: usize,
    ) -> Self {
        let fused = layers.iter().map(|_| None).collect();
        Self { arch: arch.into(), layers, fused, aliases: Vec::new(), tail, default_layer: default_layer.to_string(), num_classes, preprocess: Preprocess::default(), labels: None, resize: crate::preprocess::Resize::CenterCrop, layout: gradcam_core::Layout::Grid, attention: None, last_head: std::sync::Mutex::new(None), batch_chunks: false }
    }

    /// A batch runs the layers whose activations are large a few images at a time (the layers
    /// must treat each image on its own, as convolutions do).
    pub(crate) fn with_batch_chunks(mut self) -> Self {
        self.batch_chunks = true;
        self
    }

    /// Layers `index` and `index + 1` as the one op `both`, for passes that run through both.
    pub(crate) fn with_fused(mut self, index: usize, both: Box<dyn Layer>) -> Self {
        self.fused[index] = Some(both);
        self
    }

    /// Layers `range` in order, each fused pair as one op. With `batch_chunks`, the layers whose
    /// input holds more than [`CHUNK_BYTES`] for the batch run on chunks of the batch that hold
    /// about that much, the chunks spread over the threads, each through all those layers: a whole batch of
    /// 112x112 activations (EfficientNet-Lite0's second block expands 16 images to 77 MB) would
    /// go through main memory between layers, where one image's stay in the caches; the later,
    /// smaller layers take the whole batch.
    fn run(&self, x: &Tensor, range: std::ops::Range<usize>, rule: Rule) -> Result<Tensor> {
        let batch = x.dim(0)?;
        if !self.batch_chunks || batch < 2 || x.rank() != 4 {
            return self.run_plain(x, range, rule);
        }
        let big = |t: &Tensor, images: usize| t.elem_count() / t.dim(0).unwrap_or(1).max(1) * images * 4 > CHUNK_BYTES;
        let threads = rayon::current_num_threads().max(1);
        let mut x = x.clone();
        let mut i = range.start;
        while i < range.end {
            if !big(&x, batch) {
                return self.run_plain(&x, i..range.end, rule);
            }
            let per = (x.elem_count() / batch * 4).max(1);
            // Each thread's share of the batch in equal chunks (a thread left with a smaller
            // last chunk would wait for the others), each at most about CHUNK_BYTES.
            let share = batch.div_ceil(threads);
            let chunk = (1..=share.min(CHUNK_BYTES / per).max(1)).rev().find(|c| share % c == 0).unwrap_or(1);
            // Each chunk goes layer by layer (fused pairs kept whole) until its activations are
            // small enough for the whole batch (at the same layer for all: they are alike).
            use rayon::prelude::*;
            let start = i;
            let ran = (0..batch).step_by(chunk).collect::<Vec<_>>().into_par_iter().map(|c0| -> Result<(Tensor, usize)> {
                let (mut t, mut j) = (x.narrow(0, c0, chunk.min(batch - c0))?, start);
                while j < range.end && big(&t, batch) {
                    let step = if self.fused[j].is_some() && j + 1 < range.end { 2 } else { 1 };
                    t = self.run_plain(&t, j..j + step, rule)?;
                    j += step;
                }
                Ok((t, j))
            });
            let ran = ran.collect::<Result<Vec<_>>>()?;
            i = ran[0].1;
            if ran.iter().any(|r| r.1 != i) {
                return Err(candle_core::Error::Msg(format!("{}: the chunks of a batch ran through different layers", self.arch)).into());
            }
            let parts: Vec<Tensor> = ran.into_iter().map(|r| r.0).collect();
            x = Tensor::cat(&parts, 0)?;
        }
        Ok(x)
    }

    /// [`Network::run`] on the whole batch at once.
    fn run_plain(&self, x: &Tensor, range: std::ops::Range<usize>, rule: Rule) -> Result<Tensor> {
        let mut x = x.clone();
        let mut i = range.start;
        while i < range.end {
            match &self.fused[i] {
                Some(both) if i + 1 < range.end => {
                    x = both.forward(&x, rule)?;
                    i += 2;
                }
                _ => {
                    x = self.layers[i].1.forward(&x, rule)?;
                    i += 1;
                }
            }
        }
        Ok(x)
    }

    /// The input size and normalisation the network expects (default: ImageNet's at 224 x 224).
    pub(crate) fn with_preprocess(mut self, preprocess: Preprocess) -> Self {
        self.preprocess = preprocess;
        self
    }

    /// How the explained layer's activations hold the grid (an ONNX transformer's token layer).
    pub(crate) fn with_layout(mut self, layout: gradcam_core::Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The attention probabilities of a transformer, for rollout and relevance.
    pub(crate) fn with_attention(mut self, attention: AttentionFn) -> Self {
        self.attention = Some(attention);
        self
    }

    /// Class names (default: ImageNet's when there are 1000 classes).
    pub(crate) fn with_labels(mut self, labels: Arc<Vec<String>>) -> Self {
        self.labels = Some(labels);
        self
    }

    /// How images are resized when the user does not say: center-crop for ImageNet classifiers,
    /// stretch for the scene classifiers trained here (whose scenes matter to their corners).
    pub fn default_resize(&self) -> crate::preprocess::Resize {
        self.resize
    }

    pub(crate) fn with_default_resize(mut self, resize: crate::preprocess::Resize) -> Self {
        self.resize = resize;
        self
    }

    /// How an image becomes this network's input.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Whether class names were given (an ONNX model's `--labels`).
    pub fn has_labels(&self) -> bool {
        self.labels.is_some()
    }

    /// The name of class `c`: from the labels given, ImageNet's for 1000 classes, else "class c".
    pub fn label(&self, c: usize) -> String {
        match &self.labels {
            Some(l) => l.get(c).cloned().unwrap_or_else(|| format!("class {c}")),
            None if self.num_classes == 1000 => crate::imagenet::class_name(c).unwrap_or("?").to_string(),
            None => format!("class {c}"),
        }
    }

    /// Another accepted name for a layer (e.g. ResNet's `layer4` for its last block).
    pub(crate) fn with_alias(mut self, alias: &str, layer: &str) -> Self {
        self.aliases.push((alias.to_string(), layer.to_string()));
        self
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn default_layer(&self) -> &str {
        &self.default_layer
    }

    /// The names `--layer` accepts, in forward order (aliases after them).
    pub fn layer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.layers.iter().map(|(n, _)| n.clone()).collect();
        names.extend(self.aliases.iter().map(|(a, l)| format!("{a} (= {l})")));
        names
    }

    /// Index of a layer by name or alias; the error lists the valid names.
    pub fn layer_index(&self, name: &str) -> Result<usize> {
        let target = self.aliases.iter().find(|(a, _)| a == name).map(|(_, l)| l.as_str()).unwrap_or(name);
        self.layers.iter().position(|(n, _)| n == target).ok_or_else(|| Error::UnknownLayer {
            layer: name.to_string(),
            model: self.arch.to_string(),
            valid: self.layers.iter().map(|(n, _)| n.clone()).chain(self.aliases.iter().map(|(a, _)| a.clone())).collect(),
        })
    }

    /// Canonical name of the layer at `index` (as [`Network::layer_index`] gives it).
    pub fn layer_name(&self, index: usize) -> &str {
        &self.layers[index].0
    }

    /// Logits for a batch of preprocessed images.
    ///
    /// # Shapes
    /// `[batch, 3, h, w]` -> `[batch, classes]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Rule::Exact)
    }

    /// Logits, the backward of every ReLU following `rule`.
    pub fn forward_with(&self, x: &Tensor, rule: Rule) -> Result<Tensor> {
        let a = self.run(x, 0..self.layers.len(), rule)?;
        Ok(self.tail.forward(&a, rule)?)
    }

    /// Activations of layer `index`.
    pub fn features_at(&self, x: &Tensor, index: usize) -> Result<Tensor> {
        self.run(x, 0..index + 1, Rule::Exact)
    }

    /// Layer `index` alone, on the previous layer's activations (for per-layer timings).
    pub fn layer_forward(&self, index: usize, x: &Tensor) -> Result<Tensor> {
        Ok(self.layers[index].1.forward(x, Rule::Exact)?)
    }

    /// Number of feature layers (the tail not counted).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Logits from the activations of layer `index`.
    pub fn head_from(&self, a: &Tensor, index: usize) -> Result<Tensor> {
        let x = self.run(a, index + 1..self.layers.len(), Rule::Exact)?;
        Ok(self.tail.forward(&x, Rule::Exact)?)
    }

    /// The model split at a layer, for [`gradcam_core::explain`].
    pub fn split(&self, index: usize) -> Split<'_> {
        Split { network: self, index }
    }
}

/// A [`Network`] split at one of its layers.
pub struct Split<'a> {
    network: &'a Network,
    index: usize,
}

impl Explainable for Split<'_> {
    fn features(&self, input: &Tensor) -> gradcam_core::Result<Tensor> {
        self.network.features_at(input, self.index).map_err(Error::into_core)
    }

    fn head(&self, activations: &Tensor) -> gradcam_core::Result<Tensor> {
        // A tensor already in a graph (explain's own pass) or a batch: the plain pass.
        if activations.track_op() || activations.dim(0)? != 1 {
            return self.network.head_from(activations, self.index).map_err(Error::into_core);
        }
        let input = candle_core::Var::from_tensor(activations)?;
        let output = self.network.head_from(input.as_tensor(), self.index).map_err(Error::into_core)?;
        let values = activations.flatten_all()?.to_vec1::<f32>()?;
        let pass = HeadPass { index: self.index, values, dims: activations.dims().to_vec(), input, output: output.clone() };
        if let Ok(mut last) = self.network.last_head.lock() {
            *last = Some(pass);
        }
        Ok(output.detach())
    }

    /// One seed on the activations of the last [`Self::head`] call: the backward of that pass.
    fn head_gradients(&self, activations: &Tensor, seeds: &[(usize, f32)]) -> gradcam_core::Result<Option<(Vec<f32>, Tensor)>> {
        let &[(index, sign)] = seeds else { return Ok(None) };
        let Some(pass) = self.network.last_head.lock().ok().and_then(|mut last| last.take()) else { return Ok(None) };
        if pass.index != self.index || pass.dims != activations.dims() || pass.values != activations.flatten_all()?.to_vec1::<f32>()? {
            return Ok(None);
        }
        let row = pass.output.flatten_all()?;
        if index >= row.elem_count() {
            return Err(gradcam_core::Error::ClassOutOfRange { class: index, num_classes: row.elem_count() });
        }
        let score = row.get(index)?;
        let value = sign * score.to_scalar::<f32>()?;
        let grads = (score * sign as f64)?.backward()?;
        let grad = grads.get(pass.input.as_tensor()).ok_or(gradcam_core::Error::NoGradient)?.clone();
        Ok(Some((vec![value], grad)))
    }

    fn forward_with(&self, input: &Tensor, rule: Rule) -> gradcam_core::Result<Tensor> {
        self.network.forward_with(input, rule).map_err(Error::into_core)
    }

    fn layout(&self) -> gradcam_core::Layout {
        self.network.layout
    }

    fn attention(&self, input: &Tensor, score: Option<gradcam_core::attention::ScoreFn<'_>>) -> gradcam_core::Result<gradcam_core::Attention> {
        match &self.network.attention {
            Some(f) => f(input, score),
            None => Err(gradcam_core::Error::NoAttention { reason: format!("{} is a convolutional network", self.network.arch) }),
        }
    }
}

/// Global average pooling.
///
/// # Shapes
/// `[batch, c, h, w]` -> `[batch, c]`.
pub(crate) fn global_avg_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    x.flatten_from(2)?.mean(2)
}

/// A convolution followed by inference batch norm, folded into one convolution with bias.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_bn(
    w: &Weights,
    conv: &str,
    bn: &str,
    shape: [usize; 4],
    groups: usize,
    stride: usize,
    padding: Padding,
    eps: f64,
    activation: Activation,
) -> Result<Conv2d> {
    let weight = w.get(&format!("{conv}.weight"), &shape)?;
    let c = [shape[0]];
    let gamma = w.get(&format!("{bn}.weight"), &c)?;
    let beta = w.get(&format!("{bn}.bias"), &c)?;
    let mean = w.get(&format!("{bn}.running_mean"), &c)?;
    let var = w.get(&format!("{bn}.running_var"), &c)?;
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    let weight = weight.broadcast_mul(&scale.reshape((shape[0], 1, 1, 1))?)?;
    let bias = (beta - (mean * &scale)?)?;
    Ok(Conv2d::new(&weight, Some(&bias), groups, stride, padding, activation)?)
}

/// A plain convolution with its own bias.
pub(crate) fn conv(
    w: &Weights,
    name: &str,
    shape: [usize; 4],
    stride: usize,
    padding: Padding,
    activation: Activation,
) -> Result<Conv2d> {
    let weight = w.get(&format!("{name}.weight"), &shape)?;
    let bias = w.get(&format!("{name}.bias"), &[shape[0]])?;
    Ok(Conv2d::new(&weight, Some(&bias), 1, stride, padding, activation)?)
}

/// A fully-connected layer.
pub(crate) fn linear(w: &Weights, name: &str, out: usize, inp: usize, activation: Activation) -> Result<gradcam_kernels::Linear> {
    let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
    let bias = w.get(&format!("{name}.bias"), &[out])?;
    Ok(gradcam_kernels::Linear::new(&weight, Some(&bias), activation)?)
}
