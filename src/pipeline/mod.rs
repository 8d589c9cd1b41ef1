//! What the `classify`, `caption` and `vqa` commands do with one image, as library calls that
//! return the same records the CLI prints with `--json` (and that a server or a notebook-free
//! script can serialise as they are): predictions, and every method's map of every target,
//! pictured and written to a folder.

pub mod attack;
pub mod caption;
pub mod classify;
pub mod matching;
pub mod render;
mod text;
pub mod vqa;

use std::path::{Path, PathBuf};

use render::{Output, Rendered};
use gradcam_core::{Cam, Explainable, Method, NeuronReport};
use serde::Serialize;

/// Errors of the pipelines.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the core (explaining, writing pictures).
    #[error(transparent)]
    Core(#[from] gradcam_core::Error),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From loading or running an ImageNet classifier.
    #[error(transparent)]
    Encoders(#[from] gradcam_encoders::Error),
    /// From the captioner.
    #[error(transparent)]
    Captioner(#[from] gradcam_captioner::Error),
    /// From the VQA model.
    #[error(transparent)]
    Vqa(#[from] gradcam_vqa::Error),
    /// From a CLIP model.
    #[error(transparent)]
    Clip(#[from] gradcam_clip::Error),
    /// From an attack (its options, the adversarial image).
    #[error(transparent)]
    Eval(#[from] gradcam_eval::Error),
    /// A setting the call does not take.
    #[error(transparent)]
    Setting(#[from] gradcam_core::SettingError),
    /// From a tokenizer or dataset file.
    #[error(transparent)]
    Scenes(#[from] gradcam_scenes::Error),
    /// A request the model cannot answer (a class out of range, non-finite scores).
    #[error("{0}")]
    Request(String),
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
}

impl Error {
    /// The setting this error is about, if it is about one (see [`gradcam_core::SettingError`]).
    pub fn setting(&self) -> Option<&gradcam_core::SettingError> {
        match self { Error::Setting(s) => Some(s), Error::Eval(e) => e.setting(), Error::Encoders(e) => e.setting(), _ => None }
    }
}

/// The pipelines' result type.
pub type Result<T> = std::result::Result<T, Error>;

/// How to explain: the methods (one map each per target) and pytorch-grad-cam's smoothings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The methods, in order; several make comparison strips.
    pub methods: Vec<Method>,
    /// Eigen-smoothing ([`Cam::eigen_smooth`]).
    pub eigen_smooth: bool,
    /// Augmentation smoothing ([`Cam::aug_smooth`]).
    pub aug_smooth: bool,
    /// Set to stop the work ([`Cam::cancel_on`]): the pipeline then fails with a cancelled error.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Settings {
    /// The method an evaluation scores: one whose map comes from the gradients, eigen-smoothed
    /// if asked; augmentation smoothing is refused.
    pub fn eval_method(&self) -> Result<Box<dyn gradcam_core::CamMethod>> {
        use gradcam_core::SettingError;
        let [method] = self.methods[..] else {
            let names: Vec<&str> = self.methods.iter().map(|m| m.name()).collect();
            return Err(SettingError::value("methods", names.join(","), "evaluations score one method at a time").into());
        };
        if self.aug_smooth {
            return Err(SettingError::new(vec!["aug_smooth"], "is not taken by evaluations").into());
        }
        let Some(m) = method.cam_method().filter(|_| method.is_gradient_map()) else {
            return Err(SettingError::value("methods", method, format!("evaluations score the gradient-based methods, not {method}")).into());
        };
        Ok(if self.eigen_smooth { Box::new(gradcam_core::methods::EigenSmooth(m)) } else { m })
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings { methods: vec![Method::GradCam], eigen_smooth: false, aug_smooth: false, cancel: None }
    }
}

impl Settings {
    /// The explainer of `model` with these settings; Ablation-CAM and Score-CAM report (channels
    /// done, channels) to `progress`.
    pub fn cam<'m, M: Explainable + ?Sized>(&self, model: &'m M, progress: Option<&'m Progress>) -> Cam<'m, M> {
        let mut cam = Cam::new(model).eigen_smooth(self.eigen_smooth).aug_smooth(self.aug_smooth);
        if let Some(flag) = &self.cancel {
            cam = cam.cancel_on(flag.clone());
        }
        match progress {
            Some(p) => cam.on_progress(p),
            None => cam,
        }
    }
}

/// Hears (channels done, channels) while a perturbation method works.
pub type Progress = dyn Fn(usize, usize) + Sync;

/// Where one image's pictures go: `dir/STEM_...png` ([`crate::pipeline::render::Stems`] makes the
/// stems of a run unique), or nowhere (`dir: None`): the records then carry them as PNG data
/// URLs.
#[derive(Debug, Clone, Copy)]
pub struct Files<'a> {
    /// The folder (created by the caller), or `None` to keep pictures in memory.
    pub dir: Option<&'a Path>,
    /// The image's stem.
    pub stem: &'a str,
    /// Neither write nor keep the pictures: the records' `overlay` and `strip` are empty (a
    /// dataset run without `--overlays`, where the raw maps are the product).
    pub discard: bool,
}

impl<'a> Files<'a> {
    /// The pictures of image `stem` written to `dir`.
    pub fn new(dir: &'a Path, stem: &'a str) -> Self {
        Files { dir: Some(dir), stem, discard: false }
    }

    /// The pictures of image `stem` kept in memory (as PNG data URLs in the records).
    pub fn in_memory(stem: &'a str) -> Self {
        Files { dir: None, stem, discard: false }
    }

    /// Where the pictures drawn on `image` (the model saw `region` of it) go.
    pub fn output<'b>(&self, image: &'b image::RgbImage, region: gradcam_core::map::Region) -> Output<'b>
    where
        'a: 'b,
    {
        Output { dir: self.dir.filter(|_| !self.discard), stem: self.stem, image, region, discard: self.discard }
    }

    /// `dir/STEM_SUFFIX.png`, when there is a folder.
    pub fn path(&self, suffix: &str) -> Option<PathBuf> {
        self.dir.filter(|_| !self.discard).map(|dir| dir.join(format!("{}_{suffix}.png", self.stem)))
    }

    /// Writes `picture` to [`Files::path`] and returns the path; without a folder, returns the
    /// picture as a PNG data URL.
    pub fn keep(&self, picture: &image::RgbImage, suffix: &str) -> Result<String> {
        if self.discard {
            return Ok(String::new());
        }
        match self.path(suffix) {
            Some(path) => {
                gradcam_io::write_png(picture, &path)?;
                Ok(path.display().to_string())
            }
            None => data_url(picture),
        }
    }
}

/// A picture as a `data:image/png;base64,...` URL.
pub fn data_url(picture: &image::RgbImage) -> Result<String> {
    use base64::Engine;
    let mut png = std::io::Cursor::new(Vec::new());
    picture.write_to(&mut png, image::ImageFormat::Png).map_err(|e| Error::Request(format!("cannot encode a picture: {e}")))?;
    Ok(format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png.get_ref())))
}

/// One map as every command's `--json` record holds it.
#[derive(Debug, Clone, Serialize)]
pub struct MapRecord {
    /// The method's name.
    pub method: &'static str,
    /// Whether the target is a counterfactual.
    pub counterfactual: bool,
    /// The target's score y^c.
    pub score: f32,
    /// (height, width) of `cam`.
    pub cam_size: [usize; 2],
    /// The raw map, rows of the explained layer's resolution.
    pub cam: Vec<Vec<f32>>,
    /// False when the map is zero everywhere: nothing in the layer supports the target.
    pub nonzero: bool,
    /// The picture's file, or the picture as a PNG data URL when kept in memory.
    pub overlay: String,
    /// The textual explanation, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neurons: Option<NeuronReport>,
    /// Its sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl MapRecord {
    /// The record of one rendered explanation.
    pub fn new(r: &Rendered) -> Result<Self> {
        let (e, cam) = (&r.explanation, r.explanation.cam());
        Ok(MapRecord {
            method: e.method,
            counterfactual: e.is_counterfactual(),
            score: e.score,
            cam_size: [e.map_size.0, e.map_size.1],
            nonzero: cam.normalized().1,
            cam: cam.rows(),
            overlay: match &r.file {
                Some(file) => file.display().to_string(),
                None if r.discarded => String::new(),
                None => data_url(&r.picture)?,
            },
            text: r.neurons.as_ref().map(|n| n.text.clone()),
            neurons: r.neurons.clone(),
        })
    }

    /// How text output introduces the map: "Grad-CAM for", "gradcam++ for", "counterfactual
    /// (gradcam) for".
    pub fn kind(&self) -> String {
        match (self.counterfactual, self.method) {
            (true, m) => format!("counterfactual ({m}) for"),
            (false, "gradcam") => "Grad-CAM for".to_string(),
            (false, m) => format!("{m} for"),
        }
    }
}

/// The neuron report of an explanation by a table's unit names.
pub(crate) fn named_report<'a>(names: &'a gradcam_core::UnitNames<'a>) -> impl Fn(&gradcam_core::Explanation, &str) -> gradcam_core::Result<NeuronReport> + 'a {
    move |e, subject| e.neurons(names, subject).ok_or_else(|| gradcam_core::Error::Unsupported(format!("{} gives no weights to report", e.method)))
}
