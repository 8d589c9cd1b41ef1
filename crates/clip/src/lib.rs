//! CLIP-style image-text matching, explained (Grad-CAM paper, section 8, on today's
//! vision-language models): the target is the cosine similarity of the L2-normalised image and
//! text embeddings (or CLIP's zero-shot probability of a text among several); the text tower runs
//! forward only, the image tower is split at a token layer as any model. Two kinds of model:
//! [`model::Clip`], a small CLIP trained here on ShapeScenes (with ground truth for every phrase),
//! and [`pair::OnnxPair`], any CLIP exported as an image / text pair of ONNX files.
#![forbid(unsafe_code)]

pub mod card;
#[cfg(feature = "cli")]
pub mod cli;
pub mod eval;
pub mod matcher;
pub mod matching;
pub mod model;
pub mod pair;
pub mod text;
pub mod train;
mod trained;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use matcher::{Matcher, TextInfo};
pub use pair::OnnxPair;
pub use matching::{Matching, Probability, LOGIT_SCALE};
pub use model::{Clip, Config};
pub use trained::{Trained, VisionSplit};

/// Errors of the CLIP crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model folder, file or setting that cannot be used, and why.
    #[error("{0}")]
    Model(String),
    /// A text with no words.
    #[error("text {index} is empty; give each --text some words")]
    EmptyText { index: usize },
    #[error("training: {0}")]
    Training(String),
    /// The training loop's errors (a setting out of range among them).
    #[error("training")]
    Train(#[from] gradcam_train::Error),
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
    #[error(transparent)]
    Scenes(#[from] gradcam_scenes::Error),
    #[error(transparent)]
    Encoders(#[from] gradcam_encoders::Error),
    #[error(transparent)]
    Core(#[from] gradcam_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's errors as the core's, for the `Explainable` impls.
impl From<Error> for gradcam_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(inner) => inner,
            Error::Candle(inner) => inner.into(),
            other => gradcam_core::Error::Model(Box::new(other)),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
