//! `gradcam train classifier` and `gradcam demo bias`.

use std::path::PathBuf;
use std::process::ExitCode;

use gradcam_classifier::bias::{self, DemoConfig, Stage};
use gradcam_classifier::train::{train, Event, TrainConfig};

use crate::progress::{bar, EpochBar};

#[derive(clap::Args)]
pub struct TrainClassifierArgs {
    /// Dataset folder with train/ and val/ splits (COCO instances + images/; each image is
    /// labelled with the category of its largest object); e.g. made by `gradcam scenes --bias`.
    #[arg(long)]
    data: PathBuf,
    /// Output model folder.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Units of the explained layer `conv4`.
    #[arg(long, default_value_t = TrainConfig::default().channels)]
    channels: usize,
    /// Input side in pixels (images are resized to it).
    #[arg(long, default_value_t = TrainConfig::default().image_size)]
    image_size: u32,
    /// Train on at most this many images of the train split.
    #[arg(long)]
    limit: Option<usize>,
    /// Continue from OUT/checkpoint.json.
    #[arg(long)]
    resume: bool,
}

fn training_events(epoch_bar: &mut EpochBar) -> impl FnMut(Event) + '_ {
    move |e| match e {
        Event::Loaded { train, val } => eprintln!("{train} training images, {val} validation images"),
        Event::Start { epoch, steps } => epoch_bar.start(epoch, steps),
        Event::Step { loss } => epoch_bar.step(loss),
        Event::Epoch(log) => {
            epoch_bar.finish();
            eprintln!("epoch {:>2}: train loss {:.4}, val loss {:.4}, val accuracy {:.3} ({:.0} s)", log.epoch, log.train_loss, log.val_loss, log.val_accuracy, log.seconds);
        }
    }
}

pub fn train_classifier(args: TrainClassifierArgs) -> anyhow::Result<ExitCode> {
    let tc = TrainConfig { epochs: args.epochs, batch_size: args.batch_size, lr: args.lr, weight_decay: args.weight_decay, seed: args.seed, channels: args.channels, image_size: args.image_size, limit: args.limit };
    let start = std::time::Instant::now();
    let mut epoch_bar = EpochBar::default();
    let ckpt = train(&args.data, &args.out, &tc, args.resume, &mut training_events(&mut epoch_bar))?;
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    eprintln!("trained {} epochs in {minutes:.1} min; model in {}", ckpt.epochs_done, args.out.display());
    let b = bar(0, "test images");
    let test = gradcam_classifier::card::write(&args.data, &args.out, &ckpt, minutes, &|i, n| {
        b.set_length(n as u64);
        b.set_position(i as u64)
    })?;
    b.finish_and_clear();
    if let Some(t) = &test {
        eprintln!("test accuracy {:.3} on {} images; model card in {}", t.accuracy, t.images, args.out.join("README.md").display());
    }
    Ok(ExitCode::SUCCESS)
}

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
    #[arg(long, default_value_t = DemoConfig::default().train.epochs)]
    epochs: usize,
    /// In the biased set, the probability that the mark has its own class's colour.
    #[arg(long, default_value_t = DemoConfig::default().p)]
    p: f64,
}

pub fn run_demo(what: DemoCommand) -> anyhow::Result<ExitCode> {
    let DemoCommand::Bias(args) = what;
    let defaults = DemoConfig::default();
    let cfg = DemoConfig { seed: args.seed, scenes: args.scenes, p: args.p, train: TrainConfig { epochs: args.epochs, ..defaults.train.clone() }, ..defaults };
    let mut epoch_bar = EpochBar::default();
    let mut stage_bar = indicatif::ProgressBar::hidden();
    let report = {
        let mut events = training_events(&mut epoch_bar);
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
        })?
    };
    stage_bar.finish_and_clear();
    println!("{report}report in {}", args.out.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}
