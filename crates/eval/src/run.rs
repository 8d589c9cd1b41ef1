//! The evaluation loop, written once for every [`Subject`].

use candle_core::Tensor;
use gradcam_core::metrics::{auc, energy, pixel_order, spearman, threshold_box, BoundingBox, Energy, Pointing};
use gradcam_runs::Shard;
use gradcam_core::{Explainer, Map, SettingError};
use serde::Serialize;

use crate::fold::{Fold, ImagePart, Setup, Summary};
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
    run_shard(subject, options, Shard::ALL, |step| {
        progress(step.done, step.result);
        Ok(())
    })
}

/// One image evaluated by [`run_shard`].
pub struct Step<'a> {
    /// Its position in the dataset's order.
    pub index: usize,
    /// Images done by this shard, this one included, of `of`.
    pub done: usize,
    pub of: usize,
    pub result: &'a ExampleResult,
    /// What it adds to the summary.
    pub part: &'a ImagePart,
}

/// [`run`] over the images of the first `options.limit` that `shard` takes, in order; `each`
/// hears about every image as it is done (and may stop the run with an error). The summary is
/// over the shard's images.
pub fn run_shard<S: Subject>(subject: &S, options: &Options, shard: Shard, mut each: impl FnMut(Step) -> Result<()>) -> Result<Summary> {
    let n = subject.len().min(options.limit);
    let mut fold = Fold::default();
    for index in (0..n).filter(|&i| shard.takes(i)) {
        let ex = subject.example(index)?;
        let (result, occlusion) = evaluate_example(subject, &ex, options)?;
        let part = ImagePart::of(&result, options, occlusion);
        fold.add(&part);
        each(Step { index, done: fold.images(), of: shard.len_of(n), result: &result, part: &part })?;
    }
    Ok(fold.summary(&Setup::of(subject.kind(), options)))
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

/// One image's results, and the occlusion patch and stride when faithfulness was measured.
fn evaluate_example<S: Subject>(subject: &S, ex: &Example<S::State>, options: &Options) -> Result<(ExampleResult, Option<(usize, usize)>)> {
    let (h, w) = (ex.image.height() as usize, ex.image.width() as usize);
    let (_, channels, ih, iw) = ex.input.dims4()?;
    if (options.has(Task::Deletion) || options.has(Task::Insertion)) && options.steps > ih * iw {
        return Err(SettingError::value("steps", options.steps, format!("more steps than the input has pixels ({ih}x{iw})")).into());
    }
    let maps = subject.maps(ex, options.method)?;
    let mut occlusion = None;
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
            occlusion = Some((p, s));
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
    Ok((ExampleResult { image: ex.name.clone(), summary: ex.summary.clone(), quality: ex.quality, cases: results }, occlusion))
}
