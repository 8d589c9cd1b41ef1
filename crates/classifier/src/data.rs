//! A COCO-instances split as classification data: one label per image, the category of its
//! largest annotated object (annotations of the category `cue`, the spurious cues of a biased
//! ShapeScenes set, are never labels).

use candle_core::{Device, Tensor};
use gradcam_scenes::coco::Instances;
use gradcam_scenes::Split;

use crate::{Error, Result};

/// The category name that marks spurious cues rather than objects.
pub const CUE: &str = "cue";

/// The classes of a dataset: every category but `cue`, in id order, as (id, name).
pub fn classes(instances: &Instances) -> Vec<(u64, String)> {
    let mut c: Vec<(u64, String)> = instances.categories.iter().filter(|c| c.name != CUE).map(|c| (c.id, c.name.clone())).collect();
    c.sort();
    c
}

/// Images as u8 `[3, s, s]` planes and their class indices.
pub struct Data {
    pub size: usize,
    pixels: Vec<u8>,
    pub labels: Vec<usize>,
    /// Images of the split that had no labelled object (not used).
    pub skipped: usize,
}

impl Data {
    /// The split's labelled images at `size` x `size` (bilinear), labelled by `category_ids`
    /// (the class of category `category_ids[k]` is k).
    pub fn load(split: &Split, category_ids: &[u64], size: u32, limit: Option<usize>) -> Result<Self> {
        let s = size as usize;
        let (mut pixels, mut labels, mut skipped) = (Vec::new(), Vec::new(), 0);
        for ex in split.examples().into_iter().take(limit.unwrap_or(usize::MAX)) {
            let largest = ex.objects.iter().filter_map(|o| category_ids.iter().position(|&c| c == o.category_id).map(|k| (o.area, k))).max_by(|a, b| a.0.total_cmp(&b.0));
            let Some((_, label)) = largest else {
                skipped += 1;
                continue;
            };
            let img = gradcam_encoders::preprocess::load_image(&ex.path)?;
            let img = if img.dimensions() == (size, size) { img } else { image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle) };
            for c in 0..3 {
                pixels.extend(img.pixels().map(|p| p[c]));
            }
            labels.push(label);
        }
        Ok(Data { size: s, pixels, labels, skipped })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Images `[b, 3, s, s]` scaled to [-1, 1] (as the network's preprocessing does) and their
    /// labels `[b]`.
    pub fn batch(&self, ids: &[usize]) -> Result<(Tensor, Tensor)> {
        let plane = 3 * self.size * self.size;
        let mut px = Vec::with_capacity(ids.len() * plane);
        for &i in ids {
            px.extend(self.pixels[i * plane..(i + 1) * plane].iter().map(|&v| v as f32 / 127.5 - 1.0));
        }
        let labels: Vec<u32> = ids.iter().map(|&i| self.labels[i] as u32).collect();
        Ok((Tensor::from_vec(px, (ids.len(), 3, self.size, self.size), &Device::Cpu)?, Tensor::new(labels.as_slice(), &Device::Cpu)?))
    }
}

/// The class ids of a split's categories, checked against a model's.
pub fn check_classes(split: &Split, category_ids: &[u64], labels: &[String]) -> Result<()> {
    let found = classes(&split.instances);
    for (id, name) in &found {
        if let Some(k) = category_ids.iter().position(|c| c == id) {
            if &labels[k] != name {
                return Err(Error::Data(format!("{}: category {id} is {name:?}, the model's class {k} is {:?}", split.dir.join("instances.json").display(), labels[k])));
            }
        }
    }
    Ok(())
}
