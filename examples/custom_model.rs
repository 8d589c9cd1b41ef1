//! Grad-CAM for a CNN of your own: a small candle-nn network defined here, trained here for a few
//! seconds, then explained with every method, unchanged, and with a method of your own
//! (occlusion, written here as an [`Explainer`]) through the same `Cam`.
//!
//! ```sh
//! cargo run --release --example custom_model [OUT_DIR]
//! ```
//!
//! The task: 32x32 images of noise with one bright square, red or blue; the class is the colour.
//! The network must find the square to answer, so its Grad-CAM should light the square. The
//! example also computes Grad-CAM by hand from candle's own backward and checks that the crate's
//! map equals it (within 1e-5).
//!
//! [`Explainer`]: gradcam::Explainer

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Optimizer};
use gradcam::map::Map;
use gradcam::ops::Activation;
use gradcam::{Cam, Context, Explainable, Explainer, Explanation, Method, Request, Rule, Split, Target};

const SIDE: usize = 32;

/// A deterministic pseudo-random stream (so that every run trains the same network).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn tensor(&mut self, shape: &[usize], scale: f32) -> candle_core::Result<Tensor> {
        let data: Vec<f32> = (0..shape.iter().product()).map(|_| (self.next() * 2.0 - 1.0) * scale).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }
}

/// A batch of images `[n, 3, 32, 32]`, their labels (0 red, 1 blue) and each square's corner.
fn batch(rng: &mut Lcg, n: usize) -> candle_core::Result<(Tensor, Tensor, Vec<(usize, usize)>)> {
    let mut pixels = vec![0f32; n * 3 * SIDE * SIDE];
    let (mut labels, mut corners) = (Vec::new(), Vec::new());
    for i in 0..n {
        let image = &mut pixels[i * 3 * SIDE * SIDE..(i + 1) * 3 * SIDE * SIDE];
        image.iter_mut().for_each(|p| *p = rng.next() * 0.6);
        let label = (rng.next() * 2.0) as u32 % 2;
        let (y0, x0) = ((rng.next() * 24.0) as usize, (rng.next() * 24.0) as usize);
        for y in y0..y0 + 8 {
            for x in x0..x0 + 8 {
                let channel = if label == 0 { 0 } else { 2 };
                image[channel * SIDE * SIDE + y * SIDE + x] = 1.0;
            }
        }
        labels.push(label);
        corners.push((y0, x0));
    }
    Ok((Tensor::from_vec(pixels, (n, 3, SIDE, SIDE), &Device::Cpu)?, Tensor::new(labels, &Device::Cpu)?, corners))
}

/// The network: two convolutions (the second is explained), global average pool, linear.
struct Net {
    conv1: Conv2d,
    conv2: Conv2d,
    fc: Linear,
    vars: Vec<Var>,
}

impl Net {
    fn new(rng: &mut Lcg) -> candle_core::Result<Self> {
        let var = |t: Tensor| Var::from_tensor(&t);
        let vars = vec![
            var(rng.tensor(&[16, 3, 3, 3], 0.4)?)?,
            var(Tensor::zeros(16, DType::F32, &Device::Cpu)?)?,
            var(rng.tensor(&[32, 16, 3, 3], 0.15)?)?,
            var(Tensor::zeros(32, DType::F32, &Device::Cpu)?)?,
            var(rng.tensor(&[2, 32], 0.3)?)?,
            var(Tensor::zeros(2, DType::F32, &Device::Cpu)?)?,
        ];
        let t = |i: usize| vars[i].as_tensor().clone();
        Ok(Net {
            conv1: Conv2d::new(t(0), Some(t(1)), Conv2dConfig { padding: 1, stride: 2, ..Default::default() }),
            conv2: Conv2d::new(t(2), Some(t(3)), Conv2dConfig { padding: 1, ..Default::default() }),
            fc: Linear::new(t(4), Some(t(5))),
            vars,
        })
    }

