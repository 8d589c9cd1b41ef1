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

/// Runs the `gradcam` binary.
pub fn gradcam(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).output().expect("gradcam runs")
}

/// Its standard output, after checking that it succeeded.
pub fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Its standard error, after checking that it failed without a panic.
pub fn err(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "should fail: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}
