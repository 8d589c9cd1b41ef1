//! `gradcam eval`: the paper's evaluations for a classifier, the captioner or the VQA model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gradcam_captioner::Captioner;
use gradcam_eval::report::{markdown, worst, write_failures};
use gradcam_eval::subjects::{CaptionerSubject, ClassifierSubject, VqaSubject};
use gradcam_eval::{run, ExampleResult, Options, Subject, Task, Tolerance};
use gradcam_encoders::ModelName;
use gradcam_io::write_atomic;
use gradcam_vqa::Vqa;

use crate::common::parse_gradient_method;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// What to measure, comma-separated: localization, pointing, faithfulness, deletion, insertion,
    /// energy, segmentation, or all; or `adversarial` alone (classifiers: attack every true class,
    /// then pointing, localization and energy of its map, clean and adversarial).
    #[arg(required = true, value_delimiter = ',')]
    tasks: Vec<String>,
    /// A captioner or VQA model folder (told apart by its config.json), or a classifier:
    /// efficientnet-lite0, vgg16, resnet18, resnet50, an ONNX file (FILE.onnx) or a folder made
    /// by `gradcam train classifier`.
    #[arg(long)]
    model: String,
    /// Classifier weights (see `gradcam classify --help`); default: the architecture's own.
    #[arg(long)]
    weights: Option<String>,
    /// Classifier layer to explain; default: the last convolutional stage.
    #[arg(long)]
    layer: Option<String>,
    #[command(flatten)]
    onnx: crate::OnnxArgs,
    /// Dataset folder: `instances.json` and `images/` (COCO format); the captioner also reads
    /// `captions.json`, the VQA model `questions.json` and `annotations.json`. A classifier's
    /// categories are named by ImageNet class names.
    #[arg(long)]
    data: PathBuf,
    /// CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam or eigencam.
    #[arg(long, default_value = "gradcam", value_parser = parse_gradient_method)]
    method: gradcam_core::Method,
    /// Evaluate at most this many images.
    #[arg(long)]
    limit: Option<usize>,
    /// Folder for the per-image results (results.jsonl), summary.json, summary.md and failures/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Pointing game: how far from the object the peak may land, `15px` or a fraction of the
    /// image's longer side (`0.0625`).
    #[arg(long, default_value = "15px")]
    tolerance: Tolerance,
    /// Localization: binarise the map at this fraction of its maximum.
    #[arg(long, default_value_t = 0.15)]
    box_threshold: f32,
    /// Localization: IoU with a ground-truth box that counts as a hit.
    #[arg(long, default_value_t = 0.5)]
    iou: f32,
    /// Occlusion patch side in input pixels (default: 1/7 of the input side, 32 px at 224).
    #[arg(long)]
    patch: Option<usize>,
    /// Occlusion stride in input pixels (default: half the patch).
    #[arg(long)]
    stride: Option<usize>,
    /// Deletion / insertion: steps from no pixel to all pixels.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Pointing recall (classifiers): a top-5 prediction's map is rejected (the class said absent)
    /// when its peak is below this fraction of the image's strongest top-5 peak.
    #[arg(long, default_value_t = 0.5)]
    reject_below: f32,
    /// Write the K worst-predicted images with their maps to OUT/failures/index.html.
    #[arg(long, default_value_t = 0)]
    failures: usize,
    /// Perturbed inputs per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// adversarial: L-infinity budget of the attack, in pixel values of [0, 1].
    #[arg(long, default_value_t = 8.0 / 255.0)]
    eps: f32,
    /// adversarial: gradient steps at most per attack.
    #[arg(long, default_value_t = 10)]
    attack_steps: usize,
    /// adversarial: change per step (default 2.5 eps / steps).
    #[arg(long)]
    step_size: Option<f32>,
    /// adversarial: `random` attacks towards a random other class (until its p > 0.9) instead
    /// of away from the true class (until its p < 0.001).
    #[arg(long)]
    target: Option<String>,
    /// adversarial: the goal's probability (default 0.001 untargeted, 0.9 targeted).
    #[arg(long)]
    until: Option<f32>,
    /// adversarial: seed of the random targets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Segmentation: foreground seeds where the upsampled map is at least this fraction of its
    /// maximum.
    #[arg(long, default_value_t = gradcam_eval::segment::SegmentOptions::default().high)]
    seed_high: f32,
    /// Segmentation: background seeds where it is below this fraction.
    #[arg(long, default_value_t = gradcam_eval::segment::SegmentOptions::default().low)]
    seed_low: f32,
    /// Segmentation: the thresholded-map baseline's threshold (fraction of the maximum).
    #[arg(long, default_value_t = gradcam_eval::segment::SegmentOptions::default().threshold)]
    seg_threshold: f32,
}

