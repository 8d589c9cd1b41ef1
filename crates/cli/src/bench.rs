//! `gradcam bench classify`: the plain forward pass against the full Grad-CAM explanation, timed
//! side by side in one process.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use gradcam::{bench, Method};

use crate::ModelArgs;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// A classifier at its input size (224x224 for the built-in ones), batch 1.
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
    let threads = rayon::current_num_threads();
    match cmd {
        BenchCommand::Classify { model, iters, json, layers: true, .. } => {
            let net = model.load()?;
            let timings = bench::layers(&net, iters)?;
            if json {
                writeln!(out, "{}", serde_json::json!({"model": net.arch(), "threads": threads, "iters": iters, "layers": timings}))?;
            } else {
                writeln!(out, "{}, batch 1, {threads} threads, median of {iters} whole passes, each layer timed in turn", net.arch())?;
                let width = timings.iter().map(|t| t.name.len()).max().unwrap_or(0);
                for t in &timings {
                    writeln!(out, "  {:<width$}  {:>8.2} ms", t.name, t.ms)?;
                }
            }
        }
        BenchCommand::Classify { model, iters, json, against: Some(other), .. } => {
            let (a, b) = (model.load()?, ModelArgs { model: other, weights: None, onnx: model.onnx.clone() }.load()?);
            let (ta, tb) = bench::gradcam_pair(&a, &b, iters)?;
            let line = serde_json::json!({"model": a.arch(), "against": b.arch(), "threads": threads, "iters": iters, "gradcam_ms": ta, "against_gradcam_ms": tb, "ratio": ta / tb});
            match json {
                true => writeln!(out, "{line}")?,
                false => writeln!(out, "grad-cam, median of {iters} alternating runs, {threads} threads: {} {ta:.2} ms, {} {tb:.2} ms, ratio {:.3}", a.arch(), b.arch(), ta / tb)?,
            }
        }
        BenchCommand::Classify { model, iters, json, against: None, .. } => {
            let r = bench::classify(&model.load()?, iters)?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            } else {
                writeln!(out, "{} at {}x{}, batch 1, {} threads, median of {} runs", r.model, r.size.1, r.size.0, r.threads, r.iters)?;
                writeln!(out, "  forward   {:>8.2} ms", r.forward_ms)?;
                writeln!(out, "  grad-cam  {:>8.2} ms  ({:.3}x the forward)", r.gradcam_ms, r.ratio)?;
            }
        }
        BenchCommand::Methods { model, iters, methods, input, json } => {
            let methods = if methods.is_empty() { Method::ALL.to_vec() } else { methods };
            let net = model.load()?;
            let input = match input {
                Some(path) => {
                    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
                    let t = tensors.get("input").with_context(|| format!("{} has no tensor `input`", path.display()))?.clone();
                    if t.dims() != [1, 3, 224, 224] {
                        anyhow::bail!("{}: `input` is {:?}, not [1, 3, 224, 224]", path.display(), t.dims());
                    }
                    t
                }
                None => bench::image_like_input_sized(net.preprocess().size.0, net.preprocess().size.1)?,
            };
            let timings = bench::methods(&net, &input, &methods, iters, &mut |m, ms| eprintln!("{m}: {ms:.1} ms"))?;
            if json {
                let methods: Vec<(String, f64)> = timings.iter().map(|(m, ms)| (m.to_string(), *ms)).collect();
                writeln!(out, "{}", serde_json::json!({"model": net.arch(), "threads": threads, "iters": iters, "methods": methods}))?;
            } else {
                writeln!(out, "{} at {}x{}, batch 1, {threads} threads (median of {iters} runs; ablationcam and scorecam: one run)", net.arch(), input.dim(3)?, input.dim(2)?)?;
                for (m, ms) in &timings {
                    writeln!(out, "  {:<16} {ms:>10.1} ms", m.name())?;
                }
            }
        }
        BenchCommand::Caption { model, image, iters, json, detail } => {
            let model = gradcam_captioner::Captioner::load(&model)?;
            if !json {
                writeln!(out, "median of {iters} interleaved runs, {threads} threads")?;
                writeln!(out, "{:<48} {:>5} {:>12} {:>20} {:>7}", "image", "words", "generate ms", "generate+explain ms", "ratio")?;
            }
            let mut worst = 0f64;
            for image in &image {
                let r = bench::caption(&model, image, iters, detail)?;
                worst = worst.max(r.ratio);
                if let Some([f, g, m]) = r.parts_ms {
                    eprintln!("{}: features {f:.3} ms, greedy {g:.3} ms, word maps {m:.3} ms", image.display());
                }
                if json {
                    writeln!(out, "{}", serde_json::json!({"image": image, "words": r.words, "generate_ms": r.generate_ms, "explain_ms": r.explain_ms, "ratio": r.ratio}))?;
                } else {
                    writeln!(out, "{:<48} {:>5} {:>12.3} {:>20.3} {:>6.2}x", image.display().to_string(), r.words, r.generate_ms, r.explain_ms, r.ratio)?;
                }
            }
            if !json {
                writeln!(out, "largest ratio {worst:.2}x")?;
            }
        }
        BenchCommand::Ops { iters } => {
            writeln!(out, "median of {iters} runs, {threads} threads; ratio = candle / ours")?;
            for r in bench::ops(iters)? {
                match r.candle {
                    Ok(a) => writeln!(out, "  {:<50} candle {a:8.2} ms   ours {:8.2} ms   {:6.1}x", r.label, r.ours, a / r.ours)?,
                    Err(e) => writeln!(out, "  {:<50} candle fails ({e})   ours {:8.2} ms", r.label, r.ours)?,
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
