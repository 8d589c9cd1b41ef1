//! A small CNN for ShapeScenes-sized images (64 to 128 px), trained from scratch with the models
//! that use it. Four 3x3 convolutions with ReLU, strides 1, 2, 2, 1, so that the explained layer
//! `conv4` keeps a quarter of the input resolution (16 x 16 at 64 px).
//!
//! Spatial words ("left of") need to know where things are after global pooling. Two ways:
//! - [`Pooling::moments`] (current models): beside the average and maximum of each channel, its
//!   first spatial moments (mean of activation x column, activation x row, coordinates in
//!   [-1, 1]). Position lives in the pooling, the units stay position-free, and because the
//!   coordinates average to zero the moments add nothing to Grad-CAM's channel weights.
//! - `coord_conv` (models trained before): `conv4` also sees two coordinate channels (CoordConv,
//!   Liu et al. 2018); its units then mix position into what they detect.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use gradcam_kernels::{Activation, Padding, Rule, TrainableConv2d};
use image::{imageops::FilterType, RgbImage};

use crate::Result;

/// The explained layer's name.
pub const LAYER: &str = "conv4";

/// The input sizes a scene-CNN model may declare (`image_size` in config.json): beyond these, a
/// damaged or hostile config would make every image a huge allocation.
pub const IMAGE_SIZES: std::ops::RangeInclusive<u64> = 8..=1024;

/// (out channels, stride) of conv1..conv4 (conv4's width is the model's `channels`).
const CONVS: [(usize, usize); 4] = [(16, 1), (32, 2), (64, 2), (CHANNELS, 1)];

/// Channels of the explained layer of a newly trained model (`gradcam prune` removes the units
/// that never fire; `channels` in `config.json` gives the width of a model's layer).
pub const CHANNELS: usize = 96;

/// (out channels, stride) of conv1..conv4 of a scene CNN whose `conv4` has `channels` units.
pub fn conv_shapes(channels: usize) -> [(usize, usize); 4] {
    let mut c = CONVS;
    c[3].0 = channels;
    c
}

pub fn default_channels() -> usize {
    CHANNELS
}

/// The scene CNN's part of a model folder's `config.json` (the captioner's and the VQA model's
/// configs hold it flattened, beside their own fields).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EncoderConfig {
    /// The image encoder; only `scene-cnn` is trained here.
    pub encoder: String,
    /// Images are resized to `image_size` x `image_size`.
    pub image_size: u32,
    /// `conv4` sees coordinate channels (models trained before spatial moments).
    #[serde(default = "coord_conv_by_default")]
    pub coord_conv: bool,
    /// The pooled image vector carries each channel's spatial moments.
    #[serde(default)]
    pub pool_moments: bool,
    /// Units of the explained layer `conv4`.
    #[serde(default = "default_channels")]
    pub channels: usize,
}

fn coord_conv_by_default() -> bool {
    true
}

impl EncoderConfig {
    /// A new model's encoder: `image_size` pixels, spatial moments, no coordinate channels.
    pub fn new(image_size: u32) -> Self {
        EncoderConfig { encoder: "scene-cnn".into(), image_size, coord_conv: false, pool_moments: true, channels: CHANNELS }
    }

    /// How the explained layer is pooled into the image vector.
    pub fn pooling(&self) -> Pooling {
        Pooling { moments: self.pool_moments }
    }
}

pub struct SceneCnn {
    convs: Vec<(Tensor, Tensor, usize)>,
    coord_conv: bool,
}

