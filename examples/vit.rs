//! Grad-CAM and attention relevance for a vision transformer of your own: a small ViT written
//! here with candle (patch embedding, class token, pre-norm blocks), seeded weights, explained at
//! the last block's attention input (its first LayerNorm's output, the layer pytorch-grad-cam's
//! users pick for ViTs) with Grad-CAM, and from its attention with rollout and relevance.
//!
//! ```sh
//! cargo run --release --example vit [OUT_DIR]
//! ```
//!
//! The layer's activations are tokens `[1, 1 + 4*4, 16]`, not a grid: `features` returns each
//! image's row (the tokens flattened, then the residual stream the block adds its attention to,
//! which the head reads too) and `Layout::tokens` tells `Cam` where the 4 x 4 grid lies in it.
//! The example checks the crate's Grad-CAM against a hand computation from candle's backward.

use std::path::PathBuf;

use candle_core::{Device, Tensor, Var, D};
use gradcam::ops::softmax_last;
use gradcam::{Cam, Explainable, Layout, Method, Split, Target};

const SIDE: usize = 32;
const PATCH: usize = 8;
const DIM: usize = 16;
const HEADS: usize = 2;
const BLOCKS: usize = 2;
const CLASSES: usize = 3;
const GRID: usize = SIDE / PATCH;
const TOKENS: usize = 1 + GRID * GRID;

/// A deterministic stream for the weights and the image.
struct Lcg(u64);

