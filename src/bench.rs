//! The measurements behind `gradcam bench`: times taken side by side in one process (medians of
//! interleaved runs, so that load from other processes hits both sides alike).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use gradcam_kernels::{Activation, Conv2d, Padding};
use gradcam_core::{Cam, Explainable, Method, Target};
use gradcam_encoders::Network;
use serde::Serialize;

use crate::pipeline::Result;

/// The median of `v` (NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median milliseconds of `a` and of `b` over `iters` runs, interleaved (no warm-up).
pub fn interleaved<E>(iters: usize, mut a: impl FnMut() -> std::result::Result<(), E>, mut b: impl FnMut() -> std::result::Result<(), E>) -> std::result::Result<(f64, f64), E> {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..iters.max(1) {
        ta.push(millis(&mut a)?);
        tb.push(millis(&mut b)?);
    }
    Ok((median(ta), median(tb)))
}

/// Median milliseconds of `f` over `iters` runs after one warm-up.
pub fn time_ms<E>(iters: usize, mut f: impl FnMut() -> std::result::Result<(), E>) -> std::result::Result<f64, E> {
    f()?;
    (0..iters.max(1)).map(|_| millis(&mut f)).collect::<std::result::Result<Vec<_>, E>>().map(median)
}

fn millis<E>(f: &mut impl FnMut() -> std::result::Result<(), E>) -> std::result::Result<f64, E> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// A fixed, image-like input `[1, 3, 224, 224]`: smooth gradients plus a pattern, so activations
/// are not trivial (bench/pytorch_gradcam.py makes the same).
pub fn image_like_input() -> candle_core::Result<Tensor> {
    image_like_input_sized(224, 224)
}

/// [`image_like_input`] at `h` x `w`.
pub fn image_like_input_sized(h: usize, w: usize) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..3 * h * w)
        .map(|i| {
            let (c, y, x) = (i / (h * w), (i / w) % h, i % w);
            ((x as f32 * 0.05 + c as f32).sin() + (y as f32 * 0.03).cos()) * 0.8
        })
        .collect();
    Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)
}

/// The input `bench methods` times: the tensor `input` (`[1, 3, 224, 224]`) of the safetensors
/// file at `path`, or without one [`image_like_input_sized`] at the network's input size.
pub fn methods_input(net: &Network, path: Option<&Path>) -> Result<Tensor> {
    let Some(path) = path else {
        return Ok(image_like_input_sized(net.preprocess().size.0, net.preprocess().size.1)?);
    };
    let bad = |what: String| crate::pipeline::Error::Request(format!("{}: {what}", path.display()));
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(format!("cannot be read: {e}")))?;
    let t = tensors.get("input").ok_or_else(|| bad("has no tensor `input`".into()))?;
    if t.dims() != [1, 3, 224, 224] {
        return Err(bad(format!("`input` is {:?}, not [1, 3, 224, 224]", t.dims())));
    }
    Ok(t.clone())
}

/// A classifier's plain forward against its whole Grad-CAM explanation.
#[derive(Debug, Clone, Serialize)]
pub struct ClassifyTiming {
    /// The architecture.
    pub model: String,
    /// (height, width) of the input.
    pub size: (usize, usize),
    /// Worker threads.
    pub threads: usize,
    /// Timed runs of each.
    pub iters: usize,
    /// Median forward pass, ms.
    pub forward_ms: f64,
    /// Median Grad-CAM of the top-1 class from the input to the map at the input's size, ms.
    pub gradcam_ms: f64,
    /// `gradcam_ms / forward_ms`.
    pub ratio: f64,
    /// Images per batch.
    pub batch: usize,
    /// Images per second through the forward: `batch / forward_ms`.
    pub forward_images_per_s: f64,
    /// Images per second through Grad-CAM: `batch / gradcam_ms`.
    pub images_per_s: f64,
    /// For a batch: images per second through Grad-CAM of the same images one at a time (batch
    /// 1), timed in alternation with the batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_at_a_time_images_per_s: Option<f64>,
    /// For a batch: the batch's images per second over one at a time's, from that alternation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_speedup: Option<f64>,
}

