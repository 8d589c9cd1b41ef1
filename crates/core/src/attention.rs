//! The transformer methods, read from the attention probabilities rather than one layer:
//! attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020) and
//! gradient-weighted attention relevance (Chefer, Gur & Wolf, "Generic Attention-model
//! Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021). Both
//! read the class token's row over the patch tokens, on the same grid as Grad-CAM's map.

use candle_core::Tensor;

use crate::cam::{Context, Explainer, Request};
use crate::{Error, Explanation, Map, Result};

/// What a model gives the attention methods for one image ([`crate::Explainable::attention`]).
#[derive(Debug, Clone)]
pub struct Attention {
    /// Each block's attention probabilities `[heads, T, T]` (rows sum to 1), in order.
    pub probs: Vec<Tensor>,
    /// Their gradients for the score asked for (same shapes), when one was.
    pub grads: Option<Vec<Tensor>>,
    /// The model's output row `[1, ...]` for the image.
    pub output: Tensor,
    /// Tokens before the grid (the class token is token 0).
    pub prefix: usize,
    /// The grid the other tokens lie on, row-major.
    pub grid: (usize, usize),
}

/// A score of the output row, differentiable: what the relevance's gradients are of.
pub type ScoreFn<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// Attention rollout: the product over blocks of (I + the heads' mean attention) / 2, read from
/// the class token's row. Class-agnostic (no gradient): every target of an image gets the same map.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rollout;

/// Gradient-weighted relevance: R = I, then R += mean_heads(relu(dA * A)) @ R for each block
/// (A its attention probabilities, dA their gradient for the target), read from the class
/// token's row.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relevance;

/// `[heads, T, T]` as rows of f64, the heads' mean of `f(a, g)` per element.
fn head_mean(a: &Tensor, g: Option<&Tensor>) -> Result<Vec<f64>> {
    let (heads, t, t2) = a.dims3()?;
    if t != t2 {
        return Err(Error::Shape(format!("attention probabilities {:?} are not square", a.dims())));
    }
    let av = a.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let gv = g.map(|g| g.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()?;
    let mut out = vec![0f64; t * t];
    for h in 0..heads {
        for (i, o) in out.iter_mut().enumerate() {
            let k = h * t * t + i;
            *o += match &gv {
                Some(gv) => (av[k] as f64 * gv[k] as f64).max(0.0),
                None => av[k] as f64,
            };
        }
    }
    out.iter_mut().for_each(|v| *v /= heads as f64);
    Ok(out)
}

/// `a @ b` of two `t x t` matrices.
fn matmul(a: &[f64], b: &[f64], t: usize) -> Vec<f64> {
    let mut out = vec![0f64; t * t];
    for i in 0..t {
        for k in 0..t {
            let aik = a[i * t + k];
            if aik != 0.0 {
                for j in 0..t {
                    out[i * t + j] += aik * b[k * t + j];
                }
            }
        }
    }
    out
}

fn explain_attention(cx: &Context<'_>, requests: &[Request<'_>], name: &'static str, gradients: bool) -> Result<Vec<Explanation>> {
    let mut results = Vec::with_capacity(requests.len());
    for r in requests {
        let batch = cx.input.dim(0)?;
        if r.image >= batch {
            return Err(Error::ImageOutOfRange { image: r.image, batch });
        }
        let input = cx.input.narrow(0, r.image, 1)?;
        let target = r.target;
        let score = |out: &Tensor| -> Result<Tensor> { target.score(&out.get(0)?) };
        let att = cx.model.attention(&input, gradients.then_some(&score as ScoreFn))?;
        let t = att.prefix + att.grid.0 * att.grid.1;
        if att.prefix == 0 {
            return Err(Error::NoAttention { reason: format!("{name} reads the class token's row, and this model's tokens have none (no prefix before its {}x{} grid)", att.grid.0, att.grid.1) });
        }
        if att.probs.is_empty() {
            return Err(Error::NoAttention { reason: "the model has no attention block".into() });
        }
        let eye: Vec<f64> = (0..t * t).map(|i| if i / t == i % t { 1.0 } else { 0.0 }).collect();
        let mut joint = eye.clone();
        for (b, a) in att.probs.iter().enumerate() {
            if a.dim(1)? != t {
                return Err(Error::Shape(format!("block {b}'s attention is over {} tokens, not the {t} of the grid", a.dim(1)?)));
            }
            if gradients {
                let g = att.grads.as_ref().and_then(|g| g.get(b)).ok_or(Error::NoGradient)?;
                let cam = head_mean(a, Some(g))?;
                let step = matmul(&cam, &joint, t);
                joint.iter_mut().zip(step).for_each(|(j, s)| *j += s);
            } else {
                let mean = head_mean(a, None)?;
                let half: Vec<f64> = mean.iter().zip(&eye).map(|(m, e)| (m + e) / 2.0).collect();
                joint = matmul(&half, &joint, t);
            }
        }
        let map: Vec<f32> = joint[att.prefix..t].iter().map(|&v| v as f32).collect();
        let s = target.score(&att.output.get(0)?)?.to_scalar::<f32>()?;
        let s = if target.is_counterfactual() { -s } else { s };
        results.push(Explanation::new(name, r, s, Map::new(att.grid.0, att.grid.1, map), None)?);
    }
    Ok(results)
}

