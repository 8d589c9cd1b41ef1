//! The evaluation loop, written once for every [`Subject`].

use std::collections::BTreeMap;

use candle_core::Tensor;
use gradcam_core::metrics::{auc, energy, pixel_order, spearman, threshold_box, BoundingBox, Energy, Pointing};
use gradcam_core::{Explainer, Map, SettingError};
use serde::Serialize;

use crate::perturb::{patch_origins, Plane};
use crate::{Example, Result, Subject, Task, Tolerance};

/// How to evaluate.
pub struct Options<'a> {
    pub tasks: Vec<Task>,
    pub method: &'a dyn Explainer,
    /// At most this many images.
    pub limit: usize,
    pub tolerance: Tolerance,
    /// Localization: the map is binarised at this fraction of its maximum (the paper's 15%).
    pub box_threshold: f32,
    /// Localization: a box hits at this IoU with a ground-truth box.
    pub iou: f32,
    /// Occlusion patch side and stride in input pixels; default 1/7 of the input's shorter side
    /// (32 px at 224) and half of that.
    pub patch: Option<usize>,
    pub stride: Option<usize>,
    /// Deletion / insertion: points on the curve (pixels moved per step = 1/steps of them).
    pub steps: usize,
    /// The pointing game's recall variant: a prediction that is not in the image counts as
    /// rejected when its map's peak is below this fraction of the strongest peak among the
    /// image's top-5 maps.
    pub reject_below: f32,
    /// Perturbed inputs per forward pass.
    pub batch: usize,
    /// Seeds and baselines of the segmentation task.
    pub segment: crate::segment::SegmentOptions,
}

impl Options<'_> {
    /// Refuses options that measure nothing: fractions outside [0, 1], zero steps, batches,
    /// patches or strides.
    pub fn check(&self) -> Result<()> {
        for (name, v) in [("box_threshold", self.box_threshold), ("iou", self.iou), ("reject_below", self.reject_below)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(SettingError::value(name, v, "must be a fraction between 0 and 1").into());
            }
        }
        for (name, v) in [("steps", self.steps), ("batch", self.batch), ("patch", self.patch.unwrap_or(1)), ("stride", self.stride.unwrap_or(1))] {
            if v == 0 {
                return Err(SettingError::new(vec![name], "must be at least 1").into());
            }
        }
        self.segment.check()
    }

    fn has(&self, t: Task) -> bool {
        self.tasks.contains(&t)
    }
}

/// A running mean.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Mean {
    pub count: usize,
    pub mean: f64,
}

impl Mean {
    pub fn add(&mut self, v: f64) {
        self.count += 1;
        self.mean += (v - self.mean) / self.count as f64;
    }
}

/// Counts of hits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Hits {
    pub count: usize,
    pub hits: usize,
}

impl Hits {
    pub fn add(&mut self, hit: bool) {
        self.count += 1;
        self.hits += hit as usize;
    }
    pub fn rate(&self) -> f64 {
        self.hits as f64 / self.count.max(1) as f64
    }
}

/// The metrics over a set of cases.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Pointing game over cases that refer to objects, beside the centre baseline.
    pub pointing: Pointing,
    /// Cases whose threshold box reaches the IoU with one of their objects' boxes.
    pub localization: Hits,
    /// Spearman correlation of the map with the occlusion map.
    pub faithfulness: Mean,
    pub deletion_auc: Mean,
    pub insertion_auc: Mean,
    /// Mean map value inside the objects' boxes over outside.
    pub energy_ratio: Mean,
    /// Share of the map's mass inside the objects' boxes.
    pub energy_fraction: Mean,
    /// Segmentation from the map's seeds, beside the thresholded map and a centre prior.
    pub segmentation: Segmentation,
}

/// Mean IoUs with the objects' masks of the three segmentations of each case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Segmentation {
    pub count: usize,
    /// The random walker from the map's seeds.
    pub miou_seeded: f64,
    /// The map thresholded alone.
    pub miou_threshold: f64,
    /// A centred box.
    pub miou_centre: f64,
}

impl Segmentation {
    pub fn add(&mut self, [seeded, threshold, centre]: [f64; 3]) {
        self.count += 1;
        let k = self.count as f64;
        self.miou_seeded += (seeded - self.miou_seeded) / k;
        self.miou_threshold += (threshold - self.miou_threshold) / k;
        self.miou_centre += (centre - self.miou_centre) / k;
    }
}

