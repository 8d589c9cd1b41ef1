//! Show-and-Tell (Vinyals et al., "Show and Tell: A Neural Image Caption Generator", 2015): a CNN
//! encodes the image, its globally pooled features (average and max) are projected and fed to an
//! LSTM decoder beside every word embedding (as in m-RNN / LRCN: with the image only at the first
//! step, the decoder learned the language long before it looked at the image). Two forms share
//! one set of weights: [`Trainable`] (candle `Var`s, plain differentiable ops) and [`Captioner`]
//! (frozen, fused ops for decoding and explaining).

use std::path::Path;

use candle_core::{DType, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use gradcam_kernels::{Activation, Linear, LstmCell, Rule};
use gradcam_core::Explainable;
use gradcam_encoders::scene_cnn::{self, EncoderConfig, SceneCnn};
use serde::{Deserialize, Serialize};

use crate::scores::{CaptionHead, CaptionLogProbs};
use gradcam_scenes::vocab::Vocab;
use crate::{Error, Result};

/// `config.json` of a captioner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    /// The scene CNN: encoder, image size, coordinate channels, pooling, units.
    #[serde(flatten)]
    pub scene: EncoderConfig,
    pub embed: usize,
    pub hidden: usize,
    pub vocab_size: usize,
    /// Longest caption generated, in words.
    pub max_len: usize,
}

impl Config {
    pub fn new(vocab_size: usize) -> Self {
        Config { scene: EncoderConfig::new(64), embed: 64, hidden: 256, vocab_size, max_len: 20 }
    }

    pub fn load(path: &Path) -> Result<Self> {
        Ok(scene_cnn::read_config(path, |c: &Config| &c.scene)?)
    }
}

/// The captioner with trainable parameters.
pub struct Trainable {
    pub cfg: Config,
    cnn: SceneCnn,
    image_proj: candle_nn::Linear,
    embed: candle_nn::Embedding,
    weight_ih: candle_nn::Linear,
    weight_hh: candle_nn::Linear,
    out: candle_nn::Linear,
    /// Which words the image's captions use, from `conv4` (a 1x1 convolution max-pooled over
    /// space; an auxiliary head for training only, see `TrainConfig::word_loss`).
    words: Option<candle_nn::Linear>,
}

impl Trainable {
    /// With `word_outputs` > 0, also the auxiliary bag-of-words head (`words.*`) with that many
    /// outputs.
    pub fn new(cfg: &Config, vb: VarBuilder, word_outputs: usize) -> Result<Self> {
        let (e, h, v) = (cfg.embed, cfg.hidden, cfg.vocab_size);
        let lstm = vb.pp("lstm");
        Ok(Self {
            cfg: cfg.clone(),
            words: if word_outputs > 0 { Some(candle_nn::linear(cfg.scene.channels, word_outputs, vb.pp("words"))?) } else { None },
            cnn: SceneCnn::new(vb.pp("encoder"), cfg.scene.coord_conv, cfg.scene.channels)?,
            image_proj: candle_nn::linear(cfg.scene.pooling().width(cfg.scene.channels), e, vb.pp("image_proj"))?,
            embed: candle_nn::embedding(v, e, vb.pp("embed"))?,
            weight_ih: candle_nn::Linear::new(lstm.get((4 * h, 2 * e), "weight_ih")?, Some(lstm.get(4 * h, "bias_ih")?)),
            weight_hh: candle_nn::Linear::new(lstm.get((4 * h, h), "weight_hh")?, Some(lstm.get(4 * h, "bias_hh")?)),
            out: candle_nn::linear(h, v, vb.pp("out"))?,
        })
    }

