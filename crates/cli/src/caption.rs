//! `gradcam caption` (captions with a Grad-CAM map per word) and `gradcam train captioner`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Tensor;
use gradcam_captioner::eval::evaluate;
use gradcam_captioner::{CaptionSplit, WordLogProb};
use gradcam_core::{explain, CamResult, Explainable, Request, Target};
use gradcam_neurons::{report, Dissection, NeuronReport, UnitNames};
use gradcam_captioner::train::{train, Event, TrainConfig};
use gradcam_captioner::Captioner;
use gradcam_core::map::{overlay, write_png_atomic, Region};
use gradcam_encoders::preprocess::load_image;
use gradcam_scenes::Split;
use image::RgbImage;
use indicatif::ProgressBar;

use crate::progress::{bar, EpochBar};
use serde::Serialize;

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
    #[arg(long, default_value_t = 500)]
    limit: usize,
    /// Add each word's textual explanation: the 5 units with the largest and the 5 with the
    /// smallest alpha_k, named by the model's dissection table.
    #[arg(long)]
    neurons: bool,
    /// Dissection table for --neurons and --eval (default: MODEL/dissection.json when present).
    #[arg(long)]
    dissection: Option<PathBuf>,
    /// CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, ablationcam,
    /// scorecam, guided-backprop or guided-gradcam. Several, comma-separated, make the strip one
    /// row per method.
    #[arg(long, default_value = "gradcam", value_parser = parse_any_method, value_delimiter = ',')]
    method: Vec<String>,
    #[command(flatten)]
    smoothing: Smoothing,
}

/// Any method a command takes: the gradient-based CAMs, the perturbation ones and the guided
/// ones.
pub fn parse_any_method(s: &str) -> Result<String, String> {
    parse_method(s, &["ablationcam", "scorecam", GUIDED[0], GUIDED[1]])
}

/// The explanations of any method for every request; for the guided methods also the guided
/// images (`[3, H, W]` each). Ablation-CAM and Score-CAM show a progress bar unless `quiet`.
pub fn method_results<M: Explainable + ?Sized>(
    method: &str,
    smoothing: Smoothing,
    model: &M,
    input: &Tensor,
    activations: &Tensor,
    requests: &[Request],
    quiet: bool,
) -> anyhow::Result<(Vec<CamResult>, Option<Vec<Tensor>>)> {
    if method != "ablationcam" && method != "scorecam" {
        return gradient_results(method, smoothing, model, input, activations, requests);
    }
    if smoothing.eigen_smooth || smoothing.aug_smooth {
        anyhow::bail!("--eigen-smooth and --aug-smooth work with the gradient-based methods, not {method}");
    }
    let k = activations.dim(1)?;
    let bar = if quiet { ProgressBar::hidden() } else { bar(k as u64, if method == "ablationcam" { "channels ablated" } else { "channels scored" }) };
    let r = if method == "ablationcam" {
        gradcam_core::methods::ablation_cam(model, activations, requests, 128, &mut |n| bar.set_position(n as u64))?
    } else {
        gradcam_core::methods::score_cam(model, input, activations, requests, 2, &mut |n| bar.set_position(n as u64))?
    };
    bar.finish_and_clear();
    Ok((r, None))
}

/// Methods that write Guided Backpropagation images instead of overlays.
pub const GUIDED: [&str; 2] = ["guided-backprop", "guided-gradcam"];

/// A method's name as `--json` reports it.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "ablationcam" => "ablationcam",
        "scorecam" => "scorecam",
        "guided-backprop" => "guided-backprop",
        "guided-gradcam" => "guided-gradcam",
        other => gradcam_core::method_by_name(other).map_or("gradcam", |m| m.name()),
    }
}

/// The file-name tag of a method (none for Grad-CAM).
pub fn method_tag(method: &str) -> String {
    if method == "gradcam" {
        String::new()
    } else {
        format!("_{}", method.replace("++", "pp"))
    }
}

