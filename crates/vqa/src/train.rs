//! Training on any VQA v2 dataset laid out as `DIR/{train,val}/` (questions.json,
//! annotations.json, instances.json for the image list, images/): AdamW with cosine decay, seeded
//! shuffling and initialisation, validation each epoch, a checkpoint each epoch, resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gradcam_encoders::scene_cnn::init_parameters;
use gradcam_scenes::vocab::{normalize, Vocab};
use gradcam_scenes::Split;
pub use gradcam_train::Settings;
use gradcam_train::{Accuracy, Group};
use serde::{Deserialize, Serialize};

use crate::model::{Config, Trainable};
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs, learning rate, seed...; a batch is of images, each with all its questions.
    #[serde(flatten)]
    pub settings: Settings,
    /// Start the image encoder from this trained model folder's (a captioner's, say) instead of
    /// random values: transfer learning, as the paper's VQA models start from ImageNet CNNs.
    #[serde(default)]
    pub encoder_from: Option<PathBuf>,
    /// Keep the encoder's weights fixed (only with `encoder_from`).
    #[serde(default)]
    pub freeze_encoder: bool,
    /// The encoder's own learning rate (same cosine decay), when it should move more slowly than
    /// the rest; `None`: `lr`.
    #[serde(default)]
    pub encoder_lr: Option<f64>,
    /// Leave out the loaded encoder's units that are active at more than half of all `conv4`
    /// positions of the training images (only with `encoder_from`). Objects cover a small part
    /// of a scene, so such a unit fires over the background: under Grad-CAM it adds a floor
    /// over the whole image to every map that weights it positively, and the model can read
    /// areas ("how many", "what shape") from it instead of from the objects.
    #[serde(default)]
    pub drop_background_units: bool,
}

/// Share of `conv4` positions above which a unit counts as a background unit.
pub const BACKGROUND_SHARE: f64 = 0.5;

/// Training images scanned for background units (the first ones of the split).
pub const SCANNED_IMAGES: usize = 2000;

impl Default for TrainConfig {
    fn default() -> Self {
        let settings = Settings { epochs: 10, batch_size: 32, lr: 2e-3, weight_decay: 1e-4, seed: 0 };
        TrainConfig { settings, encoder_from: None, freeze_encoder: false, encoder_lr: None, drop_background_units: false }
    }
}

impl TrainConfig {
    /// Refuses settings that cannot train: the shared ones out of range (see
    /// [`Settings::check`]) and an encoder learning rate that is not one.
    pub fn check(&self) -> Result<()> {
        self.settings.check()?;
        Ok(self.encoder_lr.map_or(Ok(()), |lr| gradcam_train::learning_rate("encoder_lr", lr))?)
    }
}

gradcam_train::settings_field!(TrainConfig);

/// Makes `cfg`'s encoder the one of the trained model folder `dir` (checking the input size and
/// taking its coordinate channels and width).
fn match_encoder(cfg: &mut Config, dir: &Path) -> Result<()> {
    let spec = gradcam_encoders::scene_cnn::EncoderSpec::read(dir)?;
    if spec.image_size != cfg.scene.image_size {
        return Err(Error::Training(format!("{}: image_size {} differs from this model's {}", dir.join("config.json").display(), spec.image_size, cfg.scene.image_size)));
    }
    cfg.scene.coord_conv = spec.coord_conv;
    cfg.scene.channels = spec.channels;
    Ok(())
}

/// Copies `encoder.*` of `dir/model.safetensors` into `varmap`, `conv4` cut to the units `keep`
/// (all units when `None`).
fn load_encoder_weights(varmap: &VarMap, dir: &Path, keep: Option<&[u32]>) -> Result<()> {
    let weights = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| Error::Training(format!("{}: {e}", weights.display())))?;
    let data = varmap.data().lock().map_err(|_| Error::Training("parameter map poisoned".into()))?;
    let mut copied = 0;
    for (name, var) in data.iter().filter(|(n, _)| n.starts_with("encoder.")) {
        let t = tensors.get(name).ok_or_else(|| Error::Training(format!("{}: no tensor {name}", weights.display())))?;
        let t = match keep {
            Some(units) if name.starts_with("encoder.conv4.") => &t.index_select(&Tensor::new(units, &Device::Cpu)?, 0)?,
            _ => t,
        };
        if t.dims() != var.dims() {
            return Err(Error::Training(format!("{}: {name} has shape {:?}, expected {:?}", weights.display(), t.dims(), var.dims())));
        }
        var.set(t)?;
        copied += 1;
    }
    if copied == 0 {
        return Err(Error::Training("the model has no encoder parameters to load".into()));
    }
    Ok(())
}

