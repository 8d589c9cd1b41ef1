//! The captioner on one image: its caption (or a given one) and every method's map of every word,
//! with the strip of all of them, as `gradcam caption --json` prints them.

use gradcam_captioner::{CaptionSplit, Captioner};
use gradcam_core::map::Region;
use crate::pipeline::render::{fit, grid, render, Subject};
use gradcam_core::{Target, UnitNames};
use image::RgbImage;
use serde::Serialize;

use super::{named_report, Error, Files, MapRecord, Progress, Result, Settings};

/// What to caption and explain.
#[derive(Debug, Clone)]
pub struct Options {
    /// Beam width (1: greedy).
    pub beam: usize,
    /// Explain this caption instead of generating one (every word must be known).
    pub caption: Option<String>,
    /// Methods and smoothing.
    pub settings: Settings,
}

impl Default for Options {
    fn default() -> Self {
        Options { beam: 1, caption: None, settings: Settings::default() }
    }
}

/// One map of one word.
#[derive(Debug, Clone, Serialize)]
pub struct WordMap {
    /// The word's step in the caption.
    pub t: usize,
    /// The word.
    pub word: String,
    /// Its log-probability given the image and the words before it.
    pub logprob: f32,
    /// The map.
    #[serde(flatten)]
    pub map: MapRecord,
}

/// The record of one image.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The image's name (its path).
    pub image: String,
    /// The caption explained.
    pub caption: String,
    /// Every method's map of every word, method by method.
    pub words: Vec<WordMap>,
    /// The strip: the image and each word's picture, one row per method.
    pub strip: String,
}

/// Captions `img` and explains every word, writing the pictures and the strip to `files`; with
/// `names`, each map gets its neuron report.
pub fn caption(model: &Captioner, img: &RgbImage, name: &str, files: Files<'_>, options: &Options, names: Option<&UnitNames>, progress: Option<&Progress>) -> Result<Record> {
    let input = model.preprocess(img)?.unsqueeze(0)?; // [1, 3, s, s]
    let a = model.features(&input)?;
    let tokens = match &options.caption {
        Some(text) if text.split_whitespace().count() > model.cfg.max_len => {
            return Err(Error::Request(format!("the caption has {} words; the model takes at most {}", text.split_whitespace().count(), model.cfg.max_len)));
        }
        Some(text) => model.vocab.encode_known(text)?,
        None if options.beam > 1 => model.beam(&a, options.beam)?.tokens,
        None => model.greedy(&a)?.remove(0).tokens,
    };
    let words = model.vocab.decode(&tokens);
    let logprobs = model.word_logprobs(&a, &tokens, false)?.squeeze(0)?.to_vec1::<f32>()?;
    let split = CaptionSplit::new(model, &tokens);
    let subjects: Vec<Subject> = words.iter().enumerate().map(|(t, w)| Subject::new(Target::word(t), w.clone()).file_prefix(format!("{t:02}"))).collect();
    let (picture_base, region) = fit(img, Region { x: 0, y: 0, width: img.width(), height: img.height() });
    let out = files.output(&picture_base, region);
    let neurons = names.map(named_report);
    let cam = options.settings.cam(&split, progress);
    let rendered = render(&cam, &options.settings.methods, &input, &a, &subjects, &out, neurons.as_ref().map(|f| f as _))?;
    let tag = match options.settings.methods[..] {
        [m] => cam.clone().method(m).file_tag(),
        _ => "_methods".to_string(),
    };
    let strip = files.keep(&grid(&picture_base, &rendered), &format!("strip{tag}"))?;
    let words_json = rendered.iter().flatten().enumerate().map(|(i, r)| {
        let t = i % words.len().max(1);
        Ok(WordMap { t, word: words[t].clone(), logprob: logprobs[t], map: MapRecord::new(r)? })
    });
    Ok(Record { image: name.to_string(), caption: words.join(" "), words: words_json.collect::<Result<_>>()?, strip })
}
