//! Textual explanations (Grad-CAM paper, section 7): name the explained layer's units by network
//! dissection (Bau et al., "Network Dissection", 2017) or, for ImageNet classifiers, by the classes
//! they push up; then report the 5 units with the largest and the 5 with the smallest alpha_k of
//! an explanation, with their names, as data and as a sentence (the report itself lives in the
//! core, beside the explanations it reads).
#![forbid(unsafe_code)]

pub mod dissect;
pub mod model;

pub use model::{dissect_model, split_dir};
pub use dissect::{concepts, dissect, image_concepts, Concept, Dissection, ImageMasks, Options, UnitName};
pub use gradcam_core::report::{report, Neuron, NeuronReport, UnitNames};

impl gradcam_core::UnitTable for Dissection {
    fn unit_name(&self, unit: usize) -> Option<(&str, f32)> {
        self.name(unit)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{0}")]
    Data(String),
    /// An option of [`dissect_model`] it does not take.
    #[error(transparent)]
    Setting(#[from] gradcam_core::SettingError),
    /// A model folder without the dissection table that was asked for.
    #[error("{} has no dissection.json (see dissect_model)", model.display())]
    NoDissection { model: std::path::PathBuf },
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
    #[error(transparent)]
    Scenes(#[from] gradcam_scenes::Error),
}

impl Error {
    /// The setting this error is about, if it is about one.
    pub fn setting(&self) -> Option<&gradcam_core::SettingError> {
        if let Error::Setting(s) = self { Some(s) } else { None }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
