//! Gradient-capture core of gradcam (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep
//! Networks via Gradient-based Localization").
//!
//! A model is split at the explained layer ([`Explainable`]): its `features` give the activations
//! A, which are detached and wrapped in a `Var`; its `head` runs from there to scores; a
//! [`Target`] picks y^c; the backward runs through the head only and dy/dA is read from the `Var`.
//! A [`CamMethod`] turns (A, dy/dA) into the weights alpha_k and a map. This crate knows nothing
//! about captions, questions or file formats.

pub mod cam;
pub mod guided;
pub mod map;
pub mod methods;
pub mod metrics;
pub mod ops;

pub use cam::{explain, ClassLogit, CamMethod, CamResult, Counterfactual, Explainable, GradCam, Request, Target};
pub use guided::{gradient_image, guided_backprop, guided_gradcam};
pub use map::Map;
pub use methods::{augmentation_smoothing, EigenCam, EigenSmooth, GradCamPlusPlus, HiResCam, LayerCam, XGradCam};

/// The gradient-based CAM methods by name (`gradcam`, `gradcam++`, `hirescam`, `xgradcam`,
/// `layercam`, `eigencam`).
pub fn method_by_name(name: &str) -> Option<Box<dyn CamMethod>> {
    Some(match name {
        "gradcam" => Box::new(GradCam),
        "gradcam++" | "gradcampp" => Box::new(GradCamPlusPlus),
        "hirescam" => Box::new(HiResCam),
        "xgradcam" => Box::new(XGradCam),
        "layercam" => Box::new(LayerCam),
        "eigencam" => Box::new(EigenCam),
        _ => return None,
    })
}

/// Errors of the gradient-capture core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("class {class} is out of range: the model has {num_classes} classes (0..={})", num_classes.saturating_sub(1))]
    ClassOutOfRange { class: usize, num_classes: usize },
    #[error("request for image {image} but the batch has {batch} images")]
    ImageOutOfRange { image: usize, batch: usize },
    #[error("the target score is not finite ({value}); the map would be meaningless")]
    NonFiniteScore { value: f32 },
    #[error("the {what} contains NaN or infinite values")]
    NonFinite { what: &'static str },
    #[error("the head did not produce a gradient for the explained activations; is the head connected to them?")]
    NoGradient,
    #[error("cannot write {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot encode {path}: {source}")]
    Encode { path: std::path::PathBuf, source: image::ImageError },
}

pub type Result<T> = std::result::Result<T, Error>;