/// Explains the top-1 class of each image of `input` (`[B, 3, H, W]`) with `method` at the
/// default layer in one forward and one backward, and upsamples each map to the input, as
/// pytorch-grad-cam's `cam(...)` call does.
fn explain_top1(split: &impl Explainable, input: &Tensor, method: Method) -> Result<()> {
    let a = split.features(input)?;
    let logits = split.head(&a)?.to_vec2::<f32>()?;
    let requests: Vec<(usize, Target)> = logits.iter().enumerate().map(|(i, l)| (i, Target::class((0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap_or(0)))).collect();
    let r = Cam::new(split).method(method).explain_with(input, &a, &requests)?;
    let (_, _, h, w) = input.dims4()?;
    for e in &r {
        if let Some(g) = &e.guided {
            let (gh, gw) = e.guided_size;
            std::hint::black_box(gradcam_core::guided::gradient_image(&Tensor::from_slice(g, (3, gh, gw), &Device::Cpu)?)?);
        }
        std::hint::black_box(e.cam().normalized().0.resize_bilinear(h, w));
    }
    Ok(())
}

/// `batch` image-like inputs `[batch, 3, h, w]`: [`image_like_input_sized`] first, then the same
/// pattern shifted by a few pixels per image (so that the images differ).
pub fn image_like_batch(batch: usize, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let one = image_like_input_sized(h, w)?;
    let images = (0..batch.max(1)).map(|i| if i == 0 { Ok(one.clone()) } else { one.roll(i as i32 * 3, 3)?.roll(i as i32 * 2, 2) }).collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&images, 0)
}

/// `net`'s forward against its Grad-CAM at the default layer on `batch` image-like inputs
/// ([`image_like_batch`]; batch 1: [`image_like_input`]) in one batch, after two warm-up runs of
/// each.
pub fn classify(net: &Network, iters: usize, batch: usize) -> Result<ClassifyTiming> {
    let split = net.split(net.layer_index(net.default_layer())?);
    let (h, w) = net.preprocess().size;
    let batch = batch.max(1);
    let input = image_like_batch(batch, h, w)?;
    let forward = || -> Result<()> {
        std::hint::black_box(net.forward(&input)?.to_vec2::<f32>()?);
        Ok(())
    };
    let gradcam = || explain_top1(&split, &input, Method::GradCam);
    for _ in 0..2 {
        forward()?;
        gradcam()?;
    }
    let (forward_ms, gradcam_ms) = interleaved(iters, forward, gradcam)?;
    let per_s = |ms: f64| batch as f64 * 1e3 / ms;
    // The same images one at a time, alternated with the batch: the batch's speed-up, measured
    // side by side (a shared machine's load changes between two runs more than the speed-up).
    let one_at_a_time = match batch {
        1 => None,
        _ => {
            let images: Vec<Tensor> = (0..batch).map(|i| input.narrow(0, i, 1)).collect::<candle_core::Result<_>>()?;
            let singles = || images.iter().try_for_each(|x| explain_top1(&split, x, Method::GradCam));
            singles()?;
            let (single_ms, batch_ms) = interleaved(iters, singles, gradcam)?;
            Some((per_s(single_ms), single_ms / batch_ms))
        }
    };
    Ok(ClassifyTiming {
        model: net.arch().to_string(),
        size: (h, w),
        threads: rayon::current_num_threads(),
        iters,
        forward_ms,
        gradcam_ms,
        ratio: gradcam_ms / forward_ms,
        batch,
        forward_images_per_s: per_s(forward_ms),
        images_per_s: per_s(gradcam_ms),
        one_at_a_time_images_per_s: one_at_a_time.map(|o| o.0),
        batch_speedup: one_at_a_time.map(|o| o.1),
    })
}

/// One stage of [`layers`]: its name and median milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LayerTiming {
    /// The layer's name (`head forward` / `head backward` for the parts of Grad-CAM after the
    /// explained layer).
    pub name: String,
    /// Median time, ms.
    pub ms: f64,
}