    /// Log-probabilities of each next word, teacher-forced, and (with the word head) the logits
    /// of each vocabulary word being used by the image's captions.
    ///
    /// # Shapes
    /// `images`: `[b, 3, s, s]`; `rows`: `[n]` image index of each caption; `tokens`: `[n, t]`
    /// (`<start>` w1 .. w_{t-1}) -> `[n, t, vocab]`, position i predicting the word after token
    /// i; `[b, vocab]`; and the mean `conv4` activation (its L1 norm per element, ReLU outputs).
    pub fn forward(&self, images: &Tensor, rows: &Tensor, tokens: &Tensor) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        use candle_core::Module;
        let a = self.cnn.forward(images)?; // [b, C, h, w]
        // Word scores at every position (a 1x1 convolution), max-pooled over space (Oquab et
        // al. 2015): a word's evidence has to be strong somewhere, not spread thinly.
        let bag = match &self.words {
            Some(head) => {
                let (b, c, h, w) = a.dims4()?;
                let per_position = a.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?; // [b, hw, C]
                Some(head.forward(&per_position)?.max(1)?) // [b, V]
            }
            None => None,
        };
        let img = self.image_proj.forward(&self.cfg.scene.pooling().forward(&a)?)?.index_select(rows, 0)?; // [n, E]
        let (n, t) = tokens.dims2()?;
        let hidden = self.cfg.hidden;
        let zeros = Tensor::zeros((n, hidden), DType::F32, images.device())?;
        let step = |x: &Tensor, h: &Tensor, c: &Tensor| -> Result<(Tensor, Tensor)> {
            let gates = (self.weight_ih.forward(x)? + self.weight_hh.forward(h)?)?; // [n, 4H]
            let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, hidden)?)?;
            let f = candle_nn::ops::sigmoid(&gates.narrow(1, hidden, hidden)?)?;
            let g = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
            let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
            let c = ((f * c)? + (i * g)?)?;
            let h = (o * c.tanh()?)?;
            Ok((h, c))
        };
        let (mut h, mut c) = (zeros.clone(), zeros);
        let words = self.embed.forward(tokens)?; // [n, t, E]
        let mut logits = Vec::with_capacity(t);
        for s in 0..t {
            let x = Tensor::cat(&[&words.i((.., s))?, &img], 1)?; // [n, 2E]
            (h, c) = step(&x, &h, &c)?;
            logits.push(self.out.forward(&h)?);
        }
        Ok((candle_nn::ops::log_softmax(&Tensor::stack(&logits, 1)?, D::Minus1)?, bag, a.mean_all()?))
    }
}

pub use gradcam_encoders::scene_cnn::init_parameters;

/// A frozen captioner for decoding and explaining.
pub struct Captioner {
    pub cfg: Config,
    pub vocab: Vocab,
    cnn: SceneCnn,
    image_proj: Linear,
    embed: Tensor,
    lstm: LstmCell,
    out: Linear,
    /// The same decoder weights for [`CaptionLogProbs`].
    scores: CaptionLogProbs,
    /// The image projection's weight `[E, P]` and bias for [`CaptionHead`].
    proj_w: std::sync::Arc<Vec<f32>>,
    proj_b: std::sync::Arc<Vec<f32>>,
}

/// A generated caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    /// Word ids, without `<start>` and `<end>`.
    pub tokens: Vec<u32>,
    pub words: Vec<String>,
    /// log p(w_t | w_<t, image) of each word, then of `<end>` if it was produced.
    pub logprobs: Vec<f32>,
}

