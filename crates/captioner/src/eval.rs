//! Captioner metrics: exact match of the named (colour, shape) set, corpus BLEU-4, and the
//! per-word pointing game of word-by-word Grad-CAM against the objects' masks.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::Tensor;
use gradcam_core::metrics::Pointing;
use gradcam_core::{explain, CamMethod, Explanation, GradCam, Map, Request, Target};
use gradcam_neurons::{report, Dissection, UnitNames};
use gradcam_scenes::coco::Instance;
use gradcam_scenes::scene::{COLORS, SHAPES};
use gradcam_scenes::Split;
use serde::Serialize;

use crate::model::{CaptionSplit, Captioner};
use crate::Result;

/// The (colour, shape) pairs a caption names: adjacent "colour shape" words.
pub fn named_objects(words: &[String]) -> BTreeSet<(String, String)> {
    words
        .windows(2)
        .filter(|w| COLORS.contains(&w[0].as_str()) && SHAPES.contains(&w[1].as_str()))
        .map(|w| (w[0].clone(), w[1].clone()))
        .collect()
}

/// Corpus BLEU-4 (Papineni et al. 2002): clipped n-gram precisions for n = 1..4, geometric mean,
/// brevity penalty against the closest reference length.
pub fn bleu4(candidates: &[Vec<String>], references: &[Vec<Vec<String>>]) -> f64 {
    let mut matched = [0usize; 4];
    let mut total = [0usize; 4];
    let (mut cand_len, mut ref_len) = (0usize, 0usize);
    for (cand, refs) in candidates.iter().zip(references) {
        cand_len += cand.len();
        ref_len += refs.iter().map(Vec::len).min_by_key(|&l| (l.abs_diff(cand.len()), l)).unwrap_or(0);
        for n in 1..=4 {
            let grams = |s: &[String]| -> HashMap<Vec<String>, usize> {
                let mut m = HashMap::new();
                for g in s.windows(n) {
                    *m.entry(g.to_vec()).or_insert(0) += 1;
                }
                m
            };
            let c = grams(cand);
            let mut max_ref: HashMap<Vec<String>, usize> = HashMap::new();
            for r in refs {
                for (g, k) in grams(r) {
                    let e = max_ref.entry(g).or_insert(0);
                    *e = (*e).max(k);
                }
            }
            matched[n - 1] += c.iter().map(|(g, k)| (*k).min(*max_ref.get(g).unwrap_or(&0))).sum::<usize>();
            total[n - 1] += cand.len().saturating_sub(n - 1);
        }
    }
    if matched.iter().any(|&m| m == 0) || cand_len == 0 {
        return 0.0;
    }
    let log_p: f64 = (0..4).map(|i| (matched[i] as f64 / total[i] as f64).ln()).sum::<f64>() / 4.0;
    let bp = if cand_len >= ref_len { 1.0 } else { (1.0 - ref_len as f64 / cand_len as f64).exp() };
    bp * log_p.exp()
}

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    /// The CAM method whose maps the pointing game and the neuron report use.
    pub method: String,
    pub images: usize,
    /// Fraction of images whose caption names exactly the image's (colour, shape) set.
    pub exact_match: f64,
    pub bleu4: f64,
    /// Pointing game per word: `color`, `shape`, and per word (`red`, `circle`, ...).
    pub pointing: BTreeMap<String, Pointing>,
    pub tolerance_px: f32,
    /// With a dissection table: per word type and word, how often the word's concept names one
    /// of the 5 units with the largest alpha_k, and one of the 5 with the smallest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neurons: Option<BTreeMap<String, NeuronHits>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NeuronHits {
    pub count: usize,
    pub in_top5: usize,
    pub in_bottom5: usize,
}

