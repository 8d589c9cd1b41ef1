//! Training on any COCO-captions dataset laid out as `DIR/{train,val}/` (captions.json +
//! instances.json + images/): AdamW, seeded shuffling and initialisation, validation each epoch,
//! a checkpoint each epoch, resume.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use gradcam_scenes::scene::Rng;
use gradcam_scenes::Split;
use serde::{Deserialize, Serialize};

use crate::model::{init_parameters, Captioner, Config, Trainable};
use gradcam_scenes::vocab::Vocab;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Images per step; each brings all its captions.
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
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
    /// Refuses settings that cannot train: a learning rate that is not a positive number below
    /// 10, no epochs, empty batches, a zero-width LSTM, weights and smoothing out of range.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Training(m));
        if !(self.lr > 0.0 && self.lr <= 10.0) {
            return bad(format!("--lr {}: give a learning rate above 0 and at most 10", self.lr));
        }
        if self.epochs == 0 || self.batch_size == 0 || self.hidden == 0 {
            return bad("--epochs, --batch-size and --hidden must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.label_smoothing) || ![self.word_loss, self.activation_l1, self.weight_decay].iter().all(|v| v.is_finite() && *v >= 0.0) {
            return bad("--label-smoothing is in [0, 1); --word-loss and --activation-l1 are finite and not negative".into());
        }
        Ok(())
    }
}

fn default_hidden() -> usize {
    256
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { epochs: 12, batch_size: 32, lr: 2e-3, weight_decay: 1e-4, seed: 0, val_images: 200, label_smoothing: 0.0, word_loss: 0.0, hidden: default_hidden(), activation_l1: 0.0, word_pairs: false }
    }
}

/// What the progress callback hears.
pub enum Event<'a> {
    Start { epoch: usize, steps: usize },
    Step { loss: f32 },
    Epoch(&'a EpochLog),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f32,
    pub val_loss: f32,
    pub val_exact_match: f64,
    pub seconds: f64,
}

/// `checkpoint.json`: how far training got, to resume from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub train: TrainConfig,
    pub data: PathBuf,
    pub epochs_done: usize,
    pub log: Vec<EpochLog>,
}

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
    std::fs::create_dir_all(out).map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
    let train_split = Split::read(&data.join("train"))?;
    let val_split = Split::read(&data.join("val"))?;
    if train_split.captions.annotations.is_empty() {
        return Err(Error::Training(format!("{} has no captions to train on", data.join("train").display())));
    }
    let ckpt_path = out.join("checkpoint.json");
    let (vocab, mut ckpt) = if resume && ckpt_path.exists() {
        let text = std::fs::read_to_string(&ckpt_path).map_err(|source| Error::Io { path: ckpt_path.clone(), source })?;
        let ckpt: Checkpoint = serde_json::from_str(&text).map_err(|e| Error::Training(format!("{}: {e}", ckpt_path.display())))?;
        (Vocab::load(&out.join("tokenizer.json"))?, ckpt)
    } else {
        let vocab = Vocab::build(train_split.captions.annotations.iter().map(|a| a.caption.as_str()), 1)?;
        (vocab, Checkpoint { train: tc.clone(), data: data.to_path_buf(), epochs_done: 0, log: Vec::new() })
    };
    ckpt.train.epochs = tc.epochs;
    let cfg = if ckpt.epochs_done > 0 { Config::load(&out.join("config.json"))? } else { Config { hidden: ckpt.train.hidden, ..Config::new(vocab.len()) } };
    let mut varmap = VarMap::new();
    if ckpt.epochs_done == 0 {
        vocab.save(&out.join("tokenizer.json"))?;
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Training(e.to_string()))?;
        gradcam_io::write_atomic(&out.join("config.json"), text.as_bytes())?;
    }
    let mut train_data = Data::load(&train_split, &vocab, cfg.image_size, cfg.max_len)?;
    let mut val_data = Data::load(&val_split, &vocab, cfg.image_size, cfg.max_len)?;
    if ckpt.train.word_pairs {
        train_data.bigrams = bigram_vocab(&train_data.captions, 10, vocab.len());
        val_data.bigrams = train_data.bigrams.clone();
    }
    let word_outputs = if ckpt.train.word_loss > 0.0 { vocab.len() + train_data.bigrams.len() } else { 0 };
    let model = Trainable::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), word_outputs)?;
    if ckpt.epochs_done > 0 {
        varmap.load(out.join("model.safetensors"))?;
    } else {
        init_parameters(&varmap, ckpt.train.seed)?;
    }
    let params = ParamsAdamW { lr: ckpt.train.lr, weight_decay: ckpt.train.weight_decay, ..Default::default() };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let bs = ckpt.train.batch_size.max(1);

    for epoch in ckpt.epochs_done..tc.epochs {
        let start = std::time::Instant::now();
        let mut order: Vec<usize> = (0..train_data.len()).collect();
        Rng::new(ckpt.train.seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9)).shuffle(&mut order);
        // Cosine decay over the planned epochs.
        let lr = ckpt.train.lr * 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / tc.epochs as f64).cos());
        opt.set_learning_rate(lr);
        let steps = order.len().div_ceil(bs);
        progress(Event::Start { epoch, steps });
        let mut total = 0.0;
        for chunk in order.chunks(bs) {
            let l = loss(&model, &train_data.batch(chunk, &vocab)?, ckpt.train.label_smoothing, ckpt.train.word_loss, ckpt.train.activation_l1)?;
            opt.backward_step(&l)?;
            let l = l.to_scalar::<f32>()?;
            if !l.is_finite() {
                return Err(Error::Training(format!("the loss became {l} in epoch {epoch}; try a lower --lr")));
            }
            total += l;
            progress(Event::Step { loss: l });
        }
        let ids: Vec<usize> = (0..val_data.len()).collect();
        let mut val_loss = 0.0;
        for chunk in ids.chunks(bs) {
            val_loss += loss(&model, &val_data.batch(chunk, &vocab)?, 0.0, 0.0, 0.0)?.to_scalar::<f32>()? * chunk.len() as f32;
        }
        // A step can make the weights non-finite after the last finite loss: never save them.
        if !val_loss.is_finite() {
            return Err(Error::Training(format!("the validation loss became {val_loss} in epoch {epoch}; nothing of this epoch saved; try a lower --lr")));
        }
        let frozen = Captioner::from_varbuilder(cfg.clone(), vocab.clone(), VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        let exact = crate::eval::exact_match(&frozen, &val_split, ckpt.train.val_images)?;
        gradcam_encoders::scene_cnn::save_parameters(&varmap, &out.join("model.safetensors"))?;
        ckpt.epochs_done = epoch + 1;
        ckpt.log.push(EpochLog {
            epoch,
            train_loss: total / steps as f32,
            val_loss: val_loss / val_data.len().max(1) as f32,
            val_exact_match: exact,
            seconds: start.elapsed().as_secs_f64(),
        });
        let text = serde_json::to_string_pretty(&ckpt).map_err(|e| Error::Training(e.to_string()))?;
        gradcam_io::write_atomic(&ckpt_path, text.as_bytes())?;
        progress(Event::Epoch(ckpt.log.last().expect("just pushed")));
    }
    Ok(ckpt)
}

