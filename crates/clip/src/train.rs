//! Contrastive training on a ShapeScenes-format dataset `DIR/{train,val}/` (captions.json,
//! instances.json with each object's colour and size, images/): each image is paired with one of
//! its texts (an object's phrase, "red circle" or "small red circle", or one of its captions),
//! and the symmetric cross-entropy of CLIP is taken over the batch's similarity matrix, with every
//! text that describes an image counted as its match (two scenes with a red circle both match
//! "red circle"). The shared loop ([`gradcam_train::fit`]) does the rest.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use gradcam_scenes::scene::{Rng, COLORS, SHAPES};
use gradcam_scenes::vocab::{normalize, Vocab};
use gradcam_scenes::Split;
pub use gradcam_train::Settings;
use serde::{Deserialize, Serialize};

use crate::model::{init_parameters, Clip, Config};
use crate::text::{encode, Encoded};
use crate::{Error, Result};

/// `checkpoint.json`'s training configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs, learning rate, seed...; a batch is of images, each with one of its texts.
    #[serde(flatten)]
    pub settings: Settings,
    /// Share of steps' texts that are object phrases (the rest are captions).
    pub phrase_share: f64,
    /// Weight of the phrase loss: each image's cross-entropy over every colour-shape phrase
    /// ("red circle", 15 of them), its target spread over the pairs present (0 = off).
    #[serde(default)]
    pub phrase_loss: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { settings: Settings { epochs: 20, batch_size: 128, lr: 5e-4, weight_decay: 1e-4, seed: 0 }, phrase_share: 0.7, phrase_loss: 1.0 }
    }
}

impl TrainConfig {
    /// Refuses settings that cannot train.
    pub fn check(&self) -> Result<()> {
        self.settings.check()?;
        if !(0.0..=1.0).contains(&self.phrase_share) {
            return Err(gradcam_train::Error::setting("phrase_share", self.phrase_share, "must be between 0 and 1").into());
        }
        if !(self.phrase_loss.is_finite() && (0.0..=100.0).contains(&self.phrase_loss)) {
            return Err(gradcam_train::Error::setting("phrase_loss", self.phrase_loss, "must be between 0 and 100").into());
        }
        Ok(())
    }
}

gradcam_train::settings_field!(TrainConfig);

/// The validation figures of an epoch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PhraseMetrics {
    /// Of (object, colour-shape pair absent from its scene) comparisons, the share where the
    /// object's own phrase ("red circle") is the more similar to the image.
    pub phrase_vs_absent: f64,
    /// Share of objects whose phrase beats every absent pair's.
    pub phrase_beats_all_absent: f64,
}

/// What the progress callback hears.
pub type Event<'a> = gradcam_train::Event<'a, PhraseMetrics>;
/// One epoch's record.
pub type EpochLog = gradcam_train::EpochLog<PhraseMetrics>;
/// `checkpoint.json`: how far training got, to resume from.
pub type Checkpoint = gradcam_train::Checkpoint<TrainConfig, PhraseMetrics>;

/// An image's texts: phrases first, then captions, each normalised and encoded.
struct Texts {
    phrases: Vec<Encoded>,
    captions: Vec<Encoded>,
    /// Every text's normalised string: what makes another image's text a match.
    all: HashSet<String>,
    /// (colour, shape) of each object.
    pairs: Vec<(usize, usize)>,
}

/// Images as u8 planes, and each image's texts.
pub(crate) struct Data {
    size: usize,
    pixels: Vec<u8>,
    texts: Vec<Texts>,
}

/// The phrase of an object: "red circle" (or "small red circle" with the size).
pub fn phrase(color: &str, shape: &str, size: Option<&str>) -> String {
    match size {
        Some(s) => format!("{s} {color} {shape}"),
        None => format!("{color} {shape}"),
    }
}

/// The (colour, shape) indices of an object with this colour and shape name, when both are
/// ShapeScenes' (`COLORS`, `SHAPES`); its phrase index is `colour * SHAPES.len() + shape`.
pub fn pair(color: Option<&str>, shape: Option<&str>) -> Option<(usize, usize)> {
    let c = COLORS.iter().position(|x| Some(*x) == color)?;
    let s = SHAPES.iter().position(|x| Some(*x) == shape)?;
    Some((c, s))
}