impl Explainer for Rollout {
    fn name(&self) -> &'static str {
        "rollout"
    }

    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>> {
        explain_attention(cx, requests, "rollout", false)
    }
}

impl Explainer for Relevance {
    fn name(&self) -> &'static str {
        "relevance"
    }

    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>> {
        explain_attention(cx, requests, "relevance", true)
    }
}

/// Runs a transformer once on the single image `input` and records its attention: `run` computes
/// the output rows and passes each block's attention probabilities (`[1, heads, T, T]` or
/// `[heads, T, T]`, as they come out of the softmax) through the function it is given, using
/// what that returns in their place. With `score`, the probabilities are tapped
/// ([`gradcam_kernels::tap`]) and the score's backward gives their gradients (the total
/// derivative, every path after them kept). `prefix` and `grid`: the token layout.
pub fn record(input: &Tensor, score: Option<ScoreFn<'_>>, prefix: usize, grid: (usize, usize), run: &dyn Fn(&Tensor, &dyn Fn(Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor>) -> Result<Attention> {
    use std::sync::{Arc, Mutex};
    type Slot = Arc<Mutex<Option<Tensor>>>;
    let taps: Mutex<Vec<(Tensor, Option<Slot>)>> = Mutex::new(Vec::new());
    let gradients = score.is_some();
    let attend = |a: Tensor| -> candle_core::Result<Tensor> {
        let mut taps = taps.lock().unwrap_or_else(|e| e.into_inner());
        if gradients {
            let (y, slot) = gradcam_kernels::tap(&a.to_dtype(candle_core::DType::F32)?)?;
            taps.push((y.clone(), Some(slot)));
            Ok(y)
        } else {
            taps.push((a.clone(), None));
            Ok(a)
        }
    };
    let x = if gradients { candle_core::Var::from_tensor(input)?.as_tensor().clone() } else { input.clone() };
    let output = run(&x, &attend)?.flatten_from(1)?;
    if let Some(score) = score {
        score(&output)?.backward()?;
    }
    let taps = taps.into_inner().unwrap_or_else(|e| e.into_inner());
    let square = |t: &Tensor| -> Result<Tensor> {
        let t_len = t.dim(candle_core::D::Minus1)?;
        Ok(t.detach().reshape(((), t_len, t_len))?)
    };
    let probs = taps.iter().map(|(t, _)| square(t)).collect::<Result<Vec<_>>>()?;
    let grads = if gradients {
        Some(
            taps.iter()
                .map(|(_, s)| {
                    let g = s.as_ref().and_then(|s| s.lock().unwrap_or_else(|e| e.into_inner()).take()).ok_or(Error::NoGradient)?;
                    square(&g)
                })
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    Ok(Attention { probs, grads, output: output.detach(), prefix, grid })
}
