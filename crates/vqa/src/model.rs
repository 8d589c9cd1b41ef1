//! The classic VQA fusion model (Antol et al. 2015; Lu et al.'s "deeper LSTM Q + norm I"): question
//! words through embeddings and an LSTM, the image through the scene CNN (average and max pooled),
//! both projected to a joint space with tanh, fused by element-wise product, then an MLP over the
//! answer vocabulary. [`Trainable`] holds `Var`s; [`Vqa`] is the frozen form that answers and
//! explains.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use gradcam_kernels::{Activation, Linear, LstmCell, Rule};
use gradcam_core::Explainable;
use gradcam_encoders::scene_cnn::{self, EncoderConfig, SceneCnn};
use gradcam_scenes::vocab::{normalize, Vocab};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `config.json` of a VQA model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    /// The scene CNN: encoder, image size, coordinate channels, pooling, units.
    #[serde(flatten)]
    pub scene: EncoderConfig,
    /// Words of the question vocabulary (tokenizer.json).
    pub vocab_size: usize,
    pub embed: usize,
    pub hidden: usize,
    pub joint: usize,
    pub mlp: usize,
    /// The answer vocabulary, in output order.
    pub answers: Vec<String>,
    /// Longer questions are cut to this many words.
    pub max_question_len: usize,
}

impl Config {
    pub fn new(vocab_size: usize, answers: Vec<String>) -> Self {
        Config {
            scene: EncoderConfig::new(64),
            embed: 64,
            hidden: 128,
            joint: 256,
            mlp: 256,
            vocab_size,
            answers,
            max_question_len: 30,
        }
    }
}

/// The model with trainable parameters.
pub struct Trainable {
    pub cfg: Config,
    cnn: SceneCnn,
    embed: candle_nn::Embedding,
    weight_ih: candle_nn::Linear,
    weight_hh: candle_nn::Linear,
    image_proj: candle_nn::Linear,
    question_proj: candle_nn::Linear,
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
    /// No gradient into the encoder (its weights stay as loaded).
    frozen_encoder: bool,
}

impl Trainable {
    pub fn new(cfg: &Config, vb: VarBuilder, frozen_encoder: bool) -> Result<Self> {
        let (e, h, j, m) = (cfg.embed, cfg.hidden, cfg.joint, cfg.mlp);
        let lstm = vb.pp("lstm");
        Ok(Self {
            cfg: cfg.clone(),
            cnn: SceneCnn::new(vb.pp("encoder"), cfg.scene.coord_conv, cfg.scene.channels)?,
            embed: candle_nn::embedding(cfg.vocab_size, e, vb.pp("embed"))?,
            weight_ih: candle_nn::Linear::new(lstm.get((4 * h, e), "weight_ih")?, Some(lstm.get(4 * h, "bias_ih")?)),
            weight_hh: candle_nn::Linear::new(lstm.get((4 * h, h), "weight_hh")?, Some(lstm.get(4 * h, "bias_hh")?)),
            image_proj: candle_nn::linear(cfg.scene.pooling().width(cfg.scene.channels), j, vb.pp("image_proj"))?,
            question_proj: candle_nn::linear(h, j, vb.pp("question_proj"))?,
            fc1: candle_nn::linear(j, m, vb.pp("classifier.0"))?,
            fc2: candle_nn::linear(m, cfg.answers.len(), vb.pp("classifier.2"))?,
            frozen_encoder,
        })
    }

