//! `gradcam prune`: removes the units of a scene-CNN model's explained layer (`conv4`) that never
//! fire on a dataset, and checks that the image vector the rest of the model sees is unchanged on
//! every image of that dataset.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor, D};
use gradcam_encoders::scene_cnn::{self, Pooling, SceneCnn};

use crate::progress::bar;

#[derive(clap::Args)]
pub struct PruneArgs {
    /// A trained captioner or VQA model folder (scene CNN encoder).
    #[arg(long)]
    model: PathBuf,
    /// The images that decide which units never fire: a dataset folder (the `images/` of every
    /// split in it), a split folder with `images/`, or a folder of images.
    #[arg(long)]
    data: PathBuf,
    /// The pruned model's folder (created; not MODEL itself).
    #[arg(long)]
    out: PathBuf,
}

/// Every image file under the `images/` folders of `data` (see [`PruneArgs::data`]), sorted.
fn image_files(data: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut folders: Vec<PathBuf> = ["train", "val", "test"].iter().map(|s| data.join(s).join("images")).filter(|d| d.is_dir()).collect();
    if folders.is_empty() {
        folders.push(if data.join("images").is_dir() { data.join("images") } else { data.to_path_buf() });
    }
    let mut files = Vec::new();
    for dir in folders {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{}: no images found (looked in train/, val/, test/, images/ and the folder itself)", data.display());
    }
    Ok(files)
}

/// Runs `f` on every image as the encoder's input, 64 at a time, with a progress bar.
fn for_each_batch(size: u32, files: &[PathBuf], what: &str, mut f: impl FnMut(&Tensor) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let pb = bar(files.len() as u64, what);
    for chunk in files.chunks(64) {
        let inputs = chunk
            .iter()
            .map(|p| {
                let img = image::open(p).with_context(|| format!("reading {}", p.display()))?.to_rgb8();
                Ok(SceneCnn::preprocess(&img, size)?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        f(&Tensor::stack(&inputs, 0)?)?;
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(())
}

pub fn run(args: PruneArgs) -> anyhow::Result<ExitCode> {
    if args.out.canonicalize().ok().is_some_and(|o| args.model.canonicalize().ok() == Some(o)) {
        bail!("--out must be a new folder, not the model's own ({})", args.model.display());
    }
    if std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} exists and is not empty; --out must be a new folder", args.out.display());
    }
    let spec = scene_cnn::EncoderSpec::read(&args.model)?;
    let (cnn, size) = scene_cnn::load_encoder(&args.model)?;
    let cfg_path = args.model.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?).with_context(|| cfg_path.display().to_string())?;
    let pooling = Pooling { moments: cfg.get("pool_moments").and_then(|v| v.as_bool()).unwrap_or(false) };
    let files = image_files(&args.data)?;

    // The largest activation of every unit over every position of every image.
    let channels = spec.channels;
    let mut peak = vec![f32::NEG_INFINITY; channels];
    for_each_batch(size, &files, "images (finding silent units)", |input| {
        let m = cnn.forward(input)?.max(D::Minus1)?.max(D::Minus1)?.max(0)?.to_vec1::<f32>()?;
        peak.iter_mut().zip(m).for_each(|(p, v)| *p = p.max(v));
        Ok(())
    })?;
    let keep: Vec<u32> = (0..channels as u32).filter(|&u| peak[u as usize] > 0.0).collect();
    let silent: Vec<usize> = (0..channels).filter(|&u| peak[u] <= 0.0).collect();
    let mut out = std::io::stdout().lock();
    if silent.is_empty() {
        writeln!(out, "every one of the {channels} units of {} fires on some of the {} images: nothing to prune", scene_cnn::LAYER, files.len())?;
        return Ok(ExitCode::SUCCESS);
    }
    if keep.is_empty() {
        bail!("no unit of {} fires on any of the {} images; is this the right dataset?", scene_cnn::LAYER, files.len());
    }

    let weights_path = args.model.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).with_context(|| weights_path.display().to_string())?;
    let pruned = scene_cnn::prune_tensors(&tensors, &keep, channels, pooling).with_context(|| weights_path.display().to_string())?;
    cfg["channels"] = serde_json::json!(keep.len());

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let tmp = args.out.join(format!(".model.safetensors.{}.tmp", std::process::id()));
    candle_core::safetensors::save(&pruned, &tmp)?;
    std::fs::rename(&tmp, args.out.join("model.safetensors"))?;
    gradcam_scenes::write_atomic(&args.out.join("config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    for name in ["tokenizer.json", "README.md"] {
        let src = args.model.join(name);
        if src.exists() {
            gradcam_scenes::write_atomic(&args.out.join(name), &std::fs::read(&src)?)?;
        }
    }

    // The check: the pruned encoder and projection give the same image vector on every image.
    let (small, _) = scene_cnn::load_encoder(&args.out)?;
    let (w0, b0) = (&tensors["image_proj.weight"], &tensors["image_proj.bias"]);
    let (w1, b1) = (&pruned["image_proj.weight"], &pruned["image_proj.bias"]);
    let (mut worst, mut scale) = (0f32, 0f32);
    for_each_batch(size, &files, "images (checking)", |input| {
        let before = scene_cnn::image_vector(&cnn.forward(input)?, pooling, w0, b0)?;
        let after = scene_cnn::image_vector(&small.forward(input)?, pooling, w1, b1)?;
        worst = worst.max((&before - &after)?.abs()?.max_all()?.to_scalar::<f32>()?);
        scale = scale.max(before.abs()?.max_all()?.to_scalar::<f32>()?);
        Ok(())
    })?;
    if !(worst <= 1e-5 * scale.max(1.0)) {
        std::fs::remove_dir_all(&args.out).ok();
        bail!("the pruned model's image vector differs by {worst:e} (largest value {scale}); nothing written");
    }
    writeln!(out, "{}: {} of {channels} units of {} never fire on the {} images of {} and were removed: {silent:?}", args.out.display(), silent.len(), scene_cnn::LAYER, files.len(), args.data.display())?;
    writeln!(out, "image vector unchanged on every image: largest difference {worst:.1e} (largest value {scale:.2})")?;
    writeln!(out, "unit numbers changed; dissect again: gradcam dissect --model {} --data {}", args.out.display(), args.data.display())?;
    Ok(ExitCode::SUCCESS)
}