/// Classifier-only figures, per image, as ILSVRC and the paper report them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ranked {
    pub images: usize,
    /// Fraction of images where the top-1 class is wrong.
    pub top1_cls_error: f64,
    pub top5_cls_error: f64,
    /// Fraction of images where the top-1 class is wrong or its box misses (IoU below the
    /// threshold with every box of that class).
    pub top1_loc_error: f64,
    pub top5_loc_error: f64,
    /// The pointing game's recall variant over the top-5 predictions: a present class hits when
    /// its peak is on it and not rejected, an absent one when its map is rejected.
    pub pointing_recall: Pointing,
}

/// Everything measured, with the protocol that produced it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub kind: &'static str,
    pub method: &'static str,
    pub tasks: Vec<Task>,
    pub images: usize,
    pub cases: usize,
    pub overall: Tally,
    /// Per class kind, word type or question type.
    pub groups: BTreeMap<String, Tally>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranked: Option<Ranked>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize)]
pub struct Protocol {
    pub tolerance: String,
    pub box_threshold: f32,
    pub iou: f32,
    /// Occlusion patch and stride in input pixels (of the last image).
    pub patch: usize,
    pub stride: usize,
    pub steps: usize,
    pub reject_below: f32,
    pub removed_pixels: &'static str,
    pub insertion_start: &'static str,
    pub segment: crate::segment::SegmentOptions,
}

/// What was measured for one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub label: String,
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    pub prob: f32,
    pub objects: usize,
    /// (row, column) of the map's peak on the original image.
    pub peak: [usize; 2],
    /// The raw map's value there.
    pub peak_value: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointing_hit: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub centre_hit: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bbox: Option<BoundingBox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iou: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faithfulness: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insertion_auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy: Option<Energy>,
    /// IoU with the objects' masks: seeded random walker, thresholded map, centre prior.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<[f64; 3]>,
}

/// What was measured for one image.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleResult {
    pub image: String,
    pub summary: String,
    pub quality: f64,
    pub cases: Vec<CaseResult>,
}

/// Evaluates the first `options.limit` images of a subject; `progress` hears about each image's
/// results as they come.
pub fn run<S: Subject>(subject: &S, options: &Options, mut progress: impl FnMut(usize, &ExampleResult)) -> Result<Summary> {
    let n = subject.len().min(options.limit);
    let mut overall = Tally::default();
    let mut groups: BTreeMap<String, Tally> = BTreeMap::new();
    let mut ranked = Ranked::default();
    let (mut top1_cls, mut top5_cls, mut top1_loc, mut top5_loc) = (0usize, 0usize, 0usize, 0usize);
    let (mut cases, mut patch, mut stride) = (0, 0, 0);
    for i in 0..n {
        let ex = subject.example(i)?;
        let result = evaluate_example(subject, &ex, options, &mut patch, &mut stride)?;
        cases += result.cases.len();
        for c in &result.cases {
            for t in [&mut overall, groups.entry(c.group.clone()).or_default()] {
                if let (Some(hit), Some(centre)) = (c.pointing_hit, c.centre_hit) {
                    t.pointing.add(hit, centre);
                }
                if c.objects > 0 && options.has(Task::Localization) {
                    t.localization.add(c.iou.is_some_and(|v| v >= options.iou));
                }
                let means = [
                    (&mut t.faithfulness, c.faithfulness),
                    (&mut t.deletion_auc, c.deletion_auc),
                    (&mut t.insertion_auc, c.insertion_auc),
                    (&mut t.energy_ratio, c.energy.and_then(|e| e.ratio)),
                    (&mut t.energy_fraction, c.energy.and_then(|e| e.fraction)),
                ];
                for (m, v) in means {
                    if let Some(v) = v {
                        m.add(v);
                    }
                }
                if let Some(ious) = c.segmentation {
                    t.segmentation.add(ious);
                }
            }
        }
        // ILSVRC-style figures, when the subject ranks its predictions.
        let top: Vec<&CaseResult> = result.cases.iter().filter(|c| c.rank.is_some()).collect();
        if !top.is_empty() {
            ranked.images += 1;
            let right = |k: usize| top.iter().any(|c| c.rank < Some(k) && c.objects > 0);
            let located = |k: usize| top.iter().any(|c| c.rank < Some(k) && c.objects > 0 && c.iou.is_some_and(|v| v >= options.iou));
            top1_cls += !right(1) as usize;
            top5_cls += !right(5) as usize;
            top1_loc += !located(1) as usize;
            top5_loc += !located(5) as usize;
            if options.has(Task::Pointing) {
                let strongest = top.iter().map(|c| c.peak_value).fold(0f32, f32::max);
                for (c, case) in result.cases.iter().zip(&ex.cases).filter(|(c, _)| c.rank.is_some()) {
                    let kept = c.peak_value >= options.reject_below * strongest && strongest > 0.0;
                    let hit = if case.objects.is_empty() { !kept } else { kept && c.pointing_hit == Some(true) };
                    ranked.pointing_recall.add(hit, !case.objects.is_empty() && c.centre_hit == Some(true));
                }
            }
        }
        progress(i + 1, &result);
    }
    let ranked = (ranked.images > 0).then(|| {
        let d = ranked.images as f64;
        Ranked {
            top1_cls_error: top1_cls as f64 / d,
            top5_cls_error: top5_cls as f64 / d,
            top1_loc_error: if options.has(Task::Localization) { top1_loc as f64 / d } else { f64::NAN },
            top5_loc_error: if options.has(Task::Localization) { top5_loc as f64 / d } else { f64::NAN },
            ..ranked
        }
    });
    Ok(Summary {
        kind: subject.kind(),
        method: options.method.name(),
        tasks: options.tasks.clone(),
        images: n,
        cases,
        overall,
        groups,
        ranked,
        protocol: Protocol {
            tolerance: options.tolerance.to_string(),
            box_threshold: options.box_threshold,
            iou: options.iou,
            patch,
            stride,
            steps: options.steps,
            reject_below: options.reject_below,
            removed_pixels: "0 in the normalised input (the mean colour for ImageNet models, mid-grey for the scene CNN)",
            insertion_start: "the input blurred by three box filters of radius 1/32 of its side",
            segment: options.segment,
        },
    })
}

