//! Training a scene classifier on any COCO-instances dataset laid out as `DIR/{train,val}/`
//! (instances.json + images/): cross-entropy, AdamW with cosine decay, seeded shuffling and
//! initialisation, validation accuracy each epoch, a checkpoint each epoch, resume.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use gradcam_encoders::scene_cnn::{init_parameters, model_weights, save_parameters, SceneCnn};
use gradcam_scenes::scene::Rng;
use gradcam_scenes::Split;
use serde::{Deserialize, Serialize};

use crate::data::{classes, Data};
use crate::{io, Config, Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Units of the explained layer `conv4`.
    pub channels: usize,
    /// Input side in pixels.
    pub image_size: u32,
    /// Use at most this many training images (all when absent).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { epochs: 6, batch_size: 32, lr: 2e-3, weight_decay: 1e-4, seed: 0, channels: 64, image_size: 64, limit: None }
    }
}

impl TrainConfig {
    /// Refuses settings that cannot train.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Training(m));
        if !(self.lr > 0.0 && self.lr <= 10.0) {
            return bad(format!("--lr {}: give a learning rate above 0 and at most 10", self.lr));
        }
        if self.epochs == 0 || self.batch_size == 0 || self.channels == 0 || self.limit == Some(0) {
            return bad("--epochs, --batch-size, --channels and --limit must be at least 1".into());
        }
        if self.channels > 4096 || !gradcam_encoders::scene_cnn::IMAGE_SIZES.contains(&(self.image_size as u64)) {
            return bad(format!("--channels {} must be at most 4096 and --image-size {} in {:?}", self.channels, self.image_size, gradcam_encoders::scene_cnn::IMAGE_SIZES));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("--weight-decay {} must be finite and not negative", self.weight_decay));
        }
        Ok(())
    }
}

/// What the progress callback hears.
pub enum Event<'a> {
    /// Data loaded: training and validation images.
    Loaded { train: usize, val: usize },
    Start { epoch: usize, steps: usize },
    Step { loss: f32 },
    Epoch(&'a EpochLog),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f32,
    pub val_loss: f32,
    pub val_accuracy: f64,
    pub seconds: f64,
}

/// `checkpoint.json`: how far training got, to resume from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub train: TrainConfig,
    pub data: PathBuf,
    pub epochs_done: usize,
    pub log: Vec<EpochLog>,
    /// Training images (with a label) and images without one.
    pub train_images: usize,
    pub skipped: usize,
}

/// The classifier with parameters in a `VarMap`: differentiable end to end.
pub struct Trainable {
    cnn: SceneCnn,
    weight: Tensor,
    bias: Tensor,
}

