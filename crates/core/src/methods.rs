//! The gradient-based members of the CAM family, written as pytorch-grad-cam 1.5 computes them
//! (same epsilons, same ReLU placement), each a small [`CamMethod`] over the shared pipeline.
//!
//! Methods whose map is not a channel-weighted sum (HiResCAM, LayerCAM, EigenCAM) still report
//! per-channel weights, so that neuron reports have something to rank: the mean over positions of
//! the element-wise weights they use (HiResCAM: dy/dA, LayerCAM: ReLU(dy/dA), EigenCAM: the first
//! principal direction).

use candle_core::{Tensor, D};

use crate::{CamMethod, Result};

/// Grad-CAM++ (Chattopadhay et al. 2018, eq. 19): alpha_k = sum_ij ReLU(g) * g^2 / (2 g^2 +
/// sum_ab A * g^3 + 1e-6), with the ratio zeroed where g = 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct GradCamPlusPlus;

impl CamMethod for GradCamPlusPlus {
    fn name(&self) -> &'static str {
        "gradcam++"
    }

    fn weights(&self, activations: &Tensor, grads: &Tensor) -> Result<Tensor> {
        let g2 = grads.sqr()?;
        let g3 = (&g2 * grads)?;
        let sum_a = activations.sum_keepdim((2, 3))?; // [n, K, 1, 1]
        let denom = ((g2.affine(2.0, 0.0)? + g3.broadcast_mul(&sum_a)?)? + 1e-6)?;
        let aij = (&g2 / denom)?;
        let nonzero = grads.ne(0f32)?.to_dtype(grads.dtype())?;
        let aij = (aij * nonzero)?;
        Ok((grads.relu()? * aij)?.sum((2, 3))?)
    }
}

/// XGrad-CAM (Fu et al. 2020): alpha_k = sum_ij g * A / (sum_ab A + 1e-7).
#[derive(Debug, Clone, Copy, Default)]
pub struct XGradCam;

impl CamMethod for XGradCam {
    fn name(&self) -> &'static str {
        "xgradcam"
    }

    fn weights(&self, activations: &Tensor, grads: &Tensor) -> Result<Tensor> {
        let sum_a = (activations.sum_keepdim((2, 3))? + 1e-7)?;
        Ok((grads * activations)?.broadcast_div(&sum_a)?.sum((2, 3))?)
    }
}

/// HiResCAM (Draelos & Carin 2020): the map is ReLU(sum_k g^k * A^k), element-wise.
#[derive(Debug, Clone, Copy, Default)]
pub struct HiResCam;

impl CamMethod for HiResCam {
    fn name(&self) -> &'static str {
        "hirescam"
    }

    fn weights(&self, _activations: &Tensor, grads: &Tensor) -> Result<Tensor> {
        Ok(grads.flatten_from(2)?.mean(D::Minus1)?)
    }

    fn cam(&self, activations: &Tensor, grads: &Tensor, _alpha: &Tensor) -> Result<Tensor> {
        Ok((grads * activations)?.sum(1)?.relu()?)
    }
}

/// LayerCAM (Jiang et al. 2021): the map is ReLU(sum_k ReLU(g^k) * A^k), element-wise.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerCam;

impl CamMethod for LayerCam {
    fn name(&self) -> &'static str {
        "layercam"
    }

    fn weights(&self, _activations: &Tensor, grads: &Tensor) -> Result<Tensor> {
        Ok(grads.relu()?.flatten_from(2)?.mean(D::Minus1)?)
    }

    fn cam(&self, activations: &Tensor, grads: &Tensor, _alpha: &Tensor) -> Result<Tensor> {
        Ok((grads.relu()? * activations)?.sum(1)?.relu()?)
    }
}

/// EigenCAM (Muhammad & Yeasin 2020): the activations at each position, centred over positions,
/// projected on their first principal direction; no gradient. The direction's sign is arbitrary
/// in an SVD; we orient it so that the projection grows with the channel-summed activation.
#[derive(Debug, Clone, Copy, Default)]
pub struct EigenCam;

impl CamMethod for EigenCam {
    fn name(&self) -> &'static str {
        "eigencam"
    }

    fn weights(&self, activations: &Tensor, _grads: &Tensor) -> Result<Tensor> {
        let (n, k, h, w) = activations.dims4()?;
        let a = activations.reshape((n, k, h * w))?.to_vec3::<f32>()?;
        let mut out = Vec::with_capacity(n * k);
        for rows in &a {
            out.extend(principal_direction(rows, h * w));
        }
        Ok(Tensor::from_vec(out, (n, k), activations.device())?)
    }

    fn cam(&self, activations: &Tensor, _grads: &Tensor, alpha: &Tensor) -> Result<Tensor> {
        let (n, k, h, w) = activations.dims4()?;
        let a = activations.reshape((n, k, h * w))?;
        let centred = a.broadcast_sub(&a.mean_keepdim(2)?)?; // centred over positions
        let proj = alpha.unsqueeze(1)?.contiguous()?.matmul(&centred.contiguous()?)?; // [n, 1, hw]
        Ok(proj.reshape((n, h, w))?.relu()?)
    }
}

