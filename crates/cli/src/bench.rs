//! `gradcam bench classify`: the plain forward pass against the full Grad-CAM explanation, timed
//! side by side in one process.

use std::{io::Write, process::ExitCode};

use gradcam::{bench, Method};

use crate::common::print;
use crate::ModelArgs;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// A classifier at its input size (224x224 for the built-in ones), batch 1 or --batch-size.
    Classify {
        #[command(flatten)]
        model: ModelArgs,
        /// Timed iterations of each (after two warm-up runs).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long)]
        json: bool,
        /// Also time this model's Grad-CAM in alternation with --model's and print the ratio.
        #[arg(long)]
        against: Option<gradcam_encoders::ModelName>,
        /// Instead, time each layer (in turn, inside whole forward passes) and the head's forward
        /// and backward (where the time goes).
        #[arg(long, conflicts_with = "against")]
        layers: bool,
        /// Images per batch (one forward, one backward): the JSON's `images_per_s`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        batch_size: u16,
    },
    /// Every CAM method on a classifier at its input size, batch 1: the median time from the input
    /// tensor to the map at the input size (top-1 class), as pytorch-grad-cam's `cam(...)` call measures
    /// it (bench/compare_methods.sh runs both).
    Methods {
        #[command(flatten)]
        model: ModelArgs,
        /// Timed runs of each fast method (after one warm-up); ablationcam and scorecam run once.
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Methods to time, comma-separated (default: all ten).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<Method>,
        /// A preprocessed input `[1, 3, 224, 224]` in a safetensors file (tensor `input`), e.g.
        /// tests/fixtures/input.safetensors (a photo); default: a synthetic image-like pattern.
        #[arg(long)]
        input: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The captioner: generating a caption against generating and explaining all its words.
    Caption {
        #[arg(long, default_value = crate::caption::DEFAULT_MODEL)]
        model: std::path::PathBuf,
        /// ShapeScenes-like images (repeat the option); default: one with a 6-word caption and one
        /// with a 14-word caption.
        #[arg(long, default_values = ["data/shapescenes/test/images/000019.png", "data/shapescenes/train/images/000000.png"])]
        image: Vec<std::path::PathBuf>,
        #[arg(long, default_value_t = 50)]
        iters: usize,
        #[arg(long)]
        json: bool,
        /// Also time the parts: encoder, greedy decoding, word maps.
        #[arg(long)]
        detail: bool,
    },
    /// Our convolution kernels against stock candle's, on EfficientNet- and VGG-sized layers.
    Ops {
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        BenchCommand::Classify { model, iters, json, layers: true, batch_size, .. } => print(&mut out, &bench::layers_report(&model.load()?, iters, batch_size.into())?, json)?,
        BenchCommand::Classify { model, iters, json, against: Some(other), .. } => {
            let (a, b) = (model.load()?, ModelArgs { model: other, weights: None, onnx: model.onnx.clone() }.load()?);
            print(&mut out, &bench::pair_report(&a, &b, iters)?, json)?;
        }
        BenchCommand::Classify { model, iters, json, against: None, batch_size, .. } => print(&mut out, &bench::classify(&model.load()?, iters, batch_size.into())?, json)?,
        BenchCommand::Methods { model, iters, methods, input, json } => {
            let (net, methods) = (model.load()?, if methods.is_empty() { Method::ALL.to_vec() } else { methods });
            let input = bench::methods_input(&net, input.as_deref())?;
            print(&mut out, &bench::methods_report(&net, &input, &methods, iters, &mut |m, ms| eprintln!("{m}: {ms:.1} ms"))?, json)?;
        }
        BenchCommand::Caption { model, image, iters, json, detail } => {
            let report = bench::captions(&gradcam_captioner::Captioner::load(&model)?, &image, iters, detail, &mut |image, r| {
                let Some([f, g, m]) = r.parts_ms else { return };
                eprintln!("{}: features {f:.3} ms, greedy {g:.3} ms, word maps {m:.3} ms", image.display());
            })?;
            match json {
                true => report.json_rows().try_for_each(|r| writeln!(out, "{}", serde_json::to_string(&r)?))?,
                false => write!(out, "{report}")?,
            }
        }
        BenchCommand::Ops { iters } => {
            writeln!(out, "median of {iters} runs, {} threads; ratio = candle / ours", rayon::current_num_threads())?;
            bench::ops(iters)?.iter().try_for_each(|r| write!(out, "{r}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
