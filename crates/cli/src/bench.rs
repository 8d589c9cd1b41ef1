//! `gradcam bench classify`: the plain forward pass against the full Grad-CAM explanation, timed
//! side by side in one process.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use gradcam_core::{Cam, Explainable, Method, Target};
use serde::Serialize;

use crate::ModelArgs;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// A classifier at 224x224, batch 1.
    Classify {
        #[command(flatten)]
        model: ModelArgs,
        /// Timed iterations of each (after two warm-up runs).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long)]
        json: bool,
    },
    /// Every CAM method on a classifier at 224x224, batch 1: the median time from the input
    /// tensor to the map at 224x224 (top-1 class), as pytorch-grad-cam's `cam(...)` call measures
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

#[derive(Serialize)]
struct BenchResult {
    model: &'static str,
    threads: usize,
    iters: usize,
    forward_ms: f64,
    gradcam_ms: f64,
    ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Classify { model, iters, json } => classify(model, iters, json),
        BenchCommand::Ops { iters } => ops(iters),
        BenchCommand::Methods { model, iters, methods, input, json } => methods_bench(model, iters, methods, input.as_deref(), json),
        BenchCommand::Caption { model, image, iters, json, detail } => caption(&model, &image, iters, json, detail),
    }
}

/// Median milliseconds of `a` and of `b` over `iters` runs, interleaved so that load from other
/// processes hits both alike (no warm-up).
fn interleaved(iters: usize, mut a: impl FnMut() -> anyhow::Result<()>, mut b: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(f64, f64)> {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        a()?;
        ta.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        b()?;
        tb.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(ta), median(tb)))
}