/// The smoothing options pytorch-grad-cam users know.
#[derive(clap::Args, Clone, Copy, Default)]
pub struct Smoothing {
    /// Eigen-smoothing: each map is the first principal component of the weighted activations
    /// alpha_k A^k instead of their sum (pytorch-grad-cam's eigen_smooth).
    #[arg(long)]
    pub eigen_smooth: bool,
    /// Augmentation smoothing: each map is the mean over the input flipped or not and multiplied
    /// by 0.9, 1 and 1.1, at the input's resolution (pytorch-grad-cam's aug_smooth; 6x the work).
    #[arg(long)]
    pub aug_smooth: bool,
}

impl Smoothing {
    /// The file-name tag of the smoothing (none without).
    pub fn tag(self) -> &'static str {
        match (self.eigen_smooth, self.aug_smooth) {
            (false, false) => "",
            (true, false) => "_eigen",
            (false, true) => "_aug",
            (true, true) => "_eigen_aug",
        }
    }
}

/// The explanations of a gradient-based or guided method for every request, smoothed as asked;
/// for the guided methods also the guided images (`[3, H, W]`): Guided Backpropagation, or for
/// guided-gradcam its product with the request's Grad-CAM map (which the results then hold).
pub fn gradient_results<M: Explainable + ?Sized>(
    method: &str,
    smoothing: Smoothing,
    model: &M,
    input: &Tensor,
    activations: &Tensor,
    requests: &[Request],
) -> anyhow::Result<(Vec<CamResult>, Option<Vec<Tensor>>)> {
    let guided = GUIDED.contains(&method);
    let mut m = if guided { Box::new(gradcam_core::GradCam) } else { gradcam_core::method_by_name(method).context("unknown method")? };
    if smoothing.eigen_smooth {
        m = Box::new(gradcam_core::EigenSmooth(m));
    }
    let cams = if smoothing.aug_smooth {
        gradcam_core::augmentation_smoothing(model, input, requests, m.as_ref())?
    } else {
        explain(model, activations, requests, m.as_ref())?
    };
    if !guided {
        return Ok((cams, None));
    }
    let gb = gradcam_core::guided_backprop(model, input, requests)?;
    let images = cams
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let g = gb.get(i)?;
            Ok(if method == "guided-gradcam" { gradcam_core::guided_gradcam(&g, &r.cam)? } else { g })
        })
        .collect::<anyhow::Result<Vec<Tensor>>>()?;
    Ok((cams, Some(images)))
}

/// A guided image as a picture of `width x height` (the original image's size).
pub fn guided_picture(g: &Tensor, width: u32, height: u32) -> anyhow::Result<RgbImage> {
    let p = gradcam_core::gradient_image(g)?;
    Ok(if p.dimensions() == (width, height) { p } else { image::imageops::resize(&p, width, height, image::imageops::FilterType::Triangle) })
}

/// The method an `--eval` run scores: one gradient-based method, with eigen-smoothing if asked
/// (augmentation smoothing and the perturbation and guided methods are not evaluated).
pub fn eval_method(methods: &[String], smoothing: Smoothing) -> anyhow::Result<Box<dyn gradcam_core::CamMethod>> {
    let [method] = methods else { anyhow::bail!("--eval scores one method at a time; --method names {}", methods.join(", ")) };
    if smoothing.aug_smooth {
        anyhow::bail!("--eval does not take --aug-smooth");
    }
    let m = gradcam_core::method_by_name(method).with_context(|| format!("--eval scores the gradient-based methods, not {method}"))?;
    Ok(if smoothing.eigen_smooth { Box::new(gradcam_core::EigenSmooth(m)) } else { m })
}

/// A gradient-based CAM method's name, checked.
pub fn parse_gradient_method(s: &str) -> Result<String, String> {
    parse_method(s, &[])
}

