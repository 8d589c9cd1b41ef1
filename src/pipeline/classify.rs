//! An ImageNet classifier on one image: the top-k predictions and every method's map of the
//! explained classes (and their counterfactuals), as `gradcam classify --json` prints them.

use candle_core::D;
use crate::pipeline::render::{fit, render, write_method_strips, Subject};
use gradcam_core::{class_named_report, Explainable, Explanation, Target, UnitNames};
use gradcam_encoders::preprocess::{prepare_with, Resize};
use gradcam_encoders::Network;
use image::RgbImage;
use serde::Serialize;

use super::{Error, Files, MapRecord, Progress, Result, Settings};

/// What to explain on each image.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Classes to explain; none: the top-1 prediction.
    pub classes: Vec<usize>,
    /// How many predictions to report.
    pub top_k: usize,
    /// Also explain each class's counterfactual.
    pub counterfactual: bool,
    /// How the image becomes the 224-pixel input.
    pub resize: Resize,
    /// Add each map's neuron report (units named by the classes they raise, or by `dissection`).
    pub neurons: bool,
    /// Unit names from network dissection (a trained classifier folder's `dissection.json`).
    pub dissection: Option<std::sync::Arc<gradcam_neurons::Dissection>>,
    /// Methods and smoothing.
    pub settings: Settings,
}

impl Options {
    /// Refuses classes `net` does not have (before any image).
    pub fn check(&self, net: &Network) -> Result<()> {
        match self.classes.iter().find(|&&c| c >= net.num_classes()) {
            Some(bad) => Err(gradcam_core::SettingError::new(vec!["classes"], format!("{bad} is out of range: {} has classes 0..={}", net.arch(), net.num_classes() - 1)).into()),
            None => Ok(()),
        }
    }
}

/// One prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// The ImageNet class index.
    pub class: usize,
    /// Its name.
    pub label: String,
    /// Its logit.
    pub logit: f32,
    /// Its softmax probability.
    pub prob: f32,
}

/// One map of one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassMap {
    /// The class explained.
    pub class: usize,
    /// Its name.
    pub label: String,
    /// The map.
    #[serde(flatten)]
    pub map: MapRecord,
}

/// The record of one image.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The image's name (its path).
    pub image: String,
    /// The architecture.
    pub model: String,
    /// The explained layer.
    pub layer: String,
    /// (height, width) of the network's input.
    pub input_size: [usize; 2],
    /// The top-k predictions.
    pub predictions: Vec<Prediction>,
    /// Every method's map of every explained class, method by method.
    pub explanations: Vec<ClassMap>,
}

/// Classifies `img` with `net` and explains it at layer `layer` (an index of
/// [`Network::layer_index`]), writing the pictures to `files`.
pub fn classify(net: &Network, layer: usize, img: &RgbImage, name: &str, files: Files<'_>, options: &Options, progress: Option<&Progress>) -> Result<Record> {
    options.check(net)?;
    let prepared = prepare_with(img, options.resize, net.preprocess())?;
    let input = prepared.tensor.unsqueeze(0)?; // [1, 3, h, w]
    let (_, _, h, w) = input.dims4()?;
    let split = net.split(layer);
    let activations = split.features(&input)?; // [1, K, h', w']
    let logits = split.head(&activations)?.squeeze(0)?; // [classes]
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_vec1::<f32>()?;
    let logits = logits.to_vec1::<f32>()?;
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(Error::Request("the model produced non-finite logits; are the weights corrupt?".into()));
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let label = |c: usize| net.label(c);
    let predictions = order.iter().take(options.top_k).map(|&c| Prediction { class: c, label: label(c), logit: logits[c], prob: probs[c] }).collect();

    let classes = if options.classes.is_empty() { vec![order[0]] } else { options.classes.clone() };
    let subjects: Vec<Subject> =
        classes.iter().flat_map(|&c| Subject::new(Target::class(c), &label(c)).file_prefix(c.to_string()).and_counterfactual(options.counterfactual)).collect();
    let (picture_base, region) = fit(img, prepared.region);
    let out = files.output(&picture_base, region);
    let class_name = |c: usize| label(c);
    let names = options.dissection.as_deref().map(|d| UnitNames::Dissection(d));
    let neurons = |e: &Explanation, subject: &str| match &names {
        Some(names) => super::named_report(names)(e, subject),
        None => class_named_report(&split, &activations, e.weights.as_deref().unwrap_or(&[]), subject, &class_name),
    };
    let cam = options.settings.cam(&split, progress);
    let rendered = render(&cam, &options.settings.methods, &input, &activations, &subjects, &out, options.neurons.then_some(&neurons as _))?;
    if options.settings.methods.len() > 1 {
        write_method_strips(&rendered, &subjects, &out, 224)?;
    }
    let explanations = rendered
        .iter()
        .flatten()
        .map(|r| {
            let class = r.explanation.target.index().expect("a class target");
            Ok(ClassMap { class, label: label(class), map: MapRecord::new(r)? })
        })
        .collect::<Result<_>>()?;
    Ok(Record { image: name.to_string(), model: net.arch().to_string(), layer: net.layer_name(layer).to_string(), input_size: [h, w], predictions, explanations })
}
