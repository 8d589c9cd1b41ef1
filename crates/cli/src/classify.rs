//! `gradcam classify`: top-k predictions and Grad-CAM overlays for ImageNet classifiers.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{Tensor, D};
use gradcam_core::map::{overlay, write_png_atomic};
use gradcam_core::{ClassLogit, Counterfactual, Explainable, Request, Target};
use gradcam_encoders::preprocess::{load_image, prepare, Resize};
use gradcam_encoders::{imagenet, Network};
use indicatif::{ProgressBar, ProgressStyle};
use gradcam_neurons::{report, NeuronReport, UnitNames};
use serde::Serialize;

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
    /// CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, ablationcam or
    /// scorecam (one forward pass of the network per channel of the layer), guided-backprop or
    /// guided-gradcam (images at the input's resolution). Several, comma-separated, also write a
    /// comparison strip per class (`..._methods.png`).
    #[arg(long, default_value = "gradcam", value_parser = crate::caption::parse_any_method, value_delimiter = ',')]
    method: Vec<String>,
    #[command(flatten)]
    smoothing: crate::caption::Smoothing,
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
    method: &'static str,
    counterfactual: bool,
    score: f32,
    cam_size: [usize; 2],
    cam: Vec<Vec<f32>>,
    /// False when the map is zero everywhere: nothing in the layer supports the target.
    nonzero: bool,
    overlay: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    neurons: Option<NeuronReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
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
    let layer = args.layer.clone().unwrap_or_else(|| net.default_layer().to_string());
    let index = net.layer_index(&layer)?;
    let layer = net.layer_name(index).to_string();
    if let Some(&bad) = args.classes.iter().find(|&&c| c >= net.num_classes()) {
        anyhow::bail!("--class {bad} is out of range: {} has classes 0..={}", net.arch(), net.num_classes() - 1);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;

    let progress = if args.images.len() > 1 {
        let pb = ProgressBar::new(args.images.len() as u64);
        pb.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]").expect("valid template"));
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut used_names = HashSet::new();
    let mut failures = 0;
    let mut stdout = std::io::stdout().lock();
    for path in &args.images {
        progress.set_message(path.display().to_string());
        match classify_one(&net, index, &layer, path, &args, &mut used_names) {
            Ok(result) => {
                progress.suspend(|| print_result(&mut stdout, &result, args.json))?;
            }
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
        let kind = match (e.counterfactual, e.method) {
            (true, m) => format!("counterfactual ({m}) for"),
            (false, "gradcam") => "Grad-CAM for".to_string(),
            (false, m) => format!("{m} for"),
        };
        let note = if e.nonzero { "" } else { " (map is zero everywhere: nothing in this layer supports it)" };
        writeln!(out, "  {kind} {} {}: {}{note}", e.class, e.label, e.overlay)?;
        if let Some(text) = &e.text {
            writeln!(out, "    {text}")?;
        }
    }
    Ok(())
}

fn classify_one(
    net: &Network,
    index: usize,
    layer: &str,
    path: &Path,
    args: &ClassifyArgs,
    used_names: &mut HashSet<String>,
) -> anyhow::Result<ImageJson> {
    let img = load_image(path)?;
    let prepared = prepare(&img, args.resize)?;
    let input = prepared.tensor.unsqueeze(0)?; // [1, 3, h, w]
    let (_, _, h, w) = input.dims4()?;
    let split = net.split(index);
    let activations = split.features(&input)?; // [1, K, h', w']
    let logits = split.head(&activations)?.squeeze(0)?; // [classes]
    let probs = softmax(&logits)?;
    let (logits, probs) = (logits.to_vec1::<f32>()?, probs.to_vec1::<f32>()?);
    if logits.iter().any(|v| !v.is_finite()) {
        anyhow::bail!("the model produced non-finite logits; are the weights corrupt?");
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let label = |c: usize| imagenet::class_name(c).unwrap_or("?");
    let predictions = order
        .iter()
        .take(args.top_k)
        .map(|&c| Prediction { class: c, label: label(c), logit: logits[c], prob: probs[c] })
        .collect();

    let classes = if args.classes.is_empty() { vec![order[0]] } else { args.classes.clone() };
    let mut targets: Vec<(usize, Box<dyn Target>)> = Vec::new();
    for &c in &classes {
        targets.push((c, Box::new(ClassLogit(c))));
        if args.counterfactual {
            targets.push((c, Box::new(Counterfactual(ClassLogit(c)))));
        }
    }
    let requests: Vec<Request> = targets.iter().map(|(_, t)| Request { image: 0, target: t.as_ref() }).collect();
    let stem = unique_stem(path, used_names);
    let mut explanations = Vec::new();
    // Per target, the images of each method, for the comparison strip.
    let mut panels: Vec<Vec<image::RgbImage>> = vec![Vec::new(); targets.len()];
    for method in &args.method {
        let (results, guided) = crate::caption::method_results(method, args.smoothing, &split, &input, &activations, &requests, args.json)?;
        for (i, (r, (class, t))) in results.iter().zip(&targets).enumerate() {
            let class = *class;
            let subject = if t.counterfactual() { format!("not {}", label(class)) } else { label(class).to_string() };
            let neurons = if args.neurons { Some(class_named_report(&split, &activations, &r.alpha, &subject)?) } else { None };
            let (normalized, nonzero) = r.cam.normalized();
            let cf = if t.counterfactual() { "_counterfactual" } else { "" };
            let file = args.out.join(format!("{stem}_{class}_{}{cf}{}{}.png", sanitize(label(class)), crate::caption::method_tag(method), args.smoothing.tag()));
            let picture = match &guided {
                Some(g) => gradcam_core::gradient_image(&g[i])?,
                None => overlay(&img, &normalized, prepared.region),
            };
            write_png_atomic(&picture, &file)?;
            panels[i].push(picture);
            explanations.push(ExplanationJson {
                class,
                label: label(class),
                method: crate::caption::method_label(method),
                counterfactual: r.counterfactual,
                score: r.score,
                cam_size: [r.cam.h, r.cam.w],
                cam: r.cam.rows(),
                nonzero,
                overlay: file.display().to_string(),
                text: neurons.as_ref().map(|n| n.text.clone()),
                neurons,
            });
        }
    }
    if args.method.len() > 1 {
        for (panels, (class, t)) in panels.iter().zip(&targets) {
            let cf = if t.counterfactual() { "_counterfactual" } else { "" };
            let file = args.out.join(format!("{stem}_{class}_{}{cf}_methods.png", sanitize(label(*class))));
            write_png_atomic(&comparison_strip(panels, 224), &file)?;
        }
    }
    Ok(ImageJson {
        image: path.display().to_string(),
        model: net.arch(),
        layer: layer.to_string(),
        input_size: [h, w],
        predictions,
        explanations,
    })
}

/// Pictures side by side, each scaled to `height` px, 4 px of white between them: the comparison
/// strip of several methods.
pub fn comparison_strip(panels: &[image::RgbImage], height: u32) -> image::RgbImage {
    let scaled: Vec<image::RgbImage> = panels
        .iter()
        .map(|p| {
            let w = ((p.width() as u64 * height as u64) / p.height().max(1) as u64).max(1) as u32;
            image::imageops::resize(p, w, height, image::imageops::FilterType::Triangle)
        })
        .collect();
    let width = scaled.iter().map(|p| p.width()).sum::<u32>() + 4 * scaled.len().saturating_sub(1) as u32;
    let mut out = image::RgbImage::from_pixel(width.max(1), height, image::Rgb([255, 255, 255]));
    let mut x = 0;
    for p in &scaled {
        image::imageops::replace(&mut out, p, x as i64, 0);
        x += p.width() + 4;
    }
    out
}

/// The neuron report of one explanation, each reported unit named by the 3 classes whose logits
/// rise most when only that unit is on (1.0 at every position) rather than all units off: for a
/// global-average-pool + linear classifier these are exactly the unit's largest classifier weights.
fn class_named_report(split: &impl Explainable, activations: &Tensor, alpha: &[f32], subject: &str) -> anyhow::Result<NeuronReport> {
    let plain = report(alpha, &UnitNames::None, subject, 5);
    let units: Vec<usize> = plain.top.iter().chain(&plain.bottom).map(|n| n.unit).collect();
    let (_, k, h, w) = activations.dims4()?;
    let mut probe = vec![0f32; (units.len() + 1) * k * h * w];
    for (i, &u) in units.iter().enumerate() {
        let start = ((i + 1) * k + u) * h * w;
        probe[start..start + h * w].fill(1.0);
    }
    let probe = Tensor::from_vec(probe, (units.len() + 1, k, h, w), activations.device())?;
    let logits = split.head(&probe)?.to_vec2::<f32>()?; // row 0: all units off
    let mut names = std::collections::HashMap::new();
    for (i, &u) in units.iter().enumerate() {
        let rise: Vec<f32> = logits[i + 1].iter().zip(&logits[0]).map(|(a, b)| a - b).collect();
        let mut order: Vec<usize> = (0..rise.len()).collect();
        order.sort_by(|&a, &b| rise[b].total_cmp(&rise[a]));
        let classes: Vec<&str> = order.iter().take(3).map(|&c| imagenet::class_name(c).unwrap_or("?")).collect();
        names.insert(u, format!("raises {}", classes.join(" / ")));
    }
    let lookup = |u: usize| names.get(&u).cloned();
    Ok(report(alpha, &UnitNames::Classes(&lookup), subject, 5))
}

/// Softmax written with plain ops (numerically stable).
fn softmax(logits: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The file stem of an image, made unique among this run's outputs.
fn unique_stem(path: &Path, used: &mut HashSet<String>) -> String {
    let base = sanitize(&path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into()));
    let mut stem = base.clone();
    let mut n = 2;
    while !used.insert(stem.clone()) {
        stem = format!("{base}-{n}");
        n += 1;
    }
    stem
}

fn sanitize(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    s.trim_matches('_').to_string()
}
