//! Guided Backpropagation and Guided Grad-CAM (the paper's section 3.2): the gradient of the
//! target with respect to the input image through ReLUs that pass only positive gradients where
//! their input was positive, and its product with the upsampled Grad-CAM map, which makes the
//! fine-grained pixel detail class-discriminative.
//!
//! The guided rule is part of the graph: the model's guided forward
//! ([`Explainable::forward_with`] with [`Rule::Guided`]) builds its ReLUs as guided ops. A model
//! that has none is refused, so a guided image is never the plain gradient in disguise.

use candle_core::{Tensor, Var};
use image::{Rgb, RgbImage};

use crate::cam::{target_scores, Context, Explainable, Explainer, Request};
use crate::{Error, Explanation, Map, Result, Rule};

/// The guided methods: a map from `map` (Grad-CAM, or a smoothing of it) and the guided image,
/// Guided Backpropagation's gradient or (with `product`) its product with the map.
pub struct Guided {
    /// What gives the map.
    pub map: Box<dyn Explainer>,
    /// Guided Grad-CAM (the product) rather than Guided Backpropagation.
    pub product: bool,
}

impl Explainer for Guided {
    fn name(&self) -> &'static str {
        if self.product {
            "guided-gradcam"
        } else {
            "guided-backprop"
        }
    }

    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>> {
        let mut explanations = self.map.explain(cx, requests)?;
        let guided = guided_backprop(cx.model, cx.input, requests)?;
        for (i, e) in explanations.iter_mut().enumerate() {
            let g = guided.get(i)?;
            let g = if self.product { guided_gradcam(&g, &e.cam())? } else { g };
            let (_, h, w) = g.dims3()?;
            e.guided = Some(g.flatten_all()?.to_vec1::<f32>()?);
            e.guided_size = (h, w);
        }
        Ok(explanations)
    }
}

/// The guided gradient of every request's score with respect to its input image: one forward
/// (the model's guided twin) and one backward for all requests.
///
/// # Shapes
/// `input`: `[B, C, H, W]` -> `[n, C, H, W]` (one row per request).
pub fn guided_backprop<M: Explainable + ?Sized>(model: &M, input: &Tensor, requests: &[Request<'_>]) -> Result<Tensor> {
    let batch = input.dim(0)?;
    let rows = requests
        .iter()
        .map(|r| if r.image < batch { Ok(r.image as u32) } else { Err(Error::ImageOutOfRange { image: r.image, batch }) })
        .collect::<Result<Vec<u32>>>()?;
    let index = Tensor::new(rows.as_slice(), input.device())?;
    let x = Var::from_tensor(&input.detach().index_select(&index, 0)?)?;
    let output = model.forward_with(x.as_tensor(), Rule::Guided)?;
    let (_, total) = target_scores(&output, requests)?;
    let grads = total.backward()?;
    let g = grads.get(x.as_tensor()).ok_or(Error::NoGradient)?.clone();
    if g.flatten_all()?.to_vec1::<f32>()?.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "guided backpropagation" });
    }
    Ok(g)
}

/// Guided Grad-CAM: the guided gradient (`[C, H, W]`) times the Grad-CAM map at every channel,
/// the map scaled as pytorch-grad-cam scales it: min-max normalised, upsampled to the input
/// (bilinear), normalised again.
pub fn guided_gradcam(guided: &Tensor, cam: &Map) -> Result<Tensor> {
    let (_, h, w) = guided.dims3()?;
    let up = cam.normalized().0.resize_bilinear(h, w).normalized().0;
    let mask = Tensor::from_vec(up.data, (1, h, w), guided.device())?;
    Ok(guided.broadcast_mul(&mask)?)
}

/// The usual picture of a gradient image (`[3, H, W]`), as pytorch-grad-cam's
/// `deprocess_image` makes it: centred, divided by its standard deviation (+1e-5), scaled by 0.1,
/// shifted to 0.5, clipped to [0, 1].
pub fn gradient_image(g: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = g.dims3()?;
    if c != 3 {
        return Err(Error::Shape(format!("a gradient image needs 3 channels, got {c}")));
    }
    let v = g.flatten_all()?.to_vec1::<f32>()?;
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let pixel = |x: f32| -> u8 { ((((x as f64 - mean) / (std + 1e-5)) * 0.1 + 0.5).clamp(0.0, 1.0) * 255.0) as u8 };
    let plane = h * w;
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        Rgb([pixel(v[i]), pixel(v[plane + i]), pixel(v[2 * plane + i])])
    }))
}
