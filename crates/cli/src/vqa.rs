//! `gradcam vqa`: answers with Grad-CAM and counterfactual maps.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gradcam::pipeline::vqa::{answer, Options, Record};
use gradcam::pipeline::Files;
use gradcam::pipeline::render::Stems;
use gradcam_encoders::preprocess::load_image;
use gradcam_neurons::{Dissection, UnitNames};
use gradcam_scenes::vqa::Vqa as VqaFile;
use gradcam_scenes::Split;
use gradcam_vqa::eval::evaluate;
use gradcam_vqa::Vqa;

use crate::common::{HtmlArg, MethodArgs};
use gradcam_serve::html::View;
use crate::progress::bar;

pub const DEFAULT_MODEL: &str = "models/vqa";

#[derive(clap::Args)]
pub struct VqaArgs {
    /// Image to ask about.
    #[arg(required_unless_present_any = ["questions", "eval"], requires = "question")]
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
    #[arg(long, default_value = "gradcam-out")]
    out: PathBuf,
    /// One JSON object per question (JSON Lines).
    #[arg(long)]
    json: bool,
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
    /// Add each explanation's textual explanation: the 5 units with the largest and the 5 with
    /// the smallest alpha_k, named by the model's dissection table.
    #[arg(long)]
    neurons: bool,
    /// Dissection table for --neurons (default: MODEL/dissection.json).
    #[arg(long)]
    dissection: Option<PathBuf>,
    /// Several methods also write a comparison strip per answer (`..._methods.png`).
    #[command(flatten)]
    methods: MethodArgs,
    #[command(flatten)]
    html: HtmlArg,
}

pub fn run(args: VqaArgs) -> anyhow::Result<ExitCode> {
    let model = Vqa::load(&args.model).with_context(|| format!("loading the VQA model from {}", args.model.display()))?;
    if let Some(dir) = &args.eval {
        let method = args.methods.eval_method()?;
        let split = Split::read(dir)?;
        let bar = bar(args.limit as u64, "questions");
        let m = evaluate(&model, &split, args.limit, method.as_ref(), |i| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let dissection = if args.neurons { Dissection::of_model(args.dissection.as_deref(), &args.model, true)? } else { None };
    let names = dissection.as_ref().map(|d| UnitNames::Dissection(d));
    let mut stdout = std::io::stdout().lock();
    let mut stems = Stems::default();
    if let (Some(qfile), Some(dir)) = (&args.questions, &args.images) {
        return batch(&model, qfile, dir, &args, names.as_ref(), &mut stems, &mut stdout);
    }
    let (image, question) = (args.image.as_ref().expect("clap requires it"), args.question.as_deref().expect("clap requires it"));
    let img = load_image(image)?;
    let r = answer_one(&model, &img, image, question, &args, &stems.unique(image), names.as_ref())?;
    print(&mut stdout, &r, args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn print(out: &mut impl Write, r: &Record, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        return writeln!(out);
    }
    writeln!(out, "{}: {}", r.image, r.question.escape_debug())?;
    if !r.unknown_words.is_empty() {
        writeln!(out, "  note: unknown words read as <unk>: {}", r.unknown_words.join(", ").escape_debug())?;
    }
    if r.truncated {
        writeln!(out, "  note: the question was cut to the model's maximum length")?;
    }
    for a in &r.answers {
        writeln!(out, "  {:<16} p {:.4}", a.answer.escape_debug().to_string(), a.prob)?;
    }
    for e in &r.explanations {
        writeln!(out, "  {} {:?}: {}", e.map.kind(), e.answer, e.map.overlay)?;
        if let Some(text) = &e.map.text {
            writeln!(out, "    {text}")?;
        }
    }
    Ok(())
}

fn answer_one(model: &Vqa, img: &image::RgbImage, path: &Path, question: &str, args: &VqaArgs, stem: &str, names: Option<&UnitNames>) -> anyhow::Result<Record> {
    let options = Options { answers: args.answers.clone(), counterfactual: args.counterfactual, top_k: args.top_k, settings: args.methods.settings() };
    let bar = crate::progress::channels(args.json);
    let record = answer(model, img, &path.display().to_string(), question, Files { dir: Some(&args.out), stem }, &options, names, Some(&*bar))?;
    args.html.write(stem, path, View::Vqa, &record).map(|()| record)
}

fn batch(model: &Vqa, qfile: &Path, dir: &Path, args: &VqaArgs, names: Option<&UnitNames>, stems: &mut Stems, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let file = VqaFile::read(qfile, args.annotations.as_deref(), None)?;
    let files = gradcam_scenes::vqa::images_by_id(dir)?;
    let bar = bar(file.questions.len() as u64, "questions");
    let (mut failures, mut tally) = (0, file.tally());
    let mut cache: Option<(u64, image::RgbImage)> = None;
    for q in &file.questions {
        let result = (|| -> anyhow::Result<Record> {
            let path = files.get(&q.image_id).with_context(|| format!("no image for image_id {} in {}", q.image_id, dir.display()))?;
            if cache.as_ref().map(|c| c.0) != Some(q.image_id) {
                cache = Some((q.image_id, load_image(path)?));
            }
            let img = &cache.as_ref().expect("just set").1;
            let stem = stems.unique(Path::new(&format!("q{}_{}", q.question_id, path.file_stem().unwrap_or_default().to_string_lossy())));
            answer_one(model, img, path, &q.question, args, &stem, names)
        })();
        match result {
            Ok(r) => {
                tally.add(q.question_id, &r.answers[0].answer);
                bar.suspend(|| print(out, &r, args.json))?;
            }
            Err(e) => {
                failures += 1;
                bar.suspend(|| eprintln!("error: question {}: {e:#}", q.question_id));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    for (k, n, accuracy) in tally.rows() {
        eprintln!("VQA accuracy {k}: {accuracy:.4} over {n} questions");
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