impl Captioner {
    /// Loads `dir/{config.json, model.safetensors, tokenizer.json}`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = Config::load(&dir.join("config.json"))?;
        let vocab = Vocab::load(&dir.join("tokenizer.json"))?;
        if vocab.len() != cfg.vocab_size {
            return Err(gradcam_encoders::Error::VocabSize { tokenizer: vocab.len(), config: cfg.vocab_size }.into());
        }
        let vb = scene_cnn::model_weights(dir)?;
        Self::from_varbuilder(cfg, vocab, vb).map_err(|e| gradcam_encoders::Error::ModelWeights { file: dir.join("model.safetensors"), source: Box::new(e) }.into())
    }

    /// The frozen form of trained parameters.
    pub fn from_varbuilder(cfg: Config, vocab: Vocab, vb: VarBuilder) -> Result<Self> {
        let (e, h, v) = (cfg.embed, cfg.hidden, cfg.vocab_size);
        let lstm = vb.pp("lstm");
        let proj = vb.pp("image_proj");
        let out = vb.pp("out");
        let flat = |t: Tensor| -> Result<std::sync::Arc<Vec<f32>>> { Ok(std::sync::Arc::new(t.flatten_all()?.to_vec1::<f32>()?)) };
        let weight_ih = lstm.get((4 * h, 2 * e), "weight_ih")?;
        let bias = (lstm.get(4 * h, "bias_ih")? + lstm.get(4 * h, "bias_hh")?)?;
        let word_gates = vb.pp("embed").get((v, e), "weight")?.matmul(&weight_ih.narrow(1, 0, e)?.t()?)?.broadcast_add(&bias)?; // [V, 4H]
        let scores = CaptionLogProbs {
            w_img: flat(weight_ih.narrow(1, e, e)?.contiguous()?)?,
            w_hh: flat(lstm.get((4 * h, h), "weight_hh")?)?,
            word_gates: flat(word_gates)?,
            out: flat(out.get((v, h), "weight")?)?,
            out_bias: flat(out.get(v, "bias")?)?,
            e,
            h,
            v,
            inputs: vec![],
            targets: vec![],
            cache: Default::default(),
        };
        let pw = cfg.scene.pooling().width(cfg.scene.channels);
        Ok(Self {
            scores,
            proj_w: flat(proj.get((e, pw), "weight")?)?,
            proj_b: flat(proj.get(e, "bias")?)?,
            cnn: SceneCnn::new(vb.pp("encoder"), cfg.scene.coord_conv, cfg.scene.channels)?,
            image_proj: Linear::new(&proj.get((e, pw), "weight")?, Some(&proj.get(e, "bias")?), Activation::Identity)?,
            embed: vb.pp("embed").get((v, e), "weight")?,
            lstm: LstmCell::new(&lstm.get((4 * h, 2 * e), "weight_ih")?, &lstm.get((4 * h, h), "weight_hh")?, &lstm.get(4 * h, "bias_ih")?, &lstm.get(4 * h, "bias_hh")?)?,
            out: Linear::new(&out.get((v, h), "weight")?, Some(&out.get(v, "bias")?), Activation::Identity)?,
            cfg,
            vocab,
        })
    }

    /// The image as the encoder's input, `[3, s, s]`.
    pub fn preprocess(&self, img: &image::RgbImage) -> Result<Tensor> {
        Ok(SceneCnn::preprocess(img, self.cfg.scene.image_size)?)
    }

    /// Activations of the explained layer (`conv4`).
    ///
    /// # Shapes
    /// `[b, 3, s, s]` -> `[b, channels, s / 4, s / 4]` (`channels` from config.json).
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.cnn.forward(images)?)
    }

    /// The image embedding fed at every step, and the initial (zero) LSTM state.
    fn start(&self, a: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let img = self.image_proj.forward(&self.cfg.scene.pooling().forward(a)?)?; // [n, E]
        let zeros = Tensor::zeros((a.dim(0)?, self.lstm.hidden()), DType::F32, a.device())?;
        Ok((img, zeros.clone(), zeros))
    }

    /// log p(next word) after feeding `tokens`, `[n, vocab]`, and the new state.
    fn step(&self, tokens: &[u32], img: &Tensor, h: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let ids = Tensor::new(tokens, h.device())?;
        let x = Tensor::cat(&[&self.embed.index_select(&ids, 0)?, img], 1)?; // [n, 2E]
        let (h, c) = self.lstm.step(&x, h, c)?;
        let logp = candle_nn::ops::log_softmax(&self.out.forward(&h)?, D::Minus1)?; // [n, V]
        Ok((logp, h, c))
    }

    /// log p of each word of `tokens` (then of `<end>` if `with_end`), teacher-forced, as one
    /// differentiable op of the activations.
    ///
    /// # Shapes
    /// `a`: `[n, C, h, w]` -> `[n, t]` (`t` = words, plus one with `<end>`).
    pub fn word_logprobs(&self, a: &Tensor, tokens: &[u32], with_end: bool) -> Result<Tensor> {
        Ok(a.contiguous()?.apply_op1(self.head(tokens, with_end))?)
    }

    /// The head of [`Self::word_logprobs`] as one op.
    pub(crate) fn head(&self, tokens: &[u32], with_end: bool) -> CaptionHead {
        let mut inputs = vec![self.vocab.start];
        inputs.extend_from_slice(tokens);
        let mut targets = tokens.to_vec();
        if with_end {
            targets.push(self.vocab.end);
        } else {
            inputs.pop();
        }
        let scores = CaptionLogProbs { inputs, targets, cache: Default::default(), ..self.scores.clone() };
        CaptionHead { scores, proj_w: self.proj_w.clone(), proj_b: self.proj_b.clone(), moments: self.cfg.scene.pool_moments }
    }

    /// Teacher-forced log-probabilities: position i predicts the word after `tokens[i]`.
    ///
    /// # Shapes
    /// `a`: `[n, C, h, w]`, `tokens`: `n x t` -> `[n, t, vocab]`.
    pub fn logprobs(&self, a: &Tensor, tokens: &[Vec<u32>]) -> Result<Tensor> {
        let (img, mut h, mut c) = self.start(a)?;
        let t = tokens.first().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(t);
        for s in 0..t {
            let col: Vec<u32> = tokens.iter().map(|row| row[s]).collect();
            let (logp, h2, c2) = self.step(&col, &img, &h, &c)?;
            (h, c) = (h2, c2);
            out.push(logp);
        }
        Ok(Tensor::stack(&out, 1)?)
    }

    /// Greedy decoding of a batch of images (activations from [`Self::features`]).
    pub fn greedy(&self, a: &Tensor) -> Result<Vec<Caption>> {
        let n = a.dim(0)?;
        let (img, mut h, mut c) = self.start(a)?;
        let mut prev = vec![self.vocab.start; n];
        let mut caps: Vec<Caption> = vec![Caption { tokens: vec![], words: vec![], logprobs: vec![] }; n];
        let mut done = vec![false; n];
        for _ in 0..=self.cfg.max_len {
            let (logp, h2, c2) = self.step(&prev, &img, &h, &c)?;
            (h, c) = (h2, c2);
            let logp = logp.to_vec2::<f32>()?;
            for (i, row) in logp.iter().enumerate() {
                let best = argmax_word(row, &self.vocab);
                prev[i] = best;
                if done[i] {
                    continue;
                }
                caps[i].logprobs.push(row[best as usize]);
                if best == self.vocab.end || caps[i].tokens.len() == self.cfg.max_len {
                    done[i] = true;
                } else {
                    caps[i].tokens.push(best);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        for cap in &mut caps {
            cap.words = self.vocab.decode(&cap.tokens);
        }
        Ok(caps)
    }

    /// Beam search with `k` beams for one image (activations `[1, C, h, w]`); the best finished
    /// caption by total log-probability.
    pub fn beam(&self, a: &Tensor, k: usize) -> Result<Caption> {
        let k = k.max(1);
        let (img1, mut h, mut c) = self.start(a)?;
        let mut img = img1.clone();
        // (tokens, log-probabilities), one row of h / c each
        let mut beams: Vec<(Vec<u32>, Vec<f32>)> = vec![(vec![], vec![])];
        let mut finished: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
        for _ in 0..=self.cfg.max_len {
            let prev: Vec<u32> = beams.iter().map(|(t, _)| t.last().copied().unwrap_or(self.vocab.start)).collect();
            let (logp, h2, c2) = self.step(&prev, &img, &h, &c)?;
            let logp = logp.to_vec2::<f32>()?;
            let mut cands: Vec<(f32, usize, u32)> = Vec::new();
            for (b, row) in logp.iter().enumerate() {
                let base: f32 = beams[b].1.iter().sum();
                for (w, &lp) in row.iter().enumerate() {
                    if w as u32 == self.vocab.pad || w as u32 == self.vocab.start || w as u32 == self.vocab.unk {
                        continue;
                    }
                    cands.push((base + lp, b, w as u32));
                }
            }
            cands.sort_by(|x, y| y.0.total_cmp(&x.0));
            let mut next = Vec::new();
            let mut rows = Vec::new();
            for (_, b, w) in cands {
                let (mut toks, mut lps) = beams[b].clone();
                lps.push(logp[b][w as usize]);
                if w == self.vocab.end || toks.len() == self.cfg.max_len {
                    finished.push((toks, lps));
                } else {
                    toks.push(w);
                    next.push((toks, lps));
                    rows.push(b as u32);
                }
                if next.len() == k || finished.len() >= k {
                    break;
                }
            }
            if finished.len() >= k || next.is_empty() {
                break;
            }
            let idx = Tensor::new(rows.as_slice(), a.device())?;
            (h, c) = (h2.contiguous()?.index_select(&idx, 0)?, c2.contiguous()?.index_select(&idx, 0)?);
            img = img1.broadcast_as((rows.len(), img1.dim(1)?))?.contiguous()?;
            beams = next;
        }
        // Unfinished prefixes compete only when nothing finished (the length limit was hit).
        if finished.is_empty() {
            finished = beams;
        }
        let (tokens, logprobs) = finished
            .into_iter()
            .max_by(|x, y| x.1.iter().sum::<f32>().total_cmp(&y.1.iter().sum::<f32>()))
            .ok_or_else(|| Error::Model("beam search produced no caption".into()))?;
        let words = self.vocab.decode(&tokens);
        Ok(Caption { tokens, words, logprobs })
    }
}

fn argmax_word(row: &[f32], vocab: &Vocab) -> u32 {
    let mut best = vocab.end;
    for (i, &v) in row.iter().enumerate() {
        let i = i as u32;
        if i != vocab.pad && i != vocab.start && i != vocab.unk && v > row[best as usize] {
            best = i;
        }
    }
    best
}

/// The captioner split at `conv4` for one caption: the head teacher-forces the caption and
/// returns the log-probability of each of its words, `[n, t]`.
pub struct CaptionSplit<'a> {
    pub model: &'a Captioner,
    pub tokens: Vec<u32>,
}

impl<'a> CaptionSplit<'a> {
    pub fn new(model: &'a Captioner, tokens: &[u32]) -> Self {
        Self { model, tokens: tokens.to_vec() }
    }
}

impl Explainable for CaptionSplit<'_> {
    fn features(&self, input: &Tensor) -> gradcam_core::Result<Tensor> {
        self.model.features(input).map_err(Error::into_core)
    }

    fn head(&self, a: &Tensor) -> gradcam_core::Result<Tensor> {
        self.model.word_logprobs(a, &self.tokens, false).map_err(Error::into_core)
    }

    fn head_gradients(&self, a: &Tensor, seeds: &[(usize, f32)]) -> gradcam_core::Result<Option<(Vec<f32>, Tensor)>> {
        let (_, c, h, w) = a.dims4()?;
        let head = self.model.head(&self.tokens, false);
        let (scores, da) = head.gradients(&a.flatten_all()?.to_vec1::<f32>()?, (c, h, w), seeds)?;
        Ok(Some((scores, Tensor::from_vec(da, (seeds.len(), c, h, w), a.device())?)))
    }

    /// The head has no ReLU (pooling, projection, LSTM, log-softmax): the guided forward is the
    /// head on the CNN's guided features.
    fn forward_with(&self, input: &Tensor, rule: Rule) -> gradcam_core::Result<Tensor> {
        let a = self.model.cnn.forward_with(input, rule).map_err(|e| Error::from(e).into_core())?;
        self.head(&a)
    }
}