/// Where the time of a forward and of a Grad-CAM goes: each feature layer timed in turn inside
/// whole passes (medians of `iters` passes after one warm-up), then the tail and the head after the
/// default layer (forward, and forward + backward) as Grad-CAM runs it (medians of `iters` runs).
/// `batch` image-like inputs ([`image_like_batch`]) go through as one batch.
pub fn layers(net: &Network, iters: usize, batch: usize) -> Result<Vec<LayerTiming>> {
    let (h, w) = net.preprocess().size;
    let input = image_like_batch(batch, h, w)?;
    // Each layer timed inside whole passes, one after the other as a forward runs them (a layer
    // run again and again on its own input finds its weights and input in the caches).
    let mut times = vec![Vec::with_capacity(iters); net.num_layers()];
    let mut x = input.clone();
    for pass in 0..=iters.max(1) {
        x = input.clone();
        for (i, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            x = net.layer_forward(i, &x)?;
            if pass > 0 {
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let mut out: Vec<LayerTiming> = times.into_iter().enumerate().map(|(i, t)| LayerTiming { name: net.layer_name(i).to_string(), ms: median(t) }).collect();
    let last = net.num_layers() - 1;
    let ms = time_ms(iters, || net.head_from(&x, last).map(|_| ()))?;
    out.push(LayerTiming { name: "tail".into(), ms });
    let index = net.layer_index(net.default_layer())?;
    let split = net.split(index);
    let a = net.features_at(&input, index)?;
    let ms = time_ms(iters, || net.head_from(&a, index).map(|_| ()))?;
    out.push(LayerTiming { name: format!("head after {} forward", net.default_layer()), ms });
    let requests: Vec<(usize, Target)> = (0..input.dim(0)?).map(|i| (i, Target::class(0))).collect();
    let ms = time_ms(iters, || Cam::new(&split).explain_with(&a.clone(), &a, &requests).map(|_| ()))?;
    out.push(LayerTiming { name: format!("head after {} forward + backward", net.default_layer()), ms });
    Ok(out)
}

/// Two classifiers' Grad-CAM (default layer, top-1 class) on the same input, timed in
/// alternation: the medians of `a` and `b`, ms.
pub fn gradcam_pair(a: &Network, b: &Network, iters: usize) -> Result<(f64, f64)> {
    let (h, w) = a.preprocess().size;
    let input = image_like_input_sized(h, w)?;
    let (sa, sb) = (a.split(a.layer_index(a.default_layer())?), b.split(b.layer_index(b.default_layer())?));
    let run_a = || explain_top1(&sa, &input, Method::GradCam);
    let run_b = || explain_top1(&sb, &input, Method::GradCam);
    for _ in 0..2 {
        run_a()?;
        run_b()?;
    }
    interleaved(iters, run_a, run_b)
}

/// The median milliseconds of each method on `input` (`[1, 3, H, W]`) from the input to the map
/// at the input's size; the perturbation methods run once. `each` hears every result.
pub fn methods(net: &Network, input: &Tensor, methods: &[Method], iters: usize, each: &mut dyn FnMut(Method, f64)) -> Result<Vec<(Method, f64)>> {
    let split = net.split(net.layer_index(net.default_layer())?);
    let mut timings = Vec::with_capacity(methods.len());
    for &m in methods {
        let run = || explain_top1(&split, input, m);
        let ms = if m.is_perturbation() { millis(&mut { run })? } else { time_ms(iters, run)? };
        each(m, ms);
        timings.push((m, ms));
    }
    Ok(timings)
}

/// The captioner generating a caption against generating and explaining all its words.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionTiming {
    /// Words of the caption.
    pub words: usize,
    /// Median greedy decoding from the image, ms.
    pub generate_ms: f64,
    /// Median decoding plus every word's map at the image's size, ms.
    pub explain_ms: f64,
    /// `explain_ms / generate_ms`.
    pub ratio: f64,
    /// With `detail`: the encoder, greedy decoding and word maps alone, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parts_ms: Option<[f64; 3]>,
}

/// Times the captioner on the image at `path`.
pub fn caption(model: &gradcam_captioner::Captioner, path: &Path, iters: usize, detail: bool) -> Result<CaptionTiming> {
    use gradcam_captioner::eval::word_maps;
    let img = gradcam_encoders::preprocess::load_image(path)?;
    let input = model.preprocess(&img)?.unsqueeze(0)?;
    let (h, w) = (img.height() as usize, img.width() as usize);
    let generate = || -> Result<Vec<u32>> { Ok(model.greedy(&model.features(&input)?)?.remove(0).tokens) };
    let explain = || -> Result<()> {
        let a = model.features(&input)?;
        let tokens = model.greedy(&a)?.remove(0).tokens;
        for m in word_maps(model, &a, &tokens)? {
            std::hint::black_box(m.normalized().0.resize_bilinear(h, w));
        }
        Ok(())
    };
    let words = generate()?.len();
    explain()?;
    let (generate_ms, explain_ms) = interleaved(iters, || generate().map(|_| ()), explain)?;
    let parts_ms = if detail {
        let a = model.features(&input)?;
        let tokens = model.greedy(&a)?.remove(0).tokens;
        Some([
            time_ms(iters, || model.features(&input).map(|_| ()))?,
            time_ms(iters, || model.greedy(&a).map(|_| ()))?,
            time_ms(iters, || word_maps(model, &a, &tokens).map(|_| ()))?,
        ])
    } else {
        None
    };
    Ok(CaptionTiming { words, generate_ms, explain_ms, ratio: explain_ms / generate_ms, parts_ms })
}

/// [`caption`] of every image, with the figures it was taken with: as text a table (a row per
/// image, then the largest ratio); as JSON a line per image.
#[derive(Debug, Clone)]
pub struct CaptionsReport {
    /// Timed runs of each.
    pub iters: usize,
    /// Worker threads.
    pub threads: usize,
    /// Each image's timing.
    pub rows: Vec<(std::path::PathBuf, CaptionTiming)>,
}

/// One image's row of a [`CaptionsReport`] as JSON.
#[derive(Serialize)]
pub struct CaptionRow<'a> {
    /// `explain_ms` of the timing.
    pub explain_ms: f64,
    /// `generate_ms` of the timing.
    pub generate_ms: f64,
    /// The image.
    pub image: &'a Path,
    /// `ratio` of the timing.
    pub ratio: f64,
    /// Words of the caption.
    pub words: usize,
}

/// [`caption`] of each image in `images`; `each` hears every image's timing as it is taken.
pub fn captions(model: &gradcam_captioner::Captioner, images: &[std::path::PathBuf], iters: usize, detail: bool, each: &mut dyn FnMut(&Path, &CaptionTiming)) -> Result<CaptionsReport> {
    let mut rows = Vec::with_capacity(images.len());
    for image in images {
        let r = caption(model, image, iters, detail)?;
        each(image, &r);
        rows.push((image.clone(), r));
    }
    Ok(CaptionsReport { iters, threads: rayon::current_num_threads(), rows })
}

impl CaptionsReport {
    /// The JSON lines: one object per image.
    pub fn json_rows(&self) -> impl Iterator<Item = CaptionRow<'_>> {
        self.rows.iter().map(|(image, r)| CaptionRow { explain_ms: r.explain_ms, generate_ms: r.generate_ms, image, ratio: r.ratio, words: r.words })
    }
}

