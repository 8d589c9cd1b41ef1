//! `gradcam scenes`: writes a ShapeScenes dataset.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Context;
use gradcam_scenes::{dataset::{write, SPLITS}, scene::Bias, Config};

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
    /// The classification variant with a spurious cue: one object per scene (its shape is the
    /// class), and a cue (`mark`: a plus sign in a corner) whose colour is the class's with
    /// probability P in train and val (else another class's), 0.5 in test. `mark:balanced` makes
    /// the cue independent of the class (P = 1/3). instances.json marks the cue (category `cue`).
    #[arg(long, value_name = "CUE:P")]
    bias: Option<Bias>,
}

pub fn run(args: ScenesArgs) -> anyhow::Result<ExitCode> {
    let fractions: [f64; 3] = args.split_fractions.as_slice().try_into().context("--split-fractions takes three numbers")?;
    let cfg = Config { n: args.n, seed: args.seed, fractions, size: args.size, bias: args.bias };
    let bar = crate::progress::bar(args.n as u64, "scenes");
    let start = Instant::now();
    let counts = write(&args.out, &cfg, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let summary: Vec<String> = SPLITS.iter().zip(counts).map(|(s, n)| format!("{s} {n}")).collect();
    eprintln!("wrote {} scenes ({}) to {} in {:.1} s", args.n, summary.join(", "), args.out.display(), start.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}
