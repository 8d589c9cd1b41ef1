//! Show-and-Tell LSTM captioner with word-by-word Grad-CAM (paper section 8.1): each word's
//! log-probability is backpropagated into the encoder's last convolutional layer.
#![forbid(unsafe_code)]

pub mod card;
pub mod eval;
pub mod model;
mod scores;
pub mod train;

use std::path::PathBuf;

pub use model::{Caption, CaptionSplit, Captioner, Config};
pub use gradcam_scenes::vocab::Vocab;

/// Errors of the captioner crate.
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
