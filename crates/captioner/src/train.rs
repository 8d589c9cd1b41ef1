//! Training on any COCO-captions dataset laid out as `DIR/{train,val}/` (captions.json +
//! instances.json + images/): AdamW, seeded shuffling and initialisation, validation each epoch,
//! a checkpoint each epoch, resume.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gradcam_scenes::Split;
pub use gradcam_train::{ExactMatch, Settings};
use gradcam_train::{at_least_one, not_negative};
use serde::{Deserialize, Serialize};

use crate::model::{init_parameters, Captioner, Config, Trainable};
use gradcam_scenes::vocab::Vocab;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs, learning rate, seed...; a batch is of images, each with all its captions.
    #[serde(flatten)]
    pub settings: Settings,
    /// Validation images decoded each epoch for the exact-match score.
    pub val_images: usize,
    /// Label smoothing of the word targets.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Weight of the auxiliary bag-of-words loss: from `conv4` alone, a linear head applied at
    /// every position and max-pooled over space predicts which words the image's captions use
    /// (binary cross-entropy per word; Oquab et al. 2015). It asks the encoder for units that
    /// say "red" or "circle" where the object is, as a classifier trained on image labels has,
    /// without any boxes or masks.
    #[serde(default)]
    pub word_loss: f64,
    /// LSTM hidden size of a new model. Explaining every word backpropagates through the decoder
    /// once per word, so its cost grows with the square of the caption length times this.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Weight of an L1 penalty on the `conv4` activations: units that fire only where they have
    /// something to say, rather than over the whole background.
    #[serde(default)]
    pub activation_l1: f64,
    /// The bag-of-words head also predicts word pairs ("blue circle") used by at least 10
    /// training images, asking for units that bind a colour to a shape.
    #[serde(default)]
    pub word_pairs: bool,
}

impl TrainConfig {
    /// Refuses settings that cannot train: the shared ones out of range (see
    /// [`Settings::check`]), a zero-width LSTM, weights and smoothing out of range.
    pub fn check(&self) -> Result<()> {
        self.settings.check()?;
        at_least_one("hidden", self.hidden)?;
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(gradcam_train::Error::setting("label_smoothing", self.label_smoothing, "in [0, 1)").into());
        }
        not_negative("word_loss", self.word_loss)?;
        Ok(not_negative("activation_l1", self.activation_l1)?)
    }
}

gradcam_train::settings_field!(TrainConfig);

fn default_hidden() -> usize {
    256
}

impl Default for TrainConfig {
    fn default() -> Self {
        let settings = Settings { epochs: 12, batch_size: 32, lr: 2e-3, weight_decay: 1e-4, seed: 0 };
        TrainConfig { settings, val_images: 200, label_smoothing: 0.0, word_loss: 0.0, hidden: default_hidden(), activation_l1: 0.0, word_pairs: false }
    }
}

/// What the progress callback hears.
pub type Event<'a> = gradcam_train::Event<'a, ExactMatch>;
/// One epoch's record.
pub type EpochLog = gradcam_train::EpochLog<ExactMatch>;
/// `checkpoint.json`: how far training got, to resume from.
pub type Checkpoint = gradcam_train::Checkpoint<TrainConfig, ExactMatch>;

/// Images as u8 `[3, s, s]` planes and each image's tokenised captions.
struct Data {
    size: usize,
    pixels: Vec<u8>,
    captions: Vec<Vec<Vec<u32>>>,
    /// Word pairs the bag-of-words head also predicts, with their output index after the words.
    bigrams: std::collections::BTreeMap<(u32, u32), usize>,
}

/// Adjacent word pairs used by at least `min_count` training images, numbered from `offset`.
fn bigram_vocab(captions: &[Vec<Vec<u32>>], min_count: usize, offset: usize) -> std::collections::BTreeMap<(u32, u32), usize> {
    let mut count: std::collections::BTreeMap<(u32, u32), usize> = Default::default();
    for caps in captions {
        let pairs: std::collections::BTreeSet<(u32, u32)> = caps.iter().flat_map(|c| c.windows(2).map(|w| (w[0], w[1]))).collect();
        for p in pairs {
            *count.entry(p).or_default() += 1;
        }
    }
    count.into_iter().filter(|&(_, n)| n >= min_count).map(|(p, _)| p).zip(offset..).collect()
}

/// A batch: images, caption rows, inputs, one-hot targets, the number of target words, and
/// which words each image's captions use (multi-hot `[b, vocab]`).
type Batch = (Tensor, Tensor, Tensor, Tensor, f32, Tensor);

