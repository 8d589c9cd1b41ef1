//! VQA with Grad-CAM (paper section 8.2): a question LSTM and an image CNN, each projected to a
//! common space, fused by element-wise product, then an MLP over the answers. The answer's
//! pre-softmax score is backpropagated into the CNN's last convolutional layer; its negation gives
//! the counterfactual map.
#![forbid(unsafe_code)]

pub mod card;
pub mod eval;
pub mod model;
pub mod train;

use std::path::PathBuf;

pub use model::{Config, Question, Vqa, VqaSplit};

/// Errors of the VQA crate.
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
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("model: {0}")]
    Model(String),
    #[error("the question is empty")]
    EmptyQuestion,
    #[error("unknown answer {answer:?}; the model answers: {known}")]
    UnknownAnswer { answer: String, known: String },
    #[error("training: {0}")]
    Training(String),
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
    /// The training loop's errors (a setting out of range among them).
    #[error("training")]
    Train(#[from] gradcam_train::Error),
}

impl Error {
    pub(crate) fn into_core(self) -> gradcam_core::Error {
        match self {
            Error::Candle(e) => gradcam_core::Error::Candle(e),
            Error::Core(e) => e,
            other => gradcam_core::Error::Model(Box::new(other)),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
