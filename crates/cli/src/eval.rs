//! `gradcam eval`: the paper's evaluations for a classifier, the captioner or the VQA model.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use gradcam_eval::{adversarial::{self, AdversarialOptions}, ModelRef, Options, Outputs, Task, Tolerance};


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
    #[arg(long, default_value = "gradcam", value_parser = gradcam_core::Method::parse_gradient)]
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
    let adversarial = args.tasks.iter().any(|t| t.trim() == "adversarial");
    anyhow::ensure!(!adversarial || args.tasks.len() == 1, "`adversarial` runs alone: give it without other tasks");
    if !adversarial && (args.target.is_some() || args.until.is_some() || args.step_size.is_some()) {
        anyhow::bail!("--target, --until and --step-size are options of the `adversarial` task");
    }
    let tasks = if adversarial { Vec::new() } else { Task::parse_list(&args.tasks)? };
    anyhow::ensure!(args.failures == 0 || args.out.is_some(), "--failures writes a page: give --out DIR");
    let model = ModelRef::parse(&args.model)?;
    let weights = match &model {
        ModelRef::Classifier(name) => crate::weights::resolve(name, args.weights.as_deref())?,
        _ => args.weights.clone(),
    };
    let out = args.out.as_deref().map(|dir| Outputs { dir, failures: args.failures });
    let method = args.method.cam_method().context("a gradient-based method")?;
    let bar = crate::progress::bar(0, "images");
    let mut progress = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    };
    let (summary, table) = if adversarial {
        let ModelRef::Classifier(name) = &model else {
            return Err(gradcam_core::SettingError::value("model", &args.model, "the adversarial evaluation attacks classifiers (efficientnet-lite0, vgg16, resnet18, resnet50, FILE.onnx or a `gradcam train classifier` folder)").into());
        };
        let targeted = match args.target.as_deref() {
            None => false,
            Some("random") => true,
            Some(other) => anyhow::bail!("--target {other:?}: the adversarial evaluation takes `random` (or nothing, for untargeted attacks)"),
        };
        let (net, layer) = name.load(weights.as_deref(), &args.onnx.options()?, args.layer.as_deref()).with_context(|| format!("loading {}", args.model))?;
        let step_size = args.step_size.unwrap_or(gradcam_eval::attack::Pgd::default_step(args.eps, args.attack_steps));
        let until = args.until.unwrap_or(AdversarialOptions::default_until(targeted));
        let (limit, tolerance, box_threshold, iou) = (args.limit.unwrap_or(usize::MAX), args.tolerance, args.box_threshold, args.iou);
        let options = AdversarialOptions { eps: args.eps, steps: args.attack_steps, step_size, targeted, seed: args.seed, until, limit, tolerance, box_threshold, iou };
        let summary = adversarial::evaluate(&net, layer, &args.data, method.as_ref(), &options, out, &mut progress).map_err(|e| crate::hints::renamed(e, &[("steps", "--attack-steps")]))?;
        (serde_json::to_string_pretty(&summary)?, adversarial::markdown(&summary))
    } else {
        let subject = model.subject(weights.as_deref(), &args.onnx.options()?, args.layer.as_deref(), &args.data).with_context(|| format!("loading {} on {}", args.model, args.data.display()))?;
        let segment = gradcam_eval::segment::SegmentOptions { high: args.seed_high, low: args.seed_low, threshold: args.seg_threshold, ..Default::default() };
        let (limit, tolerance, box_threshold, iou, patch, stride, steps, reject_below, batch) = (args.limit.unwrap_or(usize::MAX), args.tolerance, args.box_threshold, args.iou, args.patch, args.stride, args.steps, args.reject_below, args.batch);
        let options = Options { tasks, method: method.as_ref(), limit, tolerance, box_threshold, iou, patch, stride, steps, reject_below, batch, segment };
        let summary = subject.evaluate(&args.data, &options, out, &mut progress)?;
        (serde_json::to_string_pretty(&summary)?, gradcam_eval::report::markdown(&summary))
    };
    bar.finish_and_clear();
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{summary}")?;
        return Ok(ExitCode::SUCCESS);
    }
    write!(stdout, "{table}")?;
    if let Some(out) = &args.out {
        writeln!(stdout, "\nper-{} results in {}", if adversarial { "case" } else { "image" }, out.join("results.jsonl").display())?;
        if args.failures > 0 && !adversarial {
            writeln!(stdout, "failure cases in {}", out.join("failures/index.html").display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