/// What the progress callback hears.
pub type Event<'a> = gradcam_train::Event<'a, Accuracy>;
/// One epoch's record (top-1 accuracy on the validation questions).
pub type EpochLog = gradcam_train::EpochLog<Accuracy>;
/// `checkpoint.json`: how far training got, to resume from.
pub type Checkpoint = gradcam_train::Checkpoint<TrainConfig, Accuracy, Extra>;

/// What `checkpoint.json` holds beyond the shared fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Extra {
    /// With `drop_background_units`: the loaded encoder's units left out, and each one's share
    /// of active positions.
    #[serde(default)]
    pub dropped_units: Vec<(u32, f64)>,
}

/// Each `conv4` unit's share of active (> 0) positions over the first `limit` images of `data`.
fn active_shares(cnn: &gradcam_encoders::scene_cnn::SceneCnn, data: &Data, limit: usize) -> Result<Vec<f64>> {
    let ids: Vec<usize> = (0..data.questions.len().min(limit)).collect();
    let mut active: Option<Tensor> = None;
    let mut positions = 0usize;
    for chunk in ids.chunks(64) {
        let a = cnn.forward(&data.images(chunk)?)?; // [b, C, h, w]
        let (b, _, h, w) = a.dims4()?;
        positions += b * h * w;
        let on = a.gt(0.0)?.to_dtype(DType::F32)?.sum((0, 2, 3))?;
        active = Some(match active {
            Some(t) => (t + on)?,
            None => on,
        });
    }
    let active = active.ok_or_else(|| Error::Training("no training images to scan for background units".into()))?;
    Ok(active.to_vec1::<f32>()?.into_iter().map(|n| n as f64 / positions as f64).collect())
}

/// Images as u8 planes, and each image's (question tokens, answer index) pairs.
struct Data {
    size: usize,
    pixels: Vec<u8>,
    questions: Vec<Vec<(Vec<u32>, Option<usize>)>>,
}

impl Data {
    fn load(split: &Split, vocab: &Vocab, answers: &[String], cfg: &Config) -> Result<Self> {
        let s = cfg.scene.image_size;
        let mut pixels = Vec::new();
        let mut questions = Vec::new();
        for ex in split.examples() {
            let img = gradcam_encoders::preprocess::load_image(&ex.path)?;
            let img = if img.dimensions() == (s, s) { img } else { image::imageops::resize(&img, s, s, image::imageops::FilterType::Triangle) };
            for c in 0..3 {
                pixels.extend(img.pixels().map(|p| p[c]));
            }
            let mut qs = Vec::new();
            for (q, a) in &ex.questions {
                let mut tokens = vocab.encode(&normalize(&q.question))?;
                tokens.truncate(cfg.max_question_len);
                let answer = a.and_then(|a| answers.iter().position(|x| *x == a.multiple_choice_answer));
                if !tokens.is_empty() {
                    qs.push((tokens, answer));
                }
            }
            questions.push(qs);
        }
        Ok(Data { size: s as usize, pixels, questions })
    }

    /// The images `ids` as the network's input, `[n, 3, s, s]`.
    fn images(&self, ids: &[usize]) -> Result<Tensor> {
        let plane = 3 * self.size * self.size;
        let px: Vec<f32> = ids.iter().flat_map(|&i| self.pixels[i * plane..(i + 1) * plane].iter().map(|&v| v as f32 / 127.5 - 1.0)).collect();
        Ok(Tensor::from_vec(px, (ids.len(), 3, self.size, self.size), &Device::Cpu)?)
    }

