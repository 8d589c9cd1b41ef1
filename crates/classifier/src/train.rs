//! Training a scene classifier on any COCO-instances dataset laid out as `DIR/{train,val}/`
//! (instances.json + images/): cross-entropy, AdamW with cosine decay, seeded shuffling and
//! initialisation, validation accuracy each epoch, a checkpoint each epoch, resume.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use gradcam_encoders::scene_cnn::{init_parameters, model_weights, SceneCnn, IMAGE_SIZES};
use gradcam_scenes::Split;
pub use gradcam_train::Settings;
use gradcam_train::{at_least_one, Accuracy};
use serde::{Deserialize, Serialize};

use crate::data::{classes, Data};
use crate::{Config, Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs, batch size, learning rate, seed...
    #[serde(flatten)]
    pub settings: Settings,
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
        let settings = Settings { epochs: 6, batch_size: 32, lr: 2e-3, weight_decay: 1e-4, seed: 0 };
        TrainConfig { settings, channels: 64, image_size: 64, limit: None }
    }
}

impl TrainConfig {
    /// Refuses settings that cannot train: the shared ones out of range (see
    /// [`Settings::check`]), no units, a size the encoder does not take, an empty limit.
    pub fn check(&self) -> Result<()> {
        self.settings.check()?;
        at_least_one("channels", self.channels)?;
        at_least_one("limit", self.limit.unwrap_or(1))?;
        if self.channels > 4096 {
            return Err(gradcam_train::Error::setting("channels", self.channels, "at most 4096").into());
        }
        if !IMAGE_SIZES.contains(&(self.image_size as u64)) {
            return Err(gradcam_train::Error::setting("image_size", self.image_size, format!("in {IMAGE_SIZES:?}")).into());
        }
        Ok(())
    }
}

gradcam_train::settings_field!(TrainConfig);

/// What the progress callback hears.
pub type Event<'a> = gradcam_train::Event<'a, Accuracy>;
/// One epoch's record (top-1 accuracy on the validation images).
pub type EpochLog = gradcam_train::EpochLog<Accuracy>;
/// `checkpoint.json`: how far training got, to resume from.
pub type Checkpoint = gradcam_train::Checkpoint<TrainConfig, Accuracy, Images>;

/// What `checkpoint.json` holds beyond the shared fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Images {
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
    let resumed = if resume { Some(Checkpoint::resume(out, tc.settings.epochs)?) } else { None };
    gradcam_io::create_dir_all(out)?;
    let train_split = Split::read(&data.join("train"))?;
    let val_split = Split::read(&data.join("val"))?;
    let (cfg, mut ckpt) = if let Some(ckpt) = resumed {
        (Config::load(out)?, ckpt)
    } else {
        let classes = classes(&train_split.instances);
        if classes.len() < 2 {
            return Err(Error::Training(format!("{} has {} categories besides `cue`; a classifier needs at least 2", data.join("train/instances.json").display(), classes.len())));
        }
        let (ids, names) = classes.into_iter().unzip();
        let cfg = Config::new(tc.image_size, tc.channels, names, ids);
        (cfg, Checkpoint::new(tc.clone(), data, Images::default()))
    };
    crate::data::check_classes(&val_split, &cfg.category_ids, &cfg.labels)?;
    let train_data = Data::load(&train_split, &cfg.category_ids, cfg.image_size, ckpt.train.limit)?;
    let val_data = Data::load(&val_split, &cfg.category_ids, cfg.image_size, None)?;
    if train_data.is_empty() {
        return Err(Error::Training(format!("{} has no image with a labelled object to train on", data.join("train").display())));
    }
    ckpt.extra = Images { train_images: train_data.len(), skipped: train_data.skipped };
    progress(gradcam_train::Event::Loaded { train: train_data.len(), val: val_data.len() });

    let mut varmap = VarMap::new();
    let model = Trainable::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), cfg.channels, cfg.labels.len())?;
    if ckpt.epochs_done > 0 {
        model_weights(out)?; // a clear error for a missing or damaged file
        varmap.load(out.join("model.safetensors"))?;
    } else {
        init_parameters(&varmap, ckpt.train.settings.seed)?;
        cfg.save(out)?;
    }
    let mut run = Run { model, varmap, train: train_data, val: val_data, correct: 0 };
    gradcam_train::fit(&mut run, &mut ckpt, out, progress)?;
    Ok(ckpt)
}

/// A classifier being trained, as the training loop sees it.
struct Run {
    model: Trainable,
    varmap: VarMap,
    train: Data,
    val: Data,
    /// Correct predictions of the last validation.
    correct: usize,
}

impl gradcam_train::Trainable for Run {
    type Metrics = Accuracy;
    type Extra = Images;
    type Error = Error;

    fn loss(&mut self, ids: &[usize]) -> Result<Tensor> {
        let (images, labels) = self.train.batch(ids)?;
        Ok(self.model.loss(&images, &labels)?.0)
    }

    /// In batches of 128 whatever the training batch.
    fn validate(&mut self, _: usize) -> Result<f32> {
        let (mut val_loss, mut correct) = (0.0, 0);
        let ids: Vec<usize> = (0..self.val.len()).collect();
        for chunk in ids.chunks(128) {
            let (images, labels) = self.val.batch(chunk)?;
            let (l, c) = self.model.loss(&images, &labels)?;
            val_loss += l.to_scalar::<f32>()? * chunk.len() as f32;
            correct += c;
        }
        self.correct = correct;
        Ok(val_loss / self.val.len().max(1) as f32)
    }

    fn metrics(&mut self) -> Result<Accuracy> {
        Ok(Accuracy { val_accuracy: self.correct as f64 / self.val.len().max(1) as f64 })
    }

    fn examples(&self) -> usize {
        self.train.len()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}
