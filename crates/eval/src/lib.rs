//! The paper's evaluations as one protocol for every kind of model: weakly-supervised
//! localization (section 4.1), the pointing game and its recall variant (section 4.3),
//! faithfulness against occlusion (section 5.3), deletion / insertion AUC, and the energy of the
//! map inside the object's box (the DenseCap comparison of section 8.1).
//!
//! A model under evaluation is a [`Subject`]: for each image of a dataset it says what to explain
//! (the [`Case`]s: a class, a caption word, an answer) and which ground-truth objects each case
//! refers to, produces the raw maps, and scores perturbed copies of its input. [`run`] does the
//! rest, the same way for classifiers, captioners and VQA models.
#![forbid(unsafe_code)]

pub mod adversarial;
pub mod attack;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clip;
pub mod fold;
mod perturb;
pub mod segment;
pub mod report;
mod run;
pub mod session;
pub mod shards;
pub mod subjects;

use std::path::PathBuf;

use candle_core::Tensor;
use gradcam_core::metrics::BoundingBox;
use gradcam_core::{Explainer, Map};
use gradcam_scenes::rle::Mask;
use image::RgbImage;

pub use fold::{Mean, Ranked, Summary, Tally};
pub use run::{run, run_shard, CaseResult, ExampleResult, Options, Step};
pub use gradcam_runs::Shard;
pub use session::{AnySubject, ModelRef, Outputs};

