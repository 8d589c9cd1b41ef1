//! Image decoding with limits, and the preprocessing modes: `center-crop` (shorter side to 256,
//! centre crop 224, as torchvision's ImageNet evaluation), `stretch` (to 224 x 224) and `none`
//! (the image as it is), each followed by ImageNet mean/std normalisation.

use std::path::Path;

use candle_core::{Device, Tensor};
use gradcam_core::map::Region;
use image::{imageops::FilterType, RgbImage};

use crate::{Error, Result};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Largest side we decode; a bigger image is refused before any pixel memory is allocated.
pub const MAX_SIDE: u32 = 16384;
/// Most pixels we decode (50 megapixels, a large camera's photo): a bigger image is refused from
/// its header, before any pixel memory is allocated; every model here sees at most 224 px of it.
pub const MAX_PIXELS: u64 = 50_000_000;
/// Smallest side the `none` mode accepts: five stride-2 stages need 32 pixels.
pub const MIN_SIDE: u32 = 32;
/// Largest side the `none` mode accepts: beyond it the activations alone take gigabytes.
pub const MAX_NONE_SIDE: u32 = 4096;

/// How an image becomes the network's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resize {
    #[default]
    CenterCrop,
    Stretch,
    None,
}

impl std::str::FromStr for Resize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "center-crop" => Ok(Resize::CenterCrop),
            "stretch" => Ok(Resize::Stretch),
            "none" => Ok(Resize::None),
            other => Err(format!("unknown resize mode {other:?}: use center-crop, stretch or none")),
        }
    }
}

/// Decodes an image file as RGB (grayscale is replicated, alpha dropped), with size and memory
/// limits, naming the file in every error.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    // A FIFO, socket or device would block the read or never end.
    if !meta.is_file() {
        return Err(Error::Image { path: path.to_path_buf(), message: "not a regular file".into() });
    }
    if meta.len() == 0 {
        return Err(Error::Image { path: path.to_path_buf(), message: "the file is empty".into() });
    }
    let open = || -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        image::ImageReader::open(path).map_err(io)?.with_guessed_format().map_err(io)
    };
    decode(open()?, open()?, path)
}

/// Decodes an image held in memory (an upload) as [`load_image`] decodes a file; `name` stands for
/// the file in errors.
pub fn decode_image(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let path = Path::new(name);
    if bytes.is_empty() {
        return Err(Error::Image { path: path.to_path_buf(), message: "the image is empty".into() });
    }
    let open = || image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|source| Error::Io { path: path.to_path_buf(), source });
    decode(open()?, open()?, path)
}

/// Decodes `reader` after reading the size from `header` (another reader of the same image), so
/// that an image over [`MAX_PIXELS`] is refused before its pixels are.
fn decode<R: std::io::BufRead + std::io::Seek>(header: image::ImageReader<R>, mut reader: image::ImageReader<R>, path: &Path) -> Result<RgbImage> {
    let bad = |message: String| Error::Image { path: path.to_path_buf(), message };
    let decoding = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => bad(format!("too large to decode ({l}); the limit is {MAX_SIDE} px a side and 1 GiB")),
        image::ImageError::Unsupported(u) => bad(format!("unsupported image format: {u}")),
        other => bad(format!("cannot decode: {other}")),
    };
    let (w, h) = header.into_dimensions().map_err(decoding)?;
    if w as u64 * h as u64 > MAX_PIXELS {
        return Err(bad(format!("too large: {w}x{h} is {:.0} megapixels; the limit is {} (downscale it first: the models see at most 224 px)", (w as f64 * h as f64) / 1e6, MAX_PIXELS / 1_000_000)));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(1 << 30);
    reader.limits(limits);
    Ok(reader.decode().map_err(decoding)?.to_rgb8())
}

/// A preprocessed image: the normalised input and where it lies on the original.
pub struct Prepared {
    /// `[3, h, w]`, normalised.
    pub tensor: Tensor,
    pub region: Region,
    /// The resized (or cropped) image before normalisation: what `tensor` was made from.
    pub view: RgbImage,
}