    /// Answer logits.
    ///
    /// # Shapes
    /// `images`: `[b, 3, s, s]`; `rows`: `[n]` image of each question; `tokens`, `mask`: `[n, t]`
    /// (mask 1 on words, 0 on padding) -> `[n, answers]`.
    pub fn forward(&self, images: &Tensor, rows: &Tensor, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        let a = self.cnn.forward(images)?; // [b, C, h, w]
        let a = if self.frozen_encoder { a.detach() } else { a };
        let v = self.image_proj.forward(&self.cfg.scene.pooling().forward(&a)?)?.relu()?.index_select(rows, 0)?; // [n, J]
        let (n, t) = tokens.dims2()?;
        let hd = self.cfg.hidden;
        let words = self.embed.forward(tokens)?; // [n, t, E]
        let mut h = Tensor::zeros((n, hd), DType::F32, images.device())?;
        let mut c = h.clone();
        for s in 0..t {
            let gates = (self.weight_ih.forward(&words.i((.., s))?)? + self.weight_hh.forward(&h)?)?; // [n, 4H]
            let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, hd)?)?;
            let f = candle_nn::ops::sigmoid(&gates.narrow(1, hd, hd)?)?;
            let g = gates.narrow(1, 2 * hd, hd)?.tanh()?;
            let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * hd, hd)?)?;
            let c_new = ((f * &c)? + (i * g)?)?;
            let h_new = (o * c_new.tanh()?)?;
            // Padding keeps the state: h = m h_new + (1 - m) h.
            let m = mask.i((.., s))?.unsqueeze(1)?; // [n, 1]
            let keep = m.affine(-1.0, 1.0)?;
            h = (h_new.broadcast_mul(&m)? + h.broadcast_mul(&keep)?)?;
            c = (c_new.broadcast_mul(&m)? + c.broadcast_mul(&keep)?)?;
        }
        let q = self.question_proj.forward(&h)?.tanh()?; // [n, J]
        Ok(self.fc2.forward(&self.fc1.forward(&(v * q)?)?.relu()?)?)
    }
}

/// A tokenised question.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Words the model does not know (read as `<unk>`).
    pub unknown: Vec<String>,
    /// Whether the question was cut to `max_question_len` words.
    pub truncated: bool,
}

/// The frozen model.
pub struct Vqa {
    pub cfg: Config,
    pub vocab: Vocab,
    cnn: SceneCnn,
    embed: Tensor,
    lstm: LstmCell,
    image_proj: Linear,
    question_proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl Vqa {
    /// Loads `dir/{config.json, model.safetensors, tokenizer.json}`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg: Config = scene_cnn::read_config(&dir.join("config.json"), |c: &Config| &c.scene)?;
        let vocab = Vocab::load(&dir.join("tokenizer.json"))?;
        let vb = scene_cnn::model_weights(dir)?;
        Self::from_varbuilder(cfg, vocab, vb).map_err(|e| gradcam_encoders::Error::ModelWeights { file: dir.join("model.safetensors"), source: Box::new(e) }.into())
    }

    pub fn from_varbuilder(cfg: Config, vocab: Vocab, vb: VarBuilder) -> Result<Self> {
        let (e, h, j, m, a) = (cfg.embed, cfg.hidden, cfg.joint, cfg.mlp, cfg.answers.len());
        if vocab.len() != cfg.vocab_size {
            return Err(gradcam_encoders::Error::VocabSize { tokenizer: vocab.len(), config: cfg.vocab_size }.into());
        }
        let lstm = vb.pp("lstm");
        let linear = |name: &str, out: usize, inp: usize, act: Activation| -> Result<Linear> {
            let p = vb.pp(name);
            Ok(Linear::new(&p.get((out, inp), "weight")?, Some(&p.get(out, "bias")?), act)?)
        };
        Ok(Self {
            cnn: SceneCnn::new(vb.pp("encoder"), cfg.scene.coord_conv, cfg.scene.channels)?,
            embed: vb.pp("embed").get((cfg.vocab_size, e), "weight")?,
            lstm: LstmCell::new(&lstm.get((4 * h, e), "weight_ih")?, &lstm.get((4 * h, h), "weight_hh")?, &lstm.get(4 * h, "bias_ih")?, &lstm.get(4 * h, "bias_hh")?)?,
            // ReLU fused into the op, so that Guided Backpropagation's rule holds in it (candle's
            // `relu` would pass negative gradients).
            image_proj: linear("image_proj", j, cfg.scene.pooling().width(cfg.scene.channels), Activation::Relu)?,
            question_proj: linear("question_proj", j, h, Activation::Identity)?,
            fc1: linear("classifier.0", m, j, Activation::Relu)?,
            fc2: linear("classifier.2", a, m, Activation::Identity)?,
            cfg,
            vocab,
        })
    }

