//! `gradcam caption`: captions with a Grad-CAM map per word.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradcam::pipeline::caption::{caption, Options};
use gradcam_captioner::eval::evaluate;
use gradcam_captioner::Captioner;
use gradcam_encoders::preprocess::load_image;
use gradcam_neurons::{Dissection, UnitNames};
use gradcam_scenes::Split;
use gradcam_serve::html::View;

use crate::common::{ExplainArgs, OutputArgs};
use crate::progress::{bar, each_image};

/// The shipped model, relative to the repository (and to the binary's working directory).
pub const DEFAULT_MODEL: &str = "models/captioner";

#[derive(clap::Args)]
pub struct CaptionArgs {
    /// Images to caption and explain.
    #[arg(required_unless_present_any = ["eval", "inputs"])]
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
    #[command(flatten)]
    output: OutputArgs,
    /// Evaluate on a split folder (captions.json + instances.json + images/) instead: exact
    /// match, BLEU-4 and the per-word pointing game, printed as JSON.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Images evaluated with --eval.
    #[arg(long, default_value_t = 500, value_parser = crate::common::positive)]
    limit: usize,
    #[command(flatten)]
    explain: ExplainArgs,
    #[command(flatten)]
    run: gradcam_runs::cli::RunArgs,
}

pub fn run(args: CaptionArgs) -> anyhow::Result<ExitCode> {
    let model = Captioner::load(&args.model).with_context(|| format!("loading the captioner from {}", args.model.display()))?;
    let dissection = Dissection::of_model(args.explain.dissection.as_deref(), &args.model, args.explain.neurons)?;
    if let Some(dir) = &args.eval {
        let method = args.explain.methods.settings().eval_method()?;
        let split = Split::read(dir)?;
        let n = split.instances.images.len().min(args.limit);
        let bar = bar(n as u64, "images");
        let metrics = evaluate(&model, &split, args.limit, dissection.as_ref(), method.as_ref(), |i| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        println!("{}", serde_json::to_string_pretty(&metrics)?);
        return Ok(ExitCode::SUCCESS);
    }
    let names = dissection.as_ref().filter(|_| args.explain.neurons).map(|d| UnitNames::Dissection(d));
    let options = Options { beam: args.beam, caption: args.caption.clone(), settings: args.explain.methods.settings() };
    if let Some(inputs) = &args.run.inputs {
        return crate::progress::dataset(&args.run, inputs, &args.output.out, |items| items.into_iter().map(|(i, files, img)| Ok(caption(&model, &img?, &i.image.display().to_string(), files, &options, names.as_ref(), None)?)).collect());
    }
    each_image(&args.images, (&args.output.out, args.output.json, Some((&args.explain.html, View::Caption))), |path, files, bar| {
        Ok(caption(&model, &load_image(path)?, &path.display().to_string(), files, &options, names.as_ref(), Some(bar))?)
    })
}