    /// Input to the explained layer's activations.
    ///
    /// # Shapes
    /// `[n, 3, 32, 32]` -> `[n, 32, 16, 16]`.
    fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.features_with(x, Rule::Exact)
    }

    /// [`Net::features`] with the ReLUs' backward following `rule`: gradcam's ReLUs can follow
    /// Guided Backpropagation's rule (candle's `relu` cannot), which the guided methods need.
    fn features_with(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        let x = Activation::Relu.forward_with(&self.conv1.forward(x)?, rule)?; // [n, 16, 16, 16]
        Activation::Relu.forward_with(&self.conv2.forward(&x)?, rule)
    }

    /// Activations to class scores: `[n, 32, 16, 16]` -> `[n, 2]`.
    fn head(&self, a: &Tensor) -> candle_core::Result<Tensor> {
        self.fc.forward(&a.mean((2, 3))?)
    }
}

/// A method of your own: occlusion (Zeiler & Fergus 2014). The map is the drop of the target's
/// score when a `patch` x `patch` square of the input is set to 0, on a grid `stride` apart: one
/// batched forward of every occluded copy. Given to `Cam::method`, it runs through the same
/// pipeline as the built-in methods (targets, counterfactuals, pictures).
struct Occlusion {
    patch: usize,
    stride: usize,
}