/// Scores `n` inputs of shape `dims` laid out in `data`, `batch` at a time.
fn score_all<S: Subject>(subject: &S, ex: &Example<S::State>, data: &[f32], dims: (usize, usize, usize), batch: usize) -> Result<Vec<Vec<(f32, f32)>>> {
    let size = dims.0 * dims.1 * dims.2;
    let mut out = Vec::with_capacity(data.len() / size);
    for chunk in data.chunks(size * batch.max(1)) {
        let t = Tensor::from_slice(chunk, (chunk.len() / size, dims.0, dims.1, dims.2), &candle_core::Device::Cpu)?;
        out.extend(subject.scores(ex, &t)?);
    }
    Ok(out)
}

fn evaluate_example<S: Subject>(subject: &S, ex: &Example<S::State>, options: &Options, patch: &mut usize, stride: &mut usize) -> Result<ExampleResult> {
    let (h, w) = (ex.image.height() as usize, ex.image.width() as usize);
    let (_, channels, ih, iw) = ex.input.dims4()?;
    if (options.has(Task::Deletion) || options.has(Task::Insertion)) && options.steps > ih * iw {
        return Err(SettingError::value("steps", options.steps, format!("more steps than the input has pixels ({ih}x{iw})")).into());
    }
    let maps = subject.maps(ex, options.method)?;
    let tolerance = options.tolerance.pixels(h, w);
    let mut results = Vec::with_capacity(ex.cases.len());
    for (case, raw) in ex.cases.iter().zip(&maps) {
        let up = raw.resize_bilinear(h, w);
        let (py, px) = up.argmax();
        let present = !case.objects.is_empty();
        let mut r = CaseResult {
            label: case.label.clone(),
            group: case.group.clone(),
            rank: case.rank,
            prob: case.prob,
            objects: case.objects.len(),
            peak: [py, px],
            peak_value: up.max(),
            pointing_hit: None,
            centre_hit: None,
            bbox: None,
            iou: None,
            faithfulness: None,
            deletion_auc: None,
            insertion_auc: None,
            energy: None,
            segmentation: None,
        };
        if options.has(Task::Pointing) && present {
            let (hit, centre) = Pointing::hits(&up, |y, x| case.objects.iter().any(|o| o.mask.near(y, x, tolerance)));
            (r.pointing_hit, r.centre_hit) = (Some(hit), Some(centre));
        }
        if options.has(Task::Localization) && (present || case.rank.is_some()) {
            r.bbox = threshold_box(&up, options.box_threshold);
            if present {
                r.iou = Some(r.bbox.map_or(0.0, |b| case.objects.iter().map(|o| b.iou(&o.bbox)).fold(0.0, f32::max)));
            }
        }
        if options.has(Task::Energy) && present {
            let inside: Vec<bool> = (0..h * w).map(|i| case.objects.iter().any(|o| o.bbox.contains(i / w, i % w))).collect();
            r.energy = Some(energy(&up, &inside));
        }
        if options.has(Task::Segmentation) && present {
            use crate::segment::{centre_prior, iou, random_walker, seeds, threshold};
            let o = &options.segment;
            let truth: Vec<bool> = (0..h * w).map(|i| case.objects.iter().any(|ob| ob.mask.height == h && ob.mask.width == w && ob.mask.get(i / w, i % w))).collect();
            let seeded = random_walker(&ex.image, &seeds(&up, o), o.beta, o.max_side);
            r.segmentation = Some([iou(&seeded, &truth), iou(&threshold(&up, o.threshold), &truth), iou(&centre_prior(h, w, o.centre_area), &truth)]);
        }
        results.push(r);
    }

    let primary: Vec<usize> = (0..ex.cases.len()).filter(|&i| ex.cases[i].primary).collect();
    let perturbing = [Task::Faithfulness, Task::Deletion, Task::Insertion].iter().any(|&t| options.has(t));
    if !primary.is_empty() && perturbing {
        let plane = Plane { c: channels, h: ih, w: iw, data: ex.input.flatten_all()?.to_vec1::<f32>()? };
        let dims = (channels, ih, iw);
        let base = subject.scores(ex, &ex.input)?.remove(0);
        // Each primary case's map at the input's resolution, for both kinds of perturbation.
        let at_input: Vec<(usize, Map)> = primary.iter().map(|&ci| (ci, maps[ci].resize_bilinear(ih, iw))).collect();
        if options.has(Task::Faithfulness) {
            let p = options.patch.unwrap_or(ih.min(iw) / 7).clamp(1, ih.min(iw));
            let s = options.stride.unwrap_or(p / 2).max(1);
            (*patch, *stride) = (p, s);
            let positions: Vec<(usize, usize)> = patch_origins(ih, p, s).into_iter().flat_map(|y| patch_origins(iw, p, s).into_iter().map(move |x| (y, x))).collect();
            // Made and scored `--batch` occluded inputs at a time: memory does not grow with the
            // number of positions (`--patch 1 --stride 1` is 50,176 of them at 224 px).
            let mut occluded = Vec::with_capacity(positions.len());
            for chunk in positions.chunks(options.batch.max(1)) {
                let data: Vec<f32> = chunk.iter().flat_map(|&(y, x)| plane.occluded(y, x, p)).collect();
                occluded.extend(score_all(subject, ex, &data, dims, options.batch)?);
            }
            for (ci, cam) in &at_input {
                let ci = *ci;
                let window = |y: usize, x: usize| -> f32 {
                    let (y1, x1) = ((y + p).min(ih), (x + p).min(iw));
                    let sum: f32 = (y..y1).map(|yy| cam.data[yy * iw + x..yy * iw + x1].iter().sum::<f32>()).sum();
                    sum / ((y1 - y) * (x1 - x)) as f32
                };
                let windows: Vec<f32> = positions.iter().map(|&(y, x)| window(y, x)).collect();
                let drops: Vec<f32> = occluded.iter().map(|row| base[ci].0 - row[ci].0).collect();
                results[ci].faithfulness = spearman(&windows, &drops);
            }
        }
        if options.has(Task::Deletion) || options.has(Task::Insertion) {
            let removed = vec![0f32; plane.data.len()];
            let blurred = plane.blurred((ih.min(iw) / 32).max(1));
            for (ci, cam) in &at_input {
                let (ci, order) = (*ci, pixel_order(cam));
                let curve = |from: &[f32], to: &[f32]| -> Result<f64> {
                    let mut probs = Vec::with_capacity(options.steps + 1);
                    Plane::sweep(from, to, ih * iw, &order, options.steps, options.batch, |data| -> Result<()> {
                        probs.extend(score_all(subject, ex, data, dims, options.batch)?.iter().map(|row| row[ci].1));
                        Ok(())
                    })?;
                    Ok(auc(&probs))
                };
                if options.has(Task::Deletion) {
                    results[ci].deletion_auc = Some(curve(&plane.data, &removed)?);
                }
                if options.has(Task::Insertion) {
                    results[ci].insertion_auc = Some(curve(&blurred, &plane.data)?);
                }
            }
        }
    }
    Ok(ExampleResult { image: ex.name.clone(), summary: ex.summary.clone(), quality: ex.quality, cases: results })
}
