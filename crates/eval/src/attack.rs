//! Adversarial noise (the paper's section 6.2): projected gradient descent with an L-infinity
//! budget in pixel space (values in [0, 1], before the network's normalisation), through the full
//! backward of the network to its input. The result is rounded to 8 bits, as a PNG stores it, and
//! checked again, so that the saved image is the attack.

use candle_core::{Device, Tensor, Var, D};
use gradcam_encoders::Network;
use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::{Error, Result};
use gradcam_core::SettingError;

/// What the attack wants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// Push this class's probability down, below `until`.
    Untargeted { class: usize, until: f32 },
    /// Push `target`'s probability up, above `until`.
    Targeted { class: usize, target: usize, until: f32 },
}

impl Goal {
    /// The class attacked (the one whose map is then explained).
    pub fn class(&self) -> usize {
        match *self {
            Goal::Untargeted { class, .. } | Goal::Targeted { class, .. } => class,
        }
    }

    fn reached(&self, probs: &[f32]) -> bool {
        match *self {
            Goal::Untargeted { class, until } => probs[class] < until,
            Goal::Targeted { target, until, .. } => probs[target] > until,
        }
    }
}

/// The smallest budget an attack takes (smaller ones cannot move an 8-bit pixel anyway).
pub const MIN_EPS: f32 = 1e-6;
/// The most steps an attack takes.
pub const MAX_STEPS: usize = 10_000;

/// Projected gradient descent under an L-infinity budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Pgd {
    /// The budget: no pixel value moves by more than this (in [0, 1] units).
    pub eps: f32,
    /// Gradient steps (at most; the attack stops once its goal holds on the 8-bit image).
    pub steps: usize,
    /// Each step moves every value by this, in the direction of its gradient's sign.
    pub step_size: f32,
    pub goal: Goal,
}

impl Pgd {
    /// The usual step for a budget and a number of steps: 2.5 eps / steps (Madry et al. 2018).
    pub fn default_step(eps: f32, steps: usize) -> f32 {
        2.5 * eps / steps.max(1) as f32
    }

    /// Refuses an attack that cannot run: eps outside (0, 1], no steps, a step that is not
    /// positive, a class outside the model's.
    pub fn check(&self, classes: usize) -> Result<()> {
        let bad = |e: SettingError| Err(Error::Setting(e));
        if !(self.eps >= MIN_EPS && self.eps <= 1.0) {
            return bad(SettingError::value("eps", self.eps, format!("the budget is a pixel-value change from {MIN_EPS} to 1, e.g. 0.0314 (8/255)")));
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return bad(SettingError::value("steps", self.steps, format!("give 1 to {MAX_STEPS} (each step is a forward and a backward pass)")));
        }
        if !(self.step_size >= MIN_EPS / MAX_STEPS as f32 && self.step_size.is_finite()) {
            return bad(SettingError::value("step_size", self.step_size, format!("must be a number of at least {:e}", MIN_EPS / MAX_STEPS as f32)));
        }
        let (class, other, until) = match self.goal {
            Goal::Untargeted { class, until } => (class, None, until),
            Goal::Targeted { class, target, until } => (class, Some(target), until),
        };
        for c in std::iter::once(class).chain(other) {
            if c >= classes {
                return Err(gradcam_core::Error::ClassOutOfRange { class: c, num_classes: classes }.into());
            }
        }
        if other == Some(class) {
            return bad(SettingError::value("target", class, "is the class attacked; give another class"));
        }
        if !(until > 0.0 && until < 1.0) {
            return bad(SettingError::value("until", until, "must be a probability strictly between 0 and 1"));
        }
        Ok(())
    }
}

/// An attack's outcome.
#[derive(Debug, Clone)]
pub struct Adversarial {
    /// `[1, 3, H, W]` in [0, 1], every value a multiple of 1/255 (what the PNG holds).
    pub pixels: Tensor,
    /// The class probabilities of the adversarial image.
    pub probs: Vec<f32>,
    /// Whether the goal holds on it.
    pub success: bool,
    /// Gradient steps taken.
    pub steps: usize,
    /// Times the 8-bit rounding undid an attack that held before rounding (each time the attack
    /// went on from the rounded image).
    pub rounding_undid: usize,
    /// Largest change of a value, and the L2 norm of the change (both in [0, 1] units).
    pub linf: f32,
    pub l2: f32,
}

/// An image as `[1, 3, H, W]` values in [0, 1].
pub fn pixels_of(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = px[c] as f32 / 255.0;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h as usize, w as usize), &Device::Cpu)?)
}

/// `[1, 3, H, W]` values in [0, 1] as an 8-bit image (rounded).
pub fn image_of(pixels: &Tensor) -> Result<RgbImage> {
    let (_, _, h, w) = pixels.dims4()?;
    let v = pixels.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    let q = |x: f32| (x * 255.0).round().clamp(0.0, 255.0) as u8;
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        Rgb([q(v[i]), q(v[plane + i]), q(v[2 * plane + i])])
    }))
}

