//! The user-facing pipeline: [`Split`] makes any two closures an explainable model, [`Target`]
//! names what to explain, [`Cam`] runs any method (a built-in [`Method`] or your own
//! [`Explainer`]) and gives [`Explanation`]s.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use image::{DynamicImage, RgbImage};

use crate::cam::{Context, Explainer, Request};
use crate::map::{overlay, Region};
use crate::report::{report, NeuronReport, UnitNames};
use crate::{Error, Explainable, Map, Method, Result, Rule, Score};

/// What to explain: one score of the head's output row, or its negation (the paper's
/// counterfactual, section 3.3: the regions whose removal would raise the score).
#[derive(Clone)]
pub struct Target {
    kind: TargetKind,
    counterfactual: bool,
}

#[derive(Clone)]
enum TargetKind {
    Class(usize),
    Word(usize),
    Answer(usize),
    Custom(Arc<dyn Score + Send + Sync>),
}

impl Target {
    /// The pre-softmax logit of class `k` (a classifier's output row holds its logits).
    pub fn class(k: usize) -> Self {
        Target { kind: TargetKind::Class(k), counterfactual: false }
    }

    /// The log-probability of the caption's word at step `t` (the captioner's head gives one
    /// log-probability per word of the caption it explains).
    pub fn word(t: usize) -> Self {
        Target { kind: TargetKind::Word(t), counterfactual: false }
    }

    /// The pre-softmax score of answer `k` of a VQA model.
    pub fn answer(k: usize) -> Self {
        Target { kind: TargetKind::Answer(k), counterfactual: false }
    }

    /// Any other score of the output row.
    pub fn custom(score: impl Score + Send + Sync + 'static) -> Self {
        Target { kind: TargetKind::Custom(Arc::new(score)), counterfactual: false }
    }

    /// The counterfactual of this target: its negated score.
    pub fn counterfactual(self) -> Self {
        Target { counterfactual: !self.counterfactual, ..self }
    }

    /// Whether this is a counterfactual target.
    pub fn is_counterfactual(&self) -> bool {
        self.counterfactual
    }

    /// The class, word step or answer index; `None` for a custom score.
    pub fn index(&self) -> Option<usize> {
        match self.kind {
            TargetKind::Class(i) | TargetKind::Word(i) | TargetKind::Answer(i) => Some(i),
            TargetKind::Custom(_) => None,
        }
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cf = if self.counterfactual { "counterfactual " } else { "" };
        match self.kind {
            TargetKind::Class(k) => write!(f, "{cf}class {k}"),
            TargetKind::Word(t) => write!(f, "{cf}word {t}"),
            TargetKind::Answer(k) => write!(f, "{cf}answer {k}"),
            TargetKind::Custom(_) => write!(f, "{cf}custom score"),
        }
    }
}

impl Target {
    /// The score y^c of one output row of the head (negated for a counterfactual), as a
    /// differentiable scalar: what the methods explain.
    pub fn score(&self, row: &Tensor) -> Result<Tensor> {
        let s = match (&self.kind, self.index()) {
            (TargetKind::Custom(score), _) => score.score(row)?,
            (_, Some(i)) => {
                let flat = row.flatten_all()?;
                if i >= flat.elem_count() {
                    return Err(Error::ClassOutOfRange { class: i, num_classes: flat.elem_count() });
                }
                flat.get(i)?
            }
            (_, None) => unreachable!("only custom targets have no index"),
        };
        Ok(if self.counterfactual { s.neg()? } else { s })
    }

    /// `Some((index, sign))` when the score is `sign * row[index]` ([`Score::element`]).
    pub(crate) fn element(&self) -> Option<(usize, f32)> {
        let (i, sign) = match &self.kind {
            TargetKind::Custom(score) => score.element()?,
            _ => (self.index()?, 1.0),
        };
        Some((i, if self.counterfactual { -sign } else { sign }))
    }
}