impl Data {
    /// The split's images and captions, each caption cut to `max_len` words (the longest the
    /// model generates; a longer one would only cost memory and time).
    fn load(split: &Split, vocab: &Vocab, size: u32, max_len: usize) -> Result<Self> {
        let examples = split.examples();
        let s = size as usize;
        let mut pixels = Vec::with_capacity(examples.len() * 3 * s * s);
        let mut captions = Vec::with_capacity(examples.len());
        for ex in &examples {
            let img = gradcam_encoders::preprocess::load_image(&ex.path)?;
            let img = if img.dimensions() == (size, size) { img } else { image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle) };
            for c in 0..3 {
                pixels.extend(img.pixels().map(|p| p[c]));
            }
            captions.push(ex.captions.iter().map(|c| vocab.encode(c).map(|mut ids| {
                ids.truncate(max_len);
                ids
            })).collect::<std::result::Result<Vec<_>, _>>()?);
        }
        Ok(Data { size: s, pixels, captions, bigrams: Default::default() })
    }

    fn len(&self) -> usize {
        self.captions.len()
    }

    /// Images `[b, 3, s, s]`, caption rows, inputs and one-hot targets (zero rows for padding).
    fn batch(&self, ids: &[usize], vocab: &Vocab) -> Result<Batch> {
        let plane = 3 * self.size * self.size;
        let mut px = Vec::with_capacity(ids.len() * plane);
        for &i in ids {
            px.extend(self.pixels[i * plane..(i + 1) * plane].iter().map(|&v| v as f32 / 127.5 - 1.0));
        }
        let images = Tensor::from_vec(px, (ids.len(), 3, self.size, self.size), &Device::Cpu)?;
        let mut rows = Vec::new();
        let mut seqs: Vec<&Vec<u32>> = Vec::new();
        for (b, &i) in ids.iter().enumerate() {
            for c in &self.captions[i] {
                rows.push(b as u32);
                seqs.push(c);
            }
        }
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0) + 1;
        let v = vocab.len();
        let mut inputs = Vec::with_capacity(seqs.len() * t);
        let mut onehot = vec![0f32; seqs.len() * t * v];
        let mut count = 0.0;
        for (r, s) in seqs.iter().enumerate() {
            for p in 0..t {
                inputs.push(if p == 0 { vocab.start } else { s.get(p - 1).copied().unwrap_or(vocab.pad) });
                let target = if p < s.len() { Some(s[p]) } else if p == s.len() { Some(vocab.end) } else { None };
                if let Some(target) = target {
                    onehot[(r * t + p) * v + target as usize] = 1.0;
                    count += 1.0;
                }
            }
        }
        let n = seqs.len();
        let width = v + self.bigrams.len();
        let mut bag = vec![0f32; ids.len() * width];
        for (b, &i) in ids.iter().enumerate() {
            for c in &self.captions[i] {
                for &w in c {
                    bag[b * width + w as usize] = 1.0;
                }
                for pair in c.windows(2) {
                    if let Some(&j) = self.bigrams.get(&(pair[0], pair[1])) {
                        bag[b * width + j] = 1.0;
                    }
                }
            }
        }
        Ok((
            images,
            Tensor::new(rows.as_slice(), &Device::Cpu)?,
            Tensor::from_vec(inputs, (n, t), &Device::Cpu)?,
            Tensor::from_vec(onehot, (n, t, v), &Device::Cpu)?,
            count,
            Tensor::from_vec(bag, (ids.len(), width), &Device::Cpu)?,
        ))
    }
}

