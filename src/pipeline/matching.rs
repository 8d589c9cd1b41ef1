//! A CLIP model on one image and some texts: each text's similarity (and zero-shot probability)
//! and every method's map of it, as `gradcam match --json` prints them and `POST /api/match`
//! answers.

use candle_core::D;
use gradcam_clip::{Matcher, Matching, Probability, LOGIT_SCALE};
use gradcam_core::{Explainable, Target};
use image::RgbImage;
use serde::Serialize;

use crate::pipeline::render::{fit, render, write_method_strips, Subject};

use super::{Error, Files, MapRecord, Progress, Result, Settings};

/// What to match and explain.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The texts (one or more).
    pub texts: Vec<String>,
    /// The image tower's value to explain (default: the last block's attention input).
    pub layer: Option<String>,
    /// Explain CLIP's zero-shot probability of each text among the texts (softmax over 100 x
    /// cosine; two or more texts) instead of its cosine similarity.
    pub softmax: bool,
    /// Also explain each text's counterfactual.
    pub counterfactual: bool,
    /// Methods and smoothing.
    pub settings: Settings,
}

/// One text with its scores and maps.
#[derive(Debug, Clone, Serialize)]
pub struct TextRecord {
    /// The text as given.
    pub text: String,
    /// Cosine similarity of the normalised image and text embeddings.
    pub similarity: f32,
    /// Zero-shot probability among the texts (with `softmax`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probability: Option<f32>,
    /// Whether the text was cut to the model's context length.
    pub truncated: bool,
    /// Words the model's vocabulary lacks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_words: Vec<String>,
    /// With a single method: its map of the text (not counterfactual), as in `explanations`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cam: Option<Vec<Vec<f32>>>,
    /// Every method's map of the text (and its counterfactual), method by method.
    pub explanations: Vec<MapRecord>,
}

/// The record of one image.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The image's name (its path).
    pub image: String,
    /// The image tower's explained value.
    pub layer: String,
    /// Each text, in the order given.
    pub texts: Vec<TextRecord>,
}

/// Matches `img` with the texts of `options` and explains each text's score, writing the
/// pictures to `files`.
pub fn match_texts(model: &Matcher, img: &RgbImage, name: &str, files: Files<'_>, options: &Options, progress: Option<&Progress>) -> Result<Record> {
    if options.texts.is_empty() {
        return Err(Error::Request("no text to match; give one or more".into()));
    }
    if options.softmax && options.texts.len() < 2 {
        return Err(Error::Request("the zero-shot probability (softmax) needs two or more texts".into()));
    }
    let (texts, infos) = model.encode_texts(&options.texts)?;
    let (input, region) = model.prepare(img)?;
    let scale = if options.softmax { LOGIT_SCALE } else { 1.0 };
    model.with_image(options.layer.as_deref(), |image, layer| -> Result<Record> {
        let m = Matching { image, texts: texts.clone(), scale };
        let a = m.features(&input)?;
        let row = m.head(&a)?.flatten_all()?;
        let values = row.to_vec1::<f32>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::Request("the model produced non-finite similarities; are the weights corrupt?".into()));
        }
        let probs = options.softmax.then(|| candle_nn_softmax(&row)).transpose()?;
        let subjects: Vec<Subject> = options
            .texts
            .iter()
            .enumerate()
            .flat_map(|(j, t)| {
                let target = if options.softmax { Target::custom(Probability(j)) } else { Target::class(j) };
                Subject::new(target, t.as_str()).file_prefix(format!("t{j}")).and_counterfactual(options.counterfactual)
            })
            .collect();
        let (picture_base, region) = fit(img, region);
        let out = files.output(&picture_base, region);
        let cam = options.settings.cam(&m, progress);
        let rendered = render(&cam, &options.settings.methods, &input, &a, &subjects, &out, None)?;
        if options.settings.methods.len() > 1 {
            write_method_strips(&rendered, &subjects, &out, picture_base.height().max(64))?;
        }
        let per_text = if options.counterfactual { 2 } else { 1 };
        let texts = infos
            .into_iter()
            .enumerate()
            .map(|(j, info)| {
                let explanations: Vec<MapRecord> = rendered.iter().flat_map(|row| &row[j * per_text..(j + 1) * per_text]).map(MapRecord::new).collect::<Result<_>>()?;
                let cam = (options.settings.methods.len() == 1).then(|| explanations[0].cam.clone());
                Ok(TextRecord { text: info.text, similarity: values[j] / scale as f32, probability: probs.as_ref().map(|p| p[j]), truncated: info.truncated, unknown_words: info.unknown, cam, explanations })
            })
            .collect::<Result<_>>()?;
        Ok(Record { image: name.to_string(), layer: layer.to_string(), texts })
    })?
}

fn candle_nn_softmax(row: &candle_core::Tensor) -> Result<Vec<f32>> {
    let max = row.max_keepdim(D::Minus1)?;
    let e = row.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_vec1::<f32>()?)
}
