//! The pipeline written once: the features/head split, how a score is picked, the method traits
//! ([`Explainer`], and [`CamMethod`] for the gradient-based ones) and [`explain`], the one
//! backward pass through the head they share.

use candle_core::{Tensor, Var, D};

use crate::{Error, Explanation, Layout, Map, Result, Rule, Target};

/// A model split at the layer we explain.
pub trait Explainable {
    /// Activations A of the explained layer.
    ///
    /// # Shapes
    /// `input`: the model's input batch -> `[batch, K, h, w]`.
    fn features(&self, input: &Tensor) -> Result<Tensor>;

    /// The rest of the model, run from the activations: one row of scores per batch row. Rows must
    /// not interact (no batch statistics), so that replicated rows give independent gradients.
    ///
    /// # Shapes
    /// `activations`: `[n, K, h, w]` -> `[n, ...]`.
    fn head(&self, activations: &Tensor) -> Result<Tensor>;

    /// The gradients of several scores of one image at once, for heads with a hand-written
    /// backward that takes many seeds in one pass (cheaper than replicating the activations once
    /// per score and running candle's backward): `seeds` are `(index, sign)` into the flattened
    /// output row, as [`Score::element`] gives them.
    ///
    /// Returns `sign * row[index]` for each seed and their gradients, or `None` (the default) to
    /// let [`explain`] take the general path. Must equal that path: a test per implementation
    /// compares them.
    ///
    /// # Shapes
    /// `activations`: `[1, K, h, w]` -> `[n]` and `[n, K, h, w]`.
    fn head_gradients(&self, _activations: &Tensor, _seeds: &[(usize, f32)]) -> Result<Option<(Vec<f32>, Tensor)>> {
        Ok(None)
    }

    /// The whole model, input to output rows, with the backward of its ReLUs following `rule`:
    /// Guided Backpropagation differentiates `forward_with(x, Rule::Guided)`. The default runs
    /// `head(features(x))` for [`Rule::Exact`] and refuses [`Rule::Guided`], because it cannot
    /// know that the model's ReLUs follow the rule: a model that supports the guided methods
    /// builds them with it ([`gradcam_kernels::Activation::forward_with`] and the kernels' other
    /// `forward_with`s), and candle's own `relu` never does.
    fn forward_with(&self, input: &Tensor, rule: Rule) -> Result<Tensor> {
        match rule {
            Rule::Exact => self.head(&self.features(input)?),
            Rule::Guided => Err(Error::CannotGuide { reason: "this model gives no guided forward (Explainable::forward_with with Rule::Guided; for a Split, Split::guided)".into() }),
        }
    }

    /// Where the grid lies in [`Explainable::features`]' activations: [`Layout::Grid`] (the
    /// default) when they are `[n, K, h, w]`; a transformer's layer packs its tokens with what
    /// else its head reads ([`Layout::Packed`]). The methods read the grid, the head gets the
    /// model's own layout.
    fn layout(&self) -> Layout {
        Layout::Grid
    }

    /// The attention probabilities of every attention block for the single image `input`, with
    /// their gradients for `score` (a differentiable score of the output row) when it is given:
    /// what [`crate::Rollout`] and [`crate::Relevance`] read. The default: none (an error naming
    /// it), as for every model that is not a transformer.
    fn attention(&self, _input: &Tensor, _score: Option<crate::attention::ScoreFn<'_>>) -> Result<crate::Attention> {
        Err(Error::NoAttention { reason: "this model gives no attention probabilities (Explainable::attention)".into() })
    }
}

/// A score y^c of one row of the head's output, for targets other than one element of the row
/// (classes, words and answers are [`Target`]s already): give it to [`Target::custom`].
pub trait Score {
    /// A scalar tensor, differentiable with respect to `row`.
    fn score(&self, row: &Tensor) -> Result<Tensor>;
    /// `Some((index, sign))` when the score is `sign * row[index]` of the flattened row: then
    /// [`explain`] seeds the backward with a one-hot matrix instead of building a graph of one
    /// selection per request (which costs more than the backward itself for small heads).
    fn element(&self) -> Option<(usize, f32)> {
        None
    }
}