pub fn run_eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if args.tasks.iter().any(|t| t.trim() == "adversarial") {
        anyhow::ensure!(args.tasks.len() == 1, "`adversarial` runs alone: give it without other tasks");
        return run_adversarial(&args);
    }
    if args.target.is_some() || args.until.is_some() || args.step_size.is_some() {
        anyhow::bail!("--target, --until and --step-size are options of the `adversarial` task");
    }
    let tasks = Task::parse_list(&args.tasks)?;
    if args.failures > 0 && args.out.is_none() {
        anyhow::bail!("--failures writes a page: give --out DIR");
    }
    if let Some(name) = classifier_name(&args.model) {
        let (net, layer) = name.load(crate::weights::resolve(&name, args.weights.as_deref())?.as_deref(), &args.onnx.options()?, args.layer.as_deref()).with_context(|| format!("loading {}", args.model))?;
        let subject = ClassifierSubject::new(net, layer, &args.data).with_context(|| format!("reading the dataset {}", args.data.display()))?;
        return evaluate(&subject, &args, tasks);
    }
    let dir = Path::new(&args.model);
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).with_context(|| {
        format!("--model {}: neither a classifier (efficientnet-lite0, vgg16, resnet18, resnet50, FILE.onnx) nor a model folder with config.json", args.model)
    })?;
    let is_vqa = serde_json::from_str::<serde_json::Value>(&text).with_context(|| format!("parsing {}", config.display()))?.get("answers").is_some();
    if args.weights.is_some() || args.layer.is_some() {
        anyhow::bail!("--weights and --layer are for classifiers; {} is a model folder", dir.display());
    }
    if is_vqa {
        let model = Vqa::load(dir).with_context(|| format!("loading the VQA model from {}", dir.display()))?;
        let subject = VqaSubject::new(model, &args.data).with_context(|| format!("reading the dataset {}", args.data.display()))?;
        evaluate(&subject, &args, tasks)
    } else {
        let model = Captioner::load(dir).with_context(|| format!("loading the captioner from {}", dir.display()))?;
        let subject = CaptionerSubject::new(model, &args.data).with_context(|| format!("reading the dataset {}", args.data.display()))?;
        evaluate(&subject, &args, tasks)
    }
}

