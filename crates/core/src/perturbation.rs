//! The CAM methods that perturb and rerun the model instead of reading one backward pass:
//! Ablation-CAM (the explained layer's channels ablated, the head rerun) and Score-CAM (the input
//! masked by each channel's map, the whole model rerun), as pytorch-grad-cam 1.5 computes them.

use candle_core::Tensor;

use crate::cam::{Context, Explainer, Request};
use crate::{CamMethod, Error, Explanation, GradCam, Map, Result, Target};

/// Ablation-CAM (Desai & Ramaswamy 2020), as pytorch-grad-cam computes it: channel k's weight is
/// (y - y_k) / y, where y_k is the target's score with channel k of the explained layer set to 0
/// (or, when the layer has negative values, to its minimum - 1e7); the map is ReLU(sum_k w_k A^k).
/// Only the head runs for the ablated copies (pytorch-grad-cam reruns the whole network), `chunk`
/// channels at a time; the context's `progress` hears the number of channels done.
#[derive(Debug, Clone, Copy)]
pub struct AblationCam {
    /// Ablated copies of the activations per run of the head.
    pub chunk: usize,
}

impl Explainer for AblationCam {
    fn name(&self) -> &'static str {
        "ablationcam"
    }

    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>> {
        let (model, chunk, progress, layout) = (cx.model, self.chunk, cx.progress, cx.model.layout());
        let activations = &layout.grid(cx.activations)?;
        let (_, k, h, w) = activations.dims4()?;
        let plane = h * w;
        let mut results = Vec::with_capacity(requests.len());
        for r in requests {
            let (a, values) = image_activations(activations, r)?;
            let like = cx.activations.narrow(0, r.image, 1)?;
            let y = score_rows(&model.head(&like)?, r.target)?[0];
            if !y.is_finite() {
                return Err(Error::NonFiniteScore { value: y });
            }
            let min = values.iter().copied().fold(f32::INFINITY, f32::min);
            let ablated_value = if min == 0.0 { 0.0 } else { min - 1e7 };
            let mut weights = Vec::with_capacity(k);
            for start in (0..k).step_by(chunk.max(1)) {
                let n = chunk.max(1).min(k - start);
                let mut data = Vec::with_capacity(n * k * plane);
                for c in start..start + n {
                    let mut copy = values.clone();
                    copy[c * plane..(c + 1) * plane].fill(ablated_value);
                    data.extend(copy);
                }
                let batch_in = Tensor::from_vec(data, (n, k, h, w), activations.device())?;
                for yk in score_rows(&model.head(&layout.ungrid(&batch_in, &like)?)?, r.target)? {
                    weights.push((y - yk) / y);
                }
                progress(start + n)?;
            }
            results.push(weighted_result("ablationcam", &a, weights, y, r)?);
        }
        Ok(results)
    }
}

/// The request's image's activations `[K, h, w]` and their values.
fn image_activations(activations: &Tensor, r: &Request<'_>) -> Result<(Tensor, Vec<f32>)> {
    let batch = activations.dim(0)?;
    if r.image >= batch {
        return Err(Error::ImageOutOfRange { image: r.image, batch });
    }
    let a = activations.get(r.image)?.contiguous()?;
    let values = a.flatten_all()?.to_vec1::<f32>()?;
    Ok((a, values))
}

/// The target's score of every row of a head output.
fn score_rows(out: &Tensor, target: &Target) -> Result<Vec<f32>> {
    (0..out.dim(0)?).map(|i| Ok(target.score(&out.get(i)?)?.to_scalar::<f32>()?)).collect()
}

/// The explanation of one request from perturbation weights: ReLU(sum_k w_k A^k) (Grad-CAM's
/// map, other weights), checked for NaN. `a`: `[K, h, w]`; `y`: the target's score.
fn weighted_result(method: &'static str, a: &Tensor, weights: Vec<f32>, y: f32, r: &Request<'_>) -> Result<Explanation> {
    let (k, h, w) = a.dims3()?;
    let a = a.unsqueeze(0)?;
    let alpha = Tensor::from_vec(weights.clone(), (1, k), a.device())?;
    let cam = Map::new(h, w, GradCam.cam(&a, &a, &alpha)?.flatten_all()?.to_vec1::<f32>()?);
    let score = if r.target.is_counterfactual() { -y } else { y };
    Explanation::new(method, r, score, cam, Some(weights))
}

/// Score-CAM (Wang et al. 2020), as pytorch-grad-cam computes it: each channel's map, upsampled to
/// the input (bilinear, corners aligned) and min-max scaled (with 1e-8), masks the input; the
/// network's score for the masked input, softmaxed over channels, is the channel's weight; the
/// map is ReLU(sum_k w_k A^k). Channels whose map is constant give an all-zero mask, so they share
/// one forward pass, and channels with identical masks share one; the others run `chunk` at a
/// time. The context's `progress` hears the channels done.
#[derive(Debug, Clone, Copy)]
pub struct ScoreCam {
    /// Masked inputs per forward pass (2 measured fastest on 2 cores).
    pub chunk: usize,
}