/// The unit-norm first right singular vector of the positions x channels matrix `rows` (given as
/// channels x positions), centred over positions, oriented to correlate positively with the
/// channel sums. Power iteration on the small positions x positions Gram matrix.
fn principal_direction(rows: &[Vec<f32>], p: usize) -> Vec<f32> {
    let k = rows.len();
    let centred: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            let m = r.iter().map(|&v| v as f64).sum::<f64>() / p.max(1) as f64;
            r.iter().map(|&v| v as f64 - m).collect()
        })
        .collect();
    // Gram matrix over positions: G = M M^T with M = centred^T ([p, k]).
    let mut gram = vec![0f64; p * p];
    for c in &centred {
        for i in 0..p {
            if c[i] == 0.0 {
                continue;
            }
            for j in 0..p {
                gram[i * p + j] += c[i] * c[j];
            }
        }
    }
    let mut u = vec![1.0 / (p as f64).sqrt(); p];
    for _ in 0..500 {
        let mut next: Vec<f64> = (0..p).map(|i| (0..p).map(|j| gram[i * p + j] * u[j]).sum()).collect();
        let norm = next.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            return vec![0.0; k];
        }
        next.iter_mut().for_each(|v| *v /= norm);
        let delta: f64 = next.iter().zip(&u).map(|(a, b)| (a - b).abs()).sum();
        u = next;
        if delta < 1e-12 {
            break;
        }
    }
    // v = M^T u / |M^T u|
    let mut v: Vec<f64> = centred.iter().map(|c| c.iter().zip(&u).map(|(a, b)| a * b).sum()).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
    // Orientation: the projection M v should correlate positively with the channel sums.
    let sums: Vec<f64> = (0..p).map(|i| rows.iter().map(|r| r[i] as f64).sum()).collect();
    let proj: Vec<f64> = (0..p).map(|i| centred.iter().zip(&v).map(|(c, vk)| c[i] * vk).sum()).collect();
    let mean_s = sums.iter().sum::<f64>() / p.max(1) as f64;
    let corr: f64 = proj.iter().zip(&sums).map(|(a, s)| a * (s - mean_s)).sum();
    let sign = if corr < 0.0 { -1.0 } else { 1.0 };
    v.iter().map(|x| (sign * x) as f32).collect()
}