/// Errors of the evaluation crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Core(#[from] gradcam_core::Error),
    #[error(transparent)]
    Encoders(#[from] gradcam_encoders::Error),
    #[error(transparent)]
    Scenes(#[from] gradcam_scenes::Error),
    #[error(transparent)]
    Captioner(#[from] gradcam_captioner::Error),
    #[error(transparent)]
    Vqa(#[from] gradcam_vqa::Error),
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Options(String),
    /// An option the evaluation does not take (by its name in [`Options`], [`AdversarialOptions`](adversarial::AdversarialOptions) or [`attack::Pgd`]).
    #[error(transparent)]
    Setting(#[from] gradcam_core::SettingError),
    /// From a CLIP model (its folder, its texts).
    #[error(transparent)]
    Clip(#[from] gradcam_clip::Error),
    /// `model` names neither a classifier nor a captioner's or VQA model's folder.
    #[error("{model}: neither a classifier (efficientnet-lite0, vgg16, resnet18, resnet50, FILE.onnx) nor a model folder with config.json")]
    NotAModel { model: String, #[source] source: std::io::Error },
    /// The dataset has nothing to evaluate.
    #[error("{} has no {what} to evaluate", data.display())]
    Empty { data: PathBuf, what: &'static str },
    /// A ground-truth category the classifier has no class for.
    #[error("{}: category {category:?} {}", file.display(), if *imagenet { "is not an ImageNet class name; a classifier's ground truth must name its classes as ImageNet does (e.g. \"tabby\", \"espresso\"), or give the model's class names (its labels file)" } else { "is not one of the model's class names (an ONNX model's come from its labels file, one per line)" })]
    UnknownCategory { file: PathBuf, category: String, imagenet: bool },
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
    /// The model named `model` could not be loaded for the evaluation.
    #[error("loading {model}")]
    Loading { model: String, #[source] source: Box<Error> },
}

impl Error {
    /// The setting this error is about, if it is about one (here or in the model's loading).
    pub fn setting(&self) -> Option<&gradcam_core::SettingError> {
        match self { Error::Setting(s) => Some(s), Error::Encoders(e) => e.setting(), _ => None }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The evaluations [`run`] can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Localization,
    Pointing,
    Faithfulness,
    Deletion,
    Insertion,
    Energy,
    Segmentation,
}

impl Task {
    pub const ALL: [Task; 7] = [Task::Localization, Task::Pointing, Task::Faithfulness, Task::Deletion, Task::Insertion, Task::Energy, Task::Segmentation];

    pub fn name(self) -> &'static str {
        match self {
            Task::Localization => "localization",
            Task::Pointing => "pointing",
            Task::Faithfulness => "faithfulness",
            Task::Deletion => "deletion",
            Task::Insertion => "insertion",
            Task::Energy => "energy",
            Task::Segmentation => "segmentation",
        }
    }
}

impl Task {
    /// Task names as the CLI takes them (`all` for every one), sorted and without repeats.
    pub fn parse_list(names: &[String]) -> Result<Vec<Task>> {
        let mut tasks = Vec::new();
        for n in names {
            match n.trim() {
                "all" => tasks.extend(Task::ALL),
                other => tasks.push(other.parse::<Task>().map_err(Error::Options)?),
            }
        }
        tasks.sort();
        tasks.dedup();
        Ok(tasks)
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown task {s:?}: use {} or all", Task::ALL.map(Task::name).join(", ")))
    }
}

/// How far from an object the map's peak may land and still count as pointing at it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tolerance {
    Pixels(f32),
    /// A fraction of the image's longer side.
    Fraction(f32),
}

impl Tolerance {
    /// In pixels of an `h x w` image.
    pub fn pixels(self, h: usize, w: usize) -> f32 {
        match self {
            Tolerance::Pixels(p) => p,
            Tolerance::Fraction(f) => f * h.max(w) as f32,
        }
    }
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tolerance::Pixels(p) => write!(f, "{p} px"),
            Tolerance::Fraction(x) => write!(f, "{x} of the image's longer side"),
        }
    }
}

impl std::str::FromStr for Tolerance {
    type Err = String;
    /// `15px` (pixels) or `0.0625` (a fraction of the image's longer side).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("bad tolerance {s:?}: give pixels (`15px`) or a fraction of the image's longer side (`0.0625`)");
        if let Some(px) = s.strip_suffix("px") {
            let v: f32 = px.trim().parse().map_err(|_| bad())?;
            return (v.is_finite() && v >= 0.0).then_some(Tolerance::Pixels(v)).ok_or_else(bad);
        }
        let v: f32 = s.parse().map_err(|_| bad())?;
        (v.is_finite() && (0.0..=1.0).contains(&v)).then_some(Tolerance::Fraction(v)).ok_or_else(bad)
    }
}

/// A ground-truth object, in pixels of the original image.
#[derive(Debug, Clone)]
pub struct Object {
    pub bbox: BoundingBox,
    pub mask: Mask,
}

/// One thing to explain in one image.
#[derive(Debug, Clone)]
pub struct Case {
    /// What is explained: a class name, a caption word, `question -> answer`.
    pub label: String,
    /// The row of the per-group table: `class`, `color`, `shape`, a question type.
    pub group: String,
    /// The objects the target refers to; empty when it refers to none (a class that is not in the
    /// image, a word that names nothing there, an answer whose evidence is not one object).
    pub objects: Vec<Object>,
    /// For classifiers: the class's rank among the predictions (0 = top-1), when in the top 5.
    pub rank: Option<usize>,
    /// The model's probability of the target on the clean image.
    pub prob: f32,
    /// Measured by faithfulness and deletion / insertion (each a sweep of forward passes).
    pub primary: bool,
}

/// One image with what to explain in it.
pub struct Example<S> {
    /// The image's file name.
    pub name: String,
    /// The original image; pointing, localization and energy are measured on it.
    pub image: RgbImage,
    /// The model's input, `[1, 3, H, W]`; occlusion, deletion and insertion perturb it.
    pub input: Tensor,
    pub cases: Vec<Case>,
    /// How well the model did on this image (lower is worse): `--failures` shows the lowest.
    pub quality: f64,
    /// The prediction against the truth, in words.
    pub summary: String,
    /// What the subject needs to explain and score this example again.
    pub state: S,
}

/// A model under evaluation over a dataset.
pub trait Subject {
    type State;
    /// `classifier`, `captioner` or `vqa`.
    fn kind(&self) -> &'static str;
    /// Number of images in the dataset.
    fn len(&self) -> usize;
    /// Runs the model on image `i` and says what to explain there.
    fn example(&self, i: usize) -> Result<Example<Self::State>>;
    /// The raw map (at the explained layer's resolution) of every case, in order.
    /// `method` is any [`Explainer`]: the gradient family, or rollout and relevance on a
    /// transformer (they read the example's input).
    fn maps(&self, ex: &Example<Self::State>, method: &dyn Explainer) -> Result<Vec<Map>>;
    /// For each row of `inputs` (`[n, 3, H, W]`, perturbed copies of the example's input), the
    /// explained score (what the map differentiates) and the probability of every case.
    fn scores(&self, ex: &Example<Self::State>, inputs: &Tensor) -> Result<Vec<Vec<(f32, f32)>>>;
}
