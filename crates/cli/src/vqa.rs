//! `gradcam vqa`: answers with Grad-CAM and counterfactual maps.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradcam::pipeline::render::Stems;
use gradcam::pipeline::vqa::{answer, batch, Options};
use gradcam::pipeline::Files;
use gradcam_encoders::preprocess::load_image;
use gradcam_neurons::{Dissection, UnitNames};
use gradcam_scenes::Split;
use gradcam_vqa::eval::evaluate;
use gradcam_vqa::Vqa;

use crate::common::{print, ExplainArgs, OutputArgs};
use gradcam_serve::html::View;
use crate::progress::bar;

pub const DEFAULT_MODEL: &str = "models/vqa";

#[derive(clap::Args)]
pub struct VqaArgs {
    /// Image to ask about.
    #[arg(required_unless_present_any = ["questions", "eval", "inputs"], requires = "question")]
    image: Option<PathBuf>,
    /// The question.
    question: Option<String>,
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Also explain this answer ("why would it say yellow?"); repeatable.
    #[arg(long = "answer")]
    answers: Vec<String>,
    /// Also write the counterfactual maps (negated gradients: what argues against the answer).
    #[arg(long)]
    counterfactual: bool,
    /// How many answers to list.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    #[command(flatten)]
    output: OutputArgs,
    /// Batch mode: a VQA v2 questions file...
    #[arg(long, requires = "images")]
    questions: Option<PathBuf>,
    /// ...and the folder of its images (matched by the number at the end of the file name).
    #[arg(long)]
    images: Option<PathBuf>,
    /// With --questions: the annotations, to print the VQA accuracy.
    #[arg(long)]
    annotations: Option<PathBuf>,
    /// Evaluate on a split folder (questions, annotations, instances, images/): accuracy per
    /// question type, pointing game and the counterfactual check, as JSON.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Questions evaluated with --eval.
    #[arg(long, default_value_t = 1000, value_parser = crate::common::positive)]
    limit: usize,
    #[command(flatten)]
    explain: ExplainArgs,
    #[command(flatten)]
    run: gradcam_runs::cli::RunArgs,
}

pub fn run(args: VqaArgs) -> anyhow::Result<ExitCode> {
    let model = Vqa::load(&args.model).with_context(|| format!("loading the VQA model from {}", args.model.display()))?;
    if let Some(dir) = &args.eval {
        let method = args.explain.methods.settings().eval_method()?;
        let split = Split::read(dir)?;
        let bar = bar(args.limit as u64, "questions");
        let m = evaluate(&model, &split, args.limit, method.as_ref(), |i| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(ExitCode::SUCCESS);
    }
    gradcam_io::create_dir_all(&args.output.out)?;
    let dissection = if args.explain.neurons { Dissection::of_model(args.explain.dissection.as_deref(), &args.model, true)? } else { None };
    let names = dissection.as_ref().map(|d| UnitNames::Dissection(d));
    let options = Options { answers: args.answers.clone(), counterfactual: args.counterfactual, top_k: args.top_k, settings: args.explain.methods.settings() };
    if let Some(inputs) = &args.run.inputs {
        anyhow::ensure!(gradcam_runs::Inputs::open(inputs)?.kind() == gradcam_runs::Kind::Questions, "vqa --inputs {}: give a VQA v2 questions.json (its images in images/ beside it)", inputs.display());
        let text = |i: &gradcam_runs::Input| i.question.as_ref().map_or(String::new(), |q| q.text.clone());
        return crate::progress::dataset(&args.run, inputs, &args.output.out, |items| items.into_iter().map(|(i, files, img)| Ok(answer(&model, &img?, &i.image.display().to_string(), &text(i), files, &options, names.as_ref(), None)?)).collect());
    }
    let (channels, mut stems, mut stdout) = (crate::progress::channels(args.output.json), Stems::default(), std::io::stdout().lock());
    let Some((qfile, dir)) = args.questions.as_deref().zip(args.images.as_deref()) else {
        let (image, question) = (args.image.as_ref().expect("clap requires it"), args.question.as_deref().expect("clap requires it"));
        let stem = stems.unique(image);
        let r = answer(&model, &load_image(image)?, &image.display().to_string(), question, Files::new(&args.output.out, &stem), &options, names.as_ref(), Some(&*channels))?;
        args.explain.html.write(&stem, image, View::Vqa, &r)?;
        print(&mut stdout, &r, args.output.json)?;
        return Ok(ExitCode::SUCCESS);
    };
    let (bar, mut failures, mut written) = (bar(0, "questions"), 0, Ok(()));
    let rows = batch(&model, (qfile, args.annotations.as_deref(), dir), &args.output.out, &options, names.as_ref(), Some(&*channels), &mut stems, &mut |a, n| {
        bar.set_length(n as u64);
        match a.record.map_err(anyhow::Error::from).and_then(|r| args.explain.html.write(&a.stem, a.image, View::Vqa, &r).map(|()| r).map_err(Into::into)) {
            Ok(r) if written.is_ok() => written = bar.suspend(|| print(&mut stdout, &r, args.output.json)),
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                bar.suspend(|| eprintln!("error: question {}: {}", a.question.question_id, crate::hints::message(&e)));
            }
        }
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    written?;
    for (k, n, accuracy) in rows {
        eprintln!("VQA accuracy {k}: {accuracy:.4} over {n} questions");
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