    /// Activations of the explained layer (`conv4`), `[b, channels, s / 4, s / 4]` (`channels`
    /// from config.json), of images made by [`Self::preprocess`].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.cnn.forward(images)?)
    }

    /// The image as the encoder's input, `[3, s, s]`.
    pub fn preprocess(&self, img: &image::RgbImage) -> Result<Tensor> {
        Ok(SceneCnn::preprocess(img, self.cfg.scene.image_size)?)
    }

    /// Tokenises a question: punctuation separated, unknown words kept as `<unk>` (and listed),
    /// cut to `max_question_len` words; an empty question is an error.
    pub fn question(&self, text: &str) -> Result<Question> {
        let norm = normalize(text);
        let words: Vec<&str> = norm.split_whitespace().collect();
        if words.is_empty() {
            return Err(Error::EmptyQuestion);
        }
        let mut tokens = self.vocab.encode(&norm)?;
        let unknown = tokens.iter().zip(&words).filter(|(&t, _)| t == self.vocab.unk).map(|(_, w)| w.to_string()).collect();
        let truncated = tokens.len() > self.cfg.max_question_len;
        tokens.truncate(self.cfg.max_question_len);
        Ok(Question { text: text.to_string(), tokens, unknown, truncated })
    }

    /// The question in the joint space, tanh(W h_T + b).
    ///
    /// # Shapes
    /// -> `[1, joint]`.
    pub fn encode(&self, q: &Question) -> Result<Tensor> {
        let mut h = Tensor::zeros((1, self.cfg.hidden), DType::F32, &Device::Cpu)?;
        let mut c = h.clone();
        for &t in &q.tokens {
            let x = self.embed.i(t as usize)?.unsqueeze(0)?;
            (h, c) = self.lstm.step(&x, &h, &c)?;
        }
        Ok(self.question_proj.forward(&h)?.tanh()?)
    }

    /// Answer logits from activations and an encoded question.
    ///
    /// # Shapes
    /// `a`: `[n, C, h, w]`, `q`: `[1, joint]` -> `[n, answers]`.
    pub fn logits(&self, a: &Tensor, q: &Tensor) -> Result<Tensor> {
        self.logits_with(a, q, Rule::Exact)
    }

    /// [`Self::logits`] with the backward of the head's ReLUs following `rule`.
    pub fn logits_with(&self, a: &Tensor, q: &Tensor, rule: Rule) -> Result<Tensor> {
        let v = self.image_proj.forward_with(&self.cfg.scene.pooling().forward(a)?, rule)?; // [n, J], ReLU fused
        Ok(self.fc2.forward(&self.fc1.forward_with(&v.broadcast_mul(q)?, rule)?)?)
    }

    /// The `k` most probable answers with their probabilities.
    pub fn top_answers(&self, logits: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
        let probs = candle_nn::ops::softmax(&logits.flatten_all()?, D::Minus1)?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&x, &y| probs[y].total_cmp(&probs[x]));
        Ok(order.into_iter().take(k).map(|i| (i, probs[i])).collect())
    }

    /// Index of a named answer, or an error listing the answers the model knows.
    pub fn answer_index(&self, answer: &str) -> Result<usize> {
        let a = answer.trim().to_lowercase();
        self.cfg.answers.iter().position(|x| *x == a).ok_or_else(|| Error::UnknownAnswer { answer: answer.to_string(), known: self.cfg.answers.join(", ") })
    }
}

/// The model split at `conv4` for one question: the head gives the answer logits.
pub struct VqaSplit<'a> {
    pub model: &'a Vqa,
    /// The encoded question, `[1, joint]`.
    pub question: Tensor,
}

impl Explainable for VqaSplit<'_> {
    fn features(&self, input: &Tensor) -> gradcam_core::Result<Tensor> {
        self.model.features(input).map_err(Error::into_core)
    }

    fn head(&self, a: &Tensor) -> gradcam_core::Result<Tensor> {
        self.model.logits(a, &self.question).map_err(Error::into_core)
    }

    fn forward_with(&self, input: &Tensor, rule: Rule) -> gradcam_core::Result<Tensor> {
        let a = self.model.cnn.forward_with(input, rule).map_err(|e| Error::from(e).into_core())?;
        self.model.logits_with(&a, &self.question, rule).map_err(Error::into_core)
    }
}
