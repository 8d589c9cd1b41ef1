//! `gradcam eval`'s flags and their run (feature `cli`): the tasks, the model, the dataset and
//! every option of [`Options`] and [`AdversarialOptions`], checked and assembled here so that any
//! front end gets the same command. The caller resolves the classifier's default weights and prints
//! the [`Report`].

use std::path::PathBuf;

use gradcam_core::{Method, SettingError};
use gradcam_encoders::onnx::OnnxArgs;

use crate::adversarial::{self, AdversarialOptions};
use crate::segment::SegmentOptions;
use crate::{Error, ModelRef, Options, Outputs, Result, Shard, Task, Tolerance};

/// `gradcam eval`: the paper's evaluations for a classifier, the captioner or the VQA model.
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    /// What to measure, comma-separated: localization, pointing, faithfulness, deletion, insertion,
    /// energy, segmentation, or all; or `adversarial` alone (classifiers: attack every true class,
    /// then pointing, localization and energy of its map, clean and adversarial).
    #[arg(required = true, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// A captioner or VQA model folder (told apart by its config.json), or a classifier:
    /// efficientnet-lite0, vgg16, resnet18, resnet50, an ONNX file (FILE.onnx) or a folder made
    /// by `gradcam train classifier`.
    #[arg(long, required = true)]
    pub model: Option<String>,
    /// Classifier weights (see `gradcam classify --help`); default: the architecture's own.
    #[arg(long)]
    pub weights: Option<String>,
    /// Classifier layer to explain; default: the last convolutional stage.
    #[arg(long)]
    pub layer: Option<String>,
    #[command(flatten)]
    pub onnx: OnnxArgs,
    /// Dataset folder: `instances.json` and `images/` (COCO format); the VQA model also reads
    /// `questions.json` and `annotations.json`. A classifier's categories are named by ImageNet
    /// class names.
    #[arg(long, required = true)]
    pub data: Option<PathBuf>,
    /// CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam or eigencam; on a transformer
    /// (a CLIP) also rollout or relevance.
    #[arg(long, default_value = "gradcam", value_parser = eval_method)]
    pub method: Method,
    /// Evaluate at most this many images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Folder for the per-image results (results.jsonl), summary.json, summary.md and failures/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Evaluate shard I of N (0-based) alone: the images whose position i in the list (after
    /// --limit) has i % N == I. Needs --out DIR, where it writes results-I-of-N.jsonl and
    /// shard-I-of-N.json (and failures-I-of-N/); `gradcam eval merge DIR` makes the whole run's
    /// files from the N shards.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<Shard>,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Pointing game: how far from the object the peak may land, `15px` or a fraction of the
    /// image's longer side (`0.0625`).
    #[arg(long, default_value = "15px")]
    pub tolerance: Tolerance,
    /// Localization: binarise the map at this fraction of its maximum.
    #[arg(long, default_value_t = 0.15)]
    pub box_threshold: f32,
    /// Localization: IoU with a ground-truth box that counts as a hit.
    #[arg(long, default_value_t = 0.5)]
    pub iou: f32,
    /// Occlusion patch side in input pixels (default: 1/7 of the input side, 32 px at 224).
    #[arg(long)]
    pub patch: Option<usize>,
    /// Occlusion stride in input pixels (default: half the patch).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Deletion / insertion: steps from no pixel to all pixels.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Pointing recall (classifiers): a top-5 prediction's map is rejected (the class said absent)
    /// when its peak is below this fraction of the image's strongest top-5 peak.
    #[arg(long, default_value_t = 0.5)]
    pub reject_below: f32,
    /// Write the K worst-predicted images with their maps to OUT/failures/index.html.
    #[arg(long, default_value_t = 0)]
    pub failures: usize,
    /// Perturbed inputs per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// adversarial: L-infinity budget of the attack, in pixel values of [0, 1].
    #[arg(long, default_value_t = 8.0 / 255.0)]
    pub eps: f32,
    /// adversarial: gradient steps at most per attack.
    #[arg(long, default_value_t = 10)]
    pub attack_steps: usize,
    /// adversarial: change per step (default 2.5 eps / steps).
    #[arg(long)]
    pub step_size: Option<f32>,
    /// adversarial: `random` attacks towards a random other class (until its p > 0.9) instead
    /// of away from the true class (until its p < 0.001).
    #[arg(long)]
    pub target: Option<String>,
    /// adversarial: the goal's probability (default 0.001 untargeted, 0.9 targeted).
    #[arg(long)]
    pub until: Option<f32>,
    /// adversarial: seed of the random targets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Segmentation: foreground seeds where the upsampled map is at least this fraction of its
    /// maximum.
    #[arg(long, default_value_t = SegmentOptions::default().high)]
    pub seed_high: f32,
    /// Segmentation: background seeds where it is below this fraction.
    #[arg(long, default_value_t = SegmentOptions::default().low)]
    pub seed_low: f32,
    /// Segmentation: the thresholded-map baseline's threshold (fraction of the maximum).
    #[arg(long, default_value_t = SegmentOptions::default().threshold)]
    pub seg_threshold: f32,
}