impl Explainer for ScoreCam {
    fn name(&self) -> &'static str {
        "scorecam"
    }

    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>> {
        let (model, input, chunk, progress) = (cx.model, cx.input, self.chunk, cx.progress);
        let activations = &cx.model.layout().grid(cx.activations)?;
        let (_, k, h, w) = activations.dims4()?;
        let (_, c, ih, iw) = input.dims4()?;
        let plane = h * w;
        let mut results = Vec::with_capacity(requests.len());
        for r in requests {
            let (a, values) = image_activations(activations, r)?;
            let x = input.get(r.image)?.flatten_all()?.to_vec1::<f32>()?; // [C * ih * iw]
            let masks: Vec<Option<Vec<f32>>> = (0..k)
                .map(|ch| {
                    let up = upsample_align_corners(&values[ch * plane..(ch + 1) * plane], h, w, ih, iw);
                    let (lo, hi) = up.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, u), &v| (l.min(v), u.max(v)));
                    if hi == lo {
                        None // (v - lo) / (0 + 1e-8) = 0 everywhere
                    } else {
                        Some(up.iter().map(|v| (v - lo) / (hi - lo + 1e-8)).collect())
                    }
                })
                .collect();
            let mut scores = vec![f32::NAN; k];
            // Constant channels: one forward of the zero input serves them all.
            if masks.iter().any(Option::is_none) {
                let zero = Tensor::zeros((1, c, ih, iw), input.dtype(), input.device())?;
                let s = score_rows(&model.head(&model.features(&zero)?)?, r.target)?[0];
                masks.iter().zip(scores.iter_mut()).filter(|(m, _)| m.is_none()).for_each(|(_, sc)| *sc = s);
            }
            // Channels with identical masks (e.g. maps with one non-zero position, or saturated ReLU6
            // maps with the same support) get identical scores: one pass for each distinct mask.
            let mut distinct: std::collections::HashMap<u64, Vec<usize>> = std::collections::HashMap::new();
            let mut same_as: Vec<(usize, usize)> = Vec::new(); // (channel, channel with the same mask)
            let mut varying: Vec<usize> = Vec::new();
            for ch in (0..k).filter(|&ch| masks[ch].is_some()) {
                let m = masks[ch].as_ref().expect("varying");
                let digest = m.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3));
                let reps = distinct.entry(digest).or_default();
                match reps.iter().find(|&&r| masks[r].as_ref() == Some(m)) {
                    Some(&r) => same_as.push((ch, r)),
                    None => {
                        reps.push(ch);
                        varying.push(ch);
                    }
                }
            }
            let mut done = k - varying.len() - same_as.len();
            progress(done)?;
            for group in varying.chunks(chunk.max(1)) {
                let mut data = Vec::with_capacity(group.len() * x.len());
                for &ch in group {
                    let m = masks[ch].as_ref().expect("varying");
                    for ci in 0..c {
                        data.extend(x[ci * ih * iw..(ci + 1) * ih * iw].iter().zip(m).map(|(v, mv)| v * mv));
                    }
                }
                let masked = Tensor::from_vec(data, (group.len(), c, ih, iw), input.device())?;
                for (&ch, s) in group.iter().zip(score_rows(&model.head(&model.features(&masked)?)?, r.target)?) {
                    scores[ch] = s;
                }
                done += group.len();
                progress(done)?;
            }
            for &(ch, r) in &same_as {
                scores[ch] = scores[r];
            }
            progress(k)?;
            // Softmax over channels.
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            let weights: Vec<f32> = exps.iter().map(|e| e / sum).collect();
            let y = score_rows(&model.head(&cx.activations.narrow(0, r.image, 1)?)?, r.target)?[0];
            results.push(weighted_result("scorecam", &a, weights, y, r)?);
        }
        Ok(results)
    }
}

/// Bilinear upsampling with corners aligned (PyTorch's `UpsamplingBilinear2d`).
fn upsample_align_corners(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let scale = |n: usize, o: usize| if o > 1 { (n - 1) as f32 / (o - 1) as f32 } else { 0.0 };
    let (sy, sx) = (scale(h, oh), scale(w, ow));
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let fy = y as f32 * sy;
        let y0 = (fy.floor() as usize).min(h - 1);
        let y1 = (y0 + 1).min(h - 1);
        let dy = fy - y0 as f32;
        for x in 0..ow {
            let fx = x as f32 * sx;
            let x0 = (fx.floor() as usize).min(w - 1);
            let x1 = (x0 + 1).min(w - 1);
            let dx = fx - x0 as f32;
            let top = src[y0 * w + x0] * (1.0 - dx) + src[y0 * w + x1] * dx;
            let bottom = src[y1 * w + x0] * (1.0 - dx) + src[y1 * w + x1] * dx;
            out.push(top * (1.0 - dy) + bottom * dy);
        }
    }
    out
}