/// One explanation of one target: what every method gives, built-in or yours.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The name of the method that made it (`gradcam`, `gradcam++`, ..., or your method's).
    pub method: &'static str,
    /// What was explained.
    pub target: Target,
    /// The image's row in the input batch.
    pub image: usize,
    /// The target's score y^c (for a counterfactual target, the score itself, not its negation).
    pub score: f32,
    /// The raw map, row-major `map_size.0 x map_size.1`: after the method's ReLU, before
    /// normalisation, at the explained layer's resolution (with augmentation smoothing, at the
    /// input's).
    pub map: Vec<f32>,
    /// (height, width) of `map`.
    pub map_size: (usize, usize),
    /// alpha_k for each of the K channels of the explained layer: the importance weights behind
    /// the map, ranked by the neuron report.
    pub weights: Option<Vec<f32>>,
    /// For the guided methods, the guided image `[3, H, W]` at the input's resolution (Guided
    /// Backpropagation, or its product with the upsampled Grad-CAM map), row-major per channel.
    pub guided: Option<Vec<f32>>,
    /// (height, width) of the guided image.
    pub guided_size: (usize, usize),
}

impl Explanation {
    /// The explanation of `request` by the method `method`: its score y^c (for a counterfactual
    /// target, the score itself, not its negation), raw map and weights alpha_k. An error when
    /// the map or the weights are not finite.
    pub fn new(method: &'static str, request: &Request<'_>, score: f32, map: Map, weights: Option<Vec<f32>>) -> Result<Self> {
        if !map.is_finite() || weights.as_ref().is_some_and(|w| w.iter().any(|v| !v.is_finite())) {
            return Err(Error::NonFinite { what: "map" });
        }
        Ok(Explanation {
            method,
            target: request.target.clone(),
            image: request.image,
            score,
            map_size: (map.h, map.w),
            map: map.data,
            weights,
            guided: None,
            guided_size: (0, 0),
        })
    }

    /// The raw map as a [`Map`].
    pub fn cam(&self) -> Map {
        Map::new(self.map_size.0, self.map_size.1, self.map.clone())
    }

    /// Whether this explains a counterfactual target.
    pub fn is_counterfactual(&self) -> bool {
        self.target.is_counterfactual()
    }

    /// False when the map is zero everywhere: nothing in the layer supports the target.
    pub fn nonzero(&self) -> bool {
        self.cam().normalized().1
    }

    /// The map, min-max normalised, coloured with jet and blended over the whole image (which is
    /// taken to be what the model saw).
    pub fn overlay(&self, image: &DynamicImage) -> RgbImage {
        let rgb = image.to_rgb8();
        let region = Region { x: 0, y: 0, width: rgb.width(), height: rgb.height() };
        overlay(&rgb, &self.cam().normalized().0, region)
    }

    /// The picture of this explanation on `image`: for the guided methods the guided image at the
    /// input's resolution, else the map blended over `region` (the part of the image the model
    /// saw; the rest is dimmed).
    pub fn picture(&self, image: &RgbImage, region: Region) -> Result<RgbImage> {
        match &self.guided {
            Some(g) => {
                let (h, w) = self.guided_size;
                crate::guided::gradient_image(&Tensor::from_slice(g, (3, h, w), &candle_core::Device::Cpu)?)
            }
            None => Ok(overlay(image, &self.cam().normalized().0, region)),
        }
    }

    /// The textual explanation: the 5 units with the largest and the 5 with the smallest
    /// alpha_k, named by `names`, in a sentence about `subject` (a class, a word, an answer).
    /// `None` when the method gives no weights.
    pub fn neurons(&self, names: &UnitNames, subject: &str) -> Option<NeuronReport> {
        self.weights.as_ref().map(|alpha| report(alpha, names, subject, 5))
    }
}

