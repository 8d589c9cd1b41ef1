//! Tallies for the paper's evaluations.

/// Pointing game (Zhang et al., as in the paper's section 4.3): how often the map's peak hits the
/// target object, beside the centre-point baseline.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Pointing {
    /// Cases counted.
    pub count: usize,
    /// Cases whose map's peak hit the object.
    pub hits: usize,
    /// Cases where the image's centre hit it (the baseline).
    pub centre_hits: usize,
}

impl Pointing {
    /// The pointing game for one map at the image's resolution (`h x w`, e.g. the raw map
    /// upsampled): whether its peak lands on the object (`near(y, x)`: on its mask or within the
    /// tolerance), and whether the image's centre does (the baseline). The one implementation
    /// behind `eval`, `caption --eval` and `vqa --eval`.
    pub fn hits(map: &crate::Map, near: impl Fn(usize, usize) -> bool) -> (bool, bool) {
        let (py, px) = map.argmax();
        (near(py, px), near(map.h / 2, map.w / 2))
    }

    /// Counts one case: a hit at the peak, and one at the centre.
    pub fn add(&mut self, hit: bool, centre_hit: bool) {
        self.count += 1;
        self.hits += hit as usize;
        self.centre_hits += centre_hit as usize;
    }

    /// The share of hits.
    pub fn accuracy(&self) -> f64 {
        self.hits as f64 / self.count.max(1) as f64
    }

    /// The share of centre hits.
    pub fn centre_accuracy(&self) -> f64 {
        self.centre_hits as f64 / self.count.max(1) as f64
    }
}

/// An axis-aligned box in pixel edges: it covers the pixels x0 <= x < x1, y0 <= y < y1.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BoundingBox {
    /// Left edge.
    pub x0: f32,
    /// Top edge.
    pub y0: f32,
    /// Right edge (exclusive).
    pub x1: f32,
    /// Bottom edge (exclusive).
    pub y1: f32,
}

impl BoundingBox {
    /// From a COCO `[x, y, width, height]`.
    pub fn from_coco(b: [f64; 4]) -> Self {
        Self { x0: b[0] as f32, y0: b[1] as f32, x1: (b[0] + b[2]) as f32, y1: (b[1] + b[3]) as f32 }
    }

    /// Area in pixels (0 for an empty box).
    pub fn area(&self) -> f32 {
        (self.x1 - self.x0).max(0.0) * (self.y1 - self.y0).max(0.0)
    }

    /// Intersection over union; 0 when both boxes are empty.
    pub fn iou(&self, other: &BoundingBox) -> f32 {
        let w = (self.x1.min(other.x1) - self.x0.max(other.x0)).max(0.0);
        let h = (self.y1.min(other.y1) - self.y0.max(other.y0)).max(0.0);
        let inter = w * h;
        let union = self.area() + other.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }

    /// Whether the centre of pixel (y, x) lies inside.
    pub fn contains(&self, y: usize, x: usize) -> bool {
        let (cy, cx) = (y as f32 + 0.5, x as f32 + 0.5);
        cx >= self.x0 && cx < self.x1 && cy >= self.y0 && cy < self.y1
    }
}

