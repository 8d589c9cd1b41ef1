//! `gradcam classify`: top-k predictions and Grad-CAM overlays for ImageNet classifiers.

use std::{path::PathBuf, process::ExitCode};

use gradcam::pipeline::classify::{classify, classify_batch, Options};
use gradcam_encoders::{preprocess::{load_image, Resize}, ModelName};
use gradcam_neurons::Dissection;
use gradcam_serve::html::View;

use crate::common::{MethodArgs, OutputArgs};
use gradcam_serve::cli::HtmlArg;
use crate::progress::each_image;
use crate::ExplainedClassifier;

#[derive(clap::Args)]
pub struct ClassifyArgs {
    /// Images to classify and explain (PNG, JPEG, GIF, BMP, WebP, TIFF).
    #[arg(required_unless_present = "inputs")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    classifier: ExplainedClassifier,
    /// Class to explain (repeatable); default: the top-1 prediction.
    #[arg(long = "class")]
    classes: Vec<usize>,
    /// How many predictions to print.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    #[command(flatten)]
    methods: MethodArgs,
    #[command(flatten)]
    html: HtmlArg,
    /// Also write the counterfactual map of each class (negated gradients: what argues against it).
    #[arg(long)]
    counterfactual: bool,
    /// center-crop (shorter side to 256/224 of the input size, then its centre), stretch (to the
    /// input size) or none (as it is). Default: center-crop; stretch for a trained classifier
    /// folder (its images are the scenes it was trained on, whole).
    #[arg(long)]
    resize: Option<Resize>,
    #[command(flatten)]
    output: OutputArgs,
    /// Add a textual explanation: the 5 units with the largest and the 5 with the smallest
    /// alpha_k, each named by the 3 classes it raises most through the rest of the network
    /// (ImageNet has no concept masks to dissect against); for a trained classifier folder with a
    /// dissection.json (`gradcam dissect`), by its concept names.
    #[arg(long)]
    neurons: bool,
    #[command(flatten)]
    run: gradcam_runs::cli::RunArgs,
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let (net, index) = args.classifier.load()?;
    let dissection = match &args.classifier.model.model {
        ModelName::Folder(dir) if args.neurons => Dissection::of_model(None, dir, false)?.map(Into::into),
        _ => None,
    };
    let resize = args.resize.unwrap_or(net.default_resize());
    let options = Options { classes: args.classes.clone(), top_k: args.top_k, counterfactual: args.counterfactual, resize, neurons: args.neurons, dissection, settings: args.methods.settings() };
    options.check(&net)?;
    if let Some(inputs) = &args.run.inputs {
        return crate::progress::dataset(&args.run, inputs, &args.output.out, |items| {
            let names: Vec<String> = items.iter().map(|i| i.0.image.display().to_string()).collect();
            let decoded: Vec<_> = items.iter().zip(&names).filter_map(|((_, files, img), name)| Some((img.as_ref().ok()?, name.as_str(), *files))).collect();
            let mut records = classify_batch(&net, index, &decoded, &options, None).into_iter();
            items.into_iter().map(|(.., img)| Ok(img.map(|_| records.next().expect("a record per image"))??)).collect()
        });
    }
    each_image(&args.images, (&args.output.out, args.output.json, Some((&args.html, View::Classify))), |path, files, bar| {
        Ok(classify(&net, index, &load_image(path)?, &path.display().to_string(), files, &options, Some(bar))?)
    })
}