/// Median milliseconds of `f` over `iters` runs after one warm-up.
fn time_ms(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

fn ops(iters: usize) -> anyhow::Result<ExitCode> {
    use candle_core::Var;
    use gradcam_core::ops::{Activation, Conv2d, Padding};

    let ramp = |shape: &[usize], seed: usize| -> anyhow::Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0) - 1.0).collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    };
    // Runs f on x, and with `backward` also its input gradient.
    let step = |x: &Tensor, backward: bool, f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| -> anyhow::Result<()> {
        if backward {
            let v = Var::from_tensor(x)?;
            let g = f(v.as_tensor())?.sum_all()?.backward()?;
            std::hint::black_box(g.get(v.as_tensor()).map(|t| t.dims().len()));
        } else {
            std::hint::black_box(f(x)?);
        }
        Ok(())
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "median of {iters} runs, {} threads; ratio = candle / ours", rayon::current_num_threads())?;
    // (what, input, channels per group, kernel, groups, backward): EfficientNet-Lite0's depthwise
    // 5x5 at 56 px and VGG-16's conv4 / conv5 sizes.
    let cases = [
        ("depthwise 5x5 forward", [1, 144, 56, 56], 5, 144, false),
        ("depthwise 5x5 forward+backward", [1, 144, 56, 56], 5, 144, true),
        ("dense 3x3 forward", [1, 256, 56, 56], 3, 1, false),
        ("dense 3x3 forward+backward", [1, 256, 28, 28], 3, 1, true),
    ];
    for (i, (what, shape, k, groups, backward)) in cases.into_iter().enumerate() {
        let c = shape[1];
        let x = ramp(&shape, 2 * i)?;
        let w = ramp(&[c, c / groups, k, k], 2 * i + 1)?;
        let ours = Conv2d::new(&w, None, groups, 1, Padding::Symmetric(k / 2), Activation::Identity)?;
        let candle = time_ms(iters, || step(&x, backward, &|x| x.conv2d(&w, k / 2, 1, 1, groups)));
        let ours = time_ms(iters, || step(&x, backward, &|x| ours.forward(x)))?;
        let label = format!("{what} {shape:?}");
        match candle {
            Ok(a) => writeln!(out, "  {label:<50} candle {a:8.2} ms   ours {ours:8.2} ms   {:6.1}x", a / ours)?,
            Err(e) => writeln!(out, "  {label:<50} candle fails ({e:#})   ours {ours:8.2} ms")?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn caption(model: &std::path::Path, images: &[std::path::PathBuf], iters: usize, json: bool, detail: bool) -> anyhow::Result<ExitCode> {
    use gradcam_captioner::eval::word_maps;
    let model = gradcam_captioner::Captioner::load(model)?;
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(out, "median of {iters} interleaved runs, {} threads", rayon::current_num_threads())?;
        writeln!(out, "{:<48} {:>5} {:>12} {:>20} {:>7}", "image", "words", "generate ms", "generate+explain ms", "ratio")?;
    }
    let mut worst = 0f64;
    for image in images {
        let img = gradcam_encoders::preprocess::load_image(image)?;
        let input = model.preprocess(&img)?.unsqueeze(0)?;
        let (h, w) = (img.height() as usize, img.width() as usize);
        let generate = || -> anyhow::Result<Vec<u32>> { Ok(model.greedy(&model.features(&input)?)?.remove(0).tokens) };
        let words = generate()?.len();
        let explain = || -> anyhow::Result<()> {
            let a = model.features(&input)?;
            let tokens = model.greedy(&a)?.remove(0).tokens;
            for m in word_maps(&model, &a, &tokens)? {
                std::hint::black_box(m.normalized().0.resize_bilinear(h, w));
            }
            Ok(())
        };
        generate()?;
        explain()?;
        let (generate_ms, explain_ms) = interleaved(iters, || generate().map(|_| ()), explain)?;
        let ratio = explain_ms / generate_ms;
        worst = worst.max(ratio);
        if detail {
            let a = model.features(&input)?;
            let tokens = model.greedy(&a)?.remove(0).tokens;
            let f = time_ms(iters, || model.features(&input).map(|_| ()).map_err(Into::into))?;
            let g = time_ms(iters, || model.greedy(&a).map(|_| ()).map_err(Into::into))?;
            let m = time_ms(iters, || word_maps(&model, &a, &tokens).map(|_| ()).map_err(Into::into))?;
            eprintln!("{}: features {f:.3} ms, greedy {g:.3} ms, word maps {m:.3} ms", image.display());
        }
        if json {
            writeln!(out, "{}", serde_json::json!({"image": image, "words": words, "generate_ms": generate_ms, "explain_ms": explain_ms, "ratio": ratio}))?;
        } else {
            writeln!(out, "{:<48} {words:>5} {generate_ms:>12.3} {explain_ms:>20.3} {ratio:>6.2}x", image.display().to_string())?;
        }
    }
    if !json {
        writeln!(out, "largest ratio {worst:.2}x")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A fixed, image-like input: smooth gradients plus a pattern, so activations are not trivial
/// (bench/pytorch_gradcam.py makes the same).
fn bench_input() -> anyhow::Result<Tensor> {
    let data: Vec<f32> = (0..3 * 224 * 224)
        .map(|i| {
            let (c, y, x) = (i / (224 * 224), (i / 224) % 224, i % 224);
            ((x as f32 * 0.05 + c as f32).sin() + (y as f32 * 0.03).cos()) * 0.8
        })
        .collect();
    Ok(Tensor::from_vec(data, (1, 3, 224, 224), &Device::Cpu)?)
}

#[derive(Serialize)]
struct MethodsResult {
    model: &'static str,
    threads: usize,
    iters: usize,
    /// Median milliseconds per method, in the order timed.
    methods: Vec<(String, f64)>,
}

fn methods_bench(model: ModelArgs, iters: usize, methods: Vec<Method>, input: Option<&std::path::Path>, json: bool) -> anyhow::Result<ExitCode> {
    let methods = if methods.is_empty() { Method::ALL.to_vec() } else { methods };
    let net = model.load()?;
    let split = net.split(net.layer_index(net.default_layer())?);
    let input = match input {
        Some(path) => {
            let tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
            let t = tensors.get("input").with_context(|| format!("{} has no tensor `input`", path.display()))?.clone();
            if t.dims() != [1, 3, 224, 224] {
                anyhow::bail!("{}: `input` is {:?}, not [1, 3, 224, 224]", path.display(), t.dims());
            }
            t
        }
        None => bench_input()?,
    };
    let mut timings = Vec::new();
    for &m in &methods {
        let run = || -> anyhow::Result<()> {
            let a = split.features(&input)?;
            let logits = split.head(&a)?.squeeze(0)?.to_vec1::<f32>()?;
            let top = (0..logits.len()).max_by(|&i, &j| logits[i].total_cmp(&logits[j])).unwrap_or(0);
            let r = Cam::new(&split).method(m).explain_with(&input, &a, &[(0, Target::class(top))])?;
            if let Some(g) = &r[0].guided {
                std::hint::black_box(gradcam_core::gradient_image(&Tensor::from_slice(g, (3, 224, 224), &Device::Cpu)?)?);
            }
            let (norm, _) = r[0].cam().normalized();
            std::hint::black_box(norm.resize_bilinear(224, 224));
            Ok(())
        };
        let ms = if m.is_perturbation() {
            let t = Instant::now();
            run()?;
            t.elapsed().as_secs_f64() * 1e3
        } else {
            time_ms(iters, run)?
        };
        eprintln!("{m}: {ms:.1} ms");
        timings.push((m.to_string(), ms));
    }
    let r = MethodsResult { model: net.arch(), threads: rayon::current_num_threads(), iters, methods: timings };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &r)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{} at 224x224, batch 1, {} threads (median of {} runs; ablationcam and scorecam: one run)", r.model, r.threads, r.iters)?;
        for (m, ms) in &r.methods {
            writeln!(out, "  {m:<16} {ms:>10.1} ms")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn classify(model: ModelArgs, iters: usize, json: bool) -> anyhow::Result<ExitCode> {
    let net = model.load()?;
    let index = net.layer_index(net.default_layer())?;
    let split = net.split(index);
    let input = bench_input()?;

    let forward = || -> anyhow::Result<()> {
        let logits = net.forward(&input)?;
        std::hint::black_box(logits.to_vec2::<f32>()?);
        Ok(())
    };
    let gradcam = || -> anyhow::Result<()> {
        let a = split.features(&input)?;
        let logits = split.head(&a)?.squeeze(0)?.to_vec1::<f32>()?;
        let top = (0..logits.len()).max_by(|&i, &j| logits[i].total_cmp(&logits[j])).unwrap_or(0);
        let r = Cam::new(&split).explain_with(&input, &a, &[(0, Target::class(top))])?;
        let (norm, _) = r[0].cam().normalized();
        std::hint::black_box(norm.resize_bilinear(224, 224));
        Ok(())
    };
    for _ in 0..2 {
        forward()?;
        gradcam()?;
    }
    let (forward_ms, gradcam_ms) = interleaved(iters, &forward, &gradcam)?;
    let r = BenchResult {
        model: net.arch(),
        threads: rayon::current_num_threads(),
        iters,
        forward_ms,
        gradcam_ms,
        ratio: gradcam_ms / forward_ms,
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &r)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{} at 224x224, batch 1, {} threads, median of {} runs", r.model, r.threads, r.iters)?;
        writeln!(out, "  forward   {:>8.2} ms", r.forward_ms)?;
        writeln!(out, "  grad-cam  {:>8.2} ms  ({:.3}x the forward)", r.gradcam_ms, r.ratio)?;
    }
    Ok(ExitCode::SUCCESS)
}
