//! What a command-line tool shows while training (feature `cli`): a bar per epoch, a line per
//! epoch done, and a diverged loss's hint.

use std::fmt::Display;

use indicatif::{ProgressBar, ProgressStyle};

use crate::Event;

/// Prints what training says: a bar per epoch with the last step's loss, a line per epoch done.
pub fn events<M: Display>() -> impl FnMut(Event<M>) {
    let mut bar = ProgressBar::hidden();
    move |e| match e {
        Event::Loaded { train, val } => eprintln!("{train} training images, {val} validation images"),
        Event::Start { epoch, steps } => {
            bar = ProgressBar::new(steps as u64);
            let template = format!("epoch {epoch:>2} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] loss {{msg}}");
            bar.set_style(ProgressStyle::with_template(&template).expect("valid template"));
        }
        Event::Step { loss } => {
            bar.set_message(format!("{loss:.4}"));
            bar.inc(1);
        }
        Event::Epoch(log) => {
            bar.finish_and_clear();
            eprintln!("epoch {:>2}: train loss {:.4}, val loss {:.4}, {} ({:.0} s)", log.epoch, log.train_loss, log.val_loss, log.metrics, log.seconds);
        }
    }
}

/// A training error in the command's words: a setting that cannot train by its flag, and a
/// loss that diverged with what to try.
pub fn hint(e: impl Into<anyhow::Error>) -> anyhow::Error {
    let e = e.into();
    match e.chain().find_map(|c| c.downcast_ref::<crate::Error>()) {
        Some(crate::Error::Diverged { .. } | crate::Error::DivergedValidation { .. }) => anyhow::anyhow!("{e:#}; try a lower --lr"),
        _ => e,
    }
}


/// The flags every `train` command takes.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Dataset folder with train/ and val/ splits (COCO instances and images/; captions for the
    /// captioner, VQA v2 questions and annotations for the VQA model; the classifier labels each
    /// image with the category of its largest object); e.g. made by `gradcam scenes`.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Output model folder.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Examples per optimisation step.
    #[arg(long, default_value_t = crate::Settings::default().batch_size)]
    pub batch_size: usize,
    /// Learning rate.
    #[arg(long, default_value_t = crate::Settings::default().lr)]
    pub lr: f64,
    /// Seed of the initial weights and the shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from OUT/checkpoint.json.
    #[arg(long)]
    pub resume: bool,
}

impl TrainArgs {
    /// The settings of a run of `epochs` with `weight_decay`.
    pub fn settings(&self, epochs: usize, weight_decay: f64) -> crate::Settings {
        crate::Settings { epochs, batch_size: self.batch_size, lr: self.lr, weight_decay, seed: self.seed }
    }
}