impl std::fmt::Display for CaptionsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "median of {} interleaved runs, {} threads", self.iters, self.threads)?;
        writeln!(f, "{:<48} {:>5} {:>12} {:>20} {:>7}", "image", "words", "generate ms", "generate+explain ms", "ratio")?;
        for (image, r) in &self.rows {
            writeln!(f, "{:<48} {:>5} {:>12.3} {:>20.3} {:>6.2}x", image.display().to_string(), r.words, r.generate_ms, r.explain_ms, r.ratio)?;
        }
        writeln!(f, "largest ratio {:.2}x", self.rows.iter().map(|r| r.1.ratio).fold(0f64, f64::max))
    }
}

/// One convolution timed on candle's ops and on ours.
#[derive(Debug, Clone)]
pub struct OpTiming {
    /// What was timed, with the input's shape.
    pub label: String,
    /// candle's median ms, or why it failed.
    pub candle: std::result::Result<f64, String>,
    /// Our median ms.
    pub ours: f64,
}

/// Our convolution kernels against stock candle's on EfficientNet-Lite0's depthwise 5x5 at 56 px
/// and VGG-16's conv4 / conv5 sizes, forward and forward + input gradient.
pub fn ops(iters: usize) -> Result<Vec<OpTiming>> {
    let ramp = |shape: &[usize], seed: usize| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0) - 1.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    };
    // Runs f on x, and with `backward` also its input gradient.
    let step = |x: &Tensor, backward: bool, f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| -> candle_core::Result<()> {
        if backward {
            let v = Var::from_tensor(x)?;
            let g = f(v.as_tensor())?.sum_all()?.backward()?;
            std::hint::black_box(g.get(v.as_tensor()).map(|t| t.dims().len()));
        } else {
            std::hint::black_box(f(x)?);
        }
        Ok(())
    };
    // (what, input, kernel, groups, backward)
    let cases = [
        ("depthwise 5x5 forward", [1, 144, 56, 56], 5, 144, false),
        ("depthwise 5x5 forward+backward", [1, 144, 56, 56], 5, 144, true),
        ("dense 3x3 forward", [1, 256, 56, 56], 3, 1, false),
        ("dense 3x3 forward+backward", [1, 256, 28, 28], 3, 1, true),
    ];
    let mut out = Vec::new();
    for (i, (what, shape, k, groups, backward)) in cases.into_iter().enumerate() {
        let c = shape[1];
        let x = ramp(&shape, 2 * i)?;
        let w = ramp(&[c, c / groups, k, k], 2 * i + 1)?;
        let conv = Conv2d::new(&w, None, groups, 1, Padding::Symmetric(k / 2), Activation::Identity)?;
        let candle = time_ms(iters, || step(&x, backward, &|x| x.conv2d(&w, k / 2, 1, 1, groups))).map_err(|e| e.to_string());
        let ours = time_ms(iters, || step(&x, backward, &|x| conv.forward(x)))?;
        out.push(OpTiming { label: format!("{what} {shape:?}"), candle, ours });
    }
    Ok(out)
}

