//! `gradcam match`: CLIP-style image-text matching, each text's similarity explained.

use std::process::ExitCode;

use anyhow::Context;
use gradcam::pipeline::{matching::{match_texts, Options}, render::Stems, Files};
use gradcam_clip::Matcher;
use gradcam_encoders::preprocess::load_image;

use crate::common::{print, MethodArgs, OutputArgs};
use gradcam_serve::cli::HtmlArg;

#[derive(clap::Args)]
pub struct MatchArgs {
    #[command(flatten)]
    m: gradcam_clip::cli::MatchFlags,
    #[command(flatten)]
    methods: MethodArgs,
    #[command(flatten)]
    html: HtmlArg,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    run: gradcam_runs::cli::RunArgs,
}

pub fn run(args: MatchArgs) -> anyhow::Result<ExitCode> {
    let model = Matcher::load(&args.m.model).with_context(|| format!("loading the CLIP model from {}", args.m.model.display()))?;
    let m = args.m.clone();
    let options = Options { texts: m.texts, layer: m.layer, softmax: m.softmax, counterfactual: m.counterfactual, settings: args.methods.settings() };
    if let Some(inputs) = &args.run.inputs {
        return crate::progress::dataset(&args.run, inputs, &args.output.out, |items| items.into_iter().map(|(i, files, img)| Ok(match_texts(&model, &img?, &i.image.display().to_string(), files, &options, None)?)).collect());
    }
    gradcam_io::create_dir_all(&args.output.out)?;
    let (channels, mut stems, mut stdout) = (crate::progress::channels(args.output.json), Stems::default(), std::io::stdout().lock());
    for image in &args.m.images {
        let stem = stems.unique(image);
        let r = match_texts(&model, &load_image(image)?, &image.display().to_string(), Files::new(&args.output.out, &stem), &options, Some(&*channels))?;
        r.texts.iter().filter(|t| t.truncated).for_each(|t| eprintln!("warning: {:?} is longer than the model's context; cut to it", t.text));
        args.html.write(&stem, image, gradcam_serve::html::View::Match, &r)?;
        print(&mut stdout, &r, args.output.json)?;
    }
    Ok(ExitCode::SUCCESS)
}