impl Data {
    fn load(split: &Split, vocab: &Vocab, cfg: &Config) -> Result<Self> {
        let s = cfg.image_size as u32;
        let names: std::collections::HashMap<u64, &str> = split.instances.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
        let mut pixels = Vec::new();
        let mut texts = Vec::new();
        for ex in split.examples() {
            let img = gradcam_encoders::preprocess::load_image(&ex.path)?;
            let img = if img.dimensions() == (s, s) { img } else { image::imageops::resize(&img, s, s, image::imageops::FilterType::Triangle) };
            for c in 0..3 {
                pixels.extend(img.pixels().map(|p| p[c]));
            }
            let mut phrases = Vec::new();
            let mut pairs = Vec::new();
            for o in &ex.objects {
                let (Some(color), Some(shape)) = (o.color.as_deref(), names.get(&o.category_id)) else { continue };
                pairs.extend(pair(Some(color), Some(shape)));
                phrases.push(phrase(color, shape, None));
                if let Some(size) = o.size.as_deref() {
                    phrases.push(phrase(color, shape, Some(size)));
                }
            }
            let captions: Vec<String> = ex.captions.iter().map(|c| normalize(c)).collect();
            let all: HashSet<String> = phrases.iter().chain(&captions).map(|t| normalize(t)).collect();
            let enc = |t: &String| encode(vocab, t, cfg.context_length);
            texts.push(Texts { phrases: phrases.iter().map(enc).collect::<Result<_>>()?, captions: captions.iter().map(enc).collect::<Result<_>>()?, all, pairs });
        }
        if texts.is_empty() {
            return Err(Error::Training(format!("{} has no images", split.dir.display())));
        }
        Ok(Data { size: s as usize, pixels, texts })
    }

    /// The images `ids` as the network's input, `[n, 3, s, s]`, in [-1, 1].
    fn images(&self, ids: &[usize]) -> Result<Tensor> {
        let plane = 3 * self.size * self.size;
        let px: Vec<f32> = ids.iter().flat_map(|&i| self.pixels[i * plane..(i + 1) * plane].iter().map(|&v| v as f32 / 127.5 - 1.0)).collect();
        Ok(Tensor::from_vec(px, (ids.len(), 3, self.size, self.size), &Device::Cpu)?)
    }

    /// One text per image (a phrase with probability `phrase_share`), and the match matrix
    /// `[n, n]`: 1 where text j describes image i.
    fn pick(&self, ids: &[usize], rng: &mut Rng, phrase_share: f64) -> (Vec<&Encoded>, Tensor) {
        let picked: Vec<&Encoded> = ids
            .iter()
            .map(|&i| {
                let t = &self.texts[i];
                let phrase = !t.phrases.is_empty() && (t.captions.is_empty() || (rng.unit() as f64) < phrase_share);
                let pool = if phrase { &t.phrases } else { &t.captions };
                &pool[rng.below(pool.len())]
            })
            .collect();
        let n = ids.len();
        let m: Vec<f32> = ids.iter().flat_map(|&i| picked.iter().map(move |e| (self.texts[i].all.contains(&e.text) as u8) as f32)).collect();
        (picked, Tensor::from_vec(m, (n, n), &Device::Cpu).expect("n x n values"))
    }
}

/// Token rows `[n, T]` (padded with `pad`) and each row's length.
pub(crate) fn batch_tokens(texts: &[&Encoded], pad: u32) -> Result<(Tensor, Vec<usize>)> {
    let t = texts.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let ids: Vec<u32> = texts.iter().flat_map(|e| (0..t).map(|j| e.ids.get(j).copied().unwrap_or(pad))).collect();
    Ok((Tensor::from_vec(ids, (texts.len(), t), &Device::Cpu)?, texts.iter().map(|e| e.ids.len()).collect()))
}

/// CLIP's symmetric cross-entropy over the batch, each row's (column's) target spread evenly over
/// its matches.
fn contrastive(model: &Clip, img: &Tensor, texts: &[&Encoded], matches: &Tensor, pad: u32) -> Result<Tensor> {
    let (ids, lengths) = batch_tokens(texts, pad)?;
    let txt = crate::model::normalize(&model.text.forward(&ids, &lengths)?)?;
    let scale = model.logit_scale.clamp(0.0, 100f64.ln())?.exp()?;
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(&scale)?;
    soft_cross_entropy(&logits, matches, texts.len())
}

/// The symmetric cross-entropy of `logits` `[n, m]` against `matches` (1 where row i matches
/// column j), each row's (column's) target spread evenly over its matches; `n` rows.
fn soft_cross_entropy(logits: &Tensor, matches: &Tensor, n: usize) -> Result<Tensor> {
    let rows = matches.broadcast_div(&matches.sum_keepdim(1)?.clamp(1.0, f64::MAX)?)?;
    let cols = matches.broadcast_div(&matches.sum_keepdim(0)?.clamp(1.0, f64::MAX)?)?;
    let n = n as f64;
    let li = (candle_nn::ops::log_softmax(logits, D::Minus1)? * rows)?.sum_all()?;
    let lt = (candle_nn::ops::log_softmax(logits, 0)? * cols)?.sum_all()?;
    Ok(((li + lt)? * (-0.5 / n))?)
}