/// Ablation-CAM (Desai & Ramaswamy 2020), as pytorch-grad-cam computes it: channel k's weight is
/// (y - y_k) / y, where y_k is the target's score with channel k of the explained layer set to 0
/// (or, when the layer has negative values, to its minimum - 1e7); the map is ReLU(sum_k w_k A^k).
/// Only the head runs for the ablated copies (pytorch-grad-cam reruns the whole network), `chunk`
/// channels at a time; `progress` hears the number of channels done.
pub fn ablation_cam<M: crate::Explainable + ?Sized>(
    model: &M,
    activations: &Tensor,
    requests: &[crate::Request<'_>],
    chunk: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<crate::CamResult>> {
    use crate::Error;
    let (batch, k, h, w) = activations.dims4()?;
    let plane = h * w;
    let mut results = Vec::with_capacity(requests.len());
    for r in requests {
        if r.image >= batch {
            return Err(Error::ImageOutOfRange { image: r.image, batch });
        }
        let a = activations.get(r.image)?.contiguous()?; // [K, h, w]
        let values = a.flatten_all()?.to_vec1::<f32>()?;
        let y = score_rows(&model.head(&a.unsqueeze(0)?)?, r.target)?[0];
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
            for yk in score_rows(&model.head(&batch_in)?, r.target)? {
                weights.push((y - yk) / y);
            }
            progress(start + n);
        }
        results.push(weighted_result(&a, weights, y, r, "Ablation-CAM map")?);
    }
    Ok(results)
}

/// The target's score of every row of a head output.
fn score_rows(out: &Tensor, target: &dyn crate::Score) -> Result<Vec<f32>> {
    (0..out.dim(0)?).map(|i| Ok(target.score(&out.get(i)?)?.to_scalar::<f32>()?)).collect()
}

/// The explanation of one request from perturbation weights: ReLU(sum_k w_k A^k) (Grad-CAM's
/// map, other weights), checked for NaN. `a`: `[K, h, w]`; `y`: the target's score.
fn weighted_result(a: &Tensor, weights: Vec<f32>, y: f32, r: &crate::Request<'_>, what: &'static str) -> Result<crate::CamResult> {
    let (k, h, w) = a.dims3()?;
    let a = a.unsqueeze(0)?;
    let alpha = Tensor::from_vec(weights.clone(), (1, k), a.device())?;
    let cam = crate::Map::new(h, w, crate::GradCam.cam(&a, &a, &alpha)?.flatten_all()?.to_vec1::<f32>()?);
    if !cam.is_finite() || weights.iter().any(|v| !v.is_finite()) {
        return Err(crate::Error::NonFinite { what });
    }
    let score = if r.target.counterfactual() { -y } else { y };
    Ok(crate::CamResult { image: r.image, score, counterfactual: r.target.counterfactual(), alpha: weights, cam })
}

/// Score-CAM (Wang et al. 2020), as pytorch-grad-cam computes it: each channel's map, upsampled to
/// the input (bilinear, corners aligned) and min-max scaled (with 1e-8), masks the input; the
/// network's score for the masked input, softmaxed over channels, is the channel's weight; the
/// map is ReLU(sum_k w_k A^k). Channels whose map is constant give an all-zero mask, so they share
/// one forward pass, and channels with identical masks share one; the others run `chunk` at a
/// time. `progress` hears the channels done.
pub fn score_cam<M: crate::Explainable + ?Sized>(
    model: &M,
    input: &Tensor,
    activations: &Tensor,
    requests: &[crate::Request<'_>],
    chunk: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<crate::CamResult>> {
    use crate::Error;
    let (batch, k, h, w) = activations.dims4()?;
    let (_, c, ih, iw) = input.dims4()?;
    let plane = h * w;
    let mut results = Vec::with_capacity(requests.len());
    for r in requests {
        if r.image >= batch {
            return Err(Error::ImageOutOfRange { image: r.image, batch });
        }
        let a = activations.get(r.image)?.contiguous()?; // [K, h, w]
        let values = a.flatten_all()?.to_vec1::<f32>()?;
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
        progress(done);
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
            progress(done);
        }
        for &(ch, r) in &same_as {
            scores[ch] = scores[r];
        }
        progress(k);
        // Softmax over channels.
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let weights: Vec<f32> = exps.iter().map(|e| e / sum).collect();
        let y = score_rows(&model.head(&a.unsqueeze(0)?)?, r.target)?[0];
        results.push(weighted_result(&a, weights, y, r, "Score-CAM map")?);
    }
    Ok(results)
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

/// Eigen-smoothing (pytorch-grad-cam's `eigen_smooth`): the map is the first principal component
/// of the weighted activations alpha_k A^k (positions x channels, centred over positions) instead
/// of their sum, i.e. EigenCAM of the weighted activations, oriented like their sum (the singular
/// vector's sign is otherwise arbitrary). The weights alpha_k are the wrapped method's.
pub struct EigenSmooth(pub Box<dyn CamMethod>);

impl CamMethod for EigenSmooth {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn weights(&self, activations: &Tensor, grads: &Tensor) -> Result<Tensor> {
        self.0.weights(activations, grads)
    }

    /// EigenCAM's map of the weighted activations.
    fn cam(&self, activations: &Tensor, grads: &Tensor, alpha: &Tensor) -> Result<Tensor> {
        let weighted = activations.broadcast_mul(&alpha.unsqueeze(2)?.unsqueeze(3)?)?; // [n, K, h, w]
        let direction = EigenCam.weights(&weighted, grads)?;
        EigenCam.cam(&weighted, grads, &direction)
    }
}

/// Augmentation smoothing (pytorch-grad-cam's `aug_smooth`, with its ttach transforms): the mean
/// of the maps of six copies of the input, flipped horizontally or not and multiplied by 0.9, 1
/// or 1.1, each map normalised to [0, 1], upsampled to the input (bilinear) and flipped back. The
/// results hold that mean at the input's resolution; the score and alpha_k are those of the input
/// as it is.
pub fn augmentation_smoothing<M: crate::Explainable + ?Sized>(
    model: &M,
    input: &Tensor,
    requests: &[crate::Request<'_>],
    method: &dyn CamMethod,
) -> Result<Vec<crate::CamResult>> {
    let (_, _, ih, iw) = input.dims4()?;
    let mut results: Vec<crate::CamResult> = Vec::new();
    let mut sums = vec![vec![0f32; ih * iw]; requests.len()];
    let copies = [(false, 0.9), (false, 1.0), (false, 1.1), (true, 0.9), (true, 1.0), (true, 1.1)];
    for (flip, factor) in copies {
        let x = if flip { input.flip(&[3])? } else { input.clone() };
        let x = (x * factor)?;
        let r = crate::explain(model, &model.features(&x)?, requests, method)?;
        for (sum, ri) in sums.iter_mut().zip(&r) {
            let up = ri.cam.normalized().0.resize_bilinear(ih, iw);
            for y in 0..ih {
                for x in 0..iw {
                    let src = if flip { iw - 1 - x } else { x };
                    sum[y * iw + x] += up.data[y * iw + src] / copies.len() as f32;
                }
            }
        }
        if !flip && factor == 1.0 {
            results = r;
        }
    }
    for (r, sum) in results.iter_mut().zip(sums) {
        r.cam = crate::Map::new(ih, iw, sum);
    }
    Ok(results)
}
