//! An ImageNet classifier on one image: the top-k predictions and every method's map of the
//! explained classes (and their counterfactuals), as `gradcam classify --json` prints them.

use candle_core::D;
use crate::pipeline::render::{fit, render_batch, write_method_strips, Output, Subject};
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
/// [`Network::layer_index`]), writing the pictures to `files`: [`classify_batch`] of one image.
pub fn classify(net: &Network, layer: usize, img: &RgbImage, name: &str, files: Files<'_>, options: &Options, progress: Option<&Progress>) -> Result<Record> {
    classify_batch(net, layer, &[(img, name, files)], options, progress).remove(0)
}

/// The top-k predictions of one image's logits (`[classes]`), and its top-1 class.
fn rank(net: &Network, logits: &candle_core::Tensor, top_k: usize) -> Result<(Vec<Prediction>, usize)> {
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_vec1::<f32>()?;
    let logits = logits.to_vec1::<f32>()?;
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(Error::Request("the model produced non-finite logits; are the weights corrupt?".into()));
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let predictions = order.iter().take(top_k).map(|&c| Prediction { class: c, label: net.label(c), logit: logits[c], prob: probs[c] }).collect();
    Ok((predictions, order[0]))
}

/// [`classify`] of several images, each `(image, name, files)`: per image the record
/// `classify` gives it alone (or its error: an image that cannot be prepared fails alone). The
/// images whose prepared inputs have the same size (all of them at the default resize) go
/// through the network as one batch: one forward, and one backward per method for all their
/// classes. A batch that fails as a whole (a map that cannot be written, say) is run again one
/// image at a time, so that each image gets its own answer.
pub fn classify_batch(net: &Network, layer: usize, images: &[(&RgbImage, &str, Files<'_>)], options: &Options, progress: Option<&Progress>) -> Vec<Result<Record>> {
    if options.check(net).is_err() {
        return images.iter().map(|_| Err(options.check(net).expect_err("checked"))).collect();
    }
    let mut records: Vec<Option<Result<Record>>> = images.iter().map(|_| None).collect();
    let mut groups: Vec<((usize, usize), Vec<(usize, gradcam_encoders::preprocess::Prepared)>)> = Vec::new();
    for (i, (img, _, _)) in images.iter().enumerate() {
        match prepare_with(img, options.resize, net.preprocess()) {
            Err(e) => records[i] = Some(Err(e.into())),
            Ok(p) => {
                let size = (p.tensor.dim(1).unwrap_or(0), p.tensor.dim(2).unwrap_or(0));
                match groups.iter_mut().find(|g| g.0 == size) {
                    Some(g) => g.1.push((i, p)),
                    None => groups.push((size, vec![(i, p)])),
                }
            }
        }
    }
    for (_, group) in groups {
        match classify_group(net, layer, images, &group, options, progress) {
            Ok(done) => done.into_iter().zip(&group).for_each(|(r, (i, _))| records[*i] = Some(Ok(r))),
            Err(e) if group.len() == 1 => records[group[0].0] = Some(Err(e)),
            Err(_) => group.iter().for_each(|(i, _)| records[*i] = Some(classify_batch(net, layer, &images[*i..*i + 1], options, progress).remove(0))),
        }
    }
    records.into_iter().map(|r| r.expect("every image answered")).collect()
}

/// One batch of [`classify_batch`]: images `group` (index, prepared input), all of one size.
fn classify_group(net: &Network, layer: usize, images: &[(&RgbImage, &str, Files<'_>)], group: &[(usize, gradcam_encoders::preprocess::Prepared)], options: &Options, progress: Option<&Progress>) -> Result<Vec<Record>> {
    let input = candle_core::Tensor::stack(&group.iter().map(|(_, p)| &p.tensor).collect::<Vec<_>>(), 0)?; // [n, 3, h, w]
    let (_, _, h, w) = input.dims4()?;
    let split = net.split(layer);
    let activations = split.features(&input)?; // [n, K, h', w']
    let logits = split.head(&activations)?; // [n, classes]
    let label = |c: usize| net.label(c);
    let mut ranked = Vec::with_capacity(group.len());
    let mut subjects = Vec::with_capacity(group.len());
    let mut bases = Vec::with_capacity(group.len());
    for (row, (i, p)) in group.iter().enumerate() {
        let (predictions, top) = rank(net, &logits.get(row)?, options.top_k)?;
        let classes = if options.classes.is_empty() { vec![top] } else { options.classes.clone() };
        subjects.push(classes.iter().flat_map(|&c| Subject::new(Target::class(c), &label(c)).file_prefix(c.to_string()).and_counterfactual(options.counterfactual)).collect::<Vec<_>>());
        ranked.push(predictions);
        bases.push(fit(images[*i].0, p.region));
    }
    let outs: Vec<Output<'_>> = group.iter().zip(&bases).map(|((i, _), (base, region))| images[*i].2.output(base, *region)).collect();
    let rows: Vec<candle_core::Tensor> = (0..group.len()).map(|r| activations.narrow(0, r, 1)).collect::<candle_core::Result<_>>()?;
    let names = options.dissection.as_deref().map(|d| UnitNames::Dissection(d));
    let class_name = |c: usize| label(c);
    let reports: Vec<_> = rows
        .iter()
        .map(|a| {
            let (split, names, class_name) = (&split, &names, &class_name);
            move |e: &Explanation, subject: &str| match names {
                Some(names) => super::named_report(names)(e, subject),
                None => class_named_report(split, a, e.weights.as_deref().unwrap_or(&[]), subject, class_name),
            }
        })
        .collect();
    let neurons: Vec<Option<super::render::Neurons<'_>>> = reports.iter().map(|f| options.neurons.then_some(f as _)).collect();
    let cam = options.settings.cam(&split, progress);
    let rendered = render_batch(&cam, &options.settings.methods, &input, &activations, &subjects, &outs, &neurons)?;
    let mut records = Vec::with_capacity(group.len());
    for (((r, out), ss), ((i, _), predictions)) in rendered.iter().zip(&outs).zip(&subjects).zip(group.iter().zip(ranked)) {
        if options.settings.methods.len() > 1 {
            write_method_strips(r, ss, out, 224)?;
        }
        let explanations = r
            .iter()
            .flatten()
            .map(|r| {
                let class = r.explanation.target.index().expect("a class target");
                Ok(ClassMap { class, label: label(class), map: MapRecord::new(r)? })
            })
            .collect::<Result<_>>()?;
        records.push(Record { image: images[*i].1.to_string(), model: net.arch().to_string(), layer: net.layer_name(layer).to_string(), input_size: [h, w], predictions, explanations });
    }
    Ok(records)
}