/// The phrase loss of normalised image embeddings `img` `[n, E]`: each image's cross-entropy over
/// every colour-shape phrase, its target spread over the pairs in its scene.
fn phrase_loss(model: &Clip, img: &Tensor, phrases: &[Encoded], present: &[&[(usize, usize)]], pad: u32) -> Result<Tensor> {
    let (ids, lengths) = batch_tokens(&phrases.iter().collect::<Vec<_>>(), pad)?;
    let txt = crate::model::normalize(&model.text.forward(&ids, &lengths)?)?;
    let scale = model.logit_scale.clamp(0.0, 100f64.ln())?.exp()?;
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(&scale)?; // [n, pairs]
    let m = phrases.len();
    let mut target = vec![0f32; present.len() * m];
    for (i, pairs) in present.iter().enumerate() {
        for &(c, s) in pairs.iter() {
            target[i * m + c * SHAPES.len() + s] = 1.0;
        }
    }
    let target = Tensor::from_vec(target, (present.len(), m), &Device::Cpu)?;
    let target = target.broadcast_div(&target.sum_keepdim(1)?.clamp(1.0, f64::MAX)?)?;
    Ok(((candle_nn::ops::log_softmax(&logits, D::Minus1)? * target)?.sum_all()? * (-1.0 / present.len() as f64))?)
}

/// Every colour-shape phrase, colour-major.
fn all_phrases(vocab: &Vocab, context_length: usize) -> Result<Vec<Encoded>> {
    COLORS.iter().flat_map(|c| SHAPES.iter().map(move |s| phrase(c, s, None))).map(|t| encode(vocab, &t, context_length)).collect()
}

/// How well the model tells each object's own colour-shape phrase from the pairs absent from
/// its scene, over the images of `data`: (comparisons won, comparisons, objects whose phrase
/// beats every absent pair, objects).
pub(crate) fn phrase_ranking(model: &Clip, vocab: &Vocab, images: &dyn Fn(&[usize]) -> Result<Tensor>, pairs: &[Vec<(usize, usize)>]) -> Result<[usize; 4]> {
    let all = all_phrases(vocab, model.cfg.context_length)?;
    let (ids, lengths) = batch_tokens(&all.iter().collect::<Vec<_>>(), vocab.pad)?;
    let txt = crate::model::normalize(&model.text.forward(&ids, &lengths)?)?;
    let mut tally = [0usize; 4];
    let order: Vec<usize> = (0..pairs.len()).collect();
    for chunk in order.chunks(64) {
        let img = crate::model::normalize(&model.vision.forward(&images(chunk)?, None)?)?;
        let sims = img.matmul(&txt.t()?)?.to_vec2::<f32>()?;
        for (row, &i) in sims.iter().zip(chunk) {
            let present: HashSet<usize> = pairs[i].iter().map(|&(c, s)| c * SHAPES.len() + s).collect();
            for &(c, s) in &pairs[i] {
                let own = row[c * SHAPES.len() + s];
                let mut all_won = true;
                for (k, &v) in row.iter().enumerate().filter(|(k, _)| !present.contains(k)) {
                    let _ = k;
                    tally[1] += 1;
                    if own > v {
                        tally[0] += 1;
                    } else {
                        all_won = false;
                    }
                }
                tally[2] += all_won as usize;
                tally[3] += 1;
            }
        }
    }
    Ok(tally)
}