/// A gradient-based CAM method: turns the explained layer's activations and their gradients
/// into weights alpha_k and a map. Every `CamMethod` is an [`Explainer`] (run by [`explain`]), so
/// it can be given to [`crate::Cam::method`] as it is.
pub trait CamMethod {
    /// The method's name (`gradcam`, `gradcam++`, ...).
    fn name(&self) -> &'static str;

    /// alpha: `[n, K, h, w]` x2 -> `[n, K]`.
    fn weights(&self, activations: &Tensor, grads: &Tensor) -> Result<Tensor>;

    /// The map at the layer's resolution: by default ReLU(sum_k alpha_k A^k).
    ///
    /// # Shapes
    /// `activations`, `grads`: `[n, K, h, w]`; `alpha`: `[n, K]` -> `[n, h, w]`.
    fn cam(&self, activations: &Tensor, _grads: &Tensor, alpha: &Tensor) -> Result<Tensor> {
        weighted_sum(activations, alpha)
    }
}

impl<M: CamMethod + ?Sized> CamMethod for Box<M> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn weights(&self, activations: &Tensor, grads: &Tensor) -> Result<Tensor> {
        (**self).weights(activations, grads)
    }

    fn cam(&self, activations: &Tensor, grads: &Tensor, alpha: &Tensor) -> Result<Tensor> {
        (**self).cam(activations, grads, alpha)
    }
}

/// ReLU(sum_k alpha_k A^k) of every row: on the CPU one pass of `map += alpha_k * A^k` over the
/// activations (candle's batched GEMV or channel reduction costs several times more at the sizes
/// explained here); elsewhere one GEMV per row.
///
/// # Shapes
/// `activations`: `[n, K, h, w]`, `alpha`: `[n, K]` -> `[n, h, w]`.
pub fn weighted_sum(activations: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let (n, k, h, w) = activations.dims4()?;
    let weights = alpha.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    if weights.len() != n || weights.iter().any(|row| row.len() != k) {
        return Err(Error::Shape(format!("weights {:?} do not fit activations {:?}", alpha.dims(), activations.dims())));
    }
    let plane = h * w;
    let mut acts = activations.to_dtype(candle_core::DType::F32)?;
    // Rows either contiguous or one row broadcast over the batch (explanations of one image).
    let rows_of = |t: &Tensor| {
        let layout = t.layout();
        let stride = layout.stride();
        (stride[1..] == [plane, w, 1] && (stride[0] == k * plane || stride[0] == 0 || n == 1)).then(|| (layout.start_offset(), stride[0]))
    };
    if rows_of(&acts).is_none() {
        acts = acts.contiguous()?;
    }
    let (storage, _) = acts.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, row_stride))) = (&*storage, rows_of(&acts)) else {
        drop(storage);
        let a = acts.contiguous()?.reshape((n, k, h * w))?;
        let weighted = alpha.unsqueeze(1)?.contiguous()?.matmul(&a)?; // [n, 1, hw]
        return Ok(weighted.reshape((n, h, w))?.relu()?);
    };
    let data = cpu.as_slice::<f32>()?;
    let mut out = vec![0.0f32; n * plane];
    for (r, (map, alpha)) in out.chunks_exact_mut(plane).zip(&weights).enumerate() {
        let a = &data[start + r * row_stride..start + r * row_stride + k * plane];
        for (ak, &wk) in a.chunks_exact(plane).zip(alpha) {
            map.iter_mut().zip(ak).for_each(|(m, v)| *m += wk * v);
        }
        map.iter_mut().for_each(|m| *m = m.max(0.0));
    }
    Ok(Tensor::from_vec(out, (n, h, w), activations.device())?)
}

/// Grad-CAM: alpha_k is the spatial mean of dy/dA^k (paper eq. 1).
#[derive(Debug, Clone, Copy, Default)]
pub struct GradCam;

impl CamMethod for GradCam {
    fn name(&self) -> &'static str {
        "gradcam"
    }

    fn weights(&self, _activations: &Tensor, grads: &Tensor) -> Result<Tensor> {
        Ok(grads.flatten_from(2)?.mean(D::Minus1)?)
    }
}

