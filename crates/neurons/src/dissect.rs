//! Network dissection (Bau et al. 2017): each unit's activation map, upsampled to the image and
//! thresholded at the unit's top `quantile` over the dataset, is compared with every concept's
//! masks; the unit is named by the concept with the best dataset-wide IoU
//! (sum of intersections / sum of unions over all images) when that IoU reaches a threshold.

use std::collections::BTreeSet;

use gradcam_core::Map;
use gradcam_scenes::coco::{Instance, Instances};
use gradcam_scenes::rle::Mask;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A concept with masks: a COCO category, or ShapeScenes' colours and sizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concept {
    pub name: String,
    /// `shape`, `color`, `size`, or `object` for the categories of other datasets.
    pub category: String,
}

/// Every concept an instances file has masks for: its categories (called `shape` when the
/// objects also carry ShapeScenes' colours, `object` otherwise), then the colours and the sizes
/// found on its objects.
pub fn concepts(instances: &Instances) -> Vec<Concept> {
    let has_color = instances.annotations.iter().any(|a| a.color.is_some());
    let kind = if has_color { "shape" } else { "object" };
    let mut out: Vec<Concept> = instances.categories.iter().map(|c| Concept { name: c.name.clone(), category: kind.into() }).collect();
    let colors: BTreeSet<&str> = instances.annotations.iter().filter_map(|a| a.color.as_deref()).collect();
    out.extend(colors.into_iter().map(|c| Concept { name: c.into(), category: "color".into() }));
    let sizes: BTreeSet<&str> = instances.annotations.iter().filter_map(|a| a.size.as_deref()).collect();
    out.extend(sizes.into_iter().map(|s| Concept { name: s.into(), category: "size".into() }));
    out
}

/// The mask of every concept in one image (the union of its objects' masks), `None` where the
/// image has none of it.
pub fn image_concepts(objects: &[&Instance], concepts: &[Concept], instances: &Instances, (height, width): (usize, usize)) -> ImageMasks {
    let masks = concepts
        .iter()
        .map(|c| {
            let mut mask: Option<Mask> = None;
            for o in objects {
                let is = match c.category.as_str() {
                    "color" => o.color.as_deref() == Some(c.name.as_str()),
                    "size" => o.size.as_deref() == Some(c.name.as_str()),
                    _ => instances.category_name(o.category_id) == Some(c.name.as_str()),
                };
                if is {
                    let m = mask.get_or_insert_with(|| Mask::new(o.mask.height, o.mask.width));
                    m.data.iter_mut().zip(&o.mask.data).for_each(|(a, &b)| *a |= b);
                }
            }
            mask.filter(|m| m.height == height && m.width == width)
        })
        .collect();
    ImageMasks { height, width, masks }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Options {
    /// Fraction of the highest activations (over all images and positions) kept per unit.
    pub quantile: f64,
    /// A unit is named only when its best concept's IoU reaches this.
    pub iou_threshold: f32,
}

impl Default for Options {
    fn default() -> Self {
        Options { quantile: 0.005, iou_threshold: 0.04 }
    }
}

/// One unit's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnitName {
    pub unit: usize,
    /// The best concept and its category, whatever its IoU.
    pub concept: Option<String>,
    pub category: Option<String>,
    pub iou: f32,
    /// The activation threshold (the unit's top-quantile value).
    pub threshold: f32,
    /// Whether the IoU reaches the naming threshold.
    pub named: bool,
}

/// One image's side lengths and concept masks.
#[derive(Debug, Clone)]
pub struct ImageMasks {
    pub height: usize,
    pub width: usize,
    /// Per concept, its mask in this image (`height x width`), `None` where absent.
    pub masks: Vec<Option<Mask>>,
}

/// A dissection table, as `gradcam dissect` writes it (`dissection.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dissection {
    pub layer: String,
    pub data: String,
    pub images: usize,
    pub options: Options,
    pub concepts: Vec<Concept>,
    pub units: Vec<UnitName>,
}

/// The table as text: how many units each concept names, then a row per unit.
impl std::fmt::Display for Dissection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut per: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
        for u in self.units.iter().filter(|u| u.named) {
            *per.entry((u.category.as_deref().unwrap_or_default(), u.concept.as_deref().unwrap_or_default())).or_default() += 1;
        }
        for ((cat, concept), n) in per {
            writeln!(f, "  {cat:<7} {concept:<10} {n} units")?;
        }
        writeln!(f, "unit  concept     category  IoU")?;
        for u in &self.units {
            let mark = if u.named { "" } else { "  (below threshold)" };
            writeln!(f, "{:>4}  {:<10}  {:<8}  {:.3}{mark}", u.unit, u.concept.as_deref().unwrap_or("-"), u.category.as_deref().unwrap_or("-"), u.iou)?;
        }
        Ok(())
    }
}

impl Dissection {
    /// The name of a unit when it has one: (concept, IoU).
    pub fn name(&self, unit: usize) -> Option<(&str, f32)> {
        self.units.get(unit).filter(|u| u.named).and_then(|u| u.concept.as_deref().map(|c| (c, u.iou)))
    }

    pub fn named(&self) -> usize {
        self.units.iter().filter(|u| u.named).count()
    }