/// The method [`Cam::method`] runs: a built-in [`Method`], or any [`Explainer`] of yours
/// (every [`crate::CamMethod`] is one).
#[derive(Clone)]
pub enum AnyMethod {
    /// One of the built-in methods, by name.
    Builtin(Method),
    /// Your own.
    Custom(Arc<dyn Explainer + Send + Sync>),
}

impl From<Method> for AnyMethod {
    fn from(m: Method) -> Self {
        AnyMethod::Builtin(m)
    }
}

impl<E: Explainer + Send + Sync + 'static> From<E> for AnyMethod {
    fn from(e: E) -> Self {
        AnyMethod::Custom(Arc::new(e))
    }
}

impl AnyMethod {
    /// The method's name.
    pub fn name(&self) -> &'static str {
        match self {
            AnyMethod::Builtin(m) => m.name(),
            AnyMethod::Custom(e) => e.name(),
        }
    }
}

impl fmt::Debug for AnyMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnyMethod::Builtin(m) => write!(f, "{m}"),
            AnyMethod::Custom(e) => write!(f, "custom method {}", e.name()),
        }
    }
}

/// Explains a model with one method: `Cam::new(&model).method(Method::GradCamPlusPlus)
/// .explain(&input, &targets)`, or `.method(MyMethod)` for a method of your own.
pub struct Cam<'m, M: ?Sized> {
    model: &'m M,
    method: AnyMethod,
    eigen_smooth: bool,
    aug_smooth: bool,
    progress: Option<&'m (dyn Fn(usize, usize) + Sync)>,
    cancel: Option<Arc<AtomicBool>>,
}

impl<M: ?Sized> Clone for Cam<'_, M> {
    fn clone(&self) -> Self {
        Cam { method: self.method.clone(), cancel: self.cancel.clone(), ..*self }
    }
}

impl<'m, M: Explainable + ?Sized> Cam<'m, M> {
    /// Grad-CAM of `model`, no smoothing.
    pub fn new(model: &'m M) -> Self {
        Cam { model, method: AnyMethod::Builtin(Method::GradCam), eigen_smooth: false, aug_smooth: false, progress: None, cancel: None }
    }

    /// The method to run: a [`Method`], or your own [`Explainer`].
    pub fn method(self, method: impl Into<AnyMethod>) -> Self {
        Cam { method: method.into(), ..self }
    }

    /// Eigen-smoothing (pytorch-grad-cam's `eigen_smooth`): each map is the first principal
    /// component of the weighted activations alpha_k A^k instead of their sum. Built-in
    /// gradient-based methods only.
    pub fn eigen_smooth(self, on: bool) -> Self {
        Cam { eigen_smooth: on, ..self }
    }

    /// Augmentation smoothing (pytorch-grad-cam's `aug_smooth`): the mean map over the input
    /// flipped or not and scaled by 0.9, 1 and 1.1, at the input's resolution (6x the work).
    /// Built-in gradient-based methods only.
    pub fn aug_smooth(self, on: bool) -> Self {
        Cam { aug_smooth: on, ..self }
    }

    /// Hears (channels done, channels) while Ablation-CAM or Score-CAM work through the layer.
    pub fn on_progress(self, progress: &'m (dyn Fn(usize, usize) + Sync)) -> Self {
        Cam { progress: Some(progress), ..self }
    }