impl Lcg {
    fn tensor(&mut self, shape: &[usize], scale: f32) -> candle_core::Result<Tensor> {
        let data: Vec<f32> = (0..shape.iter().product())
            .map(|_| {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }
}

/// LayerNorm over the last axis with plain ops (candle's fused one has no backward).
fn layer_norm(x: &Tensor) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    centred.broadcast_div(&(centred.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)
}

struct Block {
    qkv: Tensor,
    proj: Tensor,
    fc1: Tensor,
    fc2: Tensor,
}

impl Block {
    /// Attention on the normalised tokens `n1` (`[n, T, D]`), added to the residual `x`, then
    /// the MLP; `attend` sees the attention probabilities `[n, heads, T, T]`.
    fn forward(&self, n1: &Tensor, x: &Tensor, attend: &dyn Fn(Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        let (n, t, _) = n1.dims3()?;
        let qkv = n1.broadcast_matmul(&self.qkv)?.reshape((n, t, 3, HEADS, DIM / HEADS))?.permute((2, 0, 3, 1, 4))?; // [3, n, heads, T, d]
        let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? / ((DIM / HEADS) as f64).sqrt())?;
        let a = attend(softmax_last(&scores)?)?; // [n, heads, T, T]
        let mixed = a.matmul(&v)?.transpose(1, 2)?.reshape((n, t, DIM))?;
        let x = (x + mixed.broadcast_matmul(&self.proj)?)?;
        let hidden = layer_norm(&x)?.broadcast_matmul(&self.fc1)?.gelu_erf()?;
        x + hidden.broadcast_matmul(&self.fc2)?
    }
}

struct Vit {
    patch: Tensor,
    cls: Tensor,
    pos: Tensor,
    blocks: Vec<Block>,
    head: Tensor,
}

impl Vit {
    fn new(rng: &mut Lcg) -> candle_core::Result<Self> {
        let s = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let blocks = (0..BLOCKS)
            .map(|_| Ok(Block { qkv: rng.tensor(&[DIM, 3 * DIM], s(DIM))?, proj: rng.tensor(&[DIM, DIM], s(DIM))?, fc1: rng.tensor(&[DIM, 2 * DIM], s(DIM))?, fc2: rng.tensor(&[2 * DIM, DIM], s(2 * DIM))? }))
            .collect::<candle_core::Result<_>>()?;
        Ok(Vit { patch: rng.tensor(&[DIM, 3, PATCH, PATCH], s(3 * PATCH * PATCH))?, cls: rng.tensor(&[1, 1, DIM], 0.5)?, pos: rng.tensor(&[1, TOKENS, DIM], 0.5)?, blocks, head: rng.tensor(&[DIM, CLASSES], s(DIM))? })
    }

    /// The tokens entering block `b`: `[n, T, D]`.
    fn tokens(&self, x: &Tensor, b: usize, attend: &dyn Fn(Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let patches = x.conv2d(&self.patch, 0, PATCH, 1, 1)?.flatten_from(2)?.transpose(1, 2)?; // [n, 16, D]
        let mut t = Tensor::cat(&[self.cls.broadcast_as((n, 1, DIM))?, patches], 1)?.broadcast_add(&self.pos)?;
        for block in &self.blocks[..b] {
            t = block.forward(&layer_norm(&t)?, &t, attend)?;
        }
        Ok(t)
    }

    /// Logits from block `b`'s normalised tokens and its residual input.
    fn head_from(&self, n1: &Tensor, x: &Tensor, b: usize, attend: &dyn Fn(Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        let mut t = self.blocks[b].forward(n1, x, attend)?;
        for block in &self.blocks[b + 1..] {
            t = block.forward(&layer_norm(&t)?, &t, attend)?;
        }
        layer_norm(&t)?.get_on_dim(1, 0)?.matmul(&self.head) // the class token: [n, classes]
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("gradcam-out/examples/vit"));
    std::fs::create_dir_all(&out)?;
    let mut rng = Lcg(42);
    let vit = std::sync::Arc::new(Vit::new(&mut rng)?);
    let image = rng.tensor(&[1, 3, SIDE, SIDE], 1.0)?;
    let last = BLOCKS - 1;
    let keep = |a: Tensor| Ok(a);
    // Each image's row: LayerNorm(tokens) of the last block, then the tokens themselves.
    let (v1, v2, v3) = (vit.clone(), vit.clone(), vit.clone());
    let split = Split::new(
        move |x: &Tensor| {
            let t = v1.tokens(x, last, &keep)?;
            Tensor::cat(&[layer_norm(&t)?.flatten_from(1)?, t.flatten_from(1)?], 1)
        },
        move |row: &Tensor| {
            let n = row.dim(0)?;
            let (n1, x) = (row.narrow(1, 0, TOKENS * DIM)?.reshape((n, TOKENS, DIM))?, row.narrow(1, TOKENS * DIM, TOKENS * DIM)?.reshape((n, TOKENS, DIM))?);
            v2.head_from(&n1, &x, last, &keep)
        },
    )
    .layout(Layout::tokens(1, GRID, GRID, DIM))
    .attention(move |x, attend| {
        let t = v3.tokens(x, 0, attend)?;
        v3.head_from(&layer_norm(&t)?, &t, 0, attend)
    });

    // The input as a picture (values in [-1, 1]), for the overlays.
    let pixels = image.squeeze(0)?.to_vec3::<f32>()?;
    let rgb = image::RgbImage::from_fn(SIDE as u32, SIDE as u32, |x, y| image::Rgb([0, 1, 2].map(|c| ((pixels[c][y as usize][x as usize] + 1.0) * 127.5) as u8)));
    let logits = split.head(&split.features(&image)?)?.squeeze(0)?.to_vec1::<f32>()?;
    let class = (0..CLASSES).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap_or(0);
    println!("logits {logits:?}: class {class}");
    for method in [Method::GradCam, Method::Rollout, Method::Relevance] {
        let e = Cam::new(&split).method(method).explain(&image, &[Target::class(class)])?.remove(0);
        println!("{method}: {}x{} map", e.map_size.0, e.map_size.1);
        for row in e.map.chunks(e.map_size.1) {
            println!("  {}", row.iter().map(|v| format!("{v:7.4}")).collect::<Vec<_>>().join(" "));
        }
        let path = out.join(format!("{method}.png"));
        image::imageops::resize(&e.overlay(&image::DynamicImage::ImageRgb8(rgb.clone())), 128, 128, image::imageops::FilterType::Nearest).save(&path)?;
        println!("wrote {}", path.display());
        if method == Method::GradCam {
            // By hand: the gradient of the class logit at the grid tokens, averaged per channel.
            let row = split.features(&image)?;
            let var = Var::from_tensor(&row)?;
            let grads = split.head(var.as_tensor())?.get(0)?.get(class)?.backward()?;
            let g = grads.get(var.as_tensor()).expect("a gradient").narrow(1, DIM, GRID * GRID * DIM)?.reshape((GRID * GRID, DIM))?;
            let a = row.narrow(1, DIM, GRID * GRID * DIM)?.reshape((GRID * GRID, DIM))?;
            let alpha = g.mean(0)?; // [D]
            let map = a.broadcast_mul(&alpha)?.sum(1)?.relu()?.to_vec1::<f32>()?;
            let worst = map.iter().zip(&e.map).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            println!("Grad-CAM against the hand computation: largest difference {worst:.2e}");
            if worst > 1e-5 {
                return Err(format!("the crate's Grad-CAM differs from the hand computation by {worst}").into());
            }
        }
    }
    Ok(())
}
