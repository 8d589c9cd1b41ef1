//! Training on any VQA v2 dataset laid out as `DIR/{train,val}/` (questions.json,
//! annotations.json, instances.json for the image list, images/): AdamW with cosine decay, seeded
//! shuffling and initialisation, validation each epoch, a checkpoint each epoch, resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use gradcam_encoders::scene_cnn::init_parameters;
use gradcam_scenes::scene::Rng;
use gradcam_scenes::vocab::{normalize, Vocab};
use gradcam_scenes::Split;
use serde::{Deserialize, Serialize};

use crate::model::{Config, Trainable};
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Images per step; each brings all its questions.
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
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
        TrainConfig { epochs: 10, batch_size: 32, lr: 2e-3, weight_decay: 1e-4, seed: 0, encoder_from: None, freeze_encoder: false, encoder_lr: None, drop_background_units: false }
    }
}

/// Makes `cfg`'s encoder the one of the trained model folder `dir` (checking the input size and
/// taking its coordinate channels and width).
fn match_encoder(cfg: &mut Config, dir: &Path) -> Result<()> {
    let spec = gradcam_encoders::scene_cnn::EncoderSpec::read(dir).map_err(|e| Error::Training(e.to_string()))?;
    if spec.image_size != cfg.image_size {
        return Err(Error::Training(format!("{}: image_size {} differs from this model's {}", dir.join("config.json").display(), spec.image_size, cfg.image_size)));
    }
    cfg.coord_conv = spec.coord_conv;
    cfg.channels = spec.channels;
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
    /// Top-1 accuracy on the validation questions.
    pub val_accuracy: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub train: TrainConfig,
    pub data: PathBuf,
    pub epochs_done: usize,
    pub log: Vec<EpochLog>,
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
        let a = cnn.forward(&data.images(chunk)?).map_err(|e| Error::Training(e.to_string()))?; // [b, C, h, w]
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
        let s = cfg.image_size;
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
    let lr_ok = |lr: f64| lr > 0.0 && lr <= 10.0;
    if !lr_ok(tc.lr) || tc.encoder_lr.is_some_and(|lr| !lr_ok(lr)) || tc.epochs == 0 || tc.batch_size == 0 {
        return Err(Error::Training(format!("--lr {} / --encoder-lr {:?}: give learning rates above 0 and at most 10; --epochs and --batch-size at least 1", tc.lr, tc.encoder_lr)));
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
    let train_split = Split::read(&data.join("train"))?;
    let val_split = Split::read(&data.join("val"))?;
    let vqa = train_split.vqa.as_ref().ok_or_else(|| Error::Training(format!("{} has no questions.json", data.join("train").display())))?;
    let ckpt_path = out.join("checkpoint.json");
    let resuming = resume && ckpt_path.exists();
    let (mut cfg, vocab, mut ckpt) = if resuming {
        let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|source| Error::Io { path: p, source });
        let ckpt: Checkpoint = serde_json::from_str(&read(ckpt_path.clone())?).map_err(|e| Error::Training(e.to_string()))?;
        let cfg: Config = serde_json::from_str(&read(out.join("config.json"))?).map_err(|e| Error::Training(e.to_string()))?;
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
        (cfg, vocab, Checkpoint { train: tc.clone(), data: data.to_path_buf(), epochs_done: 0, log: Vec::new(), dropped_units: Vec::new() })
    };
    ckpt.train.epochs = tc.epochs;
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
            let (cnn, _) = gradcam_encoders::scene_cnn::load_encoder(dir).map_err(|e| Error::Training(e.to_string()))?;
            let shares = active_shares(&cnn, &train_data, SCANNED_IMAGES)?;
            let (kept, dropped): (Vec<(u32, f64)>, Vec<(u32, f64)>) = (0u32..).zip(shares).partition(|&(_, s)| s <= BACKGROUND_SHARE);
            if kept.is_empty() {
                return Err(Error::Training(format!("every unit of {} is active at more than half of its positions; no object units to keep", dir.display())));
            }
            cfg.channels = kept.len();
            keep = Some(kept.into_iter().map(|(u, _)| u).collect::<Vec<u32>>());
            ckpt.dropped_units = dropped;
        }
    }
    let model = Trainable::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), ckpt.train.freeze_encoder)?;
    if resuming {
        varmap.load(out.join("model.safetensors"))?;
    } else {
        init_parameters(&varmap, ckpt.train.seed)?;
        if let Some(dir) = &ckpt.train.encoder_from {
            load_encoder_weights(&varmap, dir, keep.as_deref())?;
        }
        vocab.save(&out.join("tokenizer.json"))?;
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Training(e.to_string()))?;
        gradcam_io::write_atomic(&out.join("config.json"), text.as_bytes())?;
    }
    // The encoder's parameters (unless frozen) and the rest, each sorted by name.
    let (encoder_vars, head_vars): (Vec<candle_core::Var>, Vec<candle_core::Var>) = {
        let data = varmap.data().lock().map_err(|_| Error::Training("parameter map poisoned".into()))?;
        let mut named: Vec<(&String, &candle_core::Var)> = data.iter().filter(|(n, _)| !(ckpt.train.freeze_encoder && n.starts_with("encoder."))).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let (enc, head): (Vec<_>, Vec<_>) = named.into_iter().partition(|(n, _)| ckpt.train.encoder_lr.is_some() && n.starts_with("encoder."));
        (enc.into_iter().map(|(_, v)| v.clone()).collect(), head.into_iter().map(|(_, v)| v.clone()).collect())
    };
    let adamw = |vars: Vec<candle_core::Var>, lr: f64| AdamW::new(vars, ParamsAdamW { lr, weight_decay: ckpt.train.weight_decay, ..Default::default() });
    let mut opt = adamw(head_vars, ckpt.train.lr)?;
    let encoder_lr = ckpt.train.encoder_lr.unwrap_or(ckpt.train.lr);
    let mut encoder_opt = adamw(encoder_vars, encoder_lr)?;
    let (bs, na) = (ckpt.train.batch_size.max(1), cfg.answers.len());
    for epoch in ckpt.epochs_done..tc.epochs {
        let start = std::time::Instant::now();
        let mut order: Vec<usize> = (0..train_data.questions.len()).collect();
        Rng::new(ckpt.train.seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9)).shuffle(&mut order);
        let decay = 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / tc.epochs as f64).cos());
        opt.set_learning_rate(ckpt.train.lr * decay);
        encoder_opt.set_learning_rate(encoder_lr * decay);
        let steps = order.len().div_ceil(bs);
        progress(Event::Start { epoch, steps });
        let mut total = 0.0;
        for chunk in order.chunks(bs) {
            let (l, _, _) = loss(&model, &train_data.batch(chunk, na)?)?;
            let grads = l.backward()?;
            opt.step(&grads)?;
            encoder_opt.step(&grads)?;
            let l = l.to_scalar::<f32>()?;
            if !l.is_finite() {
                return Err(Error::Training(format!("the loss became {l} in epoch {epoch}; try a lower --lr")));
            }
            total += l;
            progress(Event::Step { loss: l });
        }
        let ids: Vec<usize> = (0..val_data.questions.len()).collect();
        let (mut vl, mut correct, mut count) = (0.0, 0, 0);
        for chunk in ids.chunks(bs) {
            let (l, c, n) = loss(&model, &val_data.batch(chunk, na)?)?;
            vl += l.to_scalar::<f32>()? * n as f32;
            correct += c;
            count += n;
        }
        // A step can make the weights non-finite after the last finite loss: never save them.
        if !vl.is_finite() {
            return Err(Error::Training(format!("the validation loss became {vl} in epoch {epoch}; nothing of this epoch saved; try a lower --lr")));
        }
        gradcam_encoders::scene_cnn::save_parameters(&varmap, &out.join("model.safetensors"))?;
        ckpt.epochs_done = epoch + 1;
        ckpt.log.push(EpochLog {
            epoch,
            train_loss: total / steps as f32,
            val_loss: vl / count.max(1) as f32,
            val_accuracy: correct as f64 / count.max(1) as f64,
            seconds: start.elapsed().as_secs_f64(),
        });
        let text = serde_json::to_string_pretty(&ckpt).map_err(|e| Error::Training(e.to_string()))?;
        gradcam_io::write_atomic(&ckpt_path, text.as_bytes())?;
        progress(Event::Epoch(ckpt.log.last().expect("just pushed")));
    }
    Ok(ckpt)
}
