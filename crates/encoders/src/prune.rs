//! Pruning a scene-CNN model (`gradcam prune`): the units of the explained layer (`conv4`) that
//! never fire on a dataset are removed, and the image vector the rest of the model sees is
//! checked to be unchanged on every image of that dataset before anything is kept.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};

use crate::scene_cnn::{self, EncoderSpec, Pooling, SceneCnn};
use crate::{Error, Result};
use gradcam_core::SettingError;

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(gradcam_io::write_atomic(path, bytes)?)
}

/// What pruning did.
#[derive(Debug, Clone)]
pub struct Pruned {
    /// The explained layer's width before.
    pub channels: usize,
    /// The units removed (none: nothing was written).
    pub silent: Vec<usize>,
    /// The images scanned.
    pub images: usize,
    /// The largest difference of the image vector between the two models, and its largest value.
    pub difference: f32,
    /// The largest absolute value of the image vector.
    pub scale: f32,
}

impl Pruned {
    /// What was done, in words: the units removed from `out` (the pruned model) and the check
    /// (`data`: the images).
    pub fn report(&self, out: &Path, data: &Path) -> String {
        let (layer, images, channels) = (scene_cnn::LAYER, self.images, self.channels);
        if self.silent.is_empty() {
            return format!("every one of the {channels} units of {layer} fires on some of the {images} images: nothing to prune\n");
        }
        let (out, data) = (out.display(), data.display());
        let s = format!("{out}: {} of {channels} units of {layer} never fire on the {images} images of {data} and were removed: {:?}\n", self.silent.len(), self.silent);
        s + &format!("image vector unchanged on every image: largest difference {:.1e} (largest value {:.2})\n", self.difference, self.scale)
    }
}

/// Every image file under the `images/` folders of `data` (a dataset folder with train/, val/,
/// test/ splits, a split folder with `images/`, or a folder of images), sorted.
pub fn image_files(data: &Path) -> Result<Vec<PathBuf>> {
    let mut folders: Vec<PathBuf> = ["train", "val", "test"].iter().map(|s| data.join(s).join("images")).filter(|d| d.is_dir()).collect();
    if folders.is_empty() {
        folders.push(if data.join("images").is_dir() { data.join("images") } else { data.to_path_buf() });
    }
    let mut files = Vec::new();
    for dir in folders {
        let io = |source| Error::Io { path: dir.clone(), source };
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) && path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::Data(format!("{}: no images found (looked in train/, val/, test/, images/ and the folder itself)", data.display())));
    }
    Ok(files)
}

/// Runs `f` on every image as the encoder's input, 64 at a time; `progress` hears each batch's
/// size.
fn for_each_batch(size: u32, files: &[PathBuf], progress: &dyn Fn(usize), mut f: impl FnMut(&Tensor) -> Result<()>) -> Result<()> {
    for chunk in files.chunks(64) {
        let inputs = chunk
            .iter()
            .map(|p| {
                let img = crate::preprocess::load_image(p)?;
                SceneCnn::preprocess(&img, size)
            })
            .collect::<Result<Vec<_>>>()?;
        f(&Tensor::stack(&inputs, 0)?)?;
        progress(chunk.len());
    }
    Ok(())
}

/// Prunes the model folder `model` into the new folder `out` by the images of `data`.
/// `progress` hears (stage, images done in this batch): stage 0 finds the silent units, stage 1
/// checks the pruned model.
pub fn prune(model: &Path, data: &Path, out: &Path, progress: &dyn Fn(usize, usize)) -> Result<Pruned> {
    if out.canonicalize().ok().is_some_and(|o| model.canonicalize().ok() == Some(o)) {
        return Err(SettingError::new(vec!["out"], format!("must be a new folder, not the model's own ({})", model.display())).into());
    }
    if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(SettingError::value("out", out.display(), "exists and is not empty; give a new folder").into());
    }
    let spec = EncoderSpec::read(model)?;
    let (cnn, size) = scene_cnn::load_encoder(model)?;
    let cfg_path = model.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io { path: cfg_path.clone(), source })?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: {e}", cfg_path.display())))?;
    let pooling = Pooling { moments: cfg.get("pool_moments").and_then(|v| v.as_bool()).unwrap_or(false) };
    let files = image_files(data)?;

    // The largest activation of every unit over every position of every image.
    let channels = spec.channels;
    let mut peak = vec![f32::NEG_INFINITY; channels];
    for_each_batch(size, &files, &|n| progress(0, n), |input| {
        let m = cnn.forward(input)?.max(D::Minus1)?.max(D::Minus1)?.max(0)?.to_vec1::<f32>()?;
        peak.iter_mut().zip(m).for_each(|(p, v)| *p = p.max(v));
        Ok(())
    })?;
    let keep: Vec<u32> = (0..channels as u32).filter(|&u| peak[u as usize] > 0.0).collect();
    let silent: Vec<usize> = (0..channels).filter(|&u| peak[u] <= 0.0).collect();
    let mut report = Pruned { channels, silent, images: files.len(), difference: 0.0, scale: 0.0 };
    if report.silent.is_empty() {
        return Ok(report);
    }
    if keep.is_empty() {
        return Err(Error::Data(format!("no unit of {} fires on any of the {} images; is this the right dataset?", scene_cnn::LAYER, files.len())));
    }

    let weights_path = model.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| Error::Data(format!("{}: {e}", weights_path.display())))?;
    let pruned = scene_cnn::prune_tensors(&tensors, &keep, channels, pooling).map_err(|e| Error::Data(format!("{}: {e}", weights_path.display())))?;
    cfg["channels"] = serde_json::json!(keep.len());

    gradcam_io::create_dir_all(out)?;
    gradcam_io::write_safetensors(&pruned, &out.join("model.safetensors"))?;
    let config = serde_json::to_string_pretty(&cfg)?;
    write_atomic(&out.join("config.json"), config.as_bytes())?;
    for name in ["tokenizer.json", "README.md"] {
        let src = model.join(name);
        if src.exists() {
            write_atomic(&out.join(name), &std::fs::read(&src).map_err(|source| Error::Io { path: src.clone(), source })?)?;
        }
    }

    // The check: the pruned encoder and projection give the same image vector on every image.
    let (small, _) = scene_cnn::load_encoder(out)?;
    let (w0, b0) = (&tensors["image_proj.weight"], &tensors["image_proj.bias"]);
    let (w1, b1) = (&pruned["image_proj.weight"], &pruned["image_proj.bias"]);
    for_each_batch(size, &files, &|n| progress(1, n), |input| {
        let before = scene_cnn::image_vector(&cnn.forward(input)?, pooling, w0, b0)?;
        let after = scene_cnn::image_vector(&small.forward(input)?, pooling, w1, b1)?;
        report.difference = report.difference.max((&before - &after)?.abs()?.max_all()?.to_scalar::<f32>()?);
        report.scale = report.scale.max(before.abs()?.max_all()?.to_scalar::<f32>()?);
        Ok(())
    })?;
    if !(report.difference <= 1e-5 * report.scale.max(1.0)) {
        std::fs::remove_dir_all(out).ok();
        return Err(Error::Data(format!("the pruned model's image vector differs by {:e} (largest value {}); nothing written", report.difference, report.scale)));
    }
    Ok(report)
}
