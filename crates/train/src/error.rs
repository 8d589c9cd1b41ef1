//! The errors of the training loop.

use std::path::PathBuf;

/// What can go wrong in training. Each variant carries its data; sources are kept.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot train, named by its field of the training configuration (`lr`,
    /// `batch_size`, ...), with its value and what it must be: the one setting error of every
    /// crate, which the CLI shows with the flag's name.
    #[error(transparent)]
    Setting(#[from] gradcam_core::SettingError),
    /// A training step's loss was NaN or infinite (the step was taken; nothing of the epoch is
    /// saved).
    #[error("the loss became {loss} in epoch {epoch}")]
    Diverged {
        /// The epoch (from 0).
        epoch: usize,
        /// The loss.
        loss: f32,
    },
    /// The validation loss after an epoch was NaN or infinite: a step made the weights
    /// non-finite after the last finite training loss. Nothing of the epoch is saved.
    #[error("the validation loss became {loss} in epoch {epoch}; nothing of this epoch saved")]
    DivergedValidation {
        /// The epoch (from 0).
        epoch: usize,
        /// The summed validation loss.
        loss: f32,
    },
    /// A file or folder could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `checkpoint.json` could not be read or written as JSON.
    #[error("{}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A tensor operation or an optimiser step failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Writing the weights failed.
    #[error(transparent)]
    Encoders(#[from] gradcam_encoders::Error),
    /// Writing `checkpoint.json` failed.
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
}

impl Error {
    /// A setting that cannot train: `name` is `value`, and must be `requirement`.
    pub fn setting(name: &'static str, value: impl std::fmt::Display, requirement: impl std::fmt::Display) -> Self {
        Error::Setting(gradcam_core::SettingError::value(name, value, format!("must be {requirement}")))
    }

    /// `Io` for `path`, as a `map_err` argument.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Error::Io { path: path.to_path_buf(), source }
    }
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
