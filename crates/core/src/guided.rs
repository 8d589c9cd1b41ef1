//! Guided Backpropagation and Guided Grad-CAM (the paper's section 3.2): the gradient of the
//! target with respect to the input image through ReLUs that pass only positive gradients where
//! their input was positive, and its product with the upsampled Grad-CAM map, which makes the
//! fine-grained pixel detail class-discriminative.

use candle_core::{Tensor, Var};
use image::{Rgb, RgbImage};

use crate::cam::{target_scores, Explainable, Request};
use crate::{ops, Error, Map, Result};

/// The guided gradient of every request's score with respect to its input image: one forward and
/// one backward through the whole model (features and head) for all requests.
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
    let output = model.head(&model.features(x.as_tensor())?)?;
    let (_, total) = target_scores(&output, requests)?;
    let grads = ops::guided(|| total.backward())?;
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
        return Err(Error::Candle(candle_core::Error::Msg(format!("a gradient image needs 3 channels, got {c}"))));
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
