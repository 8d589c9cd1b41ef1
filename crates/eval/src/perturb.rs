//! Perturbed copies of a model input: occlusion patches, and pixels removed (deletion) or restored
//! (insertion) in the order of a map. Removed pixels take the value 0 of the normalised input
//! (the dataset mean colour for ImageNet models, mid-grey for the scene CNN).

/// A `[C, H, W]` input as plain data.
pub struct Plane {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

/// Top-left corners of the occlusion patches: every `stride` pixels, plus a last row and column
/// flush with the far edge so that the whole input is covered.
pub fn patch_origins(side: usize, patch: usize, stride: usize) -> Vec<usize> {
    if patch >= side {
        return vec![0];
    }
    let mut v: Vec<usize> = (0..=side - patch).step_by(stride.max(1)).collect();
    if *v.last().unwrap_or(&0) != side - patch {
        v.push(side - patch);
    }
    v
}

impl Plane {
    /// The input with a `patch x patch` square at (y, x) set to zero.
    pub fn occluded(&self, y: usize, x: usize, patch: usize) -> Vec<f32> {
        let mut d = self.data.clone();
        for c in 0..self.c {
            for yy in y..(y + patch).min(self.h) {
                let row = c * self.h * self.w + yy * self.w;
                d[row + x..row + (x + patch).min(self.w)].fill(0.0);
            }
        }
        d
    }

    /// `steps + 1` inputs: the first `k / steps` of `order` (pixel indices) taken from `to`, the
    /// rest from `from`, for k = 0..=steps; handed to `each` `batch` inputs at a time, so that
    /// memory holds one batch whatever the number of steps.
    pub fn sweep<E>(from: &[f32], to: &[f32], plane: usize, order: &[usize], steps: usize, batch: usize, mut each: impl FnMut(&[f32]) -> Result<(), E>) -> Result<(), E> {
        let channels = from.len() / plane;
        let mut out = Vec::with_capacity(batch.max(1).min(steps + 1) * from.len());
        let mut current = from.to_vec();
        let mut done = 0;
        for k in 0..=steps {
            let target = (order.len() * k + steps / 2) / steps.max(1);
            for &p in &order[done..target.min(order.len())] {
                for c in 0..channels {
                    current[c * plane + p] = to[c * plane + p];
                }
            }
            done = target.min(order.len());
            out.extend_from_slice(&current);
            if out.len() == batch.max(1) * from.len() || k == steps {
                each(&out)?;
                out.clear();
            }
        }
        Ok(())
    }

    /// A blurred copy (three box-blur passes of radius `r` per channel, about a Gaussian of sigma
    /// r): where insertion starts, so that it restores detail rather than colour.
    pub fn blurred(&self, r: usize) -> Vec<f32> {
        let mut d = self.data.clone();
        let (h, w) = (self.h, self.w);
        let mut tmp = vec![0f32; h * w];
        for c in 0..self.c {
            let ch = &mut d[c * h * w..(c + 1) * h * w];
            for _ in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let (lo, hi) = (x.saturating_sub(r), (x + r).min(w - 1));
                        tmp[y * w + x] = ch[y * w + lo..=y * w + hi].iter().sum::<f32>() / (hi - lo + 1) as f32;
                    }
                }
                for y in 0..h {
                    let (lo, hi) = (y.saturating_sub(r), (y + r).min(h - 1));
                    for x in 0..w {
                        ch[y * w + x] = (lo..=hi).map(|yy| tmp[yy * w + x]).sum::<f32>() / (hi - lo + 1) as f32;
                    }
                }
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_cover_the_input() {
        assert_eq!(patch_origins(10, 4, 3), vec![0, 3, 6]);
        assert_eq!(patch_origins(10, 4, 4), vec![0, 4, 6]);
        assert_eq!(patch_origins(4, 8, 2), vec![0]);
    }

    #[test]
    fn sweep_moves_pixels_in_order() {
        // One channel of 4 pixels, from zeros to ones, pixel 2 first, then 0, 3, 1.
        for batch in [1, 2, 3, 10] {
            let mut out = Vec::new();
            Plane::sweep(&[0.0; 4], &[1.0; 4], 4, &[2, 0, 3, 1], 2, batch, |b| -> Result<(), ()> {
                assert!(b.len() <= 4 * batch);
                out.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        }
    }

    #[test]
    fn occlusion_and_blur() {
        let p = Plane { c: 1, h: 3, w: 3, data: vec![1.0; 9] };
        assert_eq!(p.occluded(1, 1, 2), vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        assert_eq!(p.blurred(1), vec![1.0; 9]);
    }
}
