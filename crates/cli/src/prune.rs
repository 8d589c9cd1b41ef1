//! `gradcam prune`: removes the units of a scene-CNN model's explained layer (`conv4`) that never
//! fire on a dataset, and checks that the image vector the rest of the model sees is unchanged on
//! every image of that dataset.

use std::{io::Write, path::PathBuf, process::ExitCode};

use indicatif::ProgressBar;

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

pub fn run(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let files = gradcam_encoders::prune::image_files(&args.data)?.len() as u64;
    let bars = [bar(files, "images (finding silent units)"), bar(files, "images (checking)")];
    bars[1].finish_and_clear();
    let r = gradcam_encoders::prune::prune(&args.model, &args.data, &args.out, &|stage, n| {
        if stage == 1 && bars[0].position() > 0 {
            bars[0].finish_and_clear();
            bars[0].set_position(0);
            bars[1].reset();
        }
        bars[stage].inc(n as u64)
    })?;
    bars.iter().for_each(ProgressBar::finish_and_clear);
    let mut out = std::io::stdout().lock();
    write!(out, "{}", r.report(&args.out, &args.data))?;
    if !r.silent.is_empty() {
        writeln!(out, "unit numbers changed; dissect again: gradcam dissect --model {} --data {}", args.out.display(), args.data.display())?;
    }
    Ok(ExitCode::SUCCESS)
}
