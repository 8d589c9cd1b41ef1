//! The gradient-based members of the CAM family, written as pytorch-grad-cam 1.5 computes them
//! (same epsilons, same ReLU placement), each a small [`CamMethod`] over the shared pipeline.
//!
//! Methods whose map is not a channel-weighted sum (HiResCAM, LayerCAM, EigenCAM) still report
//! per-channel weights, so that neuron reports have something to rank: the mean over positions of
//! the element-wise weights they use (HiResCAM: dy/dA, LayerCAM: ReLU(dy/dA), EigenCAM: the first
//! principal direction).

use candle_core::{Tensor, D};

use crate::cam::{Context, Explainer, Request};
use crate::{CamMethod, Explanation, Map, Result};

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

/// Eigen-smoothing (pytorch-grad-cam's `eigen_smooth`): the map is the first principal component
/// of the weighted activations alpha_k A^k (positions x channels, centred over positions) instead
/// of their sum, i.e. EigenCAM of the weighted activations, oriented like their sum (the singular
/// vector's sign is otherwise arbitrary). The weights alpha_k are the wrapped method's.
pub struct EigenSmooth(pub Box<dyn CamMethod>);

impl CamMethod for EigenSmooth {
    fn name(&self) -> &'static str {
        CamMethod::name(&self.0)
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
pub struct AugSmooth(pub Box<dyn CamMethod>);

impl Explainer for AugSmooth {
    fn name(&self) -> &'static str {
        CamMethod::name(&self.0)
    }

    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> Result<Vec<Explanation>> {
        let (model, input, method) = (cx.model, cx.input, &self.0);
        let (_, _, ih, iw) = input.dims4()?;
        let mut results: Vec<Explanation> = Vec::new();
        let mut sums = vec![vec![0f32; ih * iw]; requests.len()];
        let copies = [(false, 0.9), (false, 1.0), (false, 1.1), (true, 0.9), (true, 1.0), (true, 1.1)];
        for (flip, factor) in copies {
            let x = if flip { input.flip(&[3])? } else { input.clone() };
            let x = (x * factor)?;
            let r = crate::explain(model, &model.features(&x)?, requests, method)?;
            for (sum, ri) in sums.iter_mut().zip(&r) {
                let up = ri.cam().normalized().0.resize_bilinear(ih, iw);
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
            let map = Map::new(ih, iw, sum);
            r.map_size = (map.h, map.w);
            r.map = map.data;
        }
        Ok(results)
    }
}
