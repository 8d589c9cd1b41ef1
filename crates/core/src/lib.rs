#![deny(missing_docs)]
#![forbid(unsafe_code)]
//! Gradient-capture core of gradcam (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep
//! Networks via Gradient-based Localization").
//!
//! A model is split at the explained layer ([`Explainable`], or [`Split`] of two closures): its
//! `features` give the activations A, which are detached and wrapped in a `Var`; its `head` runs
//! from there to scores; a [`Target`] picks y^c; the backward runs through the head only and
//! dy/dA is read from the `Var`. A method ([`Explainer`]; the gradient-based ones are
//! [`CamMethod`]s) turns that into an [`Explanation`]: the weights alpha_k and a map. [`Cam`]
//! runs a built-in [`Method`] or yours. This crate knows nothing about captions, questions or
//! file formats, and has no `unsafe` code: its ops are `gradcam-kernels`'.

pub mod attention;
pub mod cam;
pub mod explainer;
pub mod guided;
pub mod layout;
pub mod map;
pub mod method;
pub mod methods;
pub mod metrics;
pub mod perturbation;
pub mod report;
pub mod setting;
pub mod split;

pub use attention::{Attention, Relevance, Rollout};
pub use cam::{explain, weighted_sum, CamMethod, Context, Explainable, Explainer, GradCam, Request, Score};
pub use explainer::{AnyMethod, Cam, Explanation, Target};
pub use split::{AttentionForward, GuidedForward, NoGuidedForward, Split};
pub use gradcam_kernels::Rule;
pub use layout::Layout;
pub use map::Map;
pub use method::{Method, NotGradientMethod, UnknownMethod};
pub use report::{class_named_report, report, Neuron, NeuronReport, UnitNames, UnitTable};
pub use setting::{chain_message, SettingError};

/// Errors of the gradient-capture core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A target names a score the output row does not have.
    #[error("class {class} is out of range: the model has {num_classes} classes (0..={})", num_classes.saturating_sub(1))]
    ClassOutOfRange {
        /// The index asked for.
        class: usize,
        /// The row's length.
        num_classes: usize,
    },
    /// A request names an image the batch does not have.
    #[error("request for image {image} but the batch has {batch} images")]
    ImageOutOfRange {
        /// The row asked for.
        image: usize,
        /// The batch size.
        batch: usize,
    },
    /// The explained score is NaN or infinite.
    #[error("the target score is not finite ({value}); the map would be meaningless")]
    NonFiniteScore {
        /// The score.
        value: f32,
    },
    /// A map or weights came out NaN or infinite.
    #[error("the {what} contains NaN or infinite values")]
    NonFinite {
        /// What it was.
        what: &'static str,
    },
    /// The head's output does not depend on the activations.
    #[error("the head did not produce a gradient for the explained activations; is the head connected to them?")]
    NoGradient,
    /// Guided Backpropagation cannot run on this model: its ReLUs cannot follow the guided rule.
    #[error("guided backpropagation cannot run: {reason}")]
    CannotGuide {
        /// Why (which model or op).
        reason: String,
    },
    /// Rollout or relevance on a model that gives no attention probabilities.
    #[error("rollout and relevance need a transformer's attention: {reason}")]
    NoAttention {
        /// Why (which model, what is missing).
        reason: String,
    },
    /// The work was cancelled ([`crate::Cam::cancel_on`]) before it ended.
    #[error("cancelled")]
    Cancelled,
    /// A tensor has the wrong shape for where it is used.
    #[error("{0}")]
    Shape(String),
    /// A combination of options that does not exist.
    #[error("{0}")]
    Unsupported(String),
    /// A picture or file of an explanation could not be written (by the front ends that write
    /// them; this crate writes no files).
    #[error(transparent)]
    Write(Box<dyn std::error::Error + Send + Sync>),
    /// The model failed (its own error, kept whole: which weights, which file, which value).
    #[error(transparent)]
    Model(Box<dyn std::error::Error + Send + Sync>),
}

/// The core's result type.
pub type Result<T> = std::result::Result<T, Error>;
