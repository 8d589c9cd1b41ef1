//! `gradcam demo bias`.

use std::path::PathBuf;
use std::process::ExitCode;

use gradcam_classifier::bias::{self, DemoConfig, Stage};
use gradcam_classifier::train::TrainConfig;

use crate::progress::bar;

#[derive(clap::Subcommand)]
pub enum DemoCommand {
    /// The paper's dataset-bias experiment (sections 6.3, 5.2) on ShapeScenes: a biased and a
    /// balanced training set, a model on each, and what Grad-CAM shows about them.
    Bias(BiasArgs),
}

#[derive(clap::Args)]
pub struct BiasArgs {
    /// Output folder: report.md, report.json, grid.png, data/ and models/.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Scenes in each dataset (train, val and test together).
    #[arg(long, default_value_t = DemoConfig::default().scenes)]
    scenes: usize,
    /// Training epochs of each model.
    #[arg(long, default_value_t = DemoConfig::default().train.settings.epochs)]
    epochs: usize,
    /// In the biased set, the probability that the mark has its own class's colour.
    #[arg(long, default_value_t = DemoConfig::default().p)]
    p: f64,
}

pub fn run_demo(what: DemoCommand) -> anyhow::Result<ExitCode> {
    let DemoCommand::Bias(args) = what;
    let defaults = DemoConfig::default();
    let cfg = DemoConfig { seed: args.seed, scenes: args.scenes, p: args.p, train: TrainConfig { settings: gradcam_train::Settings { epochs: args.epochs, ..defaults.train.settings }, ..defaults.train.clone() }, ..defaults };
    let mut stage_bar = indicatif::ProgressBar::hidden();
    let report = {
        let mut events = crate::train::events();
        bias::run(&args.out, &cfg, &mut |s| match s {
            Stage::Begin(name, n) => {
                stage_bar.finish_and_clear();
                eprintln!("{name}");
                stage_bar = bar(n as u64, "");
            }
            Stage::Done(k) => stage_bar.set_position(k as u64),
            Stage::Train(e) => {
                stage_bar.finish_and_clear();
                events(e)
            }
        })
        .map_err(crate::train::hint)?
    };
    stage_bar.finish_and_clear();
    println!("{report}report in {}", args.out.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}