impl Explainer for Occlusion {
    fn name(&self) -> &'static str {
        "occlusion"
    }

    fn explain(&self, cx: &Context<'_>, requests: &[Request<'_>]) -> gradcam::Result<Vec<Explanation>> {
        let (_, c, h, w) = cx.input.dims4()?;
        let (rows, cols) = ((h - self.patch) / self.stride + 1, (w - self.patch) / self.stride + 1);
        let mut explanations = Vec::with_capacity(requests.len());
        for r in requests {
            let image = cx.input.get(r.image)?.flatten_all()?.to_vec1::<f32>()?; // [c * h * w]
            let mut copies = Vec::with_capacity(rows * cols * image.len());
            for (i, j) in (0..rows).flat_map(|i| (0..cols).map(move |j| (i, j))) {
                let mut copy = image.clone();
                for (ch, y) in (0..c).flat_map(|ch| (i * self.stride..i * self.stride + self.patch).map(move |y| (ch, y))) {
                    let row = ch * h * w + y * w + j * self.stride;
                    copy[row..row + self.patch].fill(0.0);
                }
                copies.extend(copy);
            }
            let copies = Tensor::from_vec(copies, (rows * cols, c, h, w), cx.input.device())?;
            let scores = cx.model.forward_with(&copies, Rule::Exact)?; // [rows * cols, classes]
            let base = r.target.score(&cx.model.forward_with(&cx.input.narrow(0, r.image, 1)?, Rule::Exact)?.get(0)?)?.to_scalar::<f32>()?;
            let drops = (0..rows * cols).map(|k| Ok((base - r.target.score(&scores.get(k)?)?.to_scalar::<f32>()?).max(0.0))).collect::<gradcam::Result<Vec<f32>>>()?;
            let score = if r.target.is_counterfactual() { -base } else { base };
            explanations.push(Explanation::new(self.name(), r, score, Map::new(rows, cols, drops), None)?);
        }
        Ok(explanations)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gradcam-out/examples/custom_model"));
    std::fs::create_dir_all(&out)?;
    let mut rng = Lcg(7);
    let net = Net::new(&mut rng)?;

    // Train: 200 steps of 32 images.
    let mut opt = candle_nn::AdamW::new(net.vars.clone(), candle_nn::ParamsAdamW { lr: 1e-2, ..Default::default() })?;
    for step in 0..200 {
        let (x, y, _) = batch(&mut rng, 32)?;
        let loss = candle_nn::loss::cross_entropy(&net.head(&net.features(&x)?)?, &y)?;
        opt.backward_step(&loss)?;
        if step % 50 == 49 {
            println!("step {:>3}: loss {:.4}", step + 1, loss.to_scalar::<f32>()?);
        }
    }
    let (x, y, corners) = batch(&mut rng, 200)?;
    let predicted = net.head(&net.features(&x)?)?.argmax(D::Minus1)?;
    let accuracy = predicted.eq(&y)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
    println!("accuracy on 200 new images: {accuracy:.3}");

    // The network as gradcam sees it: two closures, and the whole network with guided ReLUs for
    // the guided methods.
    let model = Split::new(|x: &Tensor| net.features(x), |a: &Tensor| net.head(a)).guided(|x: &Tensor| net.head(&net.features_with(x, Rule::Guided)?));

    // Grad-CAM by hand, from candle's backward, for the first test image's class.
    let image = x.get(0)?.unsqueeze(0)?;
    let class = y.to_vec1::<u32>()?[0] as usize;
    let a = Var::from_tensor(&net.features(&image)?.detach())?;
    let grads = net.head(a.as_tensor())?.get(0)?.get(class)?.backward()?;
    let alpha = grads.get(a.as_tensor()).ok_or("no gradient")?.mean((2, 3))?; // [1, 32]
    let by_hand = a.as_tensor().broadcast_mul(&alpha.unsqueeze(2)?.unsqueeze(3)?)?.sum(1)?.relu()?.flatten_all()?.to_vec1::<f32>()?;
    let ours = &Cam::new(&model).explain(&image, &[Target::class(class)])?[0];
    let worst = ours.map.iter().zip(&by_hand).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("Grad-CAM against the hand computation: largest difference {worst:.2e}");
    if !(worst <= 1e-5) {
        return Err(format!("Grad-CAM differs from the hand computation by {worst}").into());
    }

    // Every method; where does each map peak, against where the square is?
    let (y0, x0) = corners[0];
    let rgb = image::RgbImage::from_fn(SIDE as u32, SIDE as u32, |px, py| {
        let v = |c: usize| (x.get(0).and_then(|t| t.get(c)?.get(py as usize)?.get(px as usize)?.to_scalar::<f32>()).unwrap_or(0.0) * 255.0) as u8;
        image::Rgb([v(0), v(1), v(2)])
    });
    println!("image 0: {} square at rows {y0}..{}, columns {x0}..{}", ["red", "blue"][class], y0 + 8, x0 + 8);
    let activations = model.features(&image)?;
    for method in Method::ALL {
        let e = &Cam::new(&model).method(method).explain_with(&image, &activations, &[(0, Target::class(class))])?[0];
        let (py, px) = e.cam().normalized().0.resize_bilinear(SIDE, SIDE).argmax();
        let on_square = (y0..y0 + 8).contains(&py) && (x0..x0 + 8).contains(&px);
        let file = out.join(format!("{method}.png"));
        let big = image::imageops::resize(&e.picture(&rgb, gradcam::map::Region { x: 0, y: 0, width: 32, height: 32 })?, 128, 128, image::imageops::FilterType::Nearest);
        big.save(&file)?;
        println!("  {:<16} peak at ({py:>2}, {px:>2}) {}  wrote {}", method.name(), if on_square { "on the square " } else { "off the square" }, file.display());
    }

    // A method of your own goes to Cam exactly as the built-in ones do.
    let e = &Cam::new(&model).method(Occlusion { patch: 8, stride: 4 }).explain(&image, &[Target::class(class)])?[0];
    let (py, px) = e.cam().normalized().0.resize_bilinear(SIDE, SIDE).argmax();
    let on_square = (y0..y0 + 8).contains(&py) && (x0..x0 + 8).contains(&px);
    let file = out.join("occlusion.png");
    image::imageops::resize(&e.overlay(&image::DynamicImage::ImageRgb8(rgb)), 128, 128, image::imageops::FilterType::Nearest).save(&file)?;
    println!("  {:<16} peak at ({py:>2}, {px:>2}) {}  wrote {}", e.method, if on_square { "on the square " } else { "off the square" }, file.display());
    Ok(())
}
