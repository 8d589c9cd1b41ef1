//! Progress bars shared by the commands.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `n` items of `what`, with elapsed time and ETA.
pub fn bar(n: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(n);
    b.set_style(ProgressStyle::with_template(&format!("{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}")).expect("valid template"));
    b
}

/// The loop of the commands that explain a list of images (`classify`, `caption`, `attack`):
/// creates `out`, then runs `one` on every image (with its files in `out`, named by a stem unique
/// among the images, and the progress of the perturbation methods), each result written as a page
/// by `html` and printed (JSON Lines with `json`) above a progress bar (for more than one image).
/// An image that fails is reported and the others still run: exit code 1 when any failed.
pub fn each_image<R: serde::Serialize + std::fmt::Display>(
    images: &[std::path::PathBuf],
    (out, json, html): (&std::path::Path, bool, Option<(&gradcam_serve::cli::HtmlArg, gradcam_serve::html::View)>),
    mut one: impl FnMut(&std::path::Path, gradcam::pipeline::Files<'_>, &gradcam::pipeline::Progress) -> anyhow::Result<R>,
) -> anyhow::Result<std::process::ExitCode> {
    gradcam_io::create_dir_all(out)?;
    let progress = if images.len() > 1 { bar(images.len() as u64, "images") } else { ProgressBar::hidden() };
    let (mut stems, mut failures, channels) = (gradcam::pipeline::render::Stems::default(), 0, channels(json));
    let mut stdout = std::io::stdout().lock();
    for path in images {
        progress.set_message(path.display().to_string());
        let stem = stems.unique(path);
        let result = one(path, gradcam::pipeline::Files::new(out, &stem), &*channels);
        match result.and_then(|r| html.map_or(Ok(()), |(h, view)| h.write(&stem, path, view, &r)).map(|()| r).map_err(Into::into)) {
            Ok(result) => progress.suspend(|| crate::common::print(&mut stdout, &result, json))?,
            Err(err) => {
                failures += 1;
                progress.suspend(|| eprintln!("error: {}", crate::hints::message(&err.context(path.display().to_string()))));
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(if failures == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) })
}

/// The progress of Ablation-CAM and Score-CAM over the layer's channels (none when `quiet`).
pub fn channels(quiet: bool) -> Box<gradcam::pipeline::Progress> {
    if quiet {
        return Box::new(|_, _| ());
    }
    let b = bar(0, "channels");
    Box::new(move |done, k| {
        b.set_length(k as u64);
        b.set_position(done as u64);
        if done >= k {
            b.finish_and_clear();
            b.reset();
        }
    })
}

/// One input of a dataset run's batch: the input, where its pictures go, its image (decoded).
pub type Item<'a> = (&'a gradcam_runs::Input, gradcam::pipeline::Files<'a>, anyhow::Result<image::RgbImage>);

/// A dataset run (`--inputs`) into `out`: `explain` gets each batch, its images decoded side by
/// side, and gives each input's record or error (recorded, and the run goes on).
pub fn dataset<R: serde::Serialize>(run: &gradcam_runs::cli::RunArgs, inputs: &std::path::Path, out: &std::path::Path, mut explain: impl FnMut(Vec<Item<'_>>) -> Vec<anyhow::Result<R>>) -> anyhow::Result<std::process::ExitCode> {
    use rayon::prelude::*;
    run.run(inputs, out, &mut |batch, dir| {
        let stem = |i: &gradcam_runs::Input| gradcam_runs::cli::stem_prefix(i.index) + &gradcam::pipeline::render::sanitize(&i.image.file_stem().unwrap_or_default().to_string_lossy());
        let stems: Vec<String> = batch.iter().map(stem).collect();
        let images: Vec<anyhow::Result<image::RgbImage>> = batch.par_iter().map(|i| Ok(gradcam_encoders::preprocess::load_image(&i.image)?)).collect();
        let items = batch.iter().zip(&stems).zip(images).map(|((i, stem), image)| (i, gradcam::pipeline::Files { dir, stem, discard: dir.is_none() }, image));
        let records = explain(items.collect()).into_iter().zip(batch);
        records.map(|(r, i)| r.and_then(|r| Ok(serde_json::to_string(&r)?)).map_err(|e| crate::hints::message(&e.context(i.image.display().to_string())))).collect()
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}
