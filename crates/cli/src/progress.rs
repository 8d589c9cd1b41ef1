//! Progress bars shared by the commands.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `n` items of `what`, with elapsed time and ETA.
pub fn bar(n: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(n);
    b.set_style(ProgressStyle::with_template(&format!("{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}")).expect("valid template"));
    b
}

/// The loop of the commands that explain a list of images (`classify`, `caption`, `attack`):
/// `one` on every image, each result printed by `print` above a progress bar (for more than one
/// image); an image that fails is reported and the others still run. Exit code 1 when any failed.
pub fn each_image<R>(
    images: &[std::path::PathBuf],
    mut one: impl FnMut(&std::path::Path, &mut gradcam::pipeline::render::Stems) -> anyhow::Result<R>,
    mut print: impl FnMut(&mut std::io::StdoutLock<'static>, &R) -> std::io::Result<()>,
) -> anyhow::Result<std::process::ExitCode> {
    let progress = if images.len() > 1 { bar(images.len() as u64, "images") } else { ProgressBar::hidden() };
    let (mut stems, mut failures) = (gradcam::pipeline::render::Stems::default(), 0);
    let mut stdout = std::io::stdout().lock();
    for path in images {
        progress.set_message(path.display().to_string());
        match one(path, &mut stems) {
            Ok(result) => progress.suspend(|| print(&mut stdout, &result))?,
            Err(err) => {
                failures += 1;
                progress.suspend(|| eprintln!("error: {}: {err:#}", path.display()));
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
