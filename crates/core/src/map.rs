//! Maps: bilinear upsampling, min-max normalisation, the jet colormap and overlays (pixels
//! only: writing files is `gradcam-io`'s).

use image::{Rgb, RgbImage};

/// A single-channel map, row-major `h x w`.
#[derive(Debug, Clone, PartialEq)]
pub struct Map {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// The values, row-major.
    pub data: Vec<f32>,
}

impl Map {
    /// A map of `h x w` values; panics if `data` has another length.
    pub fn new(h: usize, w: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), h * w, "map data does not match its size");
        Self { h, w, data }
    }

    /// Whether every value is finite.
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }

    /// The largest value (-inf for an empty map).
    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// The smallest value (+inf for an empty map).
    pub fn min(&self) -> f32 {
        self.data.iter().copied().fold(f32::INFINITY, f32::min)
    }

    /// Rows, for JSON output.
    pub fn rows(&self) -> Vec<Vec<f32>> {
        self.data.chunks(self.w.max(1)).map(<[f32]>::to_vec).collect()
    }

    /// (row, column) of the first maximum.
    pub fn argmax(&self) -> (usize, usize) {
        let mut best = 0;
        for (i, &v) in self.data.iter().enumerate() {
            if v > self.data[best] {
                best = i;
            }
        }
        (best / self.w, best % self.w)
    }

    /// Min-max normalisation to [0, 1]. A constant map (all zero after the ReLU: nothing in the
    /// layer supports the target) is returned as zeros with `false`, never divided by zero.
    pub fn normalized(&self) -> (Map, bool) {
        let (lo, hi) = (self.min(), self.max());
        let range = hi - lo;
        if !(range > f32::EPSILON * hi.abs().max(1.0)) {
            return (Map::new(self.h, self.w, vec![0.0; self.data.len()]), false);
        }
        (Map::new(self.h, self.w, self.data.iter().map(|v| (v - lo) / range).collect()), true)
    }

    /// Bilinear resize with half-pixel centres (PyTorch `align_corners=False`, OpenCV
    /// `INTER_LINEAR` when upscaling).
    pub fn resize_bilinear(&self, out_h: usize, out_w: usize) -> Map {
        let axis = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
            let scale = inp as f32 / out as f32;
            (0..out)
                .map(|o| {
                    let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                    let i0 = (src.floor() as usize).min(inp - 1);
                    let i1 = (i0 + 1).min(inp - 1);
                    (i0, i1, src - i0 as f32)
                })
                .collect()
        };
        let (ys, xs) = (axis(out_h, self.h), axis(out_w, self.w));
        // Separable: every input row interpolated along x once, then pairs of those rows blended.
        let rows: Vec<f32> = self
            .data
            .chunks_exact(self.w.max(1))
            .flat_map(|row| xs.iter().map(move |&(x0, x1, fx)| row[x0] * (1.0 - fx) + row[x1] * fx))
            .collect();
        let mut data = Vec::with_capacity(out_h * out_w);
        for &(y0, y1, fy) in &ys {
            let (top, bottom) = (&rows[y0 * out_w..(y0 + 1) * out_w], &rows[y1 * out_w..(y1 + 1) * out_w]);
            data.extend(top.iter().zip(bottom).map(|(t, b)| t * (1.0 - fy) + b * fy));
        }
        Map::new(out_h, out_w, data)
    }
}

/// The jet colormap (OpenCV's `COLORMAP_JET` shape) for a value in [0, 1].
pub fn jet(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let channel = |centre: f32| ((1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// Where on the original image the explained input came from (a crop, or the whole image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Left edge, in pixels of the original image.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// Blends a normalised map, coloured with jet, over `region` of the original image at half
/// opacity; the image outside the region, which the model never saw, is dimmed.
pub fn overlay(image: &RgbImage, normalized: &Map, region: Region) -> RgbImage {
    let mut out = image.clone();
    let heat = normalized.resize_bilinear(region.height as usize, region.width as usize);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let inside = x >= region.x && y >= region.y && x < region.x + region.width && y < region.y + region.height;
        if inside {
            let v = heat.data[(y - region.y) as usize * heat.w + (x - region.x) as usize];
            let c = jet(v);
            *px = Rgb([0, 1, 2].map(|i| ((px[i] as u16 + c[i] as u16) / 2) as u8));
        } else {
            *px = Rgb(px.0.map(|p| p / 3));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_a_zero_map_keeps_zeros_and_says_so() {
        let (m, ok) = Map::new(2, 2, vec![0.0; 4]).normalized();
        assert!(!ok);
        assert_eq!(m.data, vec![0.0; 4]);
        let (m, ok) = Map::new(1, 3, vec![1.0, 3.0, 2.0]).normalized();
        assert!(ok);
        assert_eq!(m.data, vec![0.0, 1.0, 0.5]);
    }

    #[test]
    fn bilinear_matches_half_pixel_reference() {
        // torch.nn.functional.interpolate([[0, 1]], size=4, mode="linear", align_corners=False)
        // gives [0, 0.25, 0.75, 1].
        let m = Map::new(1, 2, vec![0.0, 1.0]).resize_bilinear(1, 4);
        assert_eq!(m.data, vec![0.0, 0.25, 0.75, 1.0]);
        let same = Map::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).resize_bilinear(2, 2);
        assert_eq!(same.data, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn jet_goes_from_blue_to_red() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        assert_eq!(jet(0.5), [128, 255, 128]);
    }
}