/// [`layers`] with the figures it was taken with; as text, a row per stage.
#[derive(Debug, Clone, Serialize)]
pub struct LayersReport {
    /// Images per batch.
    pub batch: usize,
    /// Timed passes.
    pub iters: usize,
    /// Each stage's median.
    pub layers: Vec<LayerTiming>,
    /// The architecture.
    pub model: String,
    /// Worker threads.
    pub threads: usize,
}

/// [`layers`] of `net`, reported.
pub fn layers_report(net: &Network, iters: usize, batch: usize) -> Result<LayersReport> {
    let batch = batch.max(1);
    Ok(LayersReport { batch, iters, layers: layers(net, iters, batch)?, model: net.arch().to_string(), threads: rayon::current_num_threads() })
}

/// [`gradcam_pair`] with the figures it was taken with.
#[derive(Debug, Clone, Serialize)]
pub struct PairReport {
    /// The second architecture.
    pub against: String,
    /// Its median Grad-CAM, ms.
    pub against_gradcam_ms: f64,
    /// The first architecture's median Grad-CAM, ms.
    pub gradcam_ms: f64,
    /// Timed runs of each.
    pub iters: usize,
    /// The first architecture.
    pub model: String,
    /// `gradcam_ms / against_gradcam_ms`.
    pub ratio: f64,
    /// Worker threads.
    pub threads: usize,
}

/// [`gradcam_pair`] of `a` and `b`, reported.
pub fn pair_report(a: &Network, b: &Network, iters: usize) -> Result<PairReport> {
    let (ta, tb) = gradcam_pair(a, b, iters)?;
    Ok(PairReport { against: b.arch().to_string(), against_gradcam_ms: tb, gradcam_ms: ta, iters, model: a.arch().to_string(), ratio: ta / tb, threads: rayon::current_num_threads() })
}

/// [`methods`] with the figures it was taken with.
#[derive(Debug, Clone, Serialize)]
pub struct MethodsReport {
    /// Timed runs of each fast method.
    pub iters: usize,
    /// Each method's name and median, ms.
    pub methods: Vec<(String, f64)>,
    /// The architecture.
    pub model: String,
    /// Worker threads.
    pub threads: usize,
    /// (height, width) of the input.
    #[serde(skip)]
    pub size: (usize, usize),
}