    /// Stops the work once `flag` is set: [`Cam::explain`] then answers [`Error::Cancelled`],
    /// at its start or, in the perturbation methods, at the next chunk of channels (a server
    /// whose request timed out frees its worker this way).
    pub fn cancel_on(self, flag: Arc<AtomicBool>) -> Self {
        Cam { cancel: Some(flag), ..self }
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// The method in use.
    pub fn current_method(&self) -> &AnyMethod {
        &self.method
    }

    /// The part of an output file name that tells this method and smoothing apart (empty for
    /// plain Grad-CAM): `_gradcampp`, `_eigen`, `_scorecam`, `_mymethod`, ...
    pub fn file_tag(&self) -> String {
        let smoothing = match (self.eigen_smooth, self.aug_smooth) {
            (false, false) => "",
            (true, false) => "_eigen",
            (false, true) => "_aug",
            (true, true) => "_eigen_aug",
        };
        let method = match &self.method {
            AnyMethod::Builtin(m) => m.file_tag(),
            AnyMethod::Custom(e) => format!("_{}", e.name().replace("++", "pp").chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect::<String>()),
        };
        format!("{method}{smoothing}")
    }

    /// One explanation per target of the single image `input` (`[1, C, H, W]`, or `[C, H, W]`).
    /// A batch of several images is refused: explain it with [`Cam::explain_batch`], which takes
    /// each image's targets.
    pub fn explain(&self, input: &Tensor, targets: &[Target]) -> Result<Vec<Explanation>> {
        let input = if input.rank() == 3 { input.unsqueeze(0)? } else { input.clone() };
        if input.rank() != 4 || input.dim(0)? != 1 {
            return Err(Error::Shape(format!("Cam::explain takes one image [1, C, H, W] (or [C, H, W]); got {:?}: use Cam::explain_batch for a batch", input.dims())));
        }
        let activations = self.model.features(&input)?;
        let requests: Vec<(usize, Target)> = targets.iter().map(|t| (0, t.clone())).collect();
        self.explain_with(&input, &activations, &requests)
    }

    /// The explanations of a batch `input` (`[B, C, H, W]`): `targets[i]` are image i's, and so
    /// are the answer's `[i]`, in their order. One forward through the backbone for the whole
    /// batch, and one backward through the head for every target of every image.
    pub fn explain_batch(&self, input: &Tensor, targets: &[Vec<Target>]) -> Result<Vec<Vec<Explanation>>> {
        if input.rank() != 4 || input.dim(0)? != targets.len() {
            return Err(Error::Shape(format!("Cam::explain_batch takes a batch [B, C, H, W] and one list of targets per image; got {:?} and {} lists", input.dims(), targets.len())));
        }
        let activations = self.model.features(input)?;
        let requests: Vec<(usize, Target)> = targets.iter().enumerate().flat_map(|(i, ts)| ts.iter().map(move |t| (i, t.clone()))).collect();
        let mut all = self.explain_with(input, &activations, &requests)?.into_iter();
        Ok(targets.iter().map(|ts| all.by_ref().take(ts.len()).collect()).collect())
    }

    /// One explanation per (image row, target) of a batch, from activations already computed
    /// with [`Explainable::features`] (so that a caller who also needs the predictions runs the
    /// backbone once).
    ///
    /// # Shapes
    /// `input`: `[B, C, H, W]`; `activations`: `[B, K, h, w]` (or the model's
    /// [`Explainable::layout`]).
    pub fn explain_with(&self, input: &Tensor, activations: &Tensor, requests: &[(usize, Target)]) -> Result<Vec<Explanation>> {
        if self.cancelled() {
            return Err(Error::Cancelled);
        }
        let builtin;
        let explainer: &dyn Explainer = match &self.method {
            AnyMethod::Builtin(m) => {
                builtin = m.explainer(self.eigen_smooth, self.aug_smooth)?;
                builtin.as_ref()
            }
            AnyMethod::Custom(e) if !(self.eigen_smooth || self.aug_smooth) => e.as_ref(),
            AnyMethod::Custom(e) => return Err(Error::Unsupported(format!("eigen- and augmentation smoothing work with the built-in gradient-based methods, not {}", e.name()))),
        };
        let reqs: Vec<Request> = requests.iter().map(|(image, target)| Request { image: *image, target }).collect();
        let (_, k, _, _) = self.model.layout().dims(activations)?;
        let progress = |done: usize| {
            if let Some(p) = self.progress {
                p(done, k)
            }
            if self.cancelled() {
                return Err(Error::Cancelled);
            }
            Ok(())
        };
        let cx = Context { model: &ByRef(self.model), input, activations, progress: &progress };
        let mut explanations = explainer.explain(&cx, &reqs)?;
        if explanations.len() != requests.len() {
            return Err(Error::Unsupported(format!("method {} gave {} explanations for {} requests", self.method.name(), explanations.len(), requests.len())));
        }
        for e in &mut explanations {
            e.method = self.method.name();
        }
        Ok(explanations)
    }
}

/// A borrowed model as a sized [`Explainable`], so that any model (even unsized) can stand behind a
/// `&dyn Explainable`.
struct ByRef<'m, M: ?Sized>(&'m M);