/// A network's input: its size and per-channel normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// (height, width) of the input (`center-crop` and `stretch` make it).
    pub size: (usize, usize),
    /// Subtracted from each channel (of values in [0, 1]).
    pub mean: [f32; 3],
    /// Then divided by.
    pub std: [f32; 3],
}

impl Default for Preprocess {
    /// ImageNet's: 224 x 224, torchvision's mean and std.
    fn default() -> Self {
        Self { size: (224, 224), mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }
}

/// Preprocesses one RGB image for an ImageNet classifier (224 x 224, ImageNet mean and std).
pub fn prepare(img: &RgbImage, mode: Resize) -> Result<Prepared> {
    prepare_with(img, mode, &Preprocess::default())
}

/// Preprocesses one RGB image for a network's input: `center-crop` resizes the shorter side to
/// 256/224 of the input's and takes the centre (torchvision's evaluation), `stretch` resizes to
/// the input size, `none` keeps the image as it is.
pub fn prepare_with(img: &RgbImage, mode: Resize, pp: &Preprocess) -> Result<Prepared> {
    let (th, tw) = (pp.size.0 as u32, pp.size.1 as u32);
    let (w, h) = img.dimensions();
    let full = Region { x: 0, y: 0, width: w, height: h };
    let (view, region) = match mode {
        Resize::Stretch => (image::imageops::resize(img, tw, th, FilterType::Triangle), full),
        Resize::None => {
            if w < MIN_SIDE || h < MIN_SIDE {
                return Err(Error::TooSmall { width: w, height: h, min: MIN_SIDE });
            }
            if w > MAX_NONE_SIDE || h > MAX_NONE_SIDE {
                return Err(Error::TooLarge { width: w, height: h, max: MAX_NONE_SIDE });
            }
            (img.clone(), full)
        }
        // Beyond 16:1 only the centre of the long side can reach the 224-pixel crop: keep just it
        // before resizing (a 16384x1 strip would otherwise become a 4-million-pixel-wide one).
        Resize::CenterCrop if w.max(h) as u64 > 16 * w.min(h) as u64 => {
            let (cw, ch) = if w > h { (16 * h, h) } else { (w, 16 * w) };
            let (x0, y0) = ((w - cw) / 2, (h - ch) / 2);
            let p = prepare_with(&image::imageops::crop_imm(img, x0, y0, cw, ch).to_image(), mode, pp)?;
            return Ok(Prepared { tensor: p.tensor, region: Region { x: p.region.x + x0, y: p.region.y + y0, ..p.region }, view: p.view });
        }
        Resize::CenterCrop => {
            // torchvision Resize(256): the shorter side to 256 (256/224 of the input), the other truncated.
            let side = (th.max(tw) as u64 * 256 / 224) as u32;
            let (rw, rh) = if w <= h { (side, (side as u64 * h as u64 / w as u64) as u32) } else { ((side as u64 * w as u64 / h as u64) as u32, side) };
            let (rw, rh) = (rw.max(tw), rh.max(th));
            let resized = image::imageops::resize(img, rw, rh, FilterType::Triangle);
            let left = ((rw - tw) as f64 / 2.0).round() as u32;
            let top = ((rh - th) as f64 / 2.0).round() as u32;
            let crop = image::imageops::crop_imm(&resized, left, top, tw, th).to_image();
            let (sx, sy) = (w as f64 / rw as f64, h as f64 / rh as f64);
            let region = Region {
                x: (left as f64 * sx).round() as u32,
                y: (top as f64 * sy).round() as u32,
                width: ((tw as f64 * sx).round() as u32).clamp(1, w),
                height: ((th as f64 * sy).round() as u32).clamp(1, h),
            };
            (crop, region)
        }
    };
    Ok(Prepared { tensor: normalize_with(&view, pp)?, region, view })
}

/// `[3, h, w]` with ImageNet mean/std normalisation.
pub fn normalize(img: &RgbImage) -> Result<Tensor> {
    normalize_with(img, &Preprocess::default())
}

/// `[3, h, w]` with the network's mean/std normalisation.
pub fn normalize_with(img: &RgbImage, pp: &Preprocess) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (px[c] as f32 / 255.0 - pp.mean[c]) / pp.std[c];
        }
    }
    Ok(Tensor::from_vec(data, (3, h as usize, w as usize), &Device::Cpu)?)
}
