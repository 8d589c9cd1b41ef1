//! VQA metrics: VQA accuracy overall and per question type, the answer pointing game on questions
//! whose evidence is one object, and whether the counterfactual map puts less of its mass on that
//! object than the answer's own map.

use std::collections::BTreeMap;

use gradcam_core::metrics::Pointing;
use gradcam_core::{explain, CamMethod, Map, Request, Target};
use gradcam_scenes::rle::Mask;
use gradcam_scenes::vqa::Vqa as VqaFile;
use gradcam_scenes::Split;
use serde::Serialize;

use crate::model::{Vqa, VqaSplit};
use crate::Result;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Accuracy {
    pub questions: usize,
    /// Mean VQA accuracy, min(#annotators who gave the answer / 3, 1).
    pub accuracy: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CounterfactualCheck {
    /// Questions about one object in scenes of two or more.
    pub questions: usize,
    /// Of those, how often the counterfactual map's mass on the object is below the answer map's
    /// (an empty counterfactual map has no mass anywhere and counts here).
    pub less_mass: usize,
    /// Of those, how often the counterfactual map is zero everywhere (nothing argues against the
    /// answer): the comparison then says nothing about where the map looks.
    #[serde(default)]
    pub empty: usize,
    /// Of `less_mass`, those whose counterfactual map is not empty.
    #[serde(default)]
    pub less_mass_nonempty: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    /// The CAM method whose maps the pointing game and the counterfactual check use.
    pub method: String,
    pub overall: Accuracy,
    pub per_type: BTreeMap<String, Accuracy>,
    pub pointing: Pointing,
    /// The pointing game per question type.
    pub pointing_per_type: BTreeMap<String, Pointing>,
    pub counterfactual: CounterfactualCheck,
    /// The counterfactual check per question type.
    pub counterfactual_per_type: BTreeMap<String, CounterfactualCheck>,
    pub tolerance_px: f32,
}

/// Fraction of a normalised map's mass (upsampled to the mask) on the mask; 0 for a zero map.
pub fn mass_on(map: &Map, mask: &Mask) -> f64 {
    let (n, nonzero) = map.normalized();
    if !nonzero {
        return 0.0;
    }
    let up = n.resize_bilinear(mask.height, mask.width);
    let total: f64 = up.data.iter().map(|&v| v as f64).sum();
    let inside: f64 = up.data.iter().zip(&mask.data).filter(|(_, &m)| m).map(|(&v, _)| v as f64).sum();
    inside / total.max(f64::MIN_POSITIVE)
}

/// Answers and explains up to `limit` questions of a split with `method`'s maps (Grad-CAM for the
/// figures in the model cards).
pub fn evaluate(model: &Vqa, split: &Split, limit: usize, method: &dyn CamMethod, mut progress: impl FnMut(usize)) -> Result<Metrics> {
    if split.vqa.as_ref().is_none_or(|v| v.annotations.is_empty()) {
        return Err(crate::Error::Model(format!("{}: no questions.json with annotations.json to evaluate against", split.dir.display())));
    }
    let mut overall = Accuracy::default();
    let mut per_type: BTreeMap<String, Accuracy> = BTreeMap::new();
    let mut pointing = Pointing::default();
    let mut cf = CounterfactualCheck::default();
    let mut pointing_per_type: BTreeMap<String, Pointing> = BTreeMap::new();
    let mut cf_per_type: BTreeMap<String, CounterfactualCheck> = BTreeMap::new();
    let mut tolerance = 0.0;
    let mut done = 0;
    'images: for ex in split.examples() {
        let img = gradcam_encoders::preprocess::load_image(&ex.path)?;
        let a = model.features(&model.preprocess(&img)?.unsqueeze(0)?)?;
        let (h, w) = (img.height() as usize, img.width() as usize);
        tolerance = h.max(w) as f32 / 16.0;
        for (q, ann) in &ex.questions {
            if done == limit {
                break 'images;
            }
            let Some(ann) = ann else { continue };
            done += 1;
            let question = model.question(&q.question)?;
            let split_q = VqaSplit { model, question: model.encode(&question)? };
            let logits = model.logits(&a, &split_q.question)?;
            let (pred, _) = model.top_answers(&logits, 1)?[0];
            let acc = VqaFile::accuracy(ann, &model.cfg.answers[pred]);
            let qtype = ann.question_type.clone().unwrap_or_else(|| ann.answer_type.clone());
            for t in [&mut overall, per_type.entry(qtype.clone()).or_default()] {
                t.accuracy = (t.accuracy * t.questions as f64 + acc) / (t.questions + 1) as f64;
                t.questions += 1;
            }
            let evidence: Vec<&Mask> = ann.evidence.iter().flatten().filter_map(|id| ex.objects.iter().find(|o| o.id == *id)).map(|o| &o.mask).collect();
            if evidence.len() != 1 {
                progress(done);
                continue;
            }
            let mask = evidence[0];
            let predicted = Target::answer(pred);
            let map = &explain(&split_q, &a, &[Request { image: 0, target: &predicted }], method)?[0].cam();
            let (hit, centre) = Pointing::hits(&map.resize_bilinear(h, w), |y, x| mask.near(y, x, tolerance));
            pointing.add(hit, centre);
            pointing_per_type.entry(qtype.clone()).or_default().add(hit, centre);
            if let (true, Ok(correct)) = (ex.objects.len() >= 2, model.answer_index(&ann.multiple_choice_answer)) {
                let targets = [Target::answer(correct), Target::answer(correct).counterfactual()];
                let maps = explain(&split_q, &a, &[Request { image: 0, target: &targets[0] }, Request { image: 0, target: &targets[1] }], method)?;
                let less = (mass_on(&maps[1].cam(), mask) < mass_on(&maps[0].cam(), mask)) as usize;
                let empty = !maps[1].cam().normalized().1 as usize;
                for c in [&mut cf, cf_per_type.entry(qtype.clone()).or_default()] {
                    c.questions += 1;
                    c.less_mass += less;
                    c.empty += empty;
                    c.less_mass_nonempty += less * (1 - empty);
                }
            }
            progress(done);
        }
    }
    Ok(Metrics { method: method.name().to_string(), overall, per_type, pointing, pointing_per_type, counterfactual: cf, counterfactual_per_type: cf_per_type, tolerance_px: tolerance })
}
