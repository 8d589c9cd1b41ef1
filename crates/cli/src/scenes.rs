//! `gradcam scenes`: writes a ShapeScenes dataset.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use gradcam_scenes::dataset::{write, SPLITS};
use gradcam_scenes::Config;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args)]
pub struct ScenesArgs {
    /// Output folder; each split goes to OUT/{train,val,test}/.
    #[arg(long)]
    out: PathBuf,
    /// Number of scenes over all splits.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fractions of train, val and test.
    #[arg(long, value_delimiter = ',', default_values_t = [0.8, 0.1, 0.1])]
    split_fractions: Vec<f64>,
    /// Image side in pixels (64 to 128).
    #[arg(long, default_value_t = 64)]
    size: u32,
}

pub fn run(args: ScenesArgs) -> anyhow::Result<ExitCode> {
    let fractions: [f64; 3] = args.split_fractions.as_slice().try_into().context("--split-fractions takes three numbers")?;
    let cfg = Config { n: args.n, seed: args.seed, fractions, size: args.size };
    let bar = ProgressBar::new(args.n as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} scenes [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let start = Instant::now();
    let counts = write(&args.out, &cfg, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let summary: Vec<String> = SPLITS.iter().zip(counts).map(|(s, n)| format!("{s} {n}")).collect();
    eprintln!("wrote {} scenes ({}) to {} in {:.1} s", args.n, summary.join(", "), args.out.display(), start.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}
