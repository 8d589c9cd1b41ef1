//! A classifier trained here on a COCO-instances dataset (`gradcam train classifier`): the scene
//! CNN, global average pooling and one linear layer, read from its model folder
//! (`config.json`, `model.safetensors`) as a [`Network`] that every command explains like the
//! ImageNet ones. Grad-CAM at `conv4` of this network is CAM (Zhou et al. 2016) exactly.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use gradcam_kernels::{Activation, Conv2d, Linear, Padding, Rule};
use serde::{Deserialize, Serialize};

use crate::network::{global_avg_pool, Layer, Network};
use crate::preprocess::Preprocess;
use crate::scene_cnn::{self, IMAGE_SIZES};
use crate::{Error, Result};

/// The `architecture` a classifier's `config.json` names.
pub const ARCHITECTURE: &str = "scene-classifier";

/// `config.json` of a scene classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub architecture: String,
    /// Always `scene-cnn` (so that `gradcam dissect` and `prune` read the encoder).
    pub encoder: String,
    pub image_size: u32,
    pub channels: usize,
    #[serde(default)]
    pub coord_conv: bool,
    /// Class names, in output order.
    pub labels: Vec<String>,
    /// The dataset's category id of each class.
    pub category_ids: Vec<u64>,
}

impl Config {
    pub fn new(image_size: u32, channels: usize, labels: Vec<String>, category_ids: Vec<u64>) -> Self {
        Config { architecture: ARCHITECTURE.into(), encoder: "scene-cnn".into(), image_size, channels, coord_conv: false, labels, category_ids }
    }

    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let cfg: Config = serde_json::from_str(&text).map_err(|e| Error::Checkpoint(format!("{}: not a classifier's config: {e}", path.display())))?;
        let bad = |m: String| Err(Error::Checkpoint(format!("{}: {m}", path.display())));
        if cfg.architecture != ARCHITECTURE || cfg.encoder != "scene-cnn" {
            return bad(format!("architecture {:?} / encoder {:?}: not a {ARCHITECTURE} with the scene-cnn encoder", cfg.architecture, cfg.encoder));
        }
        if !IMAGE_SIZES.contains(&(cfg.image_size as u64)) || cfg.channels == 0 || cfg.channels > 4096 {
            return bad(format!("image_size {} must be in {IMAGE_SIZES:?} and channels {} in 1..=4096", cfg.image_size, cfg.channels));
        }
        if cfg.labels.len() < 2 || cfg.labels.len() != cfg.category_ids.len() {
            return bad(format!("{} labels and {} category ids: give one per class, at least 2", cfg.labels.len(), cfg.category_ids.len()));
        }
        Ok(cfg)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        Ok(gradcam_io::write_atomic(&dir.join("config.json"), text.as_bytes())?)
    }
}

/// Whether `dir` is a classifier folder: its config.json says `"architecture": "scene-classifier"`
/// (a captioner's or VQA model's does not).
pub fn is_classifier_dir(dir: &Path) -> bool {
    let config = std::fs::read_to_string(dir.join("config.json")).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    config.is_some_and(|c| c.get("architecture").and_then(|a| a.as_str()) == Some(ARCHITECTURE))
}

struct Head {
    fc: Linear,
}

impl Layer for Head {
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        self.fc.forward_with(&global_avg_pool(x)?, rule) // [b, classes]
    }
}

/// The classifier in `dir` as a network with layers `conv1` .. `conv4` (default `conv4`), input
/// `image_size` square scaled to [-1, 1], and the class names of its config.
pub fn load(dir: &Path) -> Result<Network> {
    let cfg = Config::load(dir)?;
    let weights = dir.join("model.safetensors");
    let vb = scene_cnn::model_weights(dir)?;
    let origin = weights.display().to_string();
    let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = vb.get_unchecked(name).map_err(|_| Error::MissingTensor { name: name.into(), origin: origin.clone(), hint: format!("a {ARCHITECTURE} has encoder.conv1..4 and classifier") })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch { name: name.into(), origin: origin.clone(), expected: shape.to_vec(), found: t.dims().to_vec() });
        }
        Ok(t)
    };
    let mut layers: Vec<(String, Box<dyn Layer>)> = Vec::new();
    let mut cin = 3;
    for (i, (cout, stride)) in scene_cnn::conv_shapes(cfg.channels).into_iter().enumerate() {
        let name = format!("conv{}", i + 1);
        let w = get(&format!("encoder.{name}.weight"), &[cout, cin, 3, 3])?;
        let b = get(&format!("encoder.{name}.bias"), &[cout])?;
        layers.push((name, Box::new(Conv2d::new(&w, Some(&b), 1, stride, Padding::Same, Activation::Relu)?)));
        cin = cout;
    }
    let classes = cfg.labels.len();
    let fc = Linear::new(&get("classifier.weight", &[classes, cfg.channels])?, Some(&get("classifier.bias", &[classes])?), Activation::Identity)?;
    let name = dir.display().to_string();
    let size = cfg.image_size as usize;
    Ok(Network::new(name, layers, Box::new(Head { fc }), scene_cnn::LAYER, classes)
        .with_preprocess(Preprocess { size: (size, size), mean: [0.5; 3], std: [0.5; 3] })
        .with_labels(Arc::new(cfg.labels))
        .with_default_resize(crate::preprocess::Resize::Stretch))
}