/// Mean negative log-likelihood of the target words, against targets smoothed by `smoothing`
/// (Szegedy et al. 2016): a model that never reaches p = 1 keeps informative word gradients.
/// Plus `word_loss` x the mean binary cross-entropy of the bag-of-words head.
fn loss(model: &Trainable, batch: &Batch, smoothing: f64, word_loss: f64, l1: f64) -> Result<Tensor> {
    let (images, rows, inputs, onehot, count, bag) = batch;
    let (logp, bag_logits, mean_activation) = model.forward(images, rows, inputs)?; // [n, t, V], [b, V]
    let target = if smoothing > 0.0 {
        let v = onehot.dim(2)? as f64;
        let valid = onehot.sum_keepdim(2)?; // [n, t, 1]: 1 on words, 0 on padding
        (onehot.affine(1.0 - smoothing, 0.0)? + valid.affine(smoothing / v, 0.0)?.broadcast_as(onehot.shape())?)?
    } else {
        onehot.clone()
    };
    let mut nll = ((logp * target)?.sum_all()? * (-1.0 / *count as f64))?;
    if l1 > 0.0 {
        nll = (nll + (mean_activation * l1)?)?;
    }
    match bag_logits {
        Some(z) if word_loss > 0.0 => {
            // BCE with logits, stably: max(z, 0) - z y + log(1 + exp(-|z|)).
            let bce = ((z.relu()? - (&z * bag)?)? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?;
            Ok((nll + (bce * word_loss)?)?)
        }
        _ => Ok(nll),
    }
}

/// Trains a captioner on `data/train`, validating on `data/val`, writing the model to `out`
/// (config.json, tokenizer.json, model.safetensors, checkpoint.json) after every epoch. With
/// `resume`, continues from `out/checkpoint.json` (weights and epoch; AdamW's moments restart).
pub fn train(data: &Path, out: &Path, tc: &TrainConfig, resume: bool, progress: &mut dyn FnMut(Event)) -> Result<Checkpoint> {
    tc.check()?;
    let resumed = if resume { Some(Checkpoint::resume(out, tc.settings.epochs)?) } else { None };
    gradcam_io::create_dir_all(out)?;
    let train_split = Split::read(&data.join("train"))?;
    let val_split = Split::read(&data.join("val"))?;
    let captions = train_split.captions("the captioner trains on captions")?;
    val_split.captions("the captioner is validated on captions")?;
    if captions.annotations.is_empty() {
        return Err(Error::Training(format!("{} has no captions to train on", data.join("train").display())));
    }
    let (vocab, mut ckpt) = match resumed {
        Some(ckpt) => (Vocab::load(&out.join("tokenizer.json"))?, ckpt),
        None => (Vocab::build(captions.annotations.iter().map(|a| a.caption.as_str()), 1)?, Checkpoint::new(tc.clone(), data, ())),
    };
    let cfg = if ckpt.epochs_done > 0 { Config::load(&out.join("config.json"))? } else { Config { hidden: ckpt.train.hidden, ..Config::new(vocab.len()) } };
    let mut varmap = VarMap::new();
    if ckpt.epochs_done == 0 {
        vocab.save(&out.join("tokenizer.json"))?;
        let path = out.join("config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|source| gradcam_train::Error::Json { path: path.clone(), source })?;
        gradcam_io::write_atomic(&path, text.as_bytes())?;
    }
    let mut train_data = Data::load(&train_split, &vocab, cfg.scene.image_size, cfg.max_len)?;
    let mut val_data = Data::load(&val_split, &vocab, cfg.scene.image_size, cfg.max_len)?;
    if ckpt.train.word_pairs {
        train_data.bigrams = bigram_vocab(&train_data.captions, 10, vocab.len());
        val_data.bigrams = train_data.bigrams.clone();
    }
    let word_outputs = if ckpt.train.word_loss > 0.0 { vocab.len() + train_data.bigrams.len() } else { 0 };
    let model = Trainable::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), word_outputs)?;
    if ckpt.epochs_done > 0 {
        varmap.load(out.join("model.safetensors"))?;
    } else {
        init_parameters(&varmap, ckpt.train.settings.seed)?;
    }
    let mut run = Run { model, varmap, cfg, vocab, tc: ckpt.train.clone(), train: train_data, val: val_data, val_split: &val_split };
    gradcam_train::fit(&mut run, &mut ckpt, out, progress)?;
    Ok(ckpt)
}

/// A captioner being trained, as the training loop sees it.
struct Run<'a> {
    model: Trainable,
    varmap: VarMap,
    cfg: Config,
    vocab: Vocab,
    tc: TrainConfig,
    train: Data,
    val: Data,
    val_split: &'a Split,
}

impl gradcam_train::Trainable for Run<'_> {
    type Metrics = ExactMatch;
    type Extra = ();
    type Error = Error;

    fn loss(&mut self, ids: &[usize]) -> Result<Tensor> {
        loss(&self.model, &self.train.batch(ids, &self.vocab)?, self.tc.label_smoothing, self.tc.word_loss, self.tc.activation_l1)
    }

    fn validate(&mut self, batch_size: usize) -> Result<f32> {
        let ids: Vec<usize> = (0..self.val.len()).collect();
        let mut val_loss = 0.0;
        for chunk in ids.chunks(batch_size) {
            val_loss += loss(&self.model, &self.val.batch(chunk, &self.vocab)?, 0.0, 0.0, 0.0)?.to_scalar::<f32>()? * chunk.len() as f32;
        }
        Ok(val_loss / self.val.len().max(1) as f32)
    }

    fn metrics(&mut self) -> Result<ExactMatch> {
        let frozen = Captioner::from_varbuilder(self.cfg.clone(), self.vocab.clone(), VarBuilder::from_varmap(&self.varmap, DType::F32, &Device::Cpu))?;
        Ok(ExactMatch { val_exact_match: crate::eval::exact_match(&frozen, self.val_split, self.tc.val_images)? })
    }

    fn examples(&self) -> usize {
        self.train.len()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}
