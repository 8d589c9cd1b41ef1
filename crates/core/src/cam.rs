//! The pipeline written once: the features/head split, how a score is picked, the method traits
//! ([`Explainer`], and [`CamMethod`] for the gradient-based ones) and [`explain`], the one
//! backward pass through the head they share.

use candle_core::{Tensor, Var, D};

use crate::{Error, Explanation, Map, Result, Rule, Target};

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
/// batch (`[B, K, h, w]`), and where to report progress (units of work done, such as channels).
/// Gradients are computed by the methods that read them (through [`explain`]: one backward pass
/// through the head).
pub struct Context<'a> {
    /// The model.
    pub model: &'a dyn Explainable,
    /// Its input batch `[B, C, H, W]`.
    pub input: &'a Tensor,
    /// The explained layer's activations of the batch.
    pub activations: &'a Tensor,
    /// Hears the units of work done.
    pub progress: &'a dyn Fn(usize),
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
