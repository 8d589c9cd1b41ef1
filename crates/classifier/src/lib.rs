//! A scene classifier trained here (`gradcam train classifier`): the scene CNN, global average
//! pooling and a linear layer, on any COCO-instances dataset with one label per image; and the
//! paper's dataset-bias experiment on it (`gradcam demo bias`, sections 6.3 and 5.2).
#![forbid(unsafe_code)]

pub mod bias;
pub mod card;
pub mod data;
pub mod train;

use std::path::PathBuf;

pub use gradcam_encoders::scene_classifier::{load, Config};

/// Errors of the classifier crate.
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
    #[error("training: {0}")]
    Training(String),
    /// The training loop's errors (a setting out of range among them).
    #[error("training")]
    Train(#[from] gradcam_train::Error),
    #[error("{0}")]
    Data(String),
    /// Dissecting a trained model (the bias experiment names its units).
    #[error(transparent)]
    Neurons(#[from] gradcam_neurons::Error),
    #[error("serialising JSON")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
