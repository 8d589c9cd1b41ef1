//! The trained model measured on a ShapeScenes split: how well each object's phrase beats the
//! colour-shape pairs absent from its scene.

use gradcam_scenes::Split;

use crate::card::TestFigures;
use crate::train::{pair, PhraseMetrics};
use crate::{Result, Trained};

/// Each image's (colour, shape) pairs, and its input `[3, S, S]`.
fn scenes(model: &Trained, split: &Split, progress: &dyn Fn(usize, usize)) -> Result<(Vec<Vec<(usize, usize)>>, Vec<candle_core::Tensor>)> {
    let names: std::collections::HashMap<u64, &str> = split.instances.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
    let examples = split.examples();
    let (mut pairs, mut inputs) = (Vec::new(), Vec::new());
    for (i, ex) in examples.iter().enumerate() {
        let img = gradcam_encoders::preprocess::load_image(&ex.path)?;
        inputs.push(model.preprocess(&img)?);
        pairs.push(ex.objects.iter().filter_map(|o| pair(o.color.as_deref(), names.get(&o.category_id).copied())).collect());
        progress(i + 1, examples.len());
    }
    Ok((pairs, inputs))
}

/// The phrase ranking of `model` over every image of `split`.
pub fn phrase_test(model: &Trained, split: &Split, progress: &dyn Fn(usize, usize)) -> Result<TestFigures> {
    let (pairs, inputs) = scenes(model, split, progress)?;
    let images = |ids: &[usize]| -> Result<candle_core::Tensor> { Ok(candle_core::Tensor::stack(&ids.iter().map(|&i| &inputs[i]).collect::<Vec<_>>(), 0)?) };
    let [won, total, all, objects] = crate::train::phrase_ranking(&model.clip, &model.vocab, &images, &pairs)?;
    Ok(TestFigures { images: pairs.len(), objects, metrics: PhraseMetrics { phrase_vs_absent: won as f64 / total.max(1) as f64, phrase_beats_all_absent: all as f64 / objects.max(1) as f64 } })
}
