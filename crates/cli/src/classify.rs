//! `gradcam classify`: top-k predictions and Grad-CAM overlays for ImageNet classifiers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::D;
use gradcam_core::render::{render, write_method_strips, Output, Stems, Subject};
use gradcam_core::{class_named_report, Explainable, Target};
use gradcam_encoders::preprocess::{load_image, prepare, Resize};
use gradcam_encoders::{imagenet, Network};
use serde::Serialize;

use crate::common::{MapJson, MethodArgs, Progress};
use crate::progress::bar;
use crate::ModelArgs;

#[derive(clap::Args)]
pub struct ClassifyArgs {
    /// Images to classify and explain (PNG, JPEG, GIF, BMP, WebP, TIFF).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Layer to explain (see `gradcam layers`); default: the model's last convolutional stage.
    #[arg(long)]
    layer: Option<String>,
    /// Class to explain (repeatable); default: the top-1 prediction.
    #[arg(long = "class")]
    classes: Vec<usize>,
    /// How many predictions to print.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    #[command(flatten)]
    methods: MethodArgs,
    /// Also write the counterfactual map of each class (negated gradients: what argues against it).
    #[arg(long)]
    counterfactual: bool,
    /// center-crop (shorter side to 256, centre 224), stretch (to 224x224) or none (as it is).
    #[arg(long, default_value = "center-crop")]
    resize: Resize,
    /// Folder for the overlay PNGs.
    #[arg(long, default_value = "gradcam-out")]
    out: PathBuf,
    /// Print one JSON object per image (JSON Lines) instead of text.
    #[arg(long)]
    json: bool,
    /// Add a textual explanation: the 5 units with the largest and the 5 with the smallest
    /// alpha_k, each named by the 3 classes it raises most through the rest of the network
    /// (ImageNet has no concept masks to dissect against).
    #[arg(long)]
    neurons: bool,
}

#[derive(Serialize)]
struct Prediction {
    class: usize,
    label: &'static str,
    logit: f32,
    prob: f32,
}

#[derive(Serialize)]
struct ExplanationJson {
    class: usize,
    label: &'static str,
    #[serde(flatten)]
    map: MapJson,
}

#[derive(Serialize)]
struct ImageJson {
    image: String,
    model: &'static str,
    layer: String,
    input_size: [usize; 2],
    predictions: Vec<Prediction>,
    explanations: Vec<ExplanationJson>,
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let net = args.model.load()?;
    let index = net.layer_index(args.layer.as_deref().unwrap_or(net.default_layer()))?;
    if let Some(&bad) = args.classes.iter().find(|&&c| c >= net.num_classes()) {
        anyhow::bail!("--class {bad} is out of range: {} has classes 0..={}", net.arch(), net.num_classes() - 1);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let progress = if args.images.len() > 1 { bar(args.images.len() as u64, "images") } else { indicatif::ProgressBar::hidden() };
    let (mut stems, mut failures) = (Stems::default(), 0);
    let mut stdout = std::io::stdout().lock();
    for path in &args.images {
        progress.set_message(path.display().to_string());
        match classify_one(&net, index, path, &args, &mut stems) {
            Ok(result) => progress.suspend(|| print_result(&mut stdout, &result, args.json))?,
            Err(err) => {
                failures += 1;
                progress.suspend(|| eprintln!("error: {}: {err:#}", path.display()));
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_result(out: &mut impl Write, r: &ImageJson, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        return writeln!(out);
    }
    writeln!(out, "{} ({}, layer {}, input {}x{})", r.image, r.model, r.layer, r.input_size[1], r.input_size[0])?;
    for (i, p) in r.predictions.iter().enumerate() {
        writeln!(out, "  {}. {:>4} {:<30} logit {:>7.3}  p {:.4}", i + 1, p.class, p.label, p.logit, p.prob)?;
    }
    for e in &r.explanations {
        let note = if e.map.nonzero { "" } else { " (map is zero everywhere: nothing in this layer supports it)" };
        writeln!(out, "  {} {} {}: {}{note}", e.map.kind(), e.class, e.label, e.map.overlay)?;
        if let Some(text) = &e.map.text {
            writeln!(out, "    {text}")?;
        }
    }
    Ok(())
}

fn classify_one(net: &Network, index: usize, path: &Path, args: &ClassifyArgs, stems: &mut Stems) -> anyhow::Result<ImageJson> {
    let img = load_image(path)?;
    let prepared = prepare(&img, args.resize)?;
    let input = prepared.tensor.unsqueeze(0)?; // [1, 3, h, w]
    let (_, _, h, w) = input.dims4()?;
    let split = net.split(index);
    let activations = split.features(&input)?; // [1, K, h', w']
    let logits = split.head(&activations)?.squeeze(0)?; // [classes]
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_vec1::<f32>()?;
    let logits = logits.to_vec1::<f32>()?;
    if logits.iter().any(|v| !v.is_finite()) {
        anyhow::bail!("the model produced non-finite logits; are the weights corrupt?");
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let label = |c: usize| imagenet::class_name(c).unwrap_or("?");
    let predictions = order.iter().take(args.top_k).map(|&c| Prediction { class: c, label: label(c), logit: logits[c], prob: probs[c] }).collect();

    let classes = if args.classes.is_empty() { vec![order[0]] } else { args.classes.clone() };
    let subjects: Vec<Subject> = classes.iter().flat_map(|&c| Subject::new(Target::class(c), label(c)).file_prefix(c.to_string()).and_counterfactual(args.counterfactual)).collect();
    let stem = stems.unique(path);
    let out = Output { dir: &args.out, stem: &stem, image: &img, region: prepared.region };
    let class_name = |c: usize| label(c).to_string();
    let neurons = |e: &gradcam_core::Explanation, subject: &str| class_named_report(&split, &activations, e.weights.as_deref().unwrap_or(&[]), subject, &class_name);
    let bar = Progress::new(args.json);
    let cam = args.methods.cam(&split, &bar);
    let rendered = render(&cam, &args.methods.method, &input, &activations, &subjects, &out, args.neurons.then_some(&neurons as _))?;
    if args.methods.method.len() > 1 {
        write_method_strips(&rendered, &subjects, &out, 224)?;
    }
    let explanations = rendered
        .iter()
        .flatten()
        .map(|r| {
            let class = r.explanation.target.index().expect("a class target");
            ExplanationJson { class, label: label(class), map: MapJson::new(r) }
        })
        .collect();
    Ok(ImageJson { image: path.display().to_string(), model: net.arch(), layer: net.layer_name(index).to_string(), input_size: [h, w], predictions, explanations })
}