/// What a method is given: the model, its input batch, the explained layer's activations of that
/// batch (`[B, K, h, w]`), and where to report progress (units of work done, such as channels):
/// its answer is `Err(Error::Cancelled)` once the work is cancelled, so a long method stops at its
/// next report (`progress(done)?`).
/// Gradients are computed by the methods that read them (through [`explain`]: one backward pass
/// through the head).
pub struct Context<'a> {
    /// The model.
    pub model: &'a dyn Explainable,
    /// Its input batch `[B, C, H, W]`.
    pub input: &'a Tensor,
    /// The explained layer's activations of the batch.
    pub activations: &'a Tensor,
    /// Hears the units of work done; an error (cancelled) stops the method.
    pub progress: &'a dyn Fn(usize) -> Result<()>,
}

/// A way of explaining: one [`Explanation`] per request, from what the context gives. Every
/// method is one (the gradient-based family through [`CamMethod`], the smoothings, Ablation-CAM,
/// Score-CAM and the guided methods), and so is yours: give it to [`crate::Cam::method`] and the
/// pipeline around it (targets, pictures, reports) is the same as for the built-in ones.
pub trait Explainer {
    /// The method's name, as `--json` reports it and file names carry it.
    fn name(&self) -> &'static str;

    /// One explanation per request, in their order.
    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>>;
}

impl<M: CamMethod> Explainer for M {
    fn name(&self) -> &'static str {
        CamMethod::name(self)
    }

    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>> {
        explain(cx.model, cx.activations, requests, self)
    }
}

/// One explanation to compute: which image of the batch, and which target.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The image's row in the batch.
    pub image: usize,
    /// What is explained.
    pub target: &'a Target,
}