/// [`methods`] of `net` on `input`, reported.
pub fn methods_report(net: &Network, input: &Tensor, list: &[Method], iters: usize, each: &mut dyn FnMut(Method, f64)) -> Result<MethodsReport> {
    let timings = methods(net, input, list, iters, each)?;
    let (_, _, h, w) = input.dims4()?;
    let methods = timings.into_iter().map(|(m, ms)| (m.to_string(), ms)).collect();
    Ok(MethodsReport { iters, methods, model: net.arch().to_string(), threads: rayon::current_num_threads(), size: (h, w) })
}

impl std::fmt::Display for ClassifyTiming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} at {}x{}, batch {}, {} threads, median of {} runs", self.model, self.size.1, self.size.0, self.batch, self.threads, self.iters)?;
        if self.batch == 1 {
            writeln!(f, "  forward   {:>8.2} ms", self.forward_ms)?;
            return writeln!(f, "  grad-cam  {:>8.2} ms  ({:.3}x the forward)", self.gradcam_ms, self.ratio);
        }
        writeln!(f, "  forward   {:>8.2} ms  {:>8.1} images/s", self.forward_ms, self.forward_images_per_s)?;
        writeln!(f, "  grad-cam  {:>8.2} ms  {:>8.1} images/s  ({:.3}x the forward)", self.gradcam_ms, self.images_per_s, self.ratio)?;
        match (self.one_at_a_time_images_per_s, self.batch_speedup) {
            (Some(one), Some(x)) => writeln!(f, "  grad-cam one image at a time (alternated with the batch): {one:.1} images/s; the batch is {x:.3}x that"),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for LayersReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}, batch {}, {} threads, median of {} whole passes, each layer timed in turn", self.model, self.batch, self.threads, self.iters)?;
        let width = self.layers.iter().map(|t| t.name.len()).max().unwrap_or(0);
        self.layers.iter().try_for_each(|t| writeln!(f, "  {:<width$}  {:>8.2} ms", t.name, t.ms))
    }
}

impl std::fmt::Display for PairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (iters, threads, ta, tb) = (self.iters, self.threads, self.gradcam_ms, self.against_gradcam_ms);
        writeln!(f, "grad-cam, median of {iters} alternating runs, {threads} threads: {} {ta:.2} ms, {} {tb:.2} ms, ratio {:.3}", self.model, self.against, self.ratio)
    }
}

impl std::fmt::Display for MethodsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (iters, threads) = (self.iters, self.threads);
        writeln!(f, "{} at {}x{}, batch 1, {threads} threads (median of {iters} runs; ablationcam and scorecam: one run)", self.model, self.size.1, self.size.0)?;
        self.methods.iter().try_for_each(|(m, ms)| writeln!(f, "  {m:<16} {ms:>10.1} ms"))
    }
}

impl std::fmt::Display for OpTiming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.candle {
            Ok(a) => writeln!(f, "  {:<50} candle {a:8.2} ms   ours {:8.2} ms   {:6.1}x", self.label, self.ours, a / self.ours),
            Err(e) => writeln!(f, "  {:<50} candle fails ({e})   ours {:8.2} ms", self.label, self.ours),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_print_as_one_json_line_in_key_order_and_as_text() {
        let r = PairReport { against: "b".into(), against_gradcam_ms: 2.0, gradcam_ms: 3.0, iters: 4, model: "a".into(), ratio: 1.5, threads: 2 };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, serde_json::to_string(&serde_json::to_value(&r).unwrap()).unwrap(), "the keys are in the order json! sorts them");
        assert_eq!(r.to_string(), "grad-cam, median of 4 alternating runs, 2 threads: a 3.00 ms, b 2.00 ms, ratio 1.500\n");
        let m = MethodsReport { iters: 1, methods: vec![("gradcam".into(), 1.25)], model: "m".into(), threads: 1, size: (224, 200) };
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"iters":1,"methods":[["gradcam",1.25]],"model":"m","threads":1}"#);
        assert!(m.to_string().starts_with("m at 200x224, batch 1"));
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