/// The network's normalisation of pixel values, differentiably.
pub(crate) fn normalize(net: &Network, x: &Tensor) -> Result<Tensor> {
    let pp = net.preprocess();
    let mean = Tensor::new(&pp.mean, x.device())?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&pp.std, x.device())?.reshape((1, 3, 1, 1))?;
    Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?)
}

/// Class probabilities of pixel values `[1, 3, H, W]`.
pub fn probabilities(net: &Network, x: &Tensor) -> Result<Vec<f32>> {
    let logits = net.forward(&normalize(net, x)?)?;
    // As the objective computes them, so that both agree on whether a goal holds.
    let probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.exp()?.squeeze(0)?.to_vec1::<f32>()?;
    if probs.iter().any(|p| !p.is_finite()) {
        return Err(Error::Data("the model produced non-finite scores; are the weights corrupt?".into()));
    }
    Ok(probs)
}

/// The attack's objective at `x` and its gradient with respect to the pixel values: log p of the
/// class (untargeted, to descend) or of the target (targeted, to ascend); with the probabilities.
pub fn objective_gradient(net: &Network, x: &Tensor, goal: &Goal) -> Result<(f32, Tensor, Vec<f32>)> {
    let var = Var::from_tensor(&x.detach())?;
    let logits = net.forward(&normalize(net, var.as_tensor())?)?; // [1, classes]
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?.squeeze(0)?;
    let k = match *goal {
        Goal::Untargeted { class, .. } => class,
        Goal::Targeted { target, .. } => target,
    };
    let objective = logp.narrow(0, k, 1)?.sum_all()?;
    let grads = objective.backward()?;
    let g = grads.get(var.as_tensor()).ok_or_else(|| Error::Data("no gradient reached the input".into()))?.clone();
    let probs = logp.exp()?.to_vec1::<f32>()?;
    if probs.iter().any(|p| !p.is_finite()) {
        return Err(Error::Data("the model produced non-finite scores; are the weights corrupt?".into()));
    }
    Ok((objective.to_scalar::<f32>()?, g, probs))
}

/// Rounds to 8 bits inside the budget: the multiples of 1/255 within [x0 - eps, x0 + eps] and
/// [0, 1] (`x0` itself is 8-bit).
fn quantize(x: &Tensor, lo: &Tensor, hi: &Tensor) -> Result<Tensor> {
    Ok((x * 255.0)?.round()?.maximum(lo)?.minimum(hi)?.affine(1.0 / 255.0, 0.0)?)
}

/// Runs the attack from the 8-bit image `x0` (`[1, 3, H, W]` in [0, 1]).
pub fn attack(net: &Network, x0: &Tensor, pgd: &Pgd) -> Result<Adversarial> {
    pgd.check(net.num_classes())?;
    let x0 = x0.detach();
    // Bounds in float and, for rounding, in 8-bit steps.
    let lo = (&x0 - pgd.eps as f64)?.clamp(0f32, 1f32)?;
    let hi = (&x0 + pgd.eps as f64)?.clamp(0f32, 1f32)?;
    let lo8 = (&lo * 255.0)?.affine(1.0, -1e-4)?.ceil()?;
    let hi8 = (&hi * 255.0)?.affine(1.0, 1e-4)?.floor()?;
    let sign = match pgd.goal {
        Goal::Untargeted { .. } => -1.0,
        Goal::Targeted { .. } => 1.0,
    };
    let mut x = x0.clone();
    let (mut steps, mut rounding_undid) = (0, 0);
    let (pixels, probs) = loop {
        // The budget of steps is spent: the rounded image is the result, met goal or not.
        if steps == pgd.steps {
            let q = quantize(&x, &lo8, &hi8)?;
            let qp = probabilities(net, &q)?;
            break (q, qp);
        }
        let (_, g, probs) = objective_gradient(net, &x, &pgd.goal)?;
        if pgd.goal.reached(&probs) {
            let q = quantize(&x, &lo8, &hi8)?;
            let qp = probabilities(net, &q)?;
            if pgd.goal.reached(&qp) || rounding_undid >= pgd.steps {
                break (q, qp);
            }
            // Rounding undid it: go on from the rounded image (its gradient is taken next).
            rounding_undid += 1;
            x = q;
            continue;
        }
        x = (&x + (g.sign()? * (sign * pgd.step_size as f64))?)?.maximum(&lo)?.minimum(&hi)?;
        steps += 1;
    };
    let diff = (&pixels - &x0)?;
    let linf = diff.abs()?.max_all()?.to_scalar::<f32>()?;
    let l2 = diff.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if !(linf.is_finite() && l2.is_finite()) {
        return Err(Error::Data("the attack produced non-finite pixels; are the weights corrupt?".into()));
    }
    Ok(Adversarial { success: pgd.goal.reached(&probs), pixels, probs, steps, rounding_undid, linf, l2 })
}