impl SceneCnn {
    /// Parameters `conv1.weight`, `conv1.bias`, ... under `vb` (He-uniform initialised when the
    /// `VarBuilder` creates them); with `coord_conv`, `conv4` takes two coordinate channels more;
    /// `conv4` has `channels` units.
    pub fn new(vb: VarBuilder, coord_conv: bool, channels: usize) -> Result<Self> {
        let mut convs = Vec::new();
        let mut cin = 3;
        for (i, &(cout, stride)) in CONVS.iter().enumerate() {
            let cout = if i == 3 { channels } else { cout };
            let cin_here = if i == 3 && coord_conv { cin + 2 } else { cin };
            let fan_in = (cin_here * 9) as f64;
            let bound = (6.0 / fan_in).sqrt();
            let vb = vb.pp(format!("conv{}", i + 1));
            let w = vb.get_with_hints((cout, cin_here, 3, 3), "weight", Init::Uniform { lo: -bound, up: bound })?;
            let b = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
            convs.push((w, b, stride));
            cin = cout;
        }
        Ok(Self { convs, coord_conv })
    }

    /// Activations of `conv4`.
    ///
    /// # Shapes
    /// `[batch, 3, s, s]` -> `[batch, channels, s / 4, s / 4]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Rule::Exact)
    }

    /// [`SceneCnn::forward`] with the backward of its ReLUs following `rule`.
    pub fn forward_with(&self, x: &Tensor, rule: Rule) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, (w, b, stride)) in self.convs.iter().enumerate() {
            if i == 3 && self.coord_conv {
                x = Tensor::cat(&[&x, &coordinates(&x)?], 1)?; // [b, c + 2, h, w]
            }
            let conv = TrainableConv2d { stride: *stride, padding: Padding::Same, activation: Activation::Relu, rule };
            x = conv.forward(&x, w, b)?;
        }
        Ok(x)
    }

    /// An image as the network's input: resized to `size` (bilinear) and scaled to [-1, 1].
    ///
    /// # Shapes
    /// -> `[3, size, size]`.
    pub fn preprocess(img: &RgbImage, size: u32) -> Result<Tensor> {
        let img = if img.dimensions() == (size, size) { img.clone() } else { image::imageops::resize(img, size, size, FilterType::Triangle) };
        let plane = (size * size) as usize;
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                data[c * plane + i] = px[c] as f32 / 127.5 - 1.0;
            }
        }
        Ok(Tensor::from_vec(data, (3, size as usize, size as usize), &Device::Cpu)?)
    }
}

/// Global pooling of the explained layer into the vector the decoder sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pooling {
    /// Add each channel's first spatial moments (see the module docs).
    pub moments: bool,
}

impl Pooling {
    /// Length of the pooled vector for `channels` channels.
    pub fn width(&self, channels: usize) -> usize {
        if self.moments {
            4 * channels
        } else {
            2 * channels
        }
    }

    /// Averages, maxima, then (with `moments`) the x and y moments of every channel; differentiable.
    ///
    /// # Shapes
    /// `[n, C, h, w]` -> `[n, width(C)]`.
    pub fn forward(&self, a: &Tensor) -> Result<Tensor> {
        let avg_max = gradcam_kernels::GlobalAvgMaxPool.forward(a)?;
        if !self.moments {
            return Ok(avg_max);
        }
        let (n, c, h, w) = a.dims4()?;
        let grid = coordinates(&a.narrow(0, 0, 1)?)?; // [1, 2, h, w]
        let moment = |i: usize| -> Result<Tensor> {
            let g = grid.narrow(1, i, 1)?.broadcast_as((n, c, h, w))?;
            Ok((a * g)?.mean((2, 3))?)
        };
        Ok(Tensor::cat(&[avg_max, moment(0)?, moment(1)?], 1)?)
    }
}

/// Two channels holding each pixel's x and y in [-1, 1].
///
/// # Shapes
/// `[batch, c, h, w]` -> `[batch, 2, h, w]`.
fn coordinates(x: &Tensor) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let xs = Tensor::arange(0u32, w as u32, x.device())?.to_dtype(DType::F32)?.affine(2.0 / (w.max(2) - 1) as f64, -1.0)?;
    let ys = Tensor::arange(0u32, h as u32, x.device())?.to_dtype(DType::F32)?.affine(2.0 / (h.max(2) - 1) as f64, -1.0)?;
    let xs = xs.reshape((1, 1, 1, w))?.broadcast_as((b, 1, h, w))?;
    let ys = ys.reshape((1, 1, h, 1))?.broadcast_as((b, 1, h, w))?;
    Ok(Tensor::cat(&[&xs, &ys], 1)?.contiguous()?)
}

