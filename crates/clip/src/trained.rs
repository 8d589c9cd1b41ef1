//! The trained model of a folder (`config.json` with `"kind": "clip"`, `tokenizer.json`,
//! `model.safetensors`), and its image tower split at a block's attention input.

use std::path::Path;

use candle_core::{Device, Tensor};
use gradcam_core::{Explainable, Layout};
use gradcam_scenes::vocab::Vocab;

use crate::model::{normalize, Attend, Clip, Config, Vision};
use crate::text::{encode, Encoded};
use crate::train::batch_tokens;
use crate::{Error, Result};

/// A trained CLIP and its vocabulary.
pub struct Trained {
    pub clip: Clip,
    pub vocab: Vocab,
}

impl Trained {
    /// Loads `dir/{config.json, tokenizer.json, model.safetensors}`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let cfg: Config = serde_json::from_str(&text).map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        cfg.check().map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let vocab = Vocab::load(&dir.join("tokenizer.json"))?;
        if vocab.len() != cfg.vocab_size {
            return Err(gradcam_encoders::Error::VocabSize { tokenizer: vocab.len(), config: cfg.vocab_size }.into());
        }
        let vb = gradcam_encoders::scene_cnn::model_weights(dir)?;
        let clip = Clip::new(&cfg, vb).map_err(|e| gradcam_encoders::Error::ModelWeights { file: dir.join("model.safetensors"), source: Box::new(e) })?;
        Ok(Trained { clip, vocab })
    }

    /// The image as the image tower's input, `[3, S, S]` in [-1, 1] (resized when it is not S x S).
    pub fn preprocess(&self, img: &image::RgbImage) -> Result<Tensor> {
        Ok(gradcam_encoders::scene_cnn::SceneCnn::preprocess(img, self.clip.cfg.image_size as u32)?)
    }

    /// The texts, encoded, and their normalised embeddings `[n, E]`; an empty text is an error
    /// naming its position.
    pub fn encode_texts(&self, texts: &[String]) -> Result<(Tensor, Vec<Encoded>)> {
        let encoded = texts
            .iter()
            .enumerate()
            .map(|(i, t)| encode(&self.vocab, t, self.clip.cfg.context_length).map_err(|e| if let Error::EmptyText { .. } = e { Error::EmptyText { index: i } } else { e }))
            .collect::<Result<Vec<_>>>()?;
        let (ids, lengths) = batch_tokens(&encoded.iter().collect::<Vec<_>>(), self.vocab.pad)?;
        Ok((normalize(&self.clip.text.forward(&ids, &lengths)?)?, encoded))
    }

    /// The explainable layers, first to last: each block's attention input.
    pub fn layers(&self) -> Vec<String> {
        (0..self.clip.cfg.layers).map(|i| format!("visual.blocks.{i}.norm1")).collect()
    }

    /// The block whose attention input `name` is; `None`: the last block's.
    pub fn block(&self, name: Option<&str>) -> Result<usize> {
        let layers = self.layers();
        match name {
            None => Ok(layers.len() - 1),
            Some(n) => layers.iter().position(|l| l == n).ok_or_else(|| Error::Model(format!("no layer {n:?}; the model's layers: {}", layers.join(", ")))),
        }
    }

    /// The image tower split at block `block`'s attention input: its head gives the image
    /// embedding.
    pub fn image_split(&self, block: usize) -> VisionSplit<'_> {
        VisionSplit::new(&self.clip.vision, block, self.clip.cfg.grid(), self.clip.cfg.width)
    }

    /// The normalised image embeddings `[b, E]` of images `[b, 3, S, S]`.
    pub fn encode_images(&self, images: &Tensor) -> Result<Tensor> {
        normalize(&self.clip.vision.forward(images, None)?)
    }

    /// The CPU device the model runs on.
    pub fn device(&self) -> Device {
        Device::Cpu
    }
}

/// The image tower split at a block's attention input `h = norm1(x)`: the features are a row per
/// image holding `h` (the class token, then the grid channels-last) and the block's residual
/// input `x`; the head runs the rest of the tower from both and gives the image embedding.
pub struct VisionSplit<'a> {
    vision: &'a Vision,
    block: usize,
    grid: usize,
    width: usize,
}

impl<'a> VisionSplit<'a> {
    pub(crate) fn new(vision: &'a Vision, block: usize, grid: usize, width: usize) -> Self {
        VisionSplit { vision, block, grid, width }
    }

    fn tokens(&self) -> usize {
        1 + self.grid * self.grid
    }
}

impl Explainable for VisionSplit<'_> {
    fn features(&self, input: &Tensor) -> gradcam_core::Result<Tensor> {
        (|| -> Result<Tensor> {
            let mut x = self.vision.tokens(input)?;
            for blk in &self.vision.blocks[..self.block] {
                x = blk.forward(&x, None, None)?;
            }
            let h = self.vision.blocks[self.block].ln1.forward(&x)?;
            Ok(Tensor::cat(&[h.flatten_from(1)?, x.flatten_from(1)?], 1)?)
        })()
        .map_err(gradcam_core::Error::from)
    }

    fn head(&self, a: &Tensor) -> gradcam_core::Result<Tensor> {
        (|| -> Result<Tensor> {
            let (n, t, w) = (a.dim(0)?, self.tokens(), self.width);
            let h = a.narrow(1, 0, t * w)?.reshape((n, t, w))?;
            let x = a.narrow(1, t * w, t * w)?.reshape((n, t, w))?;
            let mut x = self.vision.blocks[self.block].forward_from(&x, &h, None, None)?;
            for blk in &self.vision.blocks[self.block + 1..] {
                x = blk.forward(&x, None, None)?;
            }
            self.vision.pool(&x)
        })()
        .map_err(gradcam_core::Error::from)
    }

    fn layout(&self) -> Layout {
        Layout::tokens(1, self.grid, self.grid, self.width)
    }

    fn attention(&self, input: &Tensor, score: Option<gradcam_core::attention::ScoreFn<'_>>) -> gradcam_core::Result<gradcam_core::Attention> {
        let run = |x: &Tensor, attend: Attend| -> candle_core::Result<Tensor> { self.vision.forward(x, Some(attend)).map_err(|e| candle_core::Error::Msg(e.to_string())) };
        gradcam_core::attention::record(input, score, 1, (self.grid, self.grid), &run)
    }
}