/// `gradcam eval merge DIR`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum EvalCommand {
    /// Merge the shards of `--shard I/N --out DIR` into DIR's results and summary.
    ///
    /// Checks that the N shards are all in DIR, done, run alike, and that every image was
    /// evaluated once; then writes DIR/results.jsonl, summary.json and summary.md (and with
    /// --failures, failures/) as one unsharded run writes them, and prints the summary.
    Merge(MergeArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct MergeArgs {
    /// The shards' folder (their --out).
    pub dir: PathBuf,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The methods an evaluation scores: the gradient-based ones, and a transformer's rollout and
/// relevance.
fn eval_method(s: &str) -> std::result::Result<Method, String> {
    let m: Method = s.parse().map_err(|e: gradcam_core::UnknownMethod| e.to_string())?;
    match m {
        Method::Rollout | Method::Relevance => Ok(m),
        m if m.is_gradient_map() => Ok(m),
        m => Err(format!("{m} is not scored by evaluations; give a gradient-based method (gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam) or, on a transformer, rollout or relevance")),
    }
}

/// What a run measured: its summary as JSON and as a Markdown table.
#[derive(Debug, Clone)]
pub struct Report {
    pub json: String,
    pub table: String,
    /// Whether it was the adversarial evaluation (its results are per case, not per image).
    pub adversarial: bool,
    /// What follows the table: where the files are (empty without --out).
    pub files: String,
}

/// The most perturbed inputs one forward pass takes (`--batch`): 1024 at 224 px are 600 MB.
pub const MAX_BATCH: usize = 1024;

impl EvalArgs {
    /// Checks the flags against each other, then names the model `--model` means.
    pub fn check(&self) -> Result<ModelRef> {
        self.tasks()?;
        ModelRef::parse(self.model()?)
    }

    fn model(&self) -> Result<&str> {
        self.model.as_deref().ok_or_else(|| SettingError::new(vec!["model"], "is needed: give --model").into())
    }

    fn data(&self) -> Result<&std::path::Path> {
        self.data.as_deref().ok_or_else(|| SettingError::new(vec!["data"], "is needed: give --data").into())
    }

    /// Whether the summary is printed as JSON (`--json`, or `merge --json`).
    pub fn prints_json(&self) -> bool {
        match &self.command {
            Some(EvalCommand::Merge(m)) => m.json,
            None => self.json,
        }
    }

    /// `gradcam eval merge DIR`'s report, when that is the command: the summary as an unsharded
    /// run reports it.
    pub fn merge(&self) -> Option<Result<Report>> {
        let Some(EvalCommand::Merge(m)) = &self.command else { return None };
        Some(crate::shards::merge(&m.dir).map(|merged| {
            let mut files = format!("\nper-{} results in {}\n", if merged.adversarial { "case" } else { "image" }, m.dir.join("results.jsonl").display());
            if merged.failures && !merged.adversarial {
                files += &format!("failure cases in {}\n", m.dir.join("failures/index.html").display());
            }
            Report { json: merged.json, table: merged.table, adversarial: merged.adversarial, files }
        }))
    }

    /// Whether the run is the adversarial evaluation, and the other tasks.
    fn tasks(&self) -> Result<(bool, Vec<Task>)> {
        let adversarial = self.tasks.iter().any(|t| t.trim() == "adversarial");
        if adversarial && self.tasks.len() > 1 {
            return Err(SettingError::value("tasks", self.tasks.join(","), "`adversarial` runs alone: give it without other tasks").into());
        }
        if !adversarial && (self.target.is_some() || self.until.is_some() || self.step_size.is_some()) {
            return Err(SettingError::new(vec!["target", "until", "step_size"], "are options of the `adversarial` task").into());
        }
        let tasks = if adversarial { Vec::new() } else { Task::parse_list(&self.tasks)? };
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return Err(SettingError::value("batch", self.batch, format!("give 1 to {MAX_BATCH} perturbed inputs per forward pass")).into());
        }
        if self.failures > 0 && self.out.is_none() {
            return Err(SettingError::new(vec!["failures"], "writes a page: give --out DIR").into());
        }
        if let (Some(shard), None) = (self.shard, &self.out) {
            return Err(SettingError::value("shard", shard, "writes its part for `gradcam eval merge DIR`: give --out DIR").into());
        }
        Ok((adversarial, tasks))
    }

    /// Runs the evaluation on `model` (from [`EvalArgs::check`]) with the classifier `weights` the
    /// caller resolved (default weights may need a resolver only a front end has), reporting
    /// `(images done, images)` to `progress`.
    pub fn run(&self, model: &ModelRef, weights: Option<&str>, progress: &mut dyn FnMut(usize, usize)) -> Result<Report> {
        let (adversarial, tasks) = self.tasks()?;
        let out = self.out.as_deref().map(|dir| Outputs { dir, failures: self.failures, shard: self.shard });
        let data = self.data()?;
        let cam = self.method.cam_method();
        let attention: Option<Box<dyn gradcam_core::Explainer>> = match self.method {
            gradcam_core::Method::Rollout => Some(Box::new(gradcam_core::Rollout)),
            gradcam_core::Method::Relevance => Some(Box::new(gradcam_core::Relevance)),
            _ => None,
        };
        let explainer: &dyn gradcam_core::Explainer = match (&cam, &attention) {
            (Some(c), _) => c,
            (None, Some(a)) => a.as_ref(),
            (None, None) => return Err(SettingError::value("method", &self.method, "a gradient-based method, rollout or relevance").into()),
        };
        let onnx = self.onnx.options()?;
        let limit = self.limit.unwrap_or(usize::MAX);
        let (json, table) = if adversarial {
            let ModelRef::Classifier(name) = model else {
                return Err(SettingError::value("model", self.model()?, "the adversarial evaluation attacks classifiers (efficientnet-lite0, vgg16, resnet18, resnet50, FILE.onnx or a `gradcam train classifier` folder)").into());
            };
            let targeted = match self.target.as_deref() {
                None => false,
                Some("random") => true,
                Some(other) => return Err(SettingError::value("target", format!("{other:?}"), "the adversarial evaluation takes `random` (or nothing, for untargeted attacks)").into()),
            };
            let method = cam.as_ref().ok_or_else(|| SettingError::value("method", &self.method, "the adversarial evaluation takes a gradient-based method"))?;
            let (net, layer) = name.load(weights, &onnx, self.layer.as_deref()).map_err(crate::session::loading(self.model()?))?;
            let step_size = self.step_size.unwrap_or(crate::attack::Pgd::default_step(self.eps, self.attack_steps));
            let until = self.until.unwrap_or(AdversarialOptions::default_until(targeted));
            let options = AdversarialOptions { eps: self.eps, steps: self.attack_steps, step_size, targeted, seed: self.seed, until, limit, tolerance: self.tolerance, box_threshold: self.box_threshold, iou: self.iou };
            let summary = adversarial::evaluate(&net, layer, data, method.as_ref(), &options, out, progress).map_err(|e| match e {
                // The attack's `steps` is this command's `attack_steps` (its `steps` are deletion's).
                Error::Setting(mut s) => {
                    s.settings.iter_mut().filter(|n| **n == "steps").for_each(|n| *n = "attack_steps");
                    Error::Setting(s)
                }
                e => e,
            })?;
            (serde_json::to_string_pretty(&summary), adversarial::markdown(&summary))
        } else {
            let subject = model.subject(weights, &onnx, self.layer.as_deref(), data)?;
            let segment = SegmentOptions { high: self.seed_high, low: self.seed_low, threshold: self.seg_threshold, ..Default::default() };
            let options = Options { tasks, method: explainer, limit, tolerance: self.tolerance, box_threshold: self.box_threshold, iou: self.iou, patch: self.patch, stride: self.stride, steps: self.steps, reject_below: self.reject_below, batch: self.batch, segment };
            let summary = subject.evaluate(data, &options, out, progress)?;
            (serde_json::to_string_pretty(&summary), crate::report::markdown(&summary))
        };
        Ok(Report { json: json.expect("a summary serialises"), table, adversarial, files: self.files(adversarial) })
    }

    /// Where the run's files are, in words.
    fn files(&self, adversarial: bool) -> String {
        let Some(out) = &self.out else { return String::new() };
        let Some(shard) = self.shard else {
            let mut files = format!("\nper-{} results in {}\n", if adversarial { "case" } else { "image" }, out.join("results.jsonl").display());
            if self.failures > 0 && !adversarial {
                files += &format!("failure cases in {}\n", out.join("failures/index.html").display());
            }
            return files;
        };
        let mut files = format!("\n(the table is shard {shard}'s images alone)\nper-{} results of shard {shard} in {}\n", if adversarial { "case" } else { "image" }, out.join(shard.file_name("results", "jsonl")).display());
        if self.failures > 0 && !adversarial {
            files += &format!("its failure cases in {}\n", out.join(format!("failures-{}-of-{}/index.html", shard.index, shard.count)).display());
        }
        files + &format!("once all {} shards are done: gradcam eval merge {}\n", shard.count, out.display())
    }
}