impl<M: Explainable + ?Sized> Explainable for ByRef<'_, M> {
    fn features(&self, input: &Tensor) -> Result<Tensor> {
        self.0.features(input)
    }

    fn head(&self, activations: &Tensor) -> Result<Tensor> {
        self.0.head(activations)
    }

    fn head_gradients(&self, activations: &Tensor, seeds: &[(usize, f32)]) -> Result<Option<(Vec<f32>, Tensor)>> {
        self.0.head_gradients(activations, seeds)
    }

    fn forward_with(&self, input: &Tensor, rule: Rule) -> Result<Tensor> {
        self.0.forward_with(input, rule)
    }

    fn layout(&self) -> crate::Layout {
        self.0.layout()
    }

    fn attention(&self, input: &Tensor, score: Option<crate::attention::ScoreFn<'_>>) -> Result<crate::Attention> {
        self.0.attention(input, score)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use gradcam_kernels::Activation;

    use super::*;
    use crate::cam::Context;
    use crate::Split;

    /// A tiny model: ReLU(conv-free scaling) features, a linear head over the pooled channels.
    /// Scores: class c = sum_k w[c][k] mean(A^k).
    fn model() -> (Tensor, impl Fn(&Tensor) -> candle_core::Result<Tensor> + Clone, impl Fn(&Tensor) -> candle_core::Result<Tensor> + Clone) {
        let input = Tensor::arange(0f32, 2.0 * 4.0 * 4.0, &Device::Cpu).unwrap().affine(0.1, -1.0).unwrap().reshape((1, 2, 4, 4)).unwrap();
        let w = Tensor::new(&[[1f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
        let features = |x: &Tensor| Activation::Relu.forward(&x.affine(2.0, 0.0)?);
        let head = move |a: &Tensor| a.mean((2, 3))?.matmul(&w.t()?);
        (input, features, head)
    }

    #[test]
    fn a_method_of_ones_own_runs_through_cam_like_the_built_in_ones() {
        // The map of every position is the target's score: enough to see the pipeline around it.
        struct Flat;
        impl Explainer for Flat {
            fn name(&self) -> &'static str {
                "flat"
            }
            fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>> {
                let (_, _, h, w) = cx.activations.dims4()?;
                let out = cx.model.head(cx.activations)?;
                requests
                    .iter()
                    .map(|r| {
                        // The score as explained (negated for a counterfactual); an explanation
                        // reports the score itself.
                        let s = r.target.score(&out.get(r.image)?)?.to_scalar::<f32>()?;
                        let score = if r.target.is_counterfactual() { -s } else { s };
                        Explanation::new(self.name(), r, score, Map::new(h, w, vec![s.max(0.0); h * w]), None)
                    })
                    .collect()
            }
        }
        let (input, features, head) = model();
        let split = Split::new(features, head);
        let cam = Cam::new(&split).method(Flat);
        assert_eq!(cam.file_tag(), "_flat");
        let e = cam.explain(&input, &[Target::class(1), Target::class(1).counterfactual()]).unwrap();
        let builtin = Cam::new(&split).explain(&input, &[Target::class(1)]).unwrap();
        assert_eq!((e[0].method, e[0].map_size, e[0].image), ("flat", (4, 4), 0));
        assert_eq!(e[0].score, builtin[0].score, "the same target, the same score");
        assert!(e[1].is_counterfactual() && e[1].score == e[0].score && e[1].map.iter().all(|&v| v == 0.0));
        // Smoothing belongs to the built-in gradient methods.
        assert!(matches!(Cam::new(&split).method(Flat).eigen_smooth(true).explain(&input, &[Target::class(0)]), Err(Error::Unsupported(_))));
    }

    #[test]
    fn guided_methods_refuse_a_model_without_a_guided_forward_and_follow_the_rule_with_one() {
        let (input, features, head) = model();
        let plain = Split::new(features.clone(), head.clone());
        for method in [Method::GuidedBackprop, Method::GuidedGradCam] {
            let err = Cam::new(&plain).method(method).explain(&input, &[Target::class(0)]).unwrap_err();
            assert!(matches!(err, Error::CannotGuide { .. }) && err.to_string().contains("Split::guided"), "{err}");
        }
        // With the guided forward, the guided image is the input gradient through a ReLU that
        // passes only positive gradients: class 0 weighs channel 1 by -2, so channel 1 gets none.
        let (f, h) = (features.clone(), head.clone());
        let guided = Split::new(features, head).guided(move |x: &Tensor| h(&Activation::Relu.forward_with(&x.affine(2.0, 0.0)?, Rule::Guided)?).map(|y| {
            let _ = &f;
            y
        }));
        let e = &Cam::new(&guided).method(Method::GuidedBackprop).explain(&input, &[Target::class(0)]).unwrap()[0];
        let g = e.guided.as_ref().unwrap();
        assert_eq!(e.guided_size, (4, 4));
        let x = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (&gv, &xv)) in g.iter().zip(&x).enumerate() {
            let expected = if i < 16 && xv > 0.0 { 2.0 * 1.0 / 16.0 } else { 0.0 };
            assert!((gv - expected).abs() < 1e-6, "value {i}: {gv}, expected {expected}");
        }
        // The exact rule lets channel 1's negative gradient through where the ReLU was open.
        let exact = guided.forward_with(&candle_core::Var::from_tensor(&input).unwrap(), Rule::Exact).unwrap();
        assert_eq!(exact.dims(), [1, 2]);
    }

    #[test]
    fn explain_takes_one_image_and_says_what_to_use_for_a_batch() {
        let (input, features, head) = model();
        let split = Split::new(features, head);
        let batch = Tensor::cat(&[&input, &input], 0).unwrap();
        let err = Cam::new(&split).explain(&batch, &[Target::class(0)]).unwrap_err();
        assert!(err.to_string().contains("explain_batch"), "{err}");
        let a = split.features(&batch).unwrap();
        let e = Cam::new(&split).explain_with(&batch, &a, &[(0, Target::class(0)), (1, Target::class(1))]).unwrap();
        assert_eq!((e[0].image, e[1].image), (0, 1));
        let err = Cam::new(&split).explain_with(&batch, &a, &[(2, Target::class(0))]).unwrap_err();
        assert!(matches!(err, Error::ImageOutOfRange { image: 2, batch: 2 }), "{err}");
        let err = Cam::new(&split).explain(&input, &[Target::class(2)]).unwrap_err();
        assert!(matches!(err, Error::ClassOutOfRange { class: 2, num_classes: 2 }), "{err}");
        let _ = DType::F32;
    }

    #[test]
    fn a_non_finite_map_is_an_error_not_an_explanation() {
        let t = Target::class(0);
        let r = Request { image: 0, target: &t };
        assert!(Explanation::new("x", &r, 1.0, Map::new(1, 2, vec![0.0, f32::NAN]), None).is_err());
        assert!(Explanation::new("x", &r, 1.0, Map::new(1, 2, vec![0.0, 1.0]), Some(vec![f32::INFINITY])).is_err());
        assert!(Explanation::new("x", &r, 1.0, Map::new(1, 2, vec![0.0, 1.0]), Some(vec![1.0])).is_ok());
    }
}