    /// Images, rows, tokens, mask and one-hot answers (zero rows for answers outside the vocabulary).
    fn batch(&self, ids: &[usize], n_answers: usize) -> Result<[Tensor; 5]> {
        let qs: Vec<(u32, &(Vec<u32>, Option<usize>))> = ids.iter().enumerate().flat_map(|(b, &i)| self.questions[i].iter().map(move |q| (b as u32, q))).collect();
        let t = qs.iter().map(|(_, q)| q.0.len()).max().unwrap_or(1);
        let (mut tokens, mut mask) = (Vec::new(), Vec::new());
        let mut onehot = vec![0f32; qs.len() * n_answers];
        for (r, (_, (toks, ans))) in qs.iter().enumerate() {
            for p in 0..t {
                tokens.push(toks.get(p).copied().unwrap_or(0));
                mask.push((p < toks.len()) as u8 as f32);
            }
            if let Some(a) = ans {
                onehot[r * n_answers + a] = 1.0;
            }
        }
        let n = qs.len();
        let cpu = &Device::Cpu;
        Ok([
            self.images(ids)?,
            Tensor::new(qs.iter().map(|(b, _)| *b).collect::<Vec<u32>>().as_slice(), cpu)?,
            Tensor::from_vec(tokens, (n, t), cpu)?,
            Tensor::from_vec(mask, (n, t), cpu)?,
            Tensor::from_vec(onehot, (n, n_answers), cpu)?,
        ])
    }
}

/// Mean cross-entropy, and the number of correct top-1 answers.
fn loss(model: &Trainable, b: &[Tensor; 5]) -> Result<(Tensor, usize, usize)> {
    let logits = model.forward(&b[0], &b[1], &b[2], &b[3])?;
    let logp = candle_nn::ops::log_softmax(&logits, 1)?;
    let count = b[4].sum_all()?.to_scalar::<f32>()?.max(1.0);
    let l = ((logp * &b[4])?.sum_all()? * (-1.0 / count as f64))?;
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    let truth = b[4].argmax(1)?.to_vec1::<u32>()?;
    let has = b[4].sum(1)?.to_vec1::<f32>()?;
    let correct = pred.iter().zip(&truth).zip(&has).filter(|((p, t), h)| **h > 0.0 && p == t).count();
    Ok((l, correct, count as usize))
}

/// Trains on `data/train`, validating on `data/val`, writing config.json, tokenizer.json,
/// model.safetensors and checkpoint.json into `out` after every epoch.
pub fn train(data: &Path, out: &Path, tc: &TrainConfig, resume: bool, progress: &mut dyn FnMut(Event)) -> Result<Checkpoint> {
    tc.check()?;
    let resumed = if resume { Some(Checkpoint::resume(out, tc.settings.epochs)?) } else { None };
    gradcam_io::create_dir_all(out)?;
    let train_split = Split::read(&data.join("train"))?;
    let val_split = Split::read(&data.join("val"))?;
    let vqa = train_split.vqa.as_ref().ok_or_else(|| Error::Training(format!("{} has no questions.json", data.join("train").display())))?;
    let resuming = resumed.is_some();
    let (mut cfg, vocab, mut ckpt) = if let Some(ckpt) = resumed {
        let path = out.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let cfg: Config = serde_json::from_str(&text).map_err(|source| gradcam_train::Error::Json { path, source })?;
        (cfg, Vocab::load(&out.join("tokenizer.json"))?, ckpt)
    } else {
        let texts: Vec<String> = vqa.questions.iter().map(|q| normalize(&q.question)).collect();
        let vocab = Vocab::build(texts.iter().map(String::as_str), 1)?;
        // Answers by decreasing frequency, then alphabetically.
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for a in &vqa.annotations {
            *counts.entry(a.multiple_choice_answer.as_str()).or_default() += 1;
        }
        let mut answers: Vec<(&str, usize)> = counts.into_iter().collect();
        answers.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(y.0)));
        let cfg = Config::new(vocab.len(), answers.into_iter().map(|(a, _)| a.to_string()).collect());
        (cfg, vocab, Checkpoint::new(tc.clone(), data, Extra::default()))
    };
    if ckpt.train.freeze_encoder && ckpt.train.encoder_lr.is_some() {
        return Err(Error::Training("a frozen encoder has no learning rate (encoder_lr with freeze_encoder)".into()));
    }
    if ckpt.train.freeze_encoder && ckpt.train.encoder_from.is_none() {
        return Err(Error::Training("freezing the encoder needs a trained one to start from (encoder_from)".into()));
    }
    if ckpt.train.drop_background_units && ckpt.train.encoder_from.is_none() {
        return Err(Error::Training("leaving out background units needs a trained encoder to start from (encoder_from)".into()));
    }
    let train_data = Data::load(&train_split, &vocab, &cfg.answers, &cfg)?;
    let val_data = Data::load(&val_split, &vocab, &cfg.answers, &cfg)?;
    let mut varmap = VarMap::new();
    let mut keep = None;
    if let (false, Some(dir)) = (resuming, &ckpt.train.encoder_from) {
        match_encoder(&mut cfg, dir)?;
        if ckpt.train.drop_background_units {
            let (cnn, _) = gradcam_encoders::scene_cnn::load_encoder(dir)?;
            let shares = active_shares(&cnn, &train_data, SCANNED_IMAGES)?;
            let (kept, dropped): (Vec<(u32, f64)>, Vec<(u32, f64)>) = (0u32..).zip(shares).partition(|&(_, s)| s <= BACKGROUND_SHARE);
            if kept.is_empty() {
                return Err(Error::Training(format!("every unit of {} is active at more than half of its positions; no object units to keep", dir.display())));
            }
            cfg.scene.channels = kept.len();
            keep = Some(kept.into_iter().map(|(u, _)| u).collect::<Vec<u32>>());
            ckpt.extra.dropped_units = dropped;
        }
    }
    let model = Trainable::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), ckpt.train.freeze_encoder)?;
    if resuming {
        varmap.load(out.join("model.safetensors"))?;
    } else {
        init_parameters(&varmap, ckpt.train.settings.seed)?;
        if let Some(dir) = &ckpt.train.encoder_from {
            load_encoder_weights(&varmap, dir, keep.as_deref())?;
        }
        vocab.save(&out.join("tokenizer.json"))?;
        let path = out.join("config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|source| gradcam_train::Error::Json { path: path.clone(), source })?;
        gradcam_io::write_atomic(&path, text.as_bytes())?;
    }
    let answers = cfg.answers.len();
    let mut run = Run { model, varmap, tc: ckpt.train.clone(), train: train_data, val: val_data, answers, tally: (0, 0) };
    gradcam_train::fit(&mut run, &mut ckpt, out, progress)?;
    Ok(ckpt)
}

