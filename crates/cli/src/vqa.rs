//! `gradcam vqa` (answers with Grad-CAM and counterfactual maps) and `gradcam train vqa`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gradcam_core::map::{overlay, write_png_atomic, Region};
use gradcam_core::{ClassLogit, Counterfactual, Request, Target};
use gradcam_encoders::preprocess::load_image;
use gradcam_scenes::vqa::Vqa as VqaFile;
use gradcam_scenes::Split;
use gradcam_vqa::eval::evaluate;
use gradcam_vqa::train::{train, Event, TrainConfig};
use gradcam_vqa::{Vqa, VqaSplit};
use gradcam_neurons::{report, NeuronReport, UnitNames};

use crate::progress::{bar, EpochBar};
use serde::Serialize;

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
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Add each explanation's textual explanation: the 5 units with the largest and the 5 with
    /// the smallest alpha_k, named by the model's dissection table.
    #[arg(long)]
    neurons: bool,
    /// Dissection table for --neurons (default: MODEL/dissection.json).
    #[arg(long)]
    dissection: Option<PathBuf>,
    /// CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, ablationcam,
    /// scorecam, guided-backprop or guided-gradcam. Several, comma-separated, also write a
    /// comparison strip per answer (`..._methods.png`).
    #[arg(long, default_value = "gradcam", value_parser = crate::caption::parse_any_method, value_delimiter = ',')]
    method: Vec<String>,
    #[command(flatten)]
    smoothing: crate::caption::Smoothing,
}

#[derive(Serialize)]
struct AnswerJson {
    answer: String,
    prob: f32,
}