    /// The table for the model folder `model`: `explicit` when given, else the folder's
    /// `dissection.json` if any; `required` turns a missing default into an error that says how
    /// to make one.
    pub fn of_model(explicit: Option<&std::path::Path>, model: &std::path::Path, required: bool) -> Result<Option<Self>> {
        if let Some(p) = explicit {
            return Self::load(p).map(Some);
        }
        let default = model.join("dissection.json");
        if default.exists() {
            return Self::load(&default).map(Some);
        }
        if required {
            return Err(Error::NoDissection { model: model.to_path_buf() });
        }
        Ok(None)
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: not a dissection table: {e}", path.display())))
    }

    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Data(e.to_string()))?;
        Ok(gradcam_io::write_atomic(path, text.as_bytes())?)
    }
}

/// Dissects a layer from its activations on a dataset.
///
/// `activations[i]` holds image i's maps, `[K][h * w]` flattened as `K x h x w` (all images the same
/// `h x w`); `masks[i]` is image i's size and concept masks (`masks[i].masks[c]` for concept c, at
/// the image's size). Each map is upsampled bilinearly to its image's size; the threshold of
/// unit k is its top-`quantile` upsampled activation over all images and positions.
pub fn dissect(
    activations: &[Vec<f32>],
    (k, h, w): (usize, usize, usize),
    masks: &[ImageMasks],
    concepts: &[Concept],
    options: Options,
) -> Result<Vec<UnitName>> {
    if activations.len() != masks.len() {
        return Err(Error::Data(format!("{} activation maps but {} mask sets", activations.len(), masks.len())));
    }
    if let Some(bad) = activations.iter().position(|a| a.len() != k * h * w) {
        return Err(Error::Data(format!("image {bad}: {} activations, expected {k} x {h} x {w}", activations[bad].len())));
    }
    if !(options.quantile > 0.0 && options.quantile < 1.0) {
        return Err(Error::Data(format!("quantile {} is outside (0, 1)", options.quantile)));
    }
    let plane = h * w;
    let upsampled = |a: &[f32], u: usize, m: &ImageMasks| Map::new(h, w, a[u * plane..(u + 1) * plane].to_vec()).resize_bilinear(m.height, m.width);
    // Per-unit thresholds: the value of the upsampled maps with a fraction `quantile` of all
    // values (every position of every image) above it.
    let thresholds: Vec<f32> = (0..k)
        .into_par_iter()
        .map(|u| {
            let mut v: Vec<f32> = activations.iter().zip(masks).flat_map(|(a, m)| upsampled(a, u, m).data).collect();
            quantile_threshold(&mut v, options.quantile)
        })
        .collect();
    let c = concepts.len();
    // Sums over images: |M_k ∩ L_c|, |M_k|, |L_c|.
    let (inter, unit_area, concept_area) = activations
        .par_iter()
        .zip(masks)
        .map(|(a, m)| {
            let mut inter = vec![0u64; k * c];
            let mut unit_area = vec![0u64; k];
            let concept_area: Vec<u64> = m.masks.iter().map(|m| m.as_ref().map_or(0, |m| m.area() as u64)).collect();
            let present: Vec<(usize, &Mask)> = m.masks.iter().enumerate().filter_map(|(i, m)| m.as_ref().map(|m| (i, m))).collect();
            for u in 0..k {
                let map = upsampled(a, u, m);
                let on: Vec<bool> = map.data.iter().map(|&v| v > thresholds[u]).collect();
                unit_area[u] = on.iter().filter(|&&b| b).count() as u64;
                if unit_area[u] == 0 {
                    continue;
                }
                for &(ci, mask) in &present {
                    if mask.data.len() == on.len() {
                        inter[u * c + ci] = on.iter().zip(&mask.data).filter(|(&x, &y)| x && y).count() as u64;
                    }
                }
            }
            (inter, unit_area, concept_area)
        })
        .reduce(
            || (vec![0u64; k * c], vec![0u64; k], vec![0u64; c]),
            |mut x, y| {
                x.0.iter_mut().zip(&y.0).for_each(|(a, b)| *a += b);
                x.1.iter_mut().zip(&y.1).for_each(|(a, b)| *a += b);
                x.2.iter_mut().zip(&y.2).for_each(|(a, b)| *a += b);
                x
            },
        );
    Ok((0..k)
        .map(|u| {
            let best = (0..c)
                .map(|ci| {
                    let i = inter[u * c + ci];
                    let union = unit_area[u] + concept_area[ci] - i;
                    (ci, if union == 0 { 0.0 } else { i as f32 / union as f32 })
                })
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let (concept, category, iou) = match best {
                Some((ci, iou)) if iou > 0.0 => (Some(concepts[ci].name.clone()), Some(concepts[ci].category.clone()), iou),
                _ => (None, None, 0.0),
            };
            UnitName { unit: u, named: concept.is_some() && iou >= options.iou_threshold, concept, category, iou, threshold: thresholds[u] }
        })
        .collect())
}

/// The threshold T with a fraction `q` of `values` above it (the (1 - q) quantile, lower value
/// on ties).
pub fn quantile_threshold(values: &mut [f32], q: f64) -> f32 {
    if values.is_empty() {
        return f32::INFINITY;
    }
    let n = values.len();
    let above = ((n as f64 * q).floor() as usize).min(n - 1);
    let idx = n - 1 - above;
    let (_, t, _) = values.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    *t
}