impl Trainable {
    pub fn new(vb: VarBuilder, channels: usize, classes: usize) -> Result<Self> {
        let cnn = SceneCnn::new(vb.pp("encoder"), false, channels)?;
        let weight = vb.get_with_hints((classes, channels), "classifier.weight", candle_nn::Init::Const(0.0))?;
        let bias = vb.get_with_hints(classes, "classifier.bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { cnn, weight, bias })
    }

    /// # Shapes
    /// `[b, 3, s, s]` -> logits `[b, classes]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let pooled = self.cnn.forward(x)?.mean((2, 3))?; // [b, C]
        Ok(pooled.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    /// Mean cross-entropy of a batch, and its number of correct predictions.
    pub fn loss(&self, images: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
        let logits = self.forward(images)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&labels.unsqueeze(1)?, 1)?.mean_all()?.neg()?;
        let correct = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
        Ok((nll, correct))
    }
}

/// Trains a classifier on `data/train`, validating on `data/val`, writing the model to `out`
/// (config.json, model.safetensors, checkpoint.json) after every epoch. With `resume`, continues
/// from `out/checkpoint.json` (weights and epoch; AdamW's moments restart).
pub fn train(data: &Path, out: &Path, tc: &TrainConfig, resume: bool, progress: &mut dyn FnMut(Event)) -> Result<Checkpoint> {
    tc.check()?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let train_split = Split::read(&data.join("train"))?;
    let val_split = Split::read(&data.join("val"))?;
    let ckpt_path = out.join("checkpoint.json");
    let resuming = resume && ckpt_path.exists();
    let (cfg, mut ckpt) = if resuming {
        let text = std::fs::read_to_string(&ckpt_path).map_err(io(&ckpt_path))?;
        let ckpt: Checkpoint = serde_json::from_str(&text).map_err(|e| Error::Training(format!("{}: {e}", ckpt_path.display())))?;
        (Config::load(out)?, ckpt)
    } else {
        let classes = classes(&train_split.instances);
        if classes.len() < 2 {
            return Err(Error::Training(format!("{} has {} categories besides `cue`; a classifier needs at least 2", data.join("train/instances.json").display(), classes.len())));
        }
        let (ids, names) = classes.into_iter().unzip();
        let cfg = Config::new(tc.image_size, tc.channels, names, ids);
        (cfg, Checkpoint { train: tc.clone(), data: data.to_path_buf(), epochs_done: 0, log: Vec::new(), train_images: 0, skipped: 0 })
    };
    ckpt.train.epochs = tc.epochs;
    crate::data::check_classes(&val_split, &cfg.category_ids, &cfg.labels)?;
    let train_data = Data::load(&train_split, &cfg.category_ids, cfg.image_size, ckpt.train.limit)?;
    let val_data = Data::load(&val_split, &cfg.category_ids, cfg.image_size, None)?;
    if train_data.is_empty() {
        return Err(Error::Training(format!("{} has no image with a labelled object to train on", data.join("train").display())));
    }
    (ckpt.train_images, ckpt.skipped) = (train_data.len(), train_data.skipped);
    progress(Event::Loaded { train: train_data.len(), val: val_data.len() });

    let mut varmap = VarMap::new();
    let model = Trainable::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), cfg.channels, cfg.labels.len())?;
    if ckpt.epochs_done > 0 {
        model_weights(out)?; // a clear error for a missing or damaged file
        varmap.load(out.join("model.safetensors"))?;
    } else {
        init_parameters(&varmap, ckpt.train.seed)?;
        cfg.save(out)?;
    }
    let params = ParamsAdamW { lr: ckpt.train.lr, weight_decay: ckpt.train.weight_decay, ..Default::default() };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let bs = ckpt.train.batch_size;
    for epoch in ckpt.epochs_done..tc.epochs {
        let start = std::time::Instant::now();
        let mut order: Vec<usize> = (0..train_data.len()).collect();
        Rng::new(ckpt.train.seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9)).shuffle(&mut order);
        let lr = ckpt.train.lr * 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / tc.epochs as f64).cos());
        opt.set_learning_rate(lr);
        let steps = order.len().div_ceil(bs);
        progress(Event::Start { epoch, steps });
        let mut total = 0.0;
        for chunk in order.chunks(bs) {
            let (images, labels) = train_data.batch(chunk)?;
            let (l, _) = model.loss(&images, &labels)?;
            opt.backward_step(&l)?;
            let l = l.to_scalar::<f32>()?;
            if !l.is_finite() {
                return Err(Error::Training(format!("the loss became {l} in epoch {epoch}; try a lower --lr")));
            }
            total += l;
            progress(Event::Step { loss: l });
        }
        let (mut val_loss, mut correct) = (0.0, 0);
        let ids: Vec<usize> = (0..val_data.len()).collect();
        for chunk in ids.chunks(128) {
            let (images, labels) = val_data.batch(chunk)?;
            let (l, c) = model.loss(&images, &labels)?;
            val_loss += l.to_scalar::<f32>()? * chunk.len() as f32;
            correct += c;
        }
        if !val_loss.is_finite() {
            return Err(Error::Training(format!("the validation loss became {val_loss} in epoch {epoch}; nothing of this epoch saved; try a lower --lr")));
        }
        save_parameters(&varmap, &out.join("model.safetensors"))?;
        ckpt.epochs_done = epoch + 1;
        ckpt.log.push(EpochLog {
            epoch,
            train_loss: total / steps as f32,
            val_loss: val_loss / val_data.len().max(1) as f32,
            val_accuracy: correct as f64 / val_data.len().max(1) as f64,
            seconds: start.elapsed().as_secs_f64(),
        });
        let text = serde_json::to_string_pretty(&ckpt).map_err(|e| Error::Training(e.to_string()))?;
        gradcam_io::write_atomic(&ckpt_path, text.as_bytes())?;
        progress(Event::Epoch(ckpt.log.last().expect("just pushed")));
    }
    Ok(ckpt)
}

