//! Any CLIP exported as a pair of ONNX files (`scripts/export_clip.py` writes one from an
//! open_clip or Hugging Face model): `config.json` `{"image_size", "mean", "std",
//! "context_length", "pad_id", "image", "text", "tokenizer"}`, `image.onnx` (pixels
//! `[1, 3, S, S]` to the image embedding), `text.onnx` (int64 `input_ids` `[1, L]` to the text
//! embedding) and a Hugging Face `tokenizer.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use gradcam_encoders::onnx::{OnnxFunction, OnnxModel, OnnxOptions};
use gradcam_encoders::Network;
use serde::Deserialize;

use crate::{Error, Result};

/// `config.json` of an ONNX pair.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PairConfig {
    pub image_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub context_length: usize,
    pub pad_id: u32,
    pub image: String,
    pub text: String,
    pub tokenizer: String,
}

/// A text as the pair's tokenizer gives it, padded to the context length.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    /// Whether the text was cut to the context length (its end token kept).
    pub truncated: bool,
}

/// A loaded ONNX pair.
pub struct OnnxPair {
    pub cfg: PairConfig,
    image: Arc<OnnxModel>,
    text: OnnxFunction,
    tokenizer: tokenizers::Tokenizer,
    /// The id the tokenizer ends every text with.
    end: u32,
}

fn file(dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if Path::new(name).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(Error::Model(format!("{}: the {what} file {name:?} must be a name inside the model folder", dir.join("config.json").display())));
    }
    if !path.is_file() {
        return Err(Error::Model(format!("{}: no {what} file {name:?} (config.json names it)", dir.display())));
    }
    Ok(path)
}

impl OnnxPair {
    /// Loads the folder `dir`, checking every file and that the towers share an embedding size.
    pub fn load(dir: &Path, cfg: PairConfig) -> Result<Self> {
        let s = cfg.image_size;
        if !(8..=4096).contains(&s) || !(2..=4096).contains(&cfg.context_length) || cfg.std.iter().any(|v| !(v.is_finite() && *v > 0.0)) || cfg.mean.iter().any(|v| !v.is_finite()) {
            return Err(Error::Model(format!("{}: image_size must be 8 to 4096, context_length 2 to 4096, mean finite and std positive", dir.join("config.json").display())));
        }
        let options = OnnxOptions { mean: Some(cfg.mean), std: Some(cfg.std), input_size: Some((s, s)), ..Default::default() };
        let image = Arc::new(OnnxModel::load(&file(dir, &cfg.image, "image tower")?, &options)?);
        let text = OnnxFunction::load(&file(dir, &cfg.text, "text tower")?)?;
        let (name, elem, shape) = text.input();
        if elem != 7 {
            return Err(Error::Model(format!("{}: the text tower's input {name:?} is not int64 token ids (ONNX type {elem})", cfg.text)));
        }
        if let Some(&[_, Some(l)]) = shape {
            if l != cfg.context_length {
                return Err(Error::Model(format!("{}: the text tower takes {l} tokens but config.json says context_length {}", cfg.text, cfg.context_length)));
            }
        }
        let tok_path = file(dir, &cfg.tokenizer, "tokenizer")?;
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::Model(format!("{}: not a tokenizers file: {e}", tok_path.display())))?;
        // The end token: what two different texts both end with.
        let last = |t: &str| -> Result<Option<u32>> { Ok(tokenizer.encode(t, true).map_err(|e| Error::Model(format!("{}: {e}", tok_path.display())))?.get_ids().last().copied()) };
        let end = match (last("a")?, last("b")?) {
            (Some(x), Some(y)) if x == y => x,
            _ => return Err(Error::Model(format!("{}: the tokenizer adds no end token (texts end with their own last word); CLIP's text tower pools at the end token", tok_path.display()))),
        };
        let pair = OnnxPair { cfg, image, text, tokenizer, end };
        let (e_img, e_txt) = (pair.image.num_classes(), pair.encode(&pair.tokens("a")?)?.dim(1)?);
        if e_img != e_txt {
            return Err(Error::Model(format!("{}: the image embedding has {e_img} values and the text embedding {e_txt}; the towers do not share a space", dir.display())));
        }
        Ok(pair)
    }

    /// The text's ids, cut to the context length (the end token kept) and padded.
    pub fn tokens(&self, text: &str) -> Result<Tokens> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| Error::Model(format!("tokenizer: {e}")))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        let l = self.cfg.context_length;
        let truncated = ids.len() > l;
        if truncated {
            ids.truncate(l - 1);
            ids.push(self.end as i64);
        }
        ids.resize(l, self.cfg.pad_id as i64);
        Ok(Tokens { ids, truncated })
    }

    /// The text embedding `[1, E]` (not normalised).
    pub fn encode(&self, t: &Tokens) -> Result<Tensor> {
        let ids = Tensor::from_vec(t.ids.clone(), (1, t.ids.len()), &Device::Cpu)?;
        let e = self.text.run(&ids)?.to_dtype(DType::F32)?.flatten_from(1)?;
        if e.to_vec2::<f32>()?.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::Model(format!("{}: the text embedding is not finite; are the weights corrupt?", self.cfg.text)));
        }
        Ok(e)
    }

    /// The image tower split at `layer` (default: the last block's attention input).
    pub fn network(&self, layer: Option<&str>) -> Result<Network> {
        Ok(self.image.network(layer)?)
    }

    /// The image tower.
    pub fn image(&self) -> &Arc<OnnxModel> {
        &self.image
    }
}
