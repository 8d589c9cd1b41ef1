//! A CLIP model folder of either kind, behind one interface: [`Matcher::load`] tells them apart
//! by `config.json` (`"kind": "clip"` for a trained model, `"image"` and `"text"` files for an
//! ONNX pair).

use std::path::Path;

use candle_core::Tensor;
use gradcam_core::map::Region;
use gradcam_core::Explainable;
use image::RgbImage;

use crate::model::normalize;
use crate::pair::{OnnxPair, PairConfig};
use crate::{Error, Result, Trained};

/// A CLIP model: ours, or an ONNX pair.
pub enum Matcher {
    Trained(Box<Trained>),
    Pair(Box<OnnxPair>),
}

/// How a text was read.
#[derive(Debug, Clone, PartialEq)]
pub struct TextInfo {
    /// The text as given.
    pub text: String,
    /// Whether it was cut to the model's context length.
    pub truncated: bool,
    /// Words the vocabulary lacks (the trained model's; read as `<unk>`).
    pub unknown: Vec<String>,
}

impl Matcher {
    /// Loads the model folder `dir`.
    pub fn load(dir: &Path) -> Result<Matcher> {
        let path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(Error::Model(format!("{}: not a folder; a CLIP model is a folder with config.json", dir.display())));
        }
        let text = std::fs::read_to_string(&path).map_err(|_| Error::Model(format!("{} has no config.json; a CLIP model folder holds config.json with either \"kind\": \"clip\" (gradcam train clip) or the files of an ONNX pair (scripts/export_clip.py)", dir.display())))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Model(format!("{}: not valid JSON: {e}", path.display())))?;
        if value.get("kind").and_then(|k| k.as_str()) == Some("clip") {
            return Ok(Matcher::Trained(Box::new(Trained::load(dir)?)));
        }
        if value.get("image").is_some() && value.get("text").is_some() {
            let cfg: PairConfig = serde_json::from_value(value).map_err(|e| Error::Model(format!("{}: {e} (an ONNX pair's config.json has image_size, mean, std, context_length, pad_id, image, text, tokenizer)", path.display())))?;
            return Ok(Matcher::Pair(Box::new(OnnxPair::load(dir, cfg)?)));
        }
        Err(Error::Model(format!("{}: neither a trained CLIP (\"kind\": \"clip\") nor an ONNX pair (\"image\" and \"text\" files)", path.display())))
    }

    /// The texts' normalised embeddings `[n, E]` and how each was read; an empty text is an error
    /// naming its position.
    pub fn encode_texts(&self, texts: &[String]) -> Result<(Tensor, Vec<TextInfo>)> {
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(Error::EmptyText { index: i });
        }
        match self {
            Matcher::Trained(m) => {
                let (e, enc) = m.encode_texts(texts)?;
                Ok((e, texts.iter().zip(enc).map(|(t, e)| TextInfo { text: t.clone(), truncated: e.truncated, unknown: e.unknown }).collect()))
            }
            Matcher::Pair(p) => {
                let mut rows = Vec::with_capacity(texts.len());
                let mut infos = Vec::with_capacity(texts.len());
                for t in texts {
                    let tokens = p.tokens(t)?;
                    rows.push(normalize(&p.encode(&tokens)?)?);
                    infos.push(TextInfo { text: t.clone(), truncated: tokens.truncated, unknown: Vec::new() });
                }
                Ok((Tensor::cat(&rows, 0)?, infos))
            }
        }
    }

    /// The image as the image tower's input `[1, 3, S, S]`, and the part of it the model sees.
    /// The trained model stretches the image to its size; an ONNX pair takes CLIP's centre crop
    /// (the shorter side's square, resized).
    pub fn prepare(&self, img: &RgbImage) -> Result<(Tensor, Region)> {
        let (w, h) = img.dimensions();
        match self {
            Matcher::Trained(m) => Ok((m.preprocess(img)?.unsqueeze(0)?, Region { x: 0, y: 0, width: w, height: h })),
            Matcher::Pair(p) => {
                let side = w.min(h);
                let region = Region { x: (w - side) / 2, y: (h - side) / 2, width: side, height: side };
                let s = p.cfg.image_size as u32;
                let crop = image::imageops::crop_imm(img, region.x, region.y, side, side).to_image();
                let crop = if side == s { crop } else { image::imageops::resize(&crop, s, s, image::imageops::FilterType::CatmullRom) };
                let pp = gradcam_encoders::preprocess::Preprocess { size: (s as usize, s as usize), mean: p.cfg.mean, std: p.cfg.std };
                let prepared = gradcam_encoders::preprocess::prepare_with(&crop, gradcam_encoders::preprocess::Resize::None, &pp)?;
                Ok((prepared.tensor.unsqueeze(0)?, region))
            }
        }
    }

    /// Runs `f` on the image tower split at `layer` (default: the last block's attention input),
    /// its head giving the image embedding, with the layer's name.
    pub fn with_image<R>(&self, layer: Option<&str>, f: impl FnOnce(&dyn Explainable, &str) -> R) -> Result<R> {
        match self {
            Matcher::Trained(m) => {
                let b = m.block(layer)?;
                Ok(f(&m.image_split(b), &m.layers()[b]))
            }
            Matcher::Pair(p) => {
                let net = p.network(layer)?;
                let name = net.default_layer().to_string();
                let index = net.layer_index(&name)?;
                Ok(f(&net.split(index), &name))
            }
        }
    }

    /// The layers `--layer` takes: the trained model's attention inputs; an ONNX pair's token values.
    pub fn layers(&self) -> Vec<String> {
        match self {
            Matcher::Trained(m) => m.layers(),
            Matcher::Pair(p) => p.image().values().into_iter().filter(|v| v.layout.is_some()).map(|v| v.name).collect(),
        }
    }

    /// `trained` or `onnx`.
    pub fn kind(&self) -> &'static str {
        match self {
            Matcher::Trained(_) => "trained",
            Matcher::Pair(_) => "onnx",
        }
    }
}
