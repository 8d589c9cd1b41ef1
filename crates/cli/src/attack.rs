//! `gradcam attack`: an adversarial image for a classifier (PGD under an L-infinity budget), and
//! the Grad-CAM of the original class on it (the paper's section 6.2).

use std::{path::PathBuf, process::ExitCode};

use gradcam::pipeline::attack::{attack, Options};
use gradcam_encoders::preprocess::Resize;

use crate::common::OutputArgs;
use crate::progress::each_image;
use crate::ExplainedClassifier;

#[derive(clap::Args)]
pub struct AttackArgs {
    /// Images to attack (each at the model's input resolution after --resize).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    classifier: ExplainedClassifier,
    /// The class to attack (default: the top-1 prediction on the clean image).
    #[arg(long)]
    class: Option<usize>,
    /// Push the class's probability down (the default).
    #[arg(long, conflicts_with = "target")]
    untargeted: bool,
    /// Push this class's probability up instead.
    #[arg(long)]
    target: Option<usize>,
    /// L-infinity budget in pixel values of [0, 1] (8/255 by default).
    #[arg(long, default_value_t = 8.0 / 255.0)]
    eps: f32,
    /// Gradient steps at most (the attack stops once its goal holds on the 8-bit image).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Change per step (default 2.5 eps / steps).
    #[arg(long)]
    step_size: Option<f32>,
    /// The goal: untargeted, the class's probability below this (default 0.001); targeted, the
    /// target's above this (default 0.9).
    #[arg(long)]
    until: Option<f32>,
    /// center-crop, stretch or none (see `classify`). The adversarial PNG is the model's input.
    #[arg(long)]
    resize: Option<Resize>,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn run(args: AttackArgs) -> anyhow::Result<ExitCode> {
    let (net, index) = args.classifier.load()?;
    let (eps, steps, step_size, until, resize) = (args.eps, args.steps, args.step_size, args.until, args.resize.unwrap_or(net.default_resize()));
    let options = Options { class: args.class, target: args.target, eps, steps, step_size, until, resize };
    options.check(net.num_classes())?;
    each_image(&args.images, (&args.output.out, args.output.json, None), |path, files, _| {
        let r = attack(&net, index, path, files, &options)?;
        if r.rounding_undid > 0 && !args.output.json {
            eprintln!("note: {}: rounding to 8 bits undid the attack {} time(s); it went on from the rounded image", r.image, r.rounding_undid);
        }
        Ok(r)
    })
}
