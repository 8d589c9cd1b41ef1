//! ShapeScenes, a deterministic synthetic vision-language dataset with ground truth (per-object
//! masks, captions, questions with the objects their answers depend on), written as COCO
//! captions, COCO instances and VQA v2 files; and readers for any dataset in those formats.
#![forbid(unsafe_code)]

pub mod coco;
pub mod dataset;
mod json;
pub mod rle;
pub mod scene;
pub mod vocab;
pub mod vqa;

use std::path::{Path, PathBuf};

/// Writes a file atomically ([`gradcam_io::write_atomic`]).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(gradcam_io::write_atomic(path, bytes)?)
}

pub use dataset::{Config, Example, Split};

/// Errors of the scenes crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not valid JSON: {message}", file.display())]
    Json { file: PathBuf, message: String },
    #[error("{}: {record}: field `{field}`: {message}", file.display())]
    Field { file: PathBuf, record: String, field: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("unknown words {words}; the model knows: {known}")]
    UnknownWords { words: String, known: String },
    #[error(transparent)]
    Write(#[from] gradcam_io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