/// Deterministic initial values for every parameter of a model built on a `VarMap`, from the
/// seed (candle's initialisers use an unseeded generator): He-uniform for the scene CNN
/// (`encoder.*`), U(-1, 1) for embeddings, U(-1/sqrt(fan_in), ..) for other weights (PyTorch's
/// default), U(-1/sqrt(H), ..) for LSTM biases, zeros for other biases.
pub fn init_parameters(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().map_err(|_| crate::Error::Checkpoint("parameter map poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    // A splitmix64 stream, as ShapeScenes uses.
    let mut state = seed;
    let mut unit = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    };
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        let lstm = name.split('.').any(|p| p.contains("lstm"));
        let bound = if name.contains("bias") {
            if lstm {
                1.0 / (dims[0] as f32 / 4.0).sqrt()
            } else {
                0.0
            }
        } else if name.starts_with("encoder") {
            (6.0 / fan_in as f32).sqrt()
        } else if name.contains("embed") {
            1.0
        } else {
            1.0 / (fan_in as f32).sqrt()
        };
        // Written as ShapeScenes' `Rng::range` does, so that models trained before this moved
        // here keep their exact initial values.
        let values: Vec<f32> = (0..n).map(|_| -bound + (bound + bound) * unit()).collect();
        var.set(&Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?)?;
    }
    Ok(())
}

/// Writes every parameter of a model being trained (`model.safetensors` of its folder) through a
/// temporary file, as the trainers do after each epoch.
pub fn save_parameters(varmap: &candle_nn::VarMap, path: &std::path::Path) -> Result<()> {
    let tensors = varmap.data().lock().map_err(|_| crate::Error::Checkpoint("parameter map poisoned".into()))?.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    Ok(gradcam_io::write_safetensors(&tensors, path)?)
}

/// The weights of a trained model folder (`dir/model.safetensors`), memory-mapped, with an error
/// naming the file when it is missing or not safetensors.
pub fn model_weights(dir: &std::path::Path) -> Result<VarBuilder<'static>> {
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(crate::Error::Io { path: weights, source: std::io::Error::new(std::io::ErrorKind::NotFound, "no model.safetensors") });
    }
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| crate::Error::Checkpoint(format!("{}: {e}", weights.display())))?;
    crate::weights::check_finite(tensors.iter(), &weights.display().to_string())?;
    Ok(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
}

/// What a trained model folder's `config.json` says about its scene CNN: input size and whether
/// `conv4` takes coordinate channels (absent in configs older than the option: yes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSpec {
    pub image_size: u32,
    pub coord_conv: bool,
    pub channels: usize,
}

impl EncoderSpec {
    /// Reads `dir/config.json` (a captioner's or a VQA model's), which must use the scene CNN.
    pub fn read(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| crate::Error::Io { path: path.clone(), source })?;
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| crate::Error::Checkpoint(format!("{}: {e}", path.display())))?;
        if cfg.get("encoder").and_then(|v| v.as_str()) != Some("scene-cnn") {
            return Err(crate::Error::Checkpoint(format!("{}: not a model with the scene CNN encoder", path.display())));
        }
        let size = cfg.get("image_size").and_then(|v| v.as_u64()).filter(|&s| IMAGE_SIZES.contains(&s));
        let image_size = size.ok_or_else(|| crate::Error::Checkpoint(format!("{}: image_size must be a number of pixels in {IMAGE_SIZES:?}", path.display())))? as u32;
        let channels = cfg.get("channels").map_or(Some(CHANNELS as u64), |v| v.as_u64().filter(|&c| c > 0)).ok_or_else(|| crate::Error::Checkpoint(format!("{}: channels must be a positive integer", path.display())))?;
        Ok(Self { image_size, coord_conv: cfg.get("coord_conv").and_then(|v| v.as_bool()).unwrap_or(true), channels: channels as usize })
    }
}