/// A VQA model being trained, as the training loop sees it.
struct Run {
    model: Trainable,
    varmap: VarMap,
    tc: TrainConfig,
    train: Data,
    val: Data,
    answers: usize,
    /// Correct answers and answered questions of the last validation.
    tally: (usize, usize),
}

impl gradcam_train::Trainable for Run {
    type Metrics = Accuracy;
    type Extra = Extra;
    type Error = Error;

    fn loss(&mut self, ids: &[usize]) -> Result<Tensor> {
        Ok(loss(&self.model, &self.train.batch(ids, self.answers)?)?.0)
    }

    fn validate(&mut self, batch_size: usize) -> Result<f32> {
        let ids: Vec<usize> = (0..self.val.questions.len()).collect();
        let (mut vl, mut correct, mut count) = (0.0, 0, 0);
        for chunk in ids.chunks(batch_size) {
            let (l, c, n) = loss(&self.model, &self.val.batch(chunk, self.answers)?)?;
            vl += l.to_scalar::<f32>()? * n as f32;
            correct += c;
            count += n;
        }
        self.tally = (correct, count);
        Ok(vl / count.max(1) as f32)
    }

    fn metrics(&mut self) -> Result<Accuracy> {
        let (correct, count) = self.tally;
        Ok(Accuracy { val_accuracy: correct as f64 / count.max(1) as f64 })
    }

    fn examples(&self) -> usize {
        self.train.questions.len()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The encoder's parameters (unless frozen) at `encoder_lr` and the rest at `lr`, each
    /// sorted by name.
    fn groups(&self, settings: &Settings) -> Result<Vec<Group>> {
        let data = self.varmap.data().lock().map_err(|_| Error::Training("parameter map poisoned".into()))?;
        let mut named: Vec<(&String, &Var)> = data.iter().filter(|(n, _)| !(self.tc.freeze_encoder && n.starts_with("encoder."))).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let (enc, head): (Vec<_>, Vec<_>) = named.into_iter().partition(|(n, _)| self.tc.encoder_lr.is_some() && n.starts_with("encoder."));
        let vars = |named: Vec<(&String, &Var)>| named.into_iter().map(|(_, v)| v.clone()).collect();
        Ok(vec![Group { vars: vars(head), lr: settings.lr }, Group { vars: vars(enc), lr: self.tc.encoder_lr.unwrap_or(settings.lr) }])
    }
}
