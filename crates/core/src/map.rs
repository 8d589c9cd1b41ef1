//! Maps: bilinear upsampling, min-max normalisation, the jet colormap, overlays and atomic PNG
//! output.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{Error, Result};

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

/// Writes a PNG through a temporary file in the same folder renamed into place ([`write_atomic`]).
pub fn write_png_atomic(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).map_err(|source| Error::Encode { path: path.to_path_buf(), source })?;
    write_atomic(path, bytes.get_ref())
}

/// Writes `bytes` through a temporary file in the same folder and renames it into place, so that
/// a failure never leaves a half-written file behind (nor an interrupted run, with
/// [`remove_temporaries_on_signals`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| std::io::Write::write_all(f, bytes))
}

/// Writes tensors as a safetensors file, atomically as [`write_atomic`].
pub fn save_safetensors_atomic(tensors: &std::collections::HashMap<String, candle_core::Tensor>, path: &Path) -> Result<()> {
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| Error::Write { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
    write_atomic(path, &bytes)
}

/// Writes through `write` into a temporary file that is created while the registry of
/// temporaries is locked, then renamed into place. The signal thread removes the registered
/// files under the same lock and exits holding it, so a temporary is either removed or never
/// created.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let err = |source| Error::Write { path: path.to_path_buf(), source };
    let (tmp, mut file) = Temporary::create(dir.join(format!(".{name}.{}.tmp", std::process::id()))).map_err(err)?;
    write(&mut file).map_err(err)?;
    drop(file);
    std::fs::rename(tmp.path(), path).map_err(err)
}

/// The temporary files being written, to remove if the process is stopped.
static TEMPORARIES: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// A temporary file in flight: removed when dropped (it was renamed into place, or the write
/// failed), and by [`remove_temporaries`] if the process is stopped first.
pub struct Temporary(std::path::PathBuf);

impl Temporary {
    /// Registers `path` and creates it, both under the registry's lock.
    pub fn create(path: std::path::PathBuf) -> std::io::Result<(Self, std::fs::File)> {
        let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
        let file = std::fs::File::create(&path)?;
        registry.push(path.clone());
        Ok((Temporary(path), file))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != &self.0);
    }
}

/// Removes every temporary file in flight, and keeps the registry locked until the process ends
/// (no new temporary can be created after this). For the signal thread only.
pub fn remove_temporaries() {
    let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
    for p in registry.drain(..) {
        let _ = std::fs::remove_file(p);
    }
    std::mem::forget(registry);
}

/// On SIGINT or SIGTERM, removes the temporary files in flight (and calls `also`, for other
/// crates' registries), then exits with 128 + the signal. Call it first thing in `main`, before
/// any thread exists: the signals are blocked in every thread and taken by one that waits for
/// them, where removing files is safe (a signal handler could not lock the registry).
#[cfg(unix)]
pub fn remove_temporaries_on_signals(also: fn()) {
    // SAFETY: plain libc calls on a local, zero-initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut signal = 0;
            if libc::sigwait(&set, &mut signal) == 0 {
                remove_temporaries();
                also();
                std::process::exit(128 + signal);
            }
        });
    }
}

/// Elsewhere, nothing: interrupted runs may leave a temporary file.
#[cfg(not(unix))]
pub fn remove_temporaries_on_signals(_also: fn()) {}

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