/// Explains every request with one backward pass through the head only.
///
/// `activations` are the explained layer's activations for the whole batch (`[B, K, h, w]`, from
/// [`Explainable::features`]); they are replicated per request, detached and wrapped in a `Var`,
/// so the backbone is never differentiated.
pub fn explain<M: Explainable + ?Sized, C: CamMethod + ?Sized>(model: &M, activations: &Tensor, requests: &[Request<'_>], method: &C) -> Result<Vec<Explanation>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let batch = activations.dim(0)?;
    let rows = requests
        .iter()
        .map(|r| if r.image < batch { Ok(r.image as u32) } else { Err(Error::ImageOutOfRange { image: r.image, batch }) })
        .collect::<Result<Vec<u32>>>()?;
    let (acts, score_values, grads) = match head_gradients(model, activations, requests)? {
        // One image: its activations broadcast, not copied, once per request.
        Some((scores, grads)) => (activations.detach().narrow(0, requests[0].image, 1)?.broadcast_as(grads.shape())?, scores, grads),
        None => {
            let index = Tensor::new(rows.as_slice(), activations.device())?;
            let acts = activations.detach().index_select(&index, 0)?; // [n, K, h, w]
            let a = Var::from_tensor(&acts)?;
            let output = model.head(a.as_tensor())?; // [n, ...]
            let (score_values, total) = target_scores(&output, requests)?;
            let grads = total.backward()?;
            (acts, score_values, grads.get(a.as_tensor()).ok_or(Error::NoGradient)?.clone())
        }
    };
    // The methods read the grid [n, K, h, w] (for a transformer, its patch tokens).
    let layout = model.layout();
    let (acts, grads) = (layout.grid(&acts)?, layout.grid(&grads)?);
    let alpha = method.weights(&acts, &grads)?; // [n, K]
    let cams = method.cam(&acts, &grads, &alpha)?; // [n, h, w]
    let (_, h, w) = cams.dims3()?;
    let alpha = alpha.to_vec2::<f32>()?;
    let cams = cams.flatten_from(1)?.to_vec2::<f32>()?;

    let mut results = Vec::with_capacity(requests.len());
    for ((r, map), (alpha, score)) in requests.iter().zip(cams).zip(alpha.into_iter().zip(score_values)) {
        let score = if r.target.is_counterfactual() { -score } else { score };
        results.push(Explanation::new(method.name(), r, score, Map::new(h, w, map), Some(alpha))?);
    }
    Ok(results)
}

/// [`Explainable::head_gradients`] when every request is one element of the same image's output
/// and the head implements it.
fn head_gradients<M: Explainable + ?Sized>(model: &M, activations: &Tensor, requests: &[Request<'_>]) -> Result<Option<(Vec<f32>, Tensor)>> {
    let image = requests[0].image;
    if requests.iter().any(|r| r.image != image) {
        return Ok(None);
    }
    let Some(seeds) = requests.iter().map(|r| r.target.element()).collect::<Option<Vec<_>>>() else { return Ok(None) };
    let Some((scores, grads)) = model.head_gradients(&activations.narrow(0, image, 1)?.detach(), &seeds)? else { return Ok(None) };
    if let Some(&value) = scores.iter().find(|v| !v.is_finite()) {
        return Err(Error::NonFiniteScore { value });
    }
    Ok(Some((scores, grads)))
}

/// The requests' scores read from the head's output (one row per request), and their sum, the
/// root of the backward.
pub(crate) fn target_scores(output: &Tensor, requests: &[Request<'_>]) -> Result<(Vec<f32>, Tensor)> {
    let elements: Option<Vec<(usize, f32)>> = requests.iter().map(|r| r.target.element()).collect();
    let (score_values, total) = match elements {
        Some(elements) => {
            // Each score is one element of its row: read the values, and seed the backward with
            // a one-hot matrix (one multiply and one sum in the graph, whatever n).
            let flat = output.flatten_from(1)?; // [n, L]
            let l = flat.dim(1)?;
            if let Some(&(class, _)) = elements.iter().find(|(i, _)| *i >= l) {
                return Err(Error::ClassOutOfRange { class, num_classes: l });
            }
            let values = flat.to_vec2::<f32>()?;
            let scores: Vec<f32> = elements.iter().enumerate().map(|(r, &(i, sign))| sign * values[r][i]).collect();
            let mut seed = vec![0f32; requests.len() * l];
            for (r, &(i, sign)) in elements.iter().enumerate() {
                seed[r * l + i] = sign;
            }
            let seed = Tensor::from_vec(seed, (requests.len(), l), output.device())?;
            (scores, (flat * seed)?.sum_all()?)
        }
        None => {
            let mut scores = Vec::with_capacity(requests.len());
            for (i, r) in requests.iter().enumerate() {
                scores.push(r.target.score(&output.get(i)?)?);
            }
            let scores = Tensor::stack(&scores, 0)?; // [n]
            (scores.to_vec1::<f32>()?, scores.sum_all()?)
        }
    };
    if let Some(&value) = score_values.iter().find(|v| !v.is_finite()) {
        return Err(Error::NonFiniteScore { value });
    }
    Ok((score_values, total))
}


#[cfg(test)]
mod tests {
    //! dy/dA through the pipeline: Grad-CAM's weights against finite differences of the head, and
    //! one backward for many targets and images against one each.

    use candle_core::{Device, Tensor};
    use gradcam_kernels::{Activation, Conv2d, Linear, MaxPool2d, Padding};

    use super::*;
    use crate::Target;

    /// `shape` filled from a multiplicative congruential stream in [-1, 1), with no two values
    /// alike (so that max-pool windows have one winner).
    fn tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut s = seed.wrapping_add(1).wrapping_mul(6364136223846793005);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0 + i as f32 * 1e-6
        }).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// A small CNN split after its first convolution: the head is conv -> relu -> max-pool -> linear.
    struct Tiny {
        conv1: Conv2d,
        conv2: Conv2d,
        fc: Linear,
    }

    impl Tiny {
        fn new() -> Self {
            Tiny {
                conv1: Conv2d::new(&tensor(&[6, 3, 3, 3], 41), Some(&tensor(&[6], 42)), 1, 1, Padding::Symmetric(1), Activation::Relu).unwrap(),
                conv2: Conv2d::new(&tensor(&[5, 6, 3, 3], 43), Some(&tensor(&[5], 44)), 1, 1, Padding::Same, Activation::Relu6).unwrap(),
                fc: Linear::new(&tensor(&[4, 5 * 4 * 4], 45), Some(&tensor(&[4], 46)), Activation::Identity).unwrap(),
            }
        }
    }

    impl Explainable for Tiny {
        fn features(&self, input: &Tensor) -> crate::Result<Tensor> {
            Ok(self.conv1.forward(input)?)
        }
        fn head(&self, a: &Tensor) -> crate::Result<Tensor> {
            let h = self.conv2.forward(a)?;
            let h = MaxPool2d { kernel: 2, stride: 2, padding: 0 }.forward(&h)?;
            Ok(self.fc.forward(&h.flatten_from(1)?)?)
        }
    }

    #[test]
    fn grad_cam_gradient_matches_finite_differences_on_a_small_model() {
        let model = Tiny::new();
        let input = tensor(&[1, 3, 8, 8], 47);
        let a = model.features(&input).unwrap(); // [1, 6, 8, 8]
        let target = Target::class(2);
        let r = explain(&model, &a, &[Request { image: 0, target: &target }], &GradCam).unwrap();
        // alpha_k is the spatial mean of dy/dA^k: compare it with finite differences of y.
        let base = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), a.dims(), &Device::Cpu).unwrap();
            model.head(&t).unwrap().get(0).unwrap().get(2).unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let eps = 1e-2;
        for k in 0..6 {
            let mut mean = 0.0;
            for i in 0..64 {
                let (mut p, mut m) = (base.clone(), base.clone());
                p[k * 64 + i] += eps;
                m[k * 64 + i] -= eps;
                mean += (y(&p) - y(&m)) / (2.0 * eps as f64) / 64.0;
            }
            assert!((mean - r[0].weights.as_deref().unwrap()[k] as f64).abs() < 2e-3, "alpha_{k}: {} vs finite differences {mean}", r[0].weights.as_deref().unwrap()[k]);
        }
        // And the map is ReLU(sum_k alpha_k A^k).
        let acts = a.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        for (i, &v) in r[0].cam().data.iter().enumerate() {
            let s: f32 = (0..6).map(|k| r[0].weights.as_deref().unwrap()[k] * acts[k][i / 8][i % 8]).sum();
            assert!((v - s.max(0.0)).abs() < 1e-5);
        }
    }

    #[test]
    fn several_targets_and_images_in_one_backward_equal_separate_ones() {
        let model = Tiny::new();
        let input = Tensor::cat(&[tensor(&[1, 3, 8, 8], 51), tensor(&[1, 3, 8, 8], 52)], 0).unwrap();
        let a = model.features(&input).unwrap(); // [2, 6, 8, 8]
        let t0 = Target::class(0);
        let t3 = Target::class(3);
        let c3 = Target::class(3).counterfactual();
        let targets: [(usize, &Target); 4] = [(0, &t0), (1, &t3), (0, &t3), (1, &c3)];
        let requests: Vec<Request> = targets.iter().map(|&(image, target)| Request { image, target }).collect();
        let together = explain(&model, &a, &requests, &GradCam).unwrap();
        for (i, &(image, target)) in targets.iter().enumerate() {
            let single = explain(&model, &a.narrow(0, image, 1).unwrap(), &[Request { image: 0, target }], &GradCam).unwrap();
            assert_eq!(together[i].weights.as_deref().unwrap().len(), 6);
            for (x, y) in together[i].weights.as_deref().unwrap().iter().zip(single[0].weights.as_deref().unwrap()) {
                assert!((x - y).abs() < 1e-6);
            }
            assert_eq!(together[i].cam(), single[0].cam());
        }
        // The counterfactual's weights are the negated weights.
        for (x, y) in together[3].weights.as_deref().unwrap().iter().zip(together[1].weights.as_deref().unwrap()) {
            assert_eq!(*x, -*y);
        }
    }

    #[test]
    fn out_of_range_class_and_image_are_errors() {
        let model = Tiny::new();
        let a = model.features(&tensor(&[1, 3, 8, 8], 61)).unwrap();
        let bad = Target::class(4);
        let err = explain(&model, &a, &[Request { image: 0, target: &bad }], &GradCam).unwrap_err();
        assert!(err.to_string().contains("class 4 is out of range"), "{err}");
        let ok = Target::class(0);
        let err = explain(&model, &a, &[Request { image: 1, target: &ok }], &GradCam).unwrap_err();
        assert!(err.to_string().contains("image 1"), "{err}");
    }
}