#[derive(Serialize)]
struct ExplanationJson {
    answer: String,
    method: &'static str,
    counterfactual: bool,
    cam_size: [usize; 2],
    cam: Vec<Vec<f32>>,
    overlay: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    neurons: Option<NeuronReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

#[derive(Serialize)]
struct QuestionJson {
    image: String,
    question: String,
    answers: Vec<AnswerJson>,
    explanations: Vec<ExplanationJson>,
    /// Words the model does not know (read as <unk>).
    unknown_words: Vec<String>,
    truncated: bool,
}

pub fn run(args: VqaArgs) -> anyhow::Result<ExitCode> {
    let model = Vqa::load(&args.model).with_context(|| format!("loading the VQA model from {}", args.model.display()))?;
    if let Some(dir) = &args.eval {
        let method = crate::caption::eval_method(&args.method, args.smoothing)?;
        let split = Split::read(dir)?;
        let bar = bar(args.limit as u64, "questions");
        let m = evaluate(&model, &split, args.limit, method.as_ref(), |i| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let dissection = if args.neurons { crate::caption::load_dissection(args.dissection.as_deref(), &args.model, true)? } else { None };
    let names = dissection.as_ref().map(UnitNames::Dissection);
    let mut stdout = std::io::stdout().lock();
    if let (Some(qfile), Some(dir)) = (&args.questions, &args.images) {
        return batch(&model, qfile, dir, &args, names.as_ref(), &mut stdout);
    }
    let (image, question) = (args.image.as_ref().expect("clap requires it"), args.question.as_deref().expect("clap requires it"));
    let img = load_image(image)?;
    let r = answer_one(&model, &img, image, question, &args, "", names.as_ref())?;
    print(&mut stdout, &r, args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn print(out: &mut impl Write, r: &QuestionJson, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        return writeln!(out);
    }
    writeln!(out, "{}: {}", r.image, r.question)?;
    if !r.unknown_words.is_empty() {
        writeln!(out, "  note: unknown words read as <unk>: {}", r.unknown_words.join(", "))?;
    }
    if r.truncated {
        writeln!(out, "  note: the question was cut to the model's maximum length")?;
    }
    for a in &r.answers {
        writeln!(out, "  {:<16} p {:.4}", a.answer, a.prob)?;
    }
    for e in &r.explanations {
        let kind = match (e.counterfactual, e.method) {
            (true, m) => format!("counterfactual ({m}) for"),
            (false, "gradcam") => "Grad-CAM for".to_string(),
            (false, m) => format!("{m} for"),
        };
        writeln!(out, "  {kind} {:?}: {}", e.answer, e.overlay)?;
        if let Some(text) = &e.text {
            writeln!(out, "    {text}")?;
        }
    }
    Ok(())
}

fn answer_one(model: &Vqa, img: &image::RgbImage, path: &Path, question: &str, args: &VqaArgs, prefix: &str, names: Option<&UnitNames>) -> anyhow::Result<QuestionJson> {
    let q = model.question(question)?;
    let input = model.preprocess(img)?.unsqueeze(0)?;
    let a = model.features(&input)?;
    let split = VqaSplit { model, question: model.encode(&q)? };
    let logits = model.logits(&a, &split.question)?;
    let top = model.top_answers(&logits, args.top_k.max(1))?;
    let mut explained = vec![top[0].0];
    for name in &args.answers {
        let i = model.answer_index(name)?;
        if !explained.contains(&i) {
            explained.push(i);
        }
    }
    let mut targets: Vec<(usize, Box<dyn Target>)> = Vec::new();
    for &i in &explained {
        targets.push((i, Box::new(ClassLogit(i))));
        if args.counterfactual {
            targets.push((i, Box::new(Counterfactual(ClassLogit(i)))));
        }
    }
    let requests: Vec<Request> = targets.iter().map(|(_, t)| Request { image: 0, target: t.as_ref() }).collect();
    let stem = format!("{prefix}{}", path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into()));
    let region = Region { x: 0, y: 0, width: img.width(), height: img.height() };
    let mut explanations = Vec::new();
    let mut panels: Vec<Vec<image::RgbImage>> = vec![Vec::new(); targets.len()];
    for method in &args.method {
        let (results, guided) = crate::caption::method_results(method, args.smoothing, &split, &input, &a, &requests, args.json)?;
        let (label, tag) = (crate::caption::method_label(method), format!("{}{}", crate::caption::method_tag(method), args.smoothing.tag()));
        for (k, (r, (i, t))) in results.iter().zip(&targets).enumerate() {
            let answer = model.cfg.answers[*i].clone();
            let cf = if t.counterfactual() { "_counterfactual" } else { "" };
            let file = args.out.join(format!("{stem}_{}{cf}{tag}.png", answer.replace(' ', "_")));
            let picture = match &guided {
                Some(g) => crate::caption::guided_picture(&g[k], img.width(), img.height())?,
                None => overlay(img, &r.cam.normalized().0, region),
            };
            write_png_atomic(&picture, &file)?;
            panels[k].push(picture);
            let subject = if r.counterfactual { format!("not {answer}") } else { answer.clone() };
            let neurons = names.map(|n| report(&r.alpha, n, &subject, 5));
            explanations.push(ExplanationJson {
                answer,
                method: label,
                counterfactual: r.counterfactual,
                cam_size: [r.cam.h, r.cam.w],
                cam: r.cam.rows(),
                overlay: file.display().to_string(),
                text: neurons.as_ref().map(|n| n.text.clone()),
                neurons,
            });
        }
    }
    if args.method.len() > 1 {
        for (panels, (i, t)) in panels.iter().zip(&targets) {
            let cf = if t.counterfactual() { "_counterfactual" } else { "" };
            let file = args.out.join(format!("{stem}_{}{cf}_methods.png", model.cfg.answers[*i].replace(' ', "_")));
            write_png_atomic(&crate::classify::comparison_strip(panels, img.height().max(64)), &file)?;
        }
    }
    Ok(QuestionJson {
        image: path.display().to_string(),
        question: question.to_string(),
        answers: top.iter().map(|&(i, p)| AnswerJson { answer: model.cfg.answers[i].clone(), prob: p }).collect(),
        explanations,
        unknown_words: q.unknown,
        truncated: q.truncated,
    })
}

/// Image files of a folder by the number at the end of their name (`000123.png`,
/// `COCO_val2014_000000000123.jpg`).
fn images_by_id(dir: &Path) -> anyhow::Result<HashMap<u64, PathBuf>> {
    let mut m = HashMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let digits: String = stem.chars().rev().take_while(char::is_ascii_digit).collect::<Vec<_>>().into_iter().rev().collect();
        if let Ok(id) = digits.parse() {
            m.insert(id, p);
        }
    }
    Ok(m)
}

fn batch(model: &Vqa, qfile: &Path, dir: &Path, args: &VqaArgs, names: Option<&UnitNames>, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let file = VqaFile::read(qfile, args.annotations.as_deref(), None)?;
    let files = images_by_id(dir)?;
    let ann: HashMap<u64, &gradcam_scenes::vqa::Annotation> = file.annotations.iter().map(|a| (a.question_id, a)).collect();
    let bar = bar(file.questions.len() as u64, "questions");
    let (mut failures, mut per_type): (usize, BTreeMap<String, (usize, f64)>) = (0, BTreeMap::new());
    let mut cache: Option<(u64, image::RgbImage)> = None;
    for q in &file.questions {
        let result = (|| -> anyhow::Result<QuestionJson> {
            let path = files.get(&q.image_id).with_context(|| format!("no image for image_id {} in {}", q.image_id, dir.display()))?;
            if cache.as_ref().map(|c| c.0) != Some(q.image_id) {
                cache = Some((q.image_id, load_image(path)?));
            }
            let img = &cache.as_ref().expect("just set").1;
            answer_one(model, img, path, &q.question, args, &format!("q{}_", q.question_id), names)
        })();
        match result {
            Ok(r) => {
                if let Some(a) = ann.get(&q.question_id) {
                    let acc = VqaFile::accuracy(a, &r.answers[0].answer);
                    for key in ["overall".to_string(), a.question_type.clone().unwrap_or_else(|| a.answer_type.clone())] {
                        let e = per_type.entry(key).or_default();
                        e.0 += 1;
                        e.1 += acc;
                    }
                }
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
    for (k, (n, sum)) in &per_type {
        eprintln!("VQA accuracy {k}: {:.4} over {n} questions", sum / *n as f64);
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[derive(clap::Args)]
pub struct TrainVqaArgs {
    /// Dataset folder with train/ and val/ splits (VQA v2 questions + annotations, COCO instances).
    #[arg(long)]
    data: PathBuf,
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
    /// Start the image encoder from this trained model folder's (e.g. models/captioner).
    #[arg(long)]
    encoder_from: Option<PathBuf>,
    /// Keep that encoder fixed while training the rest.
    #[arg(long, requires = "encoder_from")]
    freeze_encoder: bool,
    /// The encoder's own learning rate (default: --lr), for fine-tuning it more gently.
    #[arg(long, conflicts_with = "freeze_encoder")]
    encoder_lr: Option<f64>,
    /// Leave out that encoder's units that are active at more than half of all positions of
    /// the training images: units that fire over the background put a floor under every map.
    #[arg(long, requires = "encoder_from")]
    drop_background_units: bool,
    #[arg(long)]
    resume: bool,
}

pub fn train_vqa(args: TrainVqaArgs) -> anyhow::Result<ExitCode> {
    let tc = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.seed,
        encoder_from: args.encoder_from.clone(),
        freeze_encoder: args.freeze_encoder,
        encoder_lr: args.encoder_lr,
        drop_background_units: args.drop_background_units,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let mut epoch_bar = EpochBar::default();
    let ckpt = train(&args.data, &args.out, &tc, args.resume, &mut |e| match e {
        Event::Start { epoch, steps } => epoch_bar.start(epoch, steps),
        Event::Step { loss } => epoch_bar.step(loss),
        Event::Epoch(log) => {
            epoch_bar.finish();
            eprintln!("epoch {:>2}: train loss {:.4}, val loss {:.4}, val accuracy {:.3} ({:.0} s)", log.epoch, log.train_loss, log.val_loss, log.val_accuracy, log.seconds);
        }
    })?;
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    eprintln!("trained {} epochs in {minutes:.1} min; model in {}", ckpt.epochs_done, args.out.display());

    let test_dir = args.data.join("test");
    let metrics = if test_dir.join("questions.json").exists() {
        let model = Vqa::load(&args.out)?;
        let split = Split::read(&test_dir)?;
        let n = split.vqa.as_ref().map_or(0, |v| v.questions.len());
        let b = bar(n as u64, "test questions");
        let m = evaluate(&model, &split, n, &gradcam_core::GradCam, |i| b.set_position(i as u64))?;
        b.finish_and_clear();
        Some(m)
    } else {
        None
    };
    let mut command = format!(
        "gradcam train vqa --data {} --out {} --epochs {} --batch-size {} --lr {} --seed {}",
        args.data.display(),
        args.out.display(),
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed
    );
    if let Some(dir) = &args.encoder_from {
        command.push_str(&format!(" --encoder-from {}", dir.display()));
    }
    if args.freeze_encoder {
        command.push_str(" --freeze-encoder");
    }
    if let Some(lr) = args.encoder_lr {
        command.push_str(&format!(" --encoder-lr {lr}"));
    }
    if args.drop_background_units {
        command.push_str(" --drop-background-units");
    }
    let cfg: gradcam_vqa::Config = serde_json::from_str(&std::fs::read_to_string(args.out.join("config.json"))?)?;
    let side = cfg.image_size / 4;
    let mut s = String::from("# VQA fusion model for ShapeScenes\n\n");
    s.push_str(&format!(
        "Question words through embeddings ({}) and an LSTM ({}); the image through the scene CNN (explained layer `conv4`, {} x {side} x {side} at {} px{}), {}; both projected to {} with tanh, fused by element-wise product, then an MLP ({}, ReLU) over the answers. ",
        cfg.embed,
        cfg.hidden,
        cfg.channels,
        cfg.image_size,
        if cfg.coord_conv { ", CoordConv before `conv4`" } else { "" },
        if cfg.pool_moments { "average-, max- and spatial-moment-pooled" } else { "average- and max-pooled" },
        cfg.joint,
        cfg.mlp
    ));
    if let Some(dir) = &ckpt.train.encoder_from {
        s.push_str(&format!(
            "The encoder starts from the trained model in `{}`{}. ",
            dir.display(),
            match (ckpt.train.freeze_encoder, ckpt.train.encoder_lr) {
                (true, _) => " and stays fixed".to_string(),
                (false, Some(lr)) => format!(" and is fine-tuned with learning rate {lr}"),
                (false, None) => " and is fine-tuned".to_string(),
            }
        ));
    }
    if ckpt.train.drop_background_units {
        let units: Vec<String> = ckpt.dropped_units.iter().map(|(u, share)| format!("unit {u}, active at {:.1}% of positions", 100.0 * share)).collect();
        s.push_str(&format!(
            "Left out of that encoder: the units active at more than {:.0}% of the `conv4` positions of the first {} training images, which fire over the background ({}). ",
            100.0 * gradcam_vqa::train::BACKGROUND_SHARE,
            gradcam_vqa::train::SCANNED_IMAGES,
            if units.is_empty() { "none found".to_string() } else { units.join("; ") }
        ));
    }
    s.push_str("An answer is explained by backpropagating its pre-softmax score into `conv4` (Grad-CAM paper, section 8.2); its negation gives the counterfactual map.\n\n");
    s.push_str(&format!("## Training\n\nData: `{}` (VQA v2 questions + annotations, COCO instances).\n\n```sh\n{command}\n```\n\n", args.data.display()));
    s.push_str(&format!(
        "AdamW (lr {}, weight decay {}, cosine decay), batch {} images with all their questions, seed {}; {} epochs in {minutes:.1} min on a 2-core CPU.\n\n",
        ckpt.train.lr, ckpt.train.weight_decay, ckpt.train.batch_size, ckpt.train.seed, ckpt.epochs_done
    ));
    s.push_str("| epoch | train loss | val loss | val accuracy | seconds |\n|---|---|---|---|---|\n");
    for l in &ckpt.log {
        s.push_str(&format!("| {} | {:.4} | {:.4} | {:.3} | {:.0} |\n", l.epoch, l.train_loss, l.val_loss, l.val_accuracy, l.seconds));
    }
    if let Some(m) = &metrics {
        s.push_str(&format!("\n## Test metrics ({} questions)\n\n| question type | questions | VQA accuracy |\n|---|---|---|\n", m.overall.questions));
        s.push_str(&format!("| all | {} | **{:.3}** |\n", m.overall.questions, m.overall.accuracy));
        for (k, a) in &m.per_type {
            s.push_str(&format!("| {k} | {} | {:.3} |\n", a.questions, a.accuracy));
        }
        s.push_str(&format!(
            "\nAnswer pointing game on the {} questions whose evidence is one object (peak of the predicted answer's map within {:.0} px of the object's mask): **{:.3}**, centre baseline {:.3}.\n\n",
            m.pointing.count, m.tolerance_px, m.pointing.accuracy(), m.pointing.centre_accuracy()
        ));
        s.push_str(&format!(
            "Counterfactual check on the {} questions about one object in scenes of two or more: the counterfactual map of the correct answer puts less of its mass on the object than the answer's own map in **{:.3}** of them. {} of those counterfactual maps are empty (nothing argues against the answer; an empty map has no mass anywhere and counts as less); over the others alone: {:.3}.\n\n",
            m.counterfactual.questions,
            m.counterfactual.less_mass as f64 / m.counterfactual.questions.max(1) as f64,
            m.counterfactual.empty,
            m.counterfactual.less_mass_nonempty as f64 / (m.counterfactual.questions - m.counterfactual.empty).max(1) as f64
        ));
        s.push_str("| question type | pointing (questions) | centre baseline | counterfactual less mass (questions) |\n|---|---|---|---|\n");
        for (k, p) in &m.pointing_per_type {
            let c = m.counterfactual_per_type.get(k).cloned().unwrap_or_default();
            let cf = if c.questions > 0 { format!("{:.3} ({})", c.less_mass as f64 / c.questions as f64, c.questions) } else { "-".into() };
            s.push_str(&format!("| {k} | {:.3} ({}) | {:.3} | {cf} |\n", p.accuracy(), p.count, p.centre_accuracy()));
        }
        s.push_str(&format!("\nReproduce with `gradcam vqa --model DIR --eval DATA/test --limit {}`.\n", m.overall.questions));
        eprintln!("test: VQA accuracy {:.3}, pointing {:.3} (centre {:.3})", m.overall.accuracy, m.pointing.accuracy(), m.pointing.centre_accuracy());
    }
    gradcam_scenes::write_atomic(&args.out.join("README.md"), s.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