/// Trains on `data/train`, validating on `data/val`, writing config.json, tokenizer.json,
/// model.safetensors and checkpoint.json into `out` after every epoch.
pub fn train(data: &Path, out: &Path, tc: &TrainConfig, resume: bool, progress: &mut dyn FnMut(Event)) -> Result<Checkpoint> {
    tc.check()?;
    let resumed = if resume { Some(Checkpoint::resume(out, tc.settings.epochs)?) } else { None };
    gradcam_io::create_dir_all(out)?;
    let train_split = Split::read(&data.join("train"))?;
    let val_split = Split::read(&data.join("val"))?;
    let captions = train_split.captions("a CLIP trains on captions and phrases")?;
    val_split.captions("a CLIP is validated on captions and phrases")?;
    let resuming = resumed.is_some();
    let (cfg, vocab, mut ckpt) = if let Some(ckpt) = resumed {
        let path = out.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let cfg: Config = serde_json::from_str(&text).map_err(|source| gradcam_train::Error::Json { path, source })?;
        (cfg, Vocab::load(&out.join("tokenizer.json"))?, ckpt)
    } else {
        let mut texts: Vec<String> = captions.annotations.iter().map(|c| normalize(&c.caption)).collect();
        texts.extend(gradcam_scenes::scene::SIZES.iter().chain(&COLORS).chain(&SHAPES).map(|w| w.to_string()));
        let vocab = Vocab::build(texts.iter().map(String::as_str), 1)?;
        (Config::new(vocab.len()), vocab, Checkpoint::new(tc.clone(), data, ()))
    };
    let train_data = Data::load(&train_split, &vocab, &cfg)?;
    let val_data = Data::load(&val_split, &vocab, &cfg)?;
    progress(Event::Loaded { train: train_data.texts.len(), val: val_data.texts.len() });
    let mut varmap = VarMap::new();
    let model = Clip::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    if resuming {
        varmap.load(out.join("model.safetensors"))?;
    } else {
        init_parameters(&varmap, ckpt.train.settings.seed)?;
        vocab.save(&out.join("tokenizer.json"))?;
        let path = out.join("config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|source| gradcam_train::Error::Json { path: path.clone(), source })?;
        gradcam_io::write_atomic(&path, text.as_bytes())?;
    }
    // The text sampling continues from a seed of the epoch training resumes at.
    let seed = ckpt.train.settings.seed ^ (ckpt.epochs_done as u64).wrapping_mul(0x51_7cc1_b727_220a);
    let phrases = all_phrases(&vocab, cfg.context_length)?;
    let mut run = Run { model, varmap, phrase_share: ckpt.train.phrase_share, phrase_weight: ckpt.train.phrase_loss, phrases, pad: vocab.pad, vocab, train: train_data, val: val_data, rng: Rng::new(seed), tally: [0; 4] };
    gradcam_train::fit(&mut run, &mut ckpt, out, progress)?;
    Ok(ckpt)
}

/// A CLIP being trained, as the training loop sees it.
struct Run {
    model: Clip,
    varmap: VarMap,
    phrase_share: f64,
    phrase_weight: f64,
    /// Every colour-shape phrase, for the phrase loss.
    phrases: Vec<Encoded>,
    pad: u32,
    vocab: Vocab,
    train: Data,
    val: Data,
    rng: Rng,
    tally: [usize; 4],
}

impl gradcam_train::Trainable for Run {
    type Metrics = PhraseMetrics;
    type Extra = ();
    type Error = Error;

    fn loss(&mut self, ids: &[usize]) -> Result<Tensor> {
        let (texts, matches) = self.train.pick(ids, &mut self.rng, self.phrase_share);
        let img = crate::model::normalize(&self.model.vision.forward(&self.train.images(ids)?, None)?)?;
        let l = contrastive(&self.model, &img, &texts, &matches, self.pad)?;
        if self.phrase_weight == 0.0 {
            return Ok(l);
        }
        let present: Vec<&[(usize, usize)]> = ids.iter().map(|&i| self.train.texts[i].pairs.as_slice()).collect();
        Ok((l + (phrase_loss(&self.model, &img, &self.phrases, &present, self.pad)? * self.phrase_weight)?)?)
    }

    fn validate(&mut self, batch_size: usize) -> Result<f32> {
        // The same texts every epoch.
        let mut rng = Rng::new(17);
        let ids: Vec<usize> = (0..self.val.texts.len()).collect();
        let (mut total, mut n) = (0.0, 0);
        for chunk in ids.chunks(batch_size) {
            let (texts, matches) = self.val.pick(chunk, &mut rng, self.phrase_share);
            let img = crate::model::normalize(&self.model.vision.forward(&self.val.images(chunk)?, None)?)?;
            total += contrastive(&self.model, &img, &texts, &matches, self.pad)?.to_scalar::<f32>()? * chunk.len() as f32;
            n += chunk.len();
        }
        let pairs: Vec<Vec<(usize, usize)>> = self.val.texts.iter().map(|t| t.pairs.clone()).collect();
        self.tally = phrase_ranking(&self.model, &self.vocab, &|ids| self.val.images(ids), &pairs)?;
        Ok(total / n.max(1) as f32)
    }

    fn metrics(&mut self) -> Result<PhraseMetrics> {
        let [won, total, all, objects] = self.tally;
        Ok(PhraseMetrics { phrase_vs_absent: won as f64 / total.max(1) as f64, phrase_beats_all_absent: all as f64 / objects.max(1) as f64 })
    }

    fn examples(&self) -> usize {
        self.train.texts.len()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}

impl std::fmt::Display for PhraseMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "phrase vs absent {:.4}, beats all absent {:.4}", self.phrase_vs_absent, self.phrase_beats_all_absent)
    }
}
