//! gradcam's integration tests, one binary for the whole workspace.

mod adversarial;
mod bias;
mod captioner;
mod checkpoints;
mod cli;
mod eval;
mod examples;
mod goldens;
mod hostile;
mod gradients;
mod library;
mod neurons;
mod onnx;
mod scenes;
mod serve;
mod vqa;

use std::path::PathBuf;

/// A path from the repository root.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}
