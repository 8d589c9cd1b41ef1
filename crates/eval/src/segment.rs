//! Weakly-supervised segmentation from Grad-CAM seeds (the paper's section 4.2, where Grad-CAM
//! maps seed SEC): foreground seeds where the map is high, background seeds where it is low,
//! and a random walker (Grady 2006) on the image's colour affinities labels the pixels between.
//! Beside it, two baselines: the map thresholded alone and a centre prior.

use gradcam_core::Map;
use image::RgbImage;

/// How seeds and baselines are made from a map (fractions of its maximum).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SegmentOptions {
    /// Foreground seeds where the map is at least this.
    pub high: f32,
    /// Background seeds where the map is below this.
    pub low: f32,
    /// The thresholded-map baseline: foreground where the map is at least this.
    pub threshold: f32,
    /// The random walker's edge weights: exp(-beta d^2 / (10 sigma)), d the colour difference of
    /// two neighbours in [0, 1] units and sigma the image's standard deviation (scikit-image's).
    pub beta: f32,
    /// The centre prior: a centred box covering this fraction of the image.
    pub centre_area: f32,
    /// The walker works at most this many pixels on a side (larger images are scaled down for it
    /// and its labels scaled back up).
    pub max_side: u32,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions { high: 0.5, low: 0.2, threshold: 0.5, beta: 130.0, centre_area: 0.25, max_side: 128 }
    }
}

impl SegmentOptions {
    pub fn check(&self) -> crate::Result<()> {
        let checks = [
            ("segment.low", (0.0..=1.0).contains(&self.low) && self.low < self.high),
            ("segment.high", self.high <= 1.0),
            ("segment.threshold", (0.0..=1.0).contains(&self.threshold)),
            ("segment.beta", self.beta > 0.0),
            ("segment.centre_area", self.centre_area > 0.0 && self.centre_area <= 1.0),
            ("segment.max_side", self.max_side >= 8),
        ];
        let bad: Vec<&'static str> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
        if bad.is_empty() {
            return Ok(());
        }
        let requirement = format!("out of range: need 0 <= low < high <= 1, threshold in [0, 1], beta > 0, centre area in (0, 1], max side >= 8 (given {self:?})");
        Err(gradcam_core::SettingError::new(bad, requirement).into())
    }
}

/// Foreground, background, or unknown (to be labelled by the walker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    Foreground,
    Background,
    Unknown,
}

/// Seeds from a map at the image's resolution.
pub fn seeds(map: &Map, o: &SegmentOptions) -> Vec<Seed> {
    let max = map.max();
    map.data
        .iter()
        .map(|&v| {
            let v = if max > 0.0 { v / max } else { 0.0 };
            if max > 0.0 && v >= o.high {
                Seed::Foreground
            } else if v < o.low || max <= 0.0 {
                Seed::Background
            } else {
                Seed::Unknown
            }
        })
        .collect()
}

/// The map thresholded at `threshold` of its maximum (nothing for a zero map).
pub fn threshold(map: &Map, threshold: f32) -> Vec<bool> {
    let max = map.max();
    map.data.iter().map(|&v| max > 0.0 && v >= threshold * max).collect()
}

/// A centred box covering `area` of an `h x w` image.
pub fn centre_prior(h: usize, w: usize, area: f32) -> Vec<bool> {
    let s = area.sqrt();
    let (bh, bw) = (((h as f32 * s).round() as usize).max(1), ((w as f32 * s).round() as usize).max(1));
    let (y0, x0) = ((h - bh.min(h)) / 2, (w - bw.min(w)) / 2);
    (0..h * w).map(|i| (y0..y0 + bh).contains(&(i / w)) && (x0..x0 + bw).contains(&(i % w))).collect()
}

/// Intersection over union of two masks of the same size (1 when both are empty).
pub fn iou(a: &[bool], b: &[bool]) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        inter += (x && y) as usize;
        union += (x || y) as usize;
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// The random walker's labels (foreground where the walker from a pixel is more likely to reach a
/// foreground seed first), at the image's size. `seeds` has one entry per image pixel.
pub fn random_walker(image: &RgbImage, seeds: &[Seed], beta: f32, max_side: u32) -> Vec<bool> {
    let (w, h) = image.dimensions();
    let (w, h) = (w as usize, h as usize);
    if !seeds.contains(&Seed::Foreground) {
        return vec![false; w * h];
    }
    if !seeds.contains(&Seed::Background) {
        return vec![true; w * h];
    }
    let scale = (max_side as f32 / w.max(h) as f32).min(1.0);
    let (sw, sh) = (((w as f32 * scale).round() as usize).max(1), ((h as f32 * scale).round() as usize).max(1));
    let small = if (sw, sh) == (w, h) { image.clone() } else { image::imageops::resize(image, sw as u32, sh as u32, image::imageops::FilterType::Triangle) };
    // Seeds at the working size: a pixel is a seed when the pixel it comes from is.
    let mut small_seeds: Vec<Seed> = (0..sw * sh).map(|i| seeds[((i / sw) * h / sh) * w + (i % sw) * w / sw]).collect();
    clean_foreground(&small, &mut small_seeds);
    let labels = walk(&small, &small_seeds, beta);
    if (sw, sh) == (w, h) {
        return labels;
    }
    (0..w * h).map(|i| labels[((i / w) * sh / h) * sw + (i % w) * sw / w]).collect()
}

