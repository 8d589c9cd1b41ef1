//! A small CLIP (Radford et al. 2021): a vision transformer over 8 x 8 patches and a text
//! transformer over words, each projected to a joint space where the cosine similarity of the
//! L2-normalised embeddings says how well a text matches an image. The same code trains (its
//! tensors are `Var`s of a `VarMap`) and explains (its tensors loaded from `model.safetensors`);
//! every op is a plain candle op with a backward, checked against finite differences in the tests.

use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `config.json` of a trained model (`"kind": "clip"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    /// Always `clip`: tells this folder from an ONNX pair's (which names its files instead).
    pub kind: String,
    /// Image side in pixels (square input).
    pub image_size: usize,
    /// Patch side: the token grid is `image_size / patch` on a side.
    pub patch: usize,
    /// Image tower: token width, blocks, heads.
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Text tower: token width, blocks, heads.
    pub text_width: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    /// Tokens of a text, start and end tokens included; longer texts are cut (end token kept).
    pub context_length: usize,
    /// Words of tokenizer.json.
    pub vocab_size: usize,
    /// Width of the joint space.
    pub embed: usize,
}

impl Config {
    pub fn new(vocab_size: usize) -> Self {
        Config { kind: "clip".into(), image_size: 64, patch: 8, width: 96, layers: 4, heads: 4, text_width: 64, text_layers: 2, text_heads: 4, context_length: 16, vocab_size, embed: 64 }
    }

    /// Cells on a side of the token grid.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }

    /// Refuses shapes that cannot be built.
    pub fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Model(format!("config.json: {what}")));
        if self.kind != "clip" {
            return bad(&format!("kind {:?} is not \"clip\"", self.kind));
        }
        if self.patch == 0 || self.image_size % self.patch != 0 || !(8..=512).contains(&self.image_size) {
            return bad(&format!("image_size {} is not a multiple of patch {} between 8 and 512", self.image_size, self.patch));
        }
        for (name, w, h) in [("width", self.width, self.heads), ("text_width", self.text_width, self.text_heads)] {
            if h == 0 || w == 0 || w % h != 0 || w > 4096 {
                return bad(&format!("{name} {w} is not a multiple of its heads {h} (at most 4096)"));
            }
        }
        if self.layers == 0 || self.text_layers == 0 || self.layers > 64 || self.text_layers > 64 {
            return bad("layers and text_layers must be 1 to 64");
        }
        if !(3..=512).contains(&self.context_length) || self.vocab_size < 5 || self.embed == 0 || self.embed > 4096 {
            return bad("context_length must be 3 to 512, vocab_size at least 5, embed 1 to 4096");
        }
        Ok(())
    }
}

/// Layer normalisation over the last dimension, in plain ops (candle's fused one has no backward).
#[derive(Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")? })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// `x W^T + b` over the last dimension of `x` (any rank).
#[derive(Clone)]
pub(crate) struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(vb: VarBuilder, inp: usize, out: usize, bias: bool) -> Result<Self> {
        let weight_t = vb.get((out, inp), "weight")?.t()?;
        let bias = if bias { Some(vb.get(out, "bias")?) } else { None };
        Ok(Self { weight_t, bias })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows = x.elem_count() / inp.max(1);
        let y = x.reshape((rows, inp))?.matmul(&self.weight_t)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = y.dim(1)?;
        Ok(y.reshape(out)?)
    }
}

/// What sees each block's attention probabilities `[b, heads, T, T]` and gives the ones used.
pub type Attend<'a> = &'a dyn Fn(Tensor) -> candle_core::Result<Tensor>;

/// A pre-norm transformer block: `x + attn(ln1(x))`, then `+ mlp(ln2(x))` (GELU).
#[derive(Clone)]
pub(crate) struct Block {
    pub(crate) ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn new(vb: VarBuilder, width: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(vb.pp("norm1"), width)?,
            qkv: Linear::new(vb.pp("attn.qkv"), width, 3 * width, true)?,
            proj: Linear::new(vb.pp("attn.proj"), width, width, true)?,
            ln2: LayerNorm::new(vb.pp("norm2"), width)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), width, 4 * width, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), 4 * width, width, true)?,
            heads,
        })
    }

    /// The block from its residual input `x` (`[b, T, W]`).
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>, attend: Option<Attend>) -> Result<Tensor> {
        self.forward_from(x, &self.ln1.forward(x)?, mask, attend)
    }

    /// The block from its residual input `x` and the attention's input `h = ln1(x)`, given apart
    /// (the explained layer is `h`).
    ///
    /// # Shapes
    /// `x`, `h`: `[b, T, W]`; `mask`: `[b, 1, 1, T]` added to the attention logits.
    pub(crate) fn forward_from(&self, x: &Tensor, h: &Tensor, mask: Option<&Tensor>, attend: Option<Attend>) -> Result<Tensor> {
        let (b, t, w) = x.dims3()?;
        let d = w / self.heads;
        let qkv = self.qkv.forward(h)?.reshape((b, t, 3, self.heads, d))?.permute((2, 0, 3, 1, 4))?; // [3, b, H, T, d]
        let (q, k, v) = (qkv.i(0)?.contiguous()?, qkv.i(1)?.contiguous()?, qkv.i(2)?.contiguous()?);
        let logits = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let logits = match mask {
            Some(m) => logits.broadcast_add(m)?,
            None => logits,
        };
        let mut p = candle_nn::ops::softmax(&logits, D::Minus1)?;
        if let Some(attend) = attend {
            p = attend(p)?;
        }
        let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, w))?;
        let x = (x + self.proj.forward(&o)?)?;
        let m = self.fc2.forward(&self.fc1.forward(&self.ln2.forward(&x)?)?.gelu_erf()?)?;
        Ok((x + m)?)
    }
}

/// The image tower: patches, a class token, positions, `ln_pre`, blocks, `ln_post` on the class
/// token, projection.
#[derive(Clone)]
pub struct Vision {
    patch: Linear,
    class: Tensor,
    positions: Tensor,
    ln_pre: LayerNorm,
    pub(crate) blocks: Vec<Block>,
    ln_post: LayerNorm,
    proj: Tensor,
    size: usize,
    patch_side: usize,
}

impl Vision {
    fn new(vb: VarBuilder, c: &Config) -> Result<Self> {
        let (w, p, g) = (c.width, c.patch, c.grid());
        let pw = vb.pp("patch").get((w, 3, p, p), "weight")?;
        let patch = Linear { weight_t: pw.reshape((w, 3 * p * p))?.t()?, bias: Some(vb.pp("patch").get(w, "bias")?) };
        Ok(Self {
            patch,
            class: vb.get(w, "class_embedding")?,
            positions: vb.get((1 + g * g, w), "positional_embedding")?,
            ln_pre: LayerNorm::new(vb.pp("ln_pre"), w)?,
            blocks: (0..c.layers).map(|i| Block::new(vb.pp(format!("blocks.{i}")), w, c.heads)).collect::<Result<_>>()?,
            ln_post: LayerNorm::new(vb.pp("ln_post"), w)?,
            proj: vb.get((w, c.embed), "proj")?,
            size: c.image_size,
            patch_side: p,
        })
    }

    /// The residual stream entering block 0: `[b, 1 + g*g, W]` of images `[b, 3, S, S]`.
    pub(crate) fn tokens(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, s, s2) = images.dims4()?;
        if c != 3 || s != self.size || s2 != self.size {
            return Err(Error::Model(format!("the image tower takes [b, 3, {0}, {0}] images, got {1:?}", self.size, images.dims())));
        }
        let (p, g) = (self.patch_side, s / self.patch_side);
        let patches = images.reshape((b, 3, g, p, g, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, g * g, 3 * p * p))?;
        let x = self.patch.forward(&patches)?; // [b, g*g, W]
        let w = x.dim(2)?;
        let class = self.class.reshape((1, 1, w))?.broadcast_as((b, 1, w))?;
        let x = Tensor::cat(&[&class, &x], 1)?.broadcast_add(&self.positions.unsqueeze(0)?)?;
        self.ln_pre.forward(&x)
    }

    /// The embedding (not normalised) from the residual stream after the last block.
    pub(crate) fn pool(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.ln_post.forward(&x.i((.., 0))?)?.matmul(&self.proj)?)
    }

    /// Image embeddings `[b, E]` (not normalised).
    pub fn forward(&self, images: &Tensor, attend: Option<Attend>) -> Result<Tensor> {
        let mut x = self.tokens(images)?;
        for blk in &self.blocks {
            x = blk.forward(&x, None, attend)?;
        }
        self.pool(&x)
    }
}

/// The text tower: word embeddings and positions, blocks (padding masked out), `ln_final` at
/// the end token, projection.
#[derive(Clone)]
pub struct Text {
    embed: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
    proj: Tensor,
}

impl Text {
    fn new(vb: VarBuilder, c: &Config) -> Result<Self> {
        let w = c.text_width;
        Ok(Self {
            embed: vb.get((c.vocab_size, w), "token_embedding")?,
            positions: vb.get((c.context_length, w), "positional_embedding")?,
            blocks: (0..c.text_layers).map(|i| Block::new(vb.pp(format!("blocks.{i}")), w, c.text_heads)).collect::<Result<_>>()?,
            ln_final: LayerNorm::new(vb.pp("ln_final"), w)?,
            proj: vb.get((w, c.embed), "proj")?,
        })
    }

    /// Text embeddings `[n, E]` (not normalised) of token rows `[n, T]` (u32, `T` at most the
    /// context length) with `lengths[i]` real tokens each (start and end included; the rest is
    /// padding), pooled at each row's end token.
    pub fn forward(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (n, t) = ids.dims2()?;
        let w = self.embed.dim(1)?;
        let x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((n, t, w))?;
        let mut x = x.broadcast_add(&self.positions.narrow(0, 0, t)?.unsqueeze(0)?)?;
        let mask: Vec<f32> = lengths.iter().flat_map(|&l| (0..t).map(move |j| if j < l { 0.0 } else { -1e9 })).collect();
        let mask = Tensor::from_vec(mask, (n, 1, 1, t), ids.device())?;
        for blk in &self.blocks {
            x = blk.forward(&x, Some(&mask), None)?;
        }
        let ends = Tensor::new(lengths.iter().enumerate().map(|(i, &l)| (i * t + l.max(1) - 1) as u32).collect::<Vec<_>>(), ids.device())?;
        let pooled = x.reshape((n * t, w))?.index_select(&ends, 0)?;
        Ok(self.ln_final.forward(&pooled)?.matmul(&self.proj)?)
    }
}

/// Both towers and the learned temperature of training.
#[derive(Clone)]
pub struct Clip {
    pub cfg: Config,
    pub vision: Vision,
    pub text: Text,
    /// log of the training logit scale (similarities are multiplied by its exp in the loss).
    pub logit_scale: Tensor,
}

impl Clip {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        Ok(Self { cfg: cfg.clone(), vision: Vision::new(vb.pp("visual"), cfg)?, text: Text::new(vb.pp("text"), cfg)?, logit_scale: vb.get(1, "logit_scale")? })
    }

    /// Each parameter's name and shape: what `model.safetensors` holds.
    pub fn parameter_shapes(cfg: &Config) -> Result<Vec<(String, Vec<usize>)>> {
        let map = candle_nn::VarMap::new();
        Clip::new(cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
        let data = map.data().lock().map_err(|_| Error::Model("parameter map poisoned".into()))?;
        let mut v: Vec<(String, Vec<usize>)> = data.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        v.sort();
        Ok(v)
    }
}

/// Rows scaled to unit L2 norm.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)?)
}

/// Seeded initial values: layer norms at 1 and 0, biases 0, the class token, positions and word
/// embeddings normal-like with std 0.02, other matrices uniform in +-1/sqrt(fan in), the logit
/// scale at log(1 / 0.07) as CLIP starts.
pub fn init_parameters(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().map_err(|_| Error::Model("parameter map poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = gradcam_scenes::scene::Rng::new(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let leaf = name.rsplit('.').next().unwrap_or("");
        let norm = name.contains("norm") || name.contains("ln_");
        let values: Vec<f32> = if name == "logit_scale" {
            vec![(1.0f32 / 0.07).ln()]
        } else if leaf == "bias" {
            vec![0.0; n]
        } else if norm {
            vec![1.0; n]
        } else if leaf.contains("embed") {
            // Sum of 4 uniforms: close to normal, std 0.02.
            (0..n).map(|_| (0..4).map(|_| rng.range(-1.0, 1.0)).sum::<f32>() * 0.02 * (3.0f32 / 4.0).sqrt()).collect()
        } else {
            let fan_in = if leaf == "proj" { dims[0] } else { dims[1..].iter().product::<usize>().max(1) };
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.range(-bound, bound)).collect()
        };
        var.set(&Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?)?;
    }
    Ok(())
}
