//! A CLIP (`gradcam train clip`) as a [`Subject`] on a ShapeScenes-format split: each colour-shape
//! pair in an image is a case, its phrase ("red circle") the text, the objects of that colour and
//! shape the ground truth. The target is the phrase's cosine similarity with the image; the
//! probability is its zero-shot probability among every colour-shape phrase.

use std::path::Path;

use candle_core::{Tensor, D};
use gradcam_clip::train::{pair, phrase as named};
use gradcam_clip::{Matching, Trained, LOGIT_SCALE};
use gradcam_core::{Explainable, Explainer, Map, Request, Target};
use gradcam_scenes::scene::{COLORS, SHAPES};
use gradcam_scenes::Split;

use crate::subjects::{cams, file_name, items, load_checked, object, Item};
use crate::{Case, Example, Result, Subject};

/// The model, the split's images, and every colour-shape phrase's embedding.
pub struct ClipSubject {
    model: Trained,
    block: usize,
    items: Vec<Item>,
    names: std::collections::HashMap<u64, String>,
    /// `[colours x shapes, E]`, normalised, colour-major.
    phrases: Tensor,
}

pub struct ClipState {
    activations: Tensor,
    /// The phrase index of each case.
    phrases: Vec<usize>,
}

fn phrase(i: usize) -> String {
    named(COLORS[i / SHAPES.len()], SHAPES[i % SHAPES.len()], None)
}

impl ClipSubject {
    /// The model explained at `layer` (default: the last block's attention input) over `dir`.
    pub fn new(model: Trained, layer: Option<&str>, dir: &Path) -> Result<Self> {
        let split = Split::read(dir)?;
        let block = model.block(layer)?;
        let texts: Vec<String> = (0..COLORS.len() * SHAPES.len()).map(phrase).collect();
        let (phrases, _) = model.encode_texts(&texts)?;
        let names = split.instances.categories.iter().map(|c| (c.id, c.name.clone())).collect();
        Ok(Self { model, block, items: items(&split), names, phrases })
    }

    fn matching<'a>(&'a self, image: &'a dyn Explainable) -> Matching<'a> {
        Matching { image, texts: self.phrases.clone(), scale: 1.0 }
    }
}

impl Subject for ClipSubject {
    type State = ClipState;

    fn kind(&self) -> &'static str {
        "clip"
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn example(&self, i: usize) -> Result<Example<ClipState>> {
        let item = &self.items[i];
        let image = load_checked(&item.path, item.width, item.height)?;
        let input = self.model.preprocess(&image)?.unsqueeze(0)?;
        let split = self.model.image_split(self.block);
        let activations = split.features(&input)?;
        let sims = self.matching(&split).head(&activations)?.flatten_all()?;
        let probs = candle_nn::ops::softmax(&(&sims * LOGIT_SCALE)?, D::Minus1)?.to_vec1::<f32>()?;
        let sims = sims.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..sims.len()).collect();
        order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
        let pair_of = |o: &gradcam_scenes::coco::Instance| pair(o.color.as_deref(), self.names.get(&o.category_id).map(String::as_str)).map(|(c, s)| c * SHAPES.len() + s);
        let mut present: Vec<usize> = item.objects.iter().filter_map(pair_of).collect();
        present.sort_unstable();
        present.dedup();
        let cases = present
            .iter()
            .map(|&p| {
                let objects = item.objects.iter().filter(|o| pair_of(o) == Some(p)).map(object).collect();
                let rank = order.iter().position(|&q| q == p).filter(|&r| r < 5);
                Case { label: phrase(p), group: SHAPES[p % SHAPES.len()].to_string(), objects, rank, prob: probs[p], primary: true }
            })
            .collect();
        // Share of the present phrases among the top phrases, as many as there are.
        let top: Vec<usize> = order.iter().take(present.len()).copied().collect();
        let quality = if present.is_empty() { 1.0 } else { present.iter().filter(|p| top.contains(p)).count() as f64 / present.len() as f64 };
        Ok(Example {
            name: file_name(&item.path),
            image,
            input,
            cases,
            quality,
            summary: format!("top phrases: {}; objects: {}", top.iter().map(|&p| phrase(p)).collect::<Vec<_>>().join(", "), present.iter().map(|&p| phrase(p)).collect::<Vec<_>>().join(", ")),
            state: ClipState { activations, phrases: present },
        })
    }

    fn maps(&self, ex: &Example<ClipState>, method: &dyn Explainer) -> Result<Vec<Map>> {
        let split = self.model.image_split(self.block);
        let m = self.matching(&split);
        let targets: Vec<Target> = ex.state.phrases.iter().map(|&p| Target::class(p)).collect();
        let requests: Vec<Request> = targets.iter().map(|target| Request { image: 0, target }).collect();
        cams(&m, ex, &ex.state.activations, &requests, method)
    }

    fn scores(&self, ex: &Example<ClipState>, inputs: &Tensor) -> Result<Vec<Vec<(f32, f32)>>> {
        let e = self.model.encode_images(inputs)?;
        let sims = e.matmul(&self.phrases.t()?)?;
        let probs = candle_nn::ops::softmax(&(&sims * LOGIT_SCALE)?, D::Minus1)?.to_vec2::<f32>()?;
        let sims = sims.to_vec2::<f32>()?;
        Ok(sims.iter().zip(&probs).map(|(s, p)| ex.state.phrases.iter().map(|&i| (s[i], p[i])).collect()).collect())
    }
}
