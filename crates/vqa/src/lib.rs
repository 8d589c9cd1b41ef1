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
    /// A model folder's weights do not build the model (a tensor missing or of another shape):
    /// the file, and why.
    #[error("{}", file.display())]
    Weights { file: PathBuf, #[source] source: Box<Error> },
    /// The tokenizer and the config of a model folder disagree on the vocabulary.
    #[error("tokenizer.json has {tokenizer} words, config.json says {config}")]
    VocabSize { tokenizer: usize, config: usize },
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