fn evaluate<S: Subject>(subject: &S, args: &EvalArgs, tasks: Vec<Task>) -> anyhow::Result<ExitCode> {
    let method = args.method.cam_method().context("a gradient-based method")?;
    let options = Options {
        tasks,
        method: method.as_ref(),
        limit: args.limit.unwrap_or(usize::MAX),
        tolerance: args.tolerance,
        box_threshold: args.box_threshold,
        iou: args.iou,
        patch: args.patch,
        stride: args.stride,
        steps: args.steps,
        reject_below: args.reject_below,
        batch: args.batch,
        segment: gradcam_eval::segment::SegmentOptions { high: args.seed_high, low: args.seed_low, threshold: args.seg_threshold, ..Default::default() },
    };
    options.check()?;
    let n = subject.len().min(options.limit);
    if n == 0 {
        anyhow::bail!("{} has no images to evaluate", args.data.display());
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }
    let bar = crate::progress::bar(n as u64, "images");
    let mut lines = Vec::new();
    let mut qualities: Vec<(f64, usize)> = Vec::new();
    let summary = run(subject, &options, |i, r: &ExampleResult| {
        bar.set_position(i as u64);
        qualities.push((r.quality, i - 1));
        if args.out.is_some() {
            lines.extend(serde_json::to_vec(r).expect("results serialise"));
            lines.push(b'\n');
        }
    })?;
    bar.finish_and_clear();
    let table = markdown(&summary);
    if let Some(out) = &args.out {
        write_atomic(&out.join("results.jsonl"), &lines)?;
        write_atomic(&out.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
        write_atomic(&out.join("summary.md"), table.as_bytes())?;
        if args.failures > 0 {
            let segment = options.tasks.contains(&Task::Segmentation).then_some(&options.segment);
            let failures = worst(subject, &qualities, args.failures, options.method, segment)?;
            let title = format!("{} worst-predicted images of {} ({}, {})", failures.len(), args.data.display(), subject.kind(), summary.method);
            write_failures(&out.join("failures"), &failures, &title)?;
        }
    }
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &summary)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{table}")?;
        if let Some(out) = &args.out {
            writeln!(stdout, "\nper-image results in {}", out.join("results.jsonl").display())?;
            if args.failures > 0 {
                writeln!(stdout, "failure cases in {}", out.join("failures/index.html").display())?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--model` as a classifier: a built-in name, an ONNX file or a trained classifier folder (not
/// a captioner's or VQA model's folder).
fn classifier_name(model: &str) -> Option<ModelName> {
    model.parse::<ModelName>().ok().filter(|n| !matches!(n, ModelName::Folder(d) if !gradcam_encoders::scene_classifier::is_classifier_dir(d)))
}

fn run_adversarial(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    use gradcam_eval::adversarial::{markdown, run, AdversarialOptions};
    let targeted = match args.target.as_deref() {
        None => false,
        Some("random") => true,
        Some(other) => anyhow::bail!("--target {other:?}: the adversarial evaluation takes `random` (or nothing, for untargeted attacks)"),
    };
    if args.failures > 0 && args.out.is_none() {
        anyhow::bail!("--failures writes a page: give --out DIR");
    }
    let Some(name) = classifier_name(&args.model) else {
        anyhow::bail!("--model {}: the adversarial evaluation attacks classifiers (efficientnet-lite0, vgg16, resnet18, resnet50, FILE.onnx or a `gradcam train classifier` folder)", args.model);
    };
    let (net, layer) = name.load(crate::weights::resolve(&name, args.weights.as_deref())?.as_deref(), &args.onnx.options()?, args.layer.as_deref()).with_context(|| format!("loading {}", args.model))?;
    let method = args.method.cam_method().context("a gradient-based method")?;
    let options = AdversarialOptions {
        eps: args.eps,
        steps: args.attack_steps,
        step_size: args.step_size.unwrap_or(gradcam_eval::attack::Pgd::default_step(args.eps, args.attack_steps)),
        targeted,
        seed: args.seed,
        until: args.until.unwrap_or(if targeted { 0.9 } else { 1e-3 }),
        limit: args.limit.unwrap_or(usize::MAX),
        tolerance: args.tolerance,
        box_threshold: args.box_threshold,
        iou: args.iou,
    };
    anyhow::ensure!(options.limit > 0, "--limit must be at least 1");
    let probe = gradcam_eval::attack::Goal::Untargeted { class: 0, until: options.until };
    gradcam_eval::attack::Pgd { eps: options.eps, steps: options.steps, step_size: options.step_size, goal: probe }.check(net.num_classes())?;
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }
    let bar = crate::progress::bar(0, "images");
    let (summary, cases) = run(&net, layer, &args.data, method.as_ref(), &options, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })
    .with_context(|| format!("evaluating on {}", args.data.display()))?;
    bar.finish_and_clear();
    anyhow::ensure!(summary.cases > 0, "{} has no annotated object of the model's classes to attack", args.data.display());
    let table = markdown(&summary);
    if let Some(out) = &args.out {
        let mut lines = Vec::new();
        for c in &cases {
            lines.extend(serde_json::to_vec(c)?);
            lines.push(b'\n');
        }
        write_atomic(&out.join("results.jsonl"), &lines)?;
        write_atomic(&out.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
        write_atomic(&out.join("summary.md"), table.as_bytes())?;
        if args.failures > 0 {
            // The cases whose adversarial map keeps least of its mass on the object.
            let mut order: Vec<usize> = (0..cases.len()).collect();
            order.sort_by(|&a, &b| cases[a].energy_adversarial.unwrap_or(0.0).total_cmp(&cases[b].energy_adversarial.unwrap_or(0.0)));
            let mut failures = Vec::new();
            for &i in order.iter().take(args.failures) {
                let c = &cases[i];
                let image = gradcam_encoders::preprocess::load_image(&args.data.join("images").join(&c.image))?;
                let after = if c.success { "attack succeeded" } else { "attack FAILED" };
                failures.push(gradcam_eval::report::Failure {
                    name: c.image.clone(),
                    summary: format!("{} {}: p {:.4} clean, {:.2e} adversarial (top-1 now {}; {after}, L-inf {:.1}/255); maps of {} drawn on the clean image", c.class, c.label, c.prob_clean, c.prob_adversarial, net.label(c.top1_adversarial), c.linf * 255.0, c.label),
                    quality: c.energy_adversarial.unwrap_or(0.0),
                    image,
                    maps: vec![(format!("clean: {}", c.label), c.maps.0.clone()), (format!("adversarial: {}", c.label), c.maps.1.clone())],
                });
            }
            let title = format!("{} attacked classes of {} with the least map energy on the object after the attack", failures.len(), args.data.display());
            gradcam_eval::report::write_failures(&out.join("failures"), &failures, &title)?;
        }
    }
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &summary)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{table}")?;
        if let Some(out) = &args.out {
            writeln!(stdout, "\nper-case results in {}", out.join("results.jsonl").display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