/// A map a few pixels wider than its object seeds some background as foreground, and the
/// walker then floods the background from there. Foreground seeds whose colour is far from the
/// seeds' median colour (more than twice the seeds' median distance to it, and more than 0.1)
/// become unknown: the walker labels them like any other pixel.
fn clean_foreground(image: &RgbImage, seeds: &mut [Seed]) {
    let fg: Vec<usize> = (0..seeds.len()).filter(|&i| seeds[i] == Seed::Foreground).collect();
    if fg.len() < 4 {
        return;
    }
    let colour = |i: usize| image.as_raw()[3 * i..3 * i + 3].iter().map(|&v| v as f32 / 255.0).collect::<Vec<f32>>();
    let median: Vec<f32> = (0..3)
        .map(|c| {
            let mut v: Vec<f32> = fg.iter().map(|&i| colour(i)[c]).collect();
            v.sort_by(f32::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    let dist: Vec<f32> = fg.iter().map(|&i| colour(i).iter().zip(&median).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()).collect();
    let mut sorted = dist.clone();
    sorted.sort_by(f32::total_cmp);
    let limit = (2.0 * sorted[sorted.len() / 2]).max(0.1);
    for (&i, &d) in fg.iter().zip(&dist) {
        if d > limit {
            seeds[i] = Seed::Unknown;
        }
    }
}

fn walk(image: &RgbImage, seeds: &[Seed], beta: f32) -> Vec<bool> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let n = w * h;
    let px: Vec<[f32; 3]> = image.pixels().map(|p| [p[0] as f32 / 255.0, p[1] as f32 / 255.0, p[2] as f32 / 255.0]).collect();
    let mean = px.iter().flatten().sum::<f32>() / (3 * n) as f32;
    let sigma = (px.iter().flatten().map(|v| (v - mean).powi(2)).sum::<f32>() / (3 * n) as f32).sqrt().max(1e-3);
    let b = beta / (10.0 * sigma);
    let weight = |i: usize, j: usize| -> f32 {
        let d: f32 = (0..3).map(|c| (px[i][c] - px[j][c]).powi(2)).sum();
        (-b * d).exp() + 1e-6
    };
    // Right and down edge weights of every pixel.
    let right: Vec<f32> = (0..n).map(|i| if i % w + 1 < w { weight(i, i + 1) } else { 0.0 }).collect();
    let down: Vec<f32> = (0..n).map(|i| if i / w + 1 < h { weight(i, i + w) } else { 0.0 }).collect();
    let neighbours = |i: usize| -> [(usize, f32); 4] {
        let left = if i % w > 0 { (i - 1, right[i - 1]) } else { (i, 0.0) };
        let up = if i >= w { (i - w, down[i - w]) } else { (i, 0.0) };
        [(i + (i % w + 1 < w) as usize, right[i]), (i + if i / w + 1 < h { w } else { 0 }, down[i]), left, up]
    };
    let fixed = |i: usize| match seeds[i] {
        Seed::Foreground => Some(1.0f32),
        Seed::Background => Some(0.0),
        Seed::Unknown => None,
    };
    // Solve L_U x_U = B x_S for the unknown pixels: conjugate gradients with a Jacobi
    // preconditioner, matrix-free over the 4-neighbour grid.
    let degree: Vec<f32> = (0..n).map(|i| neighbours(i).iter().map(|&(_, wt)| wt).sum::<f32>().max(1e-12)).collect();
    let rhs: Vec<f32> = (0..n).map(|i| if fixed(i).is_some() { 0.0 } else { neighbours(i).iter().map(|&(j, wt)| if j != i { wt * fixed(j).unwrap_or(0.0) } else { 0.0 }).sum() }).collect();
    let apply = |x: &[f32], out: &mut [f32]| {
        for i in 0..n {
            out[i] = if fixed(i).is_some() { 0.0 } else { degree[i] * x[i] - neighbours(i).iter().map(|&(j, wt)| if j != i && fixed(j).is_none() { wt * x[j] } else { 0.0 }).sum::<f32>() };
        }
    };
    let mut x = vec![0.5f32; n];
    for i in 0..n {
        if let Some(v) = fixed(i) {
            x[i] = v;
        }
    }
    let mut ax = vec![0f32; n];
    let masked = |v: &mut Vec<f32>| (0..n).for_each(|i| if fixed(i).is_some() { v[i] = 0.0 });
    let mut xu = x.clone();
    masked(&mut xu);
    apply(&xu, &mut ax);
    let mut r: Vec<f32> = (0..n).map(|i| if fixed(i).is_some() { 0.0 } else { rhs[i] - ax[i] }).collect();
    let mut z: Vec<f32> = (0..n).map(|i| r[i] / degree[i]).collect();
    let mut p = z.clone();
    let mut rz: f64 = r.iter().zip(&z).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
    let norm0 = rhs.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
    let mut ap = vec![0f32; n];
    for _ in 0..2000 {
        if r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() < 1e-5 * norm0 {
            break;
        }
        apply(&p, &mut ap);
        let pap: f64 = p.iter().zip(&ap).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        if pap <= 0.0 {
            break;
        }
        let alpha = (rz / pap) as f32;
        for i in 0..n {
            if fixed(i).is_none() {
                xu[i] += alpha * p[i];
                r[i] -= alpha * ap[i];
            }
        }
        for i in 0..n {
            z[i] = r[i] / degree[i];
        }
        let rz_new: f64 = r.iter().zip(&z).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        let beta_cg = (rz_new / rz.max(1e-30)) as f32;
        rz = rz_new;
        for i in 0..n {
            p[i] = z[i] + beta_cg * p[i];
        }
    }
    (0..n).map(|i| fixed(i).map_or(xu[i] > 0.5, |v| v > 0.5)).collect()
}