/// The paper's weakly-supervised localization box (section 4.1): keep the pixels of the map at or
/// above `fraction` of its maximum and return the box around the largest 8-connected component of
/// them. `None` for a map that is zero (or negative) everywhere.
pub fn threshold_box(map: &crate::Map, fraction: f32) -> Option<BoundingBox> {
    let max = map.max();
    if !(max > 0.0) {
        return None;
    }
    let threshold = fraction * max;
    let (h, w) = (map.h, map.w);
    let on: Vec<bool> = map.data.iter().map(|&v| v >= threshold).collect();
    let mut seen = vec![false; h * w];
    let mut best: Option<(usize, BoundingBox)> = None;
    let mut stack = Vec::new();
    for start in 0..h * w {
        if !on[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut size, mut x0, mut y0, mut x1, mut y1) = (0usize, w, h, 0, 0);
        while let Some(i) = stack.pop() {
            let (y, x) = (i / w, i % w);
            size += 1;
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let (yy, xx) = (y as isize + dy, x as isize + dx);
                    if yy < 0 || xx < 0 || yy as usize >= h || xx as usize >= w {
                        continue;
                    }
                    let j = yy as usize * w + xx as usize;
                    if on[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        if best.as_ref().is_none_or(|(s, _)| size > *s) {
            best = Some((size, BoundingBox { x0: x0 as f32, y0: y0 as f32, x1: x1 as f32, y1: y1 as f32 }));
        }
    }
    best.map(|(_, b)| b)
}

/// Ranks from 1, ties given their average rank.
fn ranks(v: &[f32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = average;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson correlation of the tie-averaged ranks). `None` when the
/// lengths differ, there are fewer than two values, or either side is constant (undefined).
pub fn spearman(a: &[f32], b: &[f32]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 || a.iter().chain(b).any(|v| !v.is_finite()) {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

/// Area under a curve sampled at evenly spaced fractions 0, 1/n, ..., 1 (trapezoid rule), as the
/// deletion and insertion metrics report it.
pub fn auc(curve: &[f32]) -> f64 {
    if curve.len() < 2 {
        return curve.first().map_or(0.0, |&v| v as f64);
    }
    let n = (curve.len() - 1) as f64;
    curve.windows(2).map(|p| (p[0] as f64 + p[1] as f64) / 2.0).sum::<f64>() / n
}

/// Pixel indices of a map, largest value first (ties in index order): the order in which deletion
/// removes and insertion restores pixels.
pub fn pixel_order(map: &crate::Map) -> Vec<usize> {
    let mut order: Vec<usize> = (0..map.data.len()).collect();
    order.sort_by(|&a, &b| map.data[b].total_cmp(&map.data[a]).then(a.cmp(&b)));
    order
}

/// The map's energy inside a region against outside it, as the paper's DenseCap comparison
/// reports it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Energy {
    /// Mean map value inside over mean value outside; `None` when nothing lies outside, or the
    /// map is zero there (an unbounded ratio).
    pub ratio: Option<f64>,
    /// Share of the map's total mass that lies inside; `None` for a map that is zero everywhere.
    pub fraction: Option<f64>,
}

/// [`Energy`] of a non-negative map over the pixels where `inside` holds (same size as the map).
pub fn energy(map: &crate::Map, inside: &[bool]) -> Energy {
    let (mut sum_in, mut n_in, mut sum_out, mut n_out) = (0.0f64, 0usize, 0.0f64, 0usize);
    for (&v, &i) in map.data.iter().zip(inside) {
        if i {
            sum_in += v as f64;
            n_in += 1;
        } else {
            sum_out += v as f64;
            n_out += 1;
        }
    }
    let total = sum_in + sum_out;
    let ratio = (n_in > 0 && n_out > 0 && sum_out > 0.0).then(|| (sum_in / n_in as f64) / (sum_out / n_out as f64));
    Energy { ratio, fraction: (total > 0.0).then(|| sum_in / total) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Map;

    #[test]
    fn iou_of_hand_computed_boxes() {
        let a = BoundingBox { x0: 0.0, y0: 0.0, x1: 4.0, y1: 4.0 };
        let b = BoundingBox { x0: 2.0, y0: 2.0, x1: 6.0, y1: 6.0 };
        // Intersection 2x2 = 4, union 16 + 16 - 4 = 28.
        assert!((a.iou(&b) - 4.0 / 28.0).abs() < 1e-6);
        assert_eq!(a.iou(&a), 1.0);
        assert_eq!(a.iou(&BoundingBox { x0: 5.0, y0: 5.0, x1: 6.0, y1: 6.0 }), 0.0);
    }

    #[test]
    fn threshold_box_takes_the_largest_component() {
        // Two blobs above 15% of the max (10): a single strong pixel at (0, 0), and a 2x3 block
        // of weaker pixels at rows 3..5, columns 2..5. The bigger one wins, though weaker.
        #[rustfmt::skip]
        let data = vec![
            10.0, 0.0, 0.0, 0.0, 0.0, 0.0,
             0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
             0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
             0.0, 0.0, 2.0, 2.0, 2.0, 0.0,
             0.0, 0.0, 2.0, 2.0, 2.0, 0.0,
             0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let map = Map::new(6, 6, data);
        // The 1.0 at (2, 5) is below 1.5 and stays out; it would touch the block diagonally.
        assert_eq!(threshold_box(&map, 0.15), Some(BoundingBox { x0: 2.0, y0: 3.0, x1: 5.0, y1: 5.0 }));
        // At 5% it is in, joined to the block through the diagonal.
        assert_eq!(threshold_box(&map, 0.05), Some(BoundingBox { x0: 2.0, y0: 2.0, x1: 6.0, y1: 5.0 }));
        assert_eq!(threshold_box(&Map::new(2, 2, vec![0.0; 4]), 0.15), None);
    }

    #[test]
    fn spearman_of_hand_computed_cases() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 30.0, 40.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]), Some(-1.0));
        // Ranks a = 1 2 3, b = 1.5 1.5 3 (a tie): Pearson of the ranks = 1.5 / sqrt(2 * 1.5).
        let r = spearman(&[1.0, 2.0, 3.0], &[5.0, 5.0, 7.0]).unwrap();
        assert!((r - 1.5 / 3f64.sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn auc_and_order() {
        // A score that falls linearly from 1 to 0: area 1/2.
        assert!((auc(&[1.0, 0.75, 0.5, 0.25, 0.0]) - 0.5).abs() < 1e-12);
        assert!((auc(&[1.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(pixel_order(&Map::new(1, 4, vec![0.1, 0.9, 0.5, 0.9])), vec![1, 3, 2, 0]);
    }

    #[test]
    fn energy_inside_a_box() {
        // 4 pixels, the box holds the first two (mean 3) against the rest (mean 1).
        let e = energy(&Map::new(2, 2, vec![4.0, 2.0, 1.0, 1.0]), &[true, true, false, false]);
        assert_eq!(e.ratio, Some(3.0));
        assert_eq!(e.fraction, Some(0.75));
        let zero_out = energy(&Map::new(1, 2, vec![1.0, 0.0]), &[true, false]);
        assert_eq!((zero_out.ratio, zero_out.fraction), (None, Some(1.0)));
    }
}