/// Greedy captions for up to `limit` images of a split, with exact match, BLEU-4 and the
/// per-word pointing game (tolerance 1/16 of the image side); with a dissection table, also
/// whether each colour or shape word's concept names its top-5 / bottom-5 units. The maps and
/// the alphas are `method`'s (Grad-CAM for the figures in the model cards).
pub fn evaluate(model: &Captioner, split: &Split, limit: usize, dissection: Option<&Dissection>, method: &dyn CamMethod, mut progress: impl FnMut(usize)) -> Result<Metrics> {
    split.captions("BLEU-4 scores the captions against the split's own")?;
    let examples: Vec<_> = split.examples().into_iter().take(limit).collect();
    let mut exact = 0;
    let (mut cands, mut refs) = (Vec::new(), Vec::new());
    let mut pointing: BTreeMap<String, Pointing> = BTreeMap::new();
    let mut tolerance = 0.0;
    let mut neurons: BTreeMap<String, NeuronHits> = BTreeMap::new();
    for (i, ex) in examples.iter().enumerate() {
        let img = gradcam_encoders::preprocess::load_image(&ex.path)?;
        let input = model.preprocess(&img)?.unsqueeze(0)?;
        let a = model.features(&input)?;
        let cap = model.greedy(&a)?.remove(0);
        let truth: BTreeSet<(String, String)> = ex
            .objects
            .iter()
            .map(|o| (o.color.clone().unwrap_or_default(), split.instances.category_name(o.category_id).unwrap_or("").to_string()))
            .collect();
        if named_objects(&cap.words) == truth {
            exact += 1;
        }
        cands.push(cap.words.clone());
        refs.push(ex.captions.iter().map(|c| c.split_whitespace().map(str::to_string).collect()).collect());

        let (h, w) = (img.height() as usize, img.width() as usize);
        tolerance = h.max(w) as f32 / 16.0;
        let results = word_explanations_with(model, &a, &cap.tokens, method)?;
        for (t, word) in cap.words.iter().enumerate() {
            let (kind, pair) = if COLORS.contains(&word.as_str()) {
                ("color", cap.words.get(t + 1).map(|s| (word.clone(), s.clone())))
            } else if SHAPES.contains(&word.as_str()) {
                ("shape", t.checked_sub(1).map(|p| (cap.words[p].clone(), word.clone())))
            } else {
                continue;
            };
            let Some(object) = pair.and_then(|p| find(&ex.objects, split, &p)) else { continue };
            let (hit, centre) = Pointing::hits(&results[t].cam().resize_bilinear(h, w), |y, x| object.mask.near(y, x, tolerance));
            for key in [kind.to_string(), word.clone()] {
                pointing.entry(key).or_default().add(hit, centre);
            }
            if let Some(d) = dissection {
                let r = report(results[t].weights.as_deref().unwrap_or_default(), &UnitNames::Dissection(d), word, 5);
                for key in [kind.to_string(), word.clone()] {
                    let n = neurons.entry(key).or_default();
                    n.count += 1;
                    n.in_top5 += r.mentions(word, false) as usize;
                    n.in_bottom5 += r.mentions(word, true) as usize;
                }
            }
        }
        progress(i + 1);
    }
    Ok(Metrics {
        method: method.name().to_string(),
        images: examples.len(),
        exact_match: exact as f64 / examples.len().max(1) as f64,
        bleu4: bleu4(&cands, &refs),
        pointing,
        tolerance_px: tolerance,
        neurons: dissection.map(|_| neurons),
    })
}

fn find<'a>(objects: &[&'a Instance], split: &Split, (color, shape): &(String, String)) -> Option<&'a Instance> {
    objects.iter().copied().find(|o| o.color.as_deref() == Some(color.as_str()) && split.instances.category_name(o.category_id) == Some(shape.as_str()))
}

/// The Grad-CAM explanation (alpha_k and raw map) of every word of a caption, from one backward
/// pass.
pub fn word_explanations(model: &Captioner, a: &Tensor, tokens: &[u32]) -> Result<Vec<Explanation>> {
    word_explanations_with(model, a, tokens, &GradCam)
}

/// [`word_explanations`] with any gradient-based CAM method.
pub fn word_explanations_with(model: &Captioner, a: &Tensor, tokens: &[u32], method: &dyn gradcam_core::CamMethod) -> Result<Vec<Explanation>> {
    let split = CaptionSplit::new(model, tokens);
    let targets: Vec<Target> = (0..tokens.len()).map(Target::word).collect();
    let requests: Vec<Request> = targets.iter().map(|target| Request { image: 0, target }).collect();
    Ok(explain(&split, a, &requests, method)?)
}

/// The raw Grad-CAM map of every word of a caption, from one backward pass.
pub fn word_maps(model: &Captioner, a: &Tensor, tokens: &[u32]) -> Result<Vec<Map>> {
    Ok(word_explanations(model, a, tokens)?.iter().map(Explanation::cam).collect())
}

/// Fraction of the first `limit` images of a split whose greedy caption names exactly their
/// (colour, shape) set (batched; no maps).
pub fn exact_match(model: &Captioner, split: &Split, limit: usize) -> Result<f64> {
    let examples: Vec<_> = split.examples().into_iter().take(limit).collect();
    let mut exact = 0;
    for chunk in examples.chunks(64) {
        let inputs = chunk
            .iter()
            .map(|ex| {
                let img = gradcam_encoders::preprocess::load_image(&ex.path)?;
                model.preprocess(&img)
            })
            .collect::<Result<Vec<_>>>()?;
        let caps = model.greedy(&model.features(&Tensor::stack(&inputs, 0)?)?)?;
        for (ex, cap) in chunk.iter().zip(caps) {
            let truth: BTreeSet<(String, String)> = ex
                .objects
                .iter()
                .map(|o| (o.color.clone().unwrap_or_default(), split.instances.category_name(o.category_id).unwrap_or("").to_string()))
                .collect();
            exact += (named_objects(&cap.words) == truth) as usize;
        }
    }
    Ok(exact as f64 / examples.len().max(1) as f64)
}
