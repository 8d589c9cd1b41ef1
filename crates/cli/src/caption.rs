//! `gradcam caption` (captions with a Grad-CAM map per word) and `gradcam train captioner`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradcam::pipeline::caption::{caption, Options};
use gradcam_captioner::eval::evaluate;
use gradcam_captioner::train::{train, Event, TrainConfig};
use gradcam_captioner::Captioner;
use gradcam_encoders::preprocess::load_image;
use gradcam_neurons::{Dissection, UnitNames};
use gradcam_scenes::Split;
use gradcam_serve::html::View;

use crate::common::{HtmlArg, MethodArgs};
use crate::progress::{bar, each_image, EpochBar};

/// The shipped model, relative to the repository (and to the binary's working directory).
pub const DEFAULT_MODEL: &str = "models/captioner";

#[derive(clap::Args)]
pub struct CaptionArgs {
    /// Images to caption and explain.
    #[arg(required_unless_present = "eval")]
    images: Vec<PathBuf>,
    /// Model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Beam width (1: greedy).
    #[arg(long, default_value_t = 1)]
    beam: usize,
    /// Explain this caption instead of generating one.
    #[arg(long)]
    caption: Option<String>,
    /// Folder for the per-word overlays and the strip.
    #[arg(long, default_value = "gradcam-out")]
    out: PathBuf,
    /// One JSON object per image (JSON Lines).
    #[arg(long)]
    json: bool,
    /// Evaluate on a split folder (captions.json + instances.json + images/) instead: exact
    /// match, BLEU-4 and the per-word pointing game, printed as JSON.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Images evaluated with --eval.
    #[arg(long, default_value_t = 500, value_parser = crate::common::positive)]
    limit: usize,
    /// Add each word's textual explanation: the 5 units with the largest and the 5 with the
    /// smallest alpha_k, named by the model's dissection table.
    #[arg(long)]
    neurons: bool,
    /// Dissection table for --neurons and --eval (default: MODEL/dissection.json when present).
    #[arg(long)]
    dissection: Option<PathBuf>,
    /// Several methods make the strip one row per method.
    #[command(flatten)]
    methods: MethodArgs,
    #[command(flatten)]
    html: HtmlArg,
}

pub fn run(args: CaptionArgs) -> anyhow::Result<ExitCode> {
    let model = Captioner::load(&args.model).with_context(|| format!("loading the captioner from {}", args.model.display()))?;
    let dissection = Dissection::of_model(args.dissection.as_deref(), &args.model, args.neurons)?;
    if let Some(dir) = &args.eval {
        let method = args.methods.settings().eval_method()?;
        let split = Split::read(dir)?;
        let n = split.instances.images.len().min(args.limit);
        let bar = bar(n as u64, "images");
        let metrics = evaluate(&model, &split, args.limit, dissection.as_ref(), method.as_ref(), |i| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        println!("{}", serde_json::to_string_pretty(&metrics)?);
        return Ok(ExitCode::SUCCESS);
    }
    let names = dissection.as_ref().filter(|_| args.neurons).map(|d| UnitNames::Dissection(d));
    let options = Options { beam: args.beam, caption: args.caption.clone(), settings: args.methods.settings() };
    each_image(&args.images, (&args.out, args.json, Some((&args.html, View::Caption))), |path, files, bar| {
        Ok(caption(&model, &load_image(path)?, &path.display().to_string(), files, &options, names.as_ref(), Some(bar))?)
    })
}

#[derive(clap::Args)]
pub struct TrainCaptionerArgs {
    /// Dataset folder with train/ and val/ splits (COCO captions + instances); e.g. made by
    /// `gradcam scenes`.
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
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Label smoothing of the word targets (keeps word gradients informative).
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Weight of the auxiliary loss that predicts, from `conv4` alone (a head at every position,
    /// max-pooled over space), which words the image's captions use (0 = off).
    #[arg(long, default_value_t = 0.0)]
    word_loss: f64,
    /// LSTM hidden size (explaining costs grow with it).
    #[arg(long, default_value_t = TrainConfig::default().hidden)]
    hidden: usize,
    /// Weight of an L1 penalty on the explained layer's activations (0 = off).
    #[arg(long, default_value_t = 0.0)]
    activation_l1: f64,
    /// The auxiliary loss also predicts frequent word pairs ("blue circle").
    #[arg(long)]
    word_pairs: bool,
    /// Continue from OUT/checkpoint.json.
    #[arg(long)]
    resume: bool,
}

pub fn train_captioner(args: TrainCaptionerArgs) -> anyhow::Result<ExitCode> {
    let tc = TrainConfig { epochs: args.epochs, batch_size: args.batch_size, lr: args.lr, seed: args.seed, label_smoothing: args.label_smoothing, word_loss: args.word_loss, hidden: args.hidden, activation_l1: args.activation_l1, word_pairs: args.word_pairs, ..Default::default() };
    let start = std::time::Instant::now();
    let mut epoch_bar = EpochBar::default();
    let ckpt = train(&args.data, &args.out, &tc, args.resume, &mut |e| match e {
        Event::Start { epoch, steps } => epoch_bar.start(epoch, steps),
        Event::Step { loss } => epoch_bar.step(loss),
        Event::Epoch(log) => {
            epoch_bar.finish();
            eprintln!("epoch {:>2}: train loss {:.4}, val loss {:.4}, val exact match {:.3} ({:.0} s)", log.epoch, log.train_loss, log.val_loss, log.val_exact_match, log.seconds);
        }
    })?;
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    eprintln!("trained {} epochs in {minutes:.1} min; model in {}", ckpt.epochs_done, args.out.display());
    let b = bar(0, "test images");
    let metrics = gradcam_captioner::card::write(&args.data, &args.out, &tc, &ckpt, minutes, &|i, n| {
        b.set_length(n as u64);
        b.set_position(i as u64)
    })?;
    b.finish_and_clear();
    if let Some(m) = &metrics {
        eprintln!("test: exact match {:.3}, BLEU-4 {:.3}", m.exact_match, m.bleu4);
    }
    Ok(ExitCode::SUCCESS)
}