/// A CAM method's name: a gradient-based one, or one of `extra` (methods a command runs itself).
pub fn parse_method(s: &str, extra: &[&str]) -> Result<String, String> {
    if extra.contains(&s) {
        return Ok(s.to_string());
    }
    gradcam_core::method_by_name(s).map(|m| m.name().to_string()).ok_or_else(|| {
        let mut known = vec!["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam"];
        known.extend(extra);
        format!("unknown method {s:?}; one of {}", known.join(", "))
    })
}

/// The dissection table: `--dissection`, else the model folder's `dissection.json` if any;
/// `required` turns a missing default into an error that says how to make one.
pub fn load_dissection(explicit: Option<&Path>, model: &Path, required: bool) -> anyhow::Result<Option<Dissection>> {
    if let Some(p) = explicit {
        return Ok(Some(Dissection::load(p)?));
    }
    let default = model.join("dissection.json");
    if default.exists() {
        return Ok(Some(Dissection::load(&default)?));
    }
    if required {
        anyhow::bail!("{} has no dissection.json; make one with `gradcam dissect --model {} --data DATA` or pass --dissection FILE", model.display(), model.display());
    }
    Ok(None)
}

#[derive(Serialize)]
struct WordJson {
    t: usize,
    word: String,
    method: &'static str,
    logprob: f32,
    cam_size: [usize; 2],
    cam: Vec<Vec<f32>>,
    overlay: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    neurons: Option<NeuronReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

#[derive(Serialize)]
struct CaptionJson {
    image: String,
    caption: String,
    words: Vec<WordJson>,
    strip: String,
}

pub fn run(args: CaptionArgs) -> anyhow::Result<ExitCode> {
    let model = Captioner::load(&args.model).with_context(|| format!("loading the captioner from {}", args.model.display()))?;
    let dissection = load_dissection(args.dissection.as_deref(), &args.model, args.neurons)?;
    if let Some(dir) = &args.eval {
        let method = eval_method(&args.method, args.smoothing)?;
        let split = Split::read(dir)?;
        let n = split.instances.images.len().min(args.limit);
        let bar = bar(n as u64, "images");
        let metrics = evaluate(&model, &split, args.limit, dissection.as_ref(), method.as_ref(), |i| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        println!("{}", serde_json::to_string_pretty(&metrics)?);
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let bar = if args.images.len() > 1 { bar(args.images.len() as u64, "images") } else { ProgressBar::hidden() };
    let mut failures = 0;
    let mut stdout = std::io::stdout().lock();
    for path in &args.images {
        let names = if args.neurons { dissection.as_ref().map(UnitNames::Dissection) } else { None };
        match caption_one(&model, path, &args, names.as_ref()) {
            Ok(r) => bar.suspend(|| print(&mut stdout, &r, args.json))?,
            Err(e) => {
                failures += 1;
                bar.suspend(|| eprintln!("error: {}: {e:#}", path.display()));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}


fn print(out: &mut impl Write, r: &CaptionJson, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        return writeln!(out);
    }
    writeln!(out, "{}: {}", r.image, r.caption)?;
    for w in &r.words {
        writeln!(out, "  {:>2} {:<10} log p {:>7.3}  {}", w.t, w.word, w.logprob, w.overlay)?;
        if let Some(text) = &w.text {
            writeln!(out, "     {text}")?;
        }
    }
    writeln!(out, "  strip: {}", r.strip)
}

fn caption_one(model: &Captioner, path: &Path, args: &CaptionArgs, names: Option<&UnitNames>) -> anyhow::Result<CaptionJson> {
    let img = load_image(path)?;
    let input = model.preprocess(&img)?.unsqueeze(0)?; // [1, 3, s, s]
    let a = model.features(&input)?;
    let tokens = match &args.caption {
        Some(text) => model.vocab.encode_known(text)?,
        None if args.beam > 1 => model.beam(&a, args.beam)?.tokens,
        None => model.greedy(&a)?.remove(0).tokens,
    };
    let words = model.vocab.decode(&tokens);
    let logprobs = model.word_logprobs(&a, &tokens, false)?.squeeze(0)?.to_vec1::<f32>()?;
    let split = CaptionSplit::new(model, &tokens);
    let targets: Vec<WordLogProb> = (0..tokens.len()).map(|step| WordLogProb { step }).collect();
    let requests: Vec<Request> = targets.iter().map(|t| Request { image: 0, target: t as &dyn Target }).collect();
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let region = Region { x: 0, y: 0, width: img.width(), height: img.height() };
    let mut out_words = Vec::new();
    let mut rows = Vec::new();
    for method in &args.method {
        let (results, guided) = method_results(method, args.smoothing, &split, &input, &a, &requests, args.json)?;
        let (label, tag) = (method_label(method), format!("{}{}", method_tag(method), args.smoothing.tag()));
        let mut tiles = Vec::new();
        for (t, (word, r)) in words.iter().zip(&results).enumerate() {
            let map = &r.cam;
            let neurons = names.map(|n| report(&r.alpha, n, word, 5));
            let tile = match &guided {
                Some(g) => guided_picture(&g[t], img.width(), img.height())?,
                None => overlay(&img, &map.normalized().0, region),
            };
            let file = args.out.join(format!("{stem}_{t:02}_{word}{tag}.png"));
            write_png_atomic(&tile, &file)?;
            tiles.push(tile);
            out_words.push(WordJson {
                t,
                word: word.clone(),
                method: label,
                logprob: logprobs[t],
                cam_size: [map.h, map.w],
                cam: map.rows(),
                overlay: file.display().to_string(),
                text: neurons.as_ref().map(|n| n.text.clone()),
                neurons,
            });
        }
        rows.push(strip(&img, &tiles));
    }
    // One row per method, stacked.
    let tag = if args.method.len() == 1 { format!("{}{}", method_tag(&args.method[0]), args.smoothing.tag()) } else { "_methods".to_string() };
    let strip_file = args.out.join(format!("{stem}_strip{tag}.png"));
    let mut grid = RgbImage::new(rows[0].width(), rows[0].height() * rows.len() as u32);
    for (i, row) in rows.iter().enumerate() {
        image::imageops::replace(&mut grid, row, 0, (i as u32 * row.height()) as i64);
    }
    write_png_atomic(&grid, &strip_file)?;
    Ok(CaptionJson { image: path.display().to_string(), caption: words.join(" "), words: out_words, strip: strip_file.display().to_string() })
}


/// The image followed by each word's overlay, side by side.
fn strip(img: &RgbImage, tiles: &[RgbImage]) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = RgbImage::new(w * (tiles.len() as u32 + 1), h);
    image::imageops::replace(&mut out, img, 0, 0);
    for (i, t) in tiles.iter().enumerate() {
        image::imageops::replace(&mut out, t, (w * (i as u32 + 1)) as i64, 0);
    }
    out
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
            eprintln!(
                "epoch {:>2}: train loss {:.4}, val loss {:.4}, val exact match {:.3} ({:.0} s)",
                log.epoch, log.train_loss, log.val_loss, log.val_exact_match, log.seconds
            );
        }
    })?;
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    eprintln!("trained {} epochs in {minutes:.1} min; model in {}", ckpt.epochs_done, args.out.display());

    // The model card, with metrics measured on the test split when there is one.
    let test_dir = args.data.join("test");
    let metrics = if test_dir.join("captions.json").exists() {
        let model = Captioner::load(&args.out)?;
        let split = Split::read(&test_dir)?;
        let n = split.instances.images.len().min(1000);
        let b = bar(n as u64, "test images");
        let m = evaluate(&model, &split, n, None, &gradcam_core::GradCam, |i| b.set_position(i as u64))?;
        b.finish_and_clear();
        Some(m)
    } else {
        None
    };
    let command = format!(
        "gradcam train captioner --data {} --out {} --epochs {} --batch-size {} --lr {} --seed {} --label-smoothing {} --word-loss {} --hidden {} --activation-l1 {}{}",
        args.data.display(), args.out.display(), args.epochs, args.batch_size, args.lr, args.seed, args.label_smoothing, args.word_loss, args.hidden, args.activation_l1,
        if args.word_pairs { " --word-pairs" } else { "" }
    );
    let cfg = gradcam_captioner::Config::load(&args.out.join("config.json"))?;
    let card = model_card(&command, &cfg, &ckpt, minutes, metrics.as_ref(), &args.data);
    gradcam_scenes::write_atomic(&args.out.join("README.md"), card.as_bytes())?;
    if let Some(m) = &metrics {
        eprintln!("test: exact match {:.3}, BLEU-4 {:.3}", m.exact_match, m.bleu4);
    }
    Ok(ExitCode::SUCCESS)
}

fn model_card(
    command: &str,
    cfg: &gradcam_captioner::Config,
    ckpt: &gradcam_captioner::train::Checkpoint,
    minutes: f64,
    metrics: Option<&gradcam_captioner::eval::Metrics>,
    data: &Path,
) -> String {
    let mut s = String::new();
    let side = cfg.image_size / 4;
    s.push_str("# Show-and-Tell captioner for ShapeScenes\n\n");
    s.push_str(&format!(
        "A scene CNN (4 convolutions{}, explained layer `conv4`: {} x {side} x {side} at {} px) whose ",
        if cfg.coord_conv { ", CoordConv before `conv4`" } else { "" },
        cfg.channels,
        cfg.image_size
    ));
    s.push_str(&format!(
        "{} features, projected to {}, enter an LSTM (hidden {}) beside every word embedding ({}) (Show and Tell, Vinyals et al. 2015, with the image at every step). ",
        if cfg.pool_moments { "average-, max- and spatial-moment-pooled" } else { "average- and max-pooled" },
        cfg.embed,
        cfg.hidden,
        cfg.embed
    ));
    s.push_str("Every word of a caption is explained by backpropagating its log-probability into `conv4` (Grad-CAM paper, section 8.1).\n\n");
    s.push_str(&format!("## Training\n\nData: `{}` (COCO captions + instances; train split for training, val for validation, test for the metrics below).\n\n", data.display()));
    s.push_str(&format!("```sh\n{command}\n```\n\n"));
    s.push_str(&format!(
        "AdamW (lr {}, weight decay {}, cosine decay), label smoothing {}, auxiliary bag-of-words loss weight {}, batch {} images with all their captions, seed {}; {} epochs in {minutes:.1} min on a 2-core CPU.\n\n",
        ckpt.train.lr, ckpt.train.weight_decay, ckpt.train.label_smoothing, ckpt.train.word_loss, ckpt.train.batch_size, ckpt.train.seed, ckpt.epochs_done
    ));
    s.push_str("| epoch | train loss | val loss | val exact match | seconds |\n|---|---|---|---|---|\n");
    for l in &ckpt.log {
        s.push_str(&format!("| {} | {:.4} | {:.4} | {:.3} | {:.0} |\n", l.epoch, l.train_loss, l.val_loss, l.val_exact_match, l.seconds));
    }
    if let Some(m) = metrics {
        s.push_str(&format!("\n## Test metrics ({} images, greedy decoding)\n\n", m.images));
        s.push_str(&format!("- exact match of the named (colour, shape) set: **{:.3}**\n- BLEU-4 against the 5 references: **{:.3}**\n\n", m.exact_match, m.bleu4));
        s.push_str(&format!(
            "Per-word pointing game: the peak of each colour or shape word's map, upsampled to the image, on the word's object mask or within {:.0} px (1/16 of the side):\n\n",
            m.tolerance_px
        ));
        s.push_str("| word | words | Grad-CAM | centre baseline |\n|---|---|---|---|\n");
        for (w, p) in &m.pointing {
            s.push_str(&format!("| {w} | {} | {:.3} | {:.3} |\n", p.count, p.accuracy(), p.centre_accuracy()));
        }
        s.push_str("\nReproduce with `gradcam caption --model DIR --eval DATA/test --limit N`.\n");
    }
    s
}