/// The scene CNN of a trained model folder (captioner or VQA: `config.json`, weights under
/// `encoder.*` in `model.safetensors`) and its input size.
pub fn load_encoder(dir: &std::path::Path) -> Result<(SceneCnn, u32)> {
    let spec = EncoderSpec::read(dir)?;
    let vb = model_weights(dir)?;
    let cnn = SceneCnn::new(vb.pp("encoder"), spec.coord_conv, spec.channels).map_err(|e| crate::Error::Checkpoint(format!("{}: {e}", dir.join("model.safetensors").display())))?;
    Ok((cnn, spec.image_size))
}

/// The units of a model's `conv4` removed: `keep` (ascending unit numbers) sliced out of every
/// tensor indexed by them (`encoder.conv4.*`, the image projection's columns in each pooled block,
/// the captioner's training-only word head); the other tensors as they are.
pub fn prune_tensors(tensors: &std::collections::HashMap<String, Tensor>, keep: &[u32], channels: usize, pooling: Pooling) -> Result<std::collections::HashMap<String, Tensor>> {
    for name in ["encoder.conv4.weight", "encoder.conv4.bias", "image_proj.weight", "image_proj.bias"] {
        match tensors.get(name) {
            None => return Err(crate::Error::Checkpoint(format!("no tensor {name}"))),
            Some(t) if name == "encoder.conv4.bias" && t.dims() != [channels] => {
                return Err(crate::Error::Checkpoint(format!("{name} has shape {:?}, config.json says {channels} channels", t.dims())))
            }
            _ => {}
        }
    }
    if keep.iter().any(|&u| u as usize >= channels) {
        return Err(crate::Error::Checkpoint(format!("unit numbers beyond the layer's {channels}")));
    }
    let device = Device::Cpu;
    let idx = Tensor::new(keep, &device)?;
    let blocks = pooling.width(channels) / channels;
    let proj: Vec<u32> = (0..blocks as u32).flat_map(|b| keep.iter().map(move |&u| b * channels as u32 + u)).collect();
    let proj = Tensor::new(proj.as_slice(), &device)?;
    tensors
        .iter()
        .map(|(name, t)| {
            let sliced = match name.as_str() {
                "encoder.conv4.weight" | "encoder.conv4.bias" => t.index_select(&idx, 0)?,
                "image_proj.weight" => t.index_select(&proj, 1)?,
                "words.weight" => t.index_select(&idx, 1)?,
                _ => t.clone(),
            };
            Ok((name.clone(), sliced))
        })
        .collect()
}

/// The image vector the rest of a captioner or VQA model sees: the image projection of the pooled
/// activations.
///
/// # Shapes
/// `a`: `[n, C, h, w]`, `weight`: `[E, width(C)]`, `bias`: `[E]` -> `[n, E]`.
pub fn image_vector(a: &Tensor, pooling: Pooling, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(pooling.forward(a)?.matmul(&weight.t()?)?.broadcast_add(bias)?)
}

/// Reads the `config.json` of a model folder built on the scene CNN (the captioner's, the VQA
/// model's) as `T`, and checks what the encoder needs of it: `spec` gives its encoder name, which
/// must be `scene-cnn`, and its image side, one of [`IMAGE_SIZES`].
pub fn read_config<T: serde::de::DeserializeOwned>(path: &std::path::Path, spec: impl Fn(&T) -> &EncoderConfig) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| crate::Error::Io { path: path.to_path_buf(), source })?;
    let bad = |problem: String| crate::Error::Config { file: path.to_path_buf(), problem };
    let cfg: T = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let EncoderConfig { encoder, image_size, .. } = spec(&cfg);
    let (encoder, image_size) = (encoder.as_str(), *image_size);
    if !IMAGE_SIZES.contains(&(image_size as u64)) {
        return Err(bad(format!("image_size {image_size} is outside {IMAGE_SIZES:?} pixels")));
    }
    if encoder != "scene-cnn" {
        return Err(bad(format!("encoder {encoder:?} is not supported; use \"scene-cnn\"")));
    }
    Ok(cfg)
}
