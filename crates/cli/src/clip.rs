//! `gradcam match`: CLIP-style image-text matching, each text's similarity explained.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradcam::pipeline::matching::{match_texts, Options};
use gradcam::pipeline::{render::Stems, Files};
use gradcam_clip::Matcher;
use gradcam_encoders::preprocess::load_image;

use crate::common::{print, HtmlArg, MethodArgs, OutputArgs};

#[derive(clap::Args)]
pub struct MatchArgs {
    /// Images to match.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// CLIP model folder: a trained one (`gradcam train clip`) or an ONNX pair (scripts/export_clip.py).
    #[arg(long, default_value = "models/clip")]
    model: PathBuf,
    /// A text to match with each image; repeatable.
    #[arg(long = "text", required = true)]
    texts: Vec<String>,
    /// The image tower's value to explain (default: the last block's attention input).
    #[arg(long)]
    layer: Option<String>,
    /// Explain CLIP's zero-shot probability of each text among the texts (softmax over 100 x
    /// cosine; two or more texts) instead of its cosine similarity.
    #[arg(long)]
    softmax: bool,
    /// Also write the counterfactual maps (what argues against each text).
    #[arg(long)]
    counterfactual: bool,
    #[command(flatten)]
    methods: MethodArgs,
    #[command(flatten)]
    html: HtmlArg,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn run(args: MatchArgs) -> anyhow::Result<ExitCode> {
    let model = Matcher::load(&args.model).with_context(|| format!("loading the CLIP model from {}", args.model.display()))?;
    let options = Options { texts: args.texts.clone(), layer: args.layer.clone(), softmax: args.softmax, counterfactual: args.counterfactual, settings: args.methods.settings() };
    std::fs::create_dir_all(&args.output.out).with_context(|| format!("creating {}", args.output.out.display()))?;
    let (channels, mut stems, mut stdout) = (crate::progress::channels(args.output.json), Stems::default(), std::io::stdout().lock());
    for image in &args.images {
        let stem = stems.unique(image);
        let r = match_texts(&model, &load_image(image)?, &image.display().to_string(), Files { dir: Some(&args.output.out), stem: &stem }, &options, Some(&*channels))?;
        for t in r.texts.iter().filter(|t| t.truncated) {
            eprintln!("warning: {:?} is longer than the model's context; cut to it", t.text);
        }
        args.html.write(&stem, image, gradcam_serve::html::View::Match, &r)?;
        print(&mut stdout, &r, args.output.json)?;
    }
    Ok(ExitCode::SUCCESS)
}
