//! Measuring a trained classifier on a split, and the model card (`README.md` of the model
//! folder) that `gradcam train classifier` writes.

use std::path::Path;

use candle_core::{Tensor, D};
use gradcam_core::{Cam, Explainable, Map, Target};
use gradcam_encoders::preprocess::{load_image, prepare_with, Resize};
use gradcam_encoders::Network;
use gradcam_scenes::coco::Instance;
use gradcam_scenes::Split;
use serde::Serialize;

use crate::data::CUE;
use crate::train::{Checkpoint, TrainConfig};
use crate::{Config, Error, Result};

/// One test image as a model saw it: its label, prediction and the Grad-CAM map of the
/// predicted class (upsampled to the image), with where the object and the cue are.
#[derive(Debug, Clone)]
pub struct Case {
    pub file: String,
    pub label: usize,
    pub predicted: usize,
    /// The Grad-CAM map of the predicted class at `conv4`, bilinearly upsampled to the image.
    pub map: Map,
    /// The labelled object's box, (x0, y0, x1, y1) in pixels.
    pub object: [usize; 4],
    /// The cue's box and the class whose colour it has (a biased ShapeScenes set's `cue`).
    pub cue: Option<([usize; 4], usize)>,
    /// The share of the map's mass inside the object's box (0 for a map that is zero everywhere).
    pub object_share: f64,
}

impl Case {
    pub fn correct(&self) -> bool {
        self.label == self.predicted
    }

    /// Whether the map's peak lies in the cue's box.
    pub fn peaks_on_cue(&self) -> Option<bool> {
        let ([x0, y0, x1, y1], _) = self.cue?;
        let (y, x) = self.map.argmax();
        Some(self.map.max() > 0.0 && (x0..x1).contains(&x) && (y0..y1).contains(&y))
    }
}

fn pixel_box(b: [f64; 4], w: usize, h: usize) -> [usize; 4] {
    let c = |v: f64, hi: usize| (v.max(0.0).round() as usize).min(hi);
    [c(b[0], w), c(b[1], h), c(b[0] + b[2], w), c(b[1] + b[3], h)]
}

/// Classifies every labelled image of `split` (at most `limit`) with `net` at layer `conv4` and
/// explains its prediction. `progress` hears (images done, images).
pub fn cases(net: &Network, cfg: &Config, split: &Split, limit: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<Case>> {
    crate::data::check_classes(split, &cfg.category_ids, &cfg.labels)?;
    let cue_id = split.instances.categories.iter().find(|c| c.name == CUE).map(|c| c.id);
    let examples: Vec<_> = split.examples().into_iter().take(limit).collect();
    let layer = net.layer_index(net.default_layer())?;
    let model = net.split(layer);
    let cam = Cam::new(&model);
    let mut out = Vec::with_capacity(examples.len());
    for (done, chunk) in examples.chunks(64).enumerate() {
        let mut inputs = Vec::new();
        let mut meta = Vec::new();
        for ex in chunk {
            let labelled = |o: &&&Instance| cfg.category_ids.contains(&o.category_id);
            let Some(object) = ex.objects.iter().filter(labelled).max_by(|a, b| a.area.total_cmp(&b.area)) else { continue };
            let img = load_image(&ex.path)?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            inputs.push(prepare_with(&img, Resize::Stretch, net.preprocess())?.tensor);
            let label = cfg.category_ids.iter().position(|&c| c == object.category_id).expect("filtered");
            let cue = ex.objects.iter().find(|o| Some(o.category_id) == cue_id).map(|o| {
                let class = o.color.as_deref().and_then(|c| gradcam_scenes::scene::CUE_COLORS.iter().position(|n| *n == c)).unwrap_or(usize::MAX);
                (pixel_box(o.bbox, w, h), class)
            });
            meta.push((ex.image.file_name.clone(), label, pixel_box(object.bbox, w, h), cue, (h, w)));
        }
        if inputs.is_empty() {
            continue;
        }
        let input = Tensor::stack(&inputs, 0)?;
        let activations = model.features(&input)?;
        let predicted: Vec<u32> = model.head(&activations)?.argmax(D::Minus1)?.to_vec1()?;
        let requests: Vec<(usize, Target)> = predicted.iter().enumerate().map(|(i, &c)| (i, Target::class(c as usize))).collect();
        let explanations = cam.explain_with(&input, &activations, &requests)?;
        for ((file, label, object, cue, (h, w)), (e, &p)) in meta.into_iter().zip(explanations.iter().zip(&predicted)) {
            let map = e.cam().resize_bilinear(h, w);
            if !map.is_finite() {
                return Err(Error::Data(format!("{file}: the map is not finite; are the weights damaged?")));
            }
            let [x0, y0, x1, y1] = object;
            let inside: Vec<bool> = (0..h * w).map(|i| (x0..x1).contains(&(i % w)) && (y0..y1).contains(&(i / w))).collect();
            let object_share = gradcam_core::metrics::energy(&map, &inside).fraction.unwrap_or(0.0);
            out.push(Case { file, label, predicted: p as usize, map, object, cue, object_share });
        }
        progress((done * 64 + chunk.len()).min(examples.len()), examples.len());
    }
    Ok(out)
}

/// Accuracy over cases, overall and per class (count, correct).
#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub images: usize,
    pub accuracy: f64,
    pub per_class: Vec<(String, usize, f64)>,
}

pub fn accuracy(cases: &[Case], labels: &[String]) -> Accuracy {
    let per_class = labels
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let of: Vec<&Case> = cases.iter().filter(|c| c.label == k).collect();
            (name.clone(), of.len(), of.iter().filter(|c| c.correct()).count() as f64 / of.len().max(1) as f64)
        })
        .collect();
    Accuracy { images: cases.len(), accuracy: cases.iter().filter(|c| c.correct()).count() as f64 / cases.len().max(1) as f64, per_class }
}

/// The command that trains this model again.
pub fn command(data: &Path, out: &Path, tc: &TrainConfig) -> String {
    format!(
        "gradcam train classifier --data {} --out {} --epochs {} --batch-size {} --lr {} --weight-decay {} --seed {} --channels {} --image-size {}{}",
        data.display(), out.display(), tc.settings.epochs, tc.settings.batch_size, tc.settings.lr, tc.settings.weight_decay, tc.settings.seed, tc.channels, tc.image_size,
        tc.limit.map(|l| format!(" --limit {l}")).unwrap_or_default()
    )
}

/// Measures the model in `out` on `data/test` (at most 1000 images) when that split exists and
/// writes `out/README.md`. `progress` hears (images done, images).
pub fn write(data: &Path, out: &Path, ckpt: &Checkpoint, minutes: f64, progress: &dyn Fn(usize, usize)) -> Result<Option<Accuracy>> {
    let cfg = Config::load(out)?;
    let test_dir = data.join("test");
    let test = if test_dir.join("instances.json").exists() {
        let net = crate::load(out)?;
        let split = Split::read(&test_dir)?;
        Some(accuracy(&cases(&net, &cfg, &split, 1000, &mut |i, n| progress(i, n))?, &cfg.labels))
    } else {
        None
    };
    let text = card(&command(data, out, &ckpt.train), &cfg, ckpt, minutes, test.as_ref(), data);
    gradcam_io::write_atomic(&out.join("README.md"), text.as_bytes())?;
    Ok(test)
}

fn card(command: &str, cfg: &Config, ckpt: &Checkpoint, minutes: f64, test: Option<&Accuracy>, data: &Path) -> String {
    let side = cfg.image_size / 4;
    let mut s = format!(
        "# Scene classifier\n\nA scene CNN (4 convolutions, explained layer `conv4`: {} x {side} x {side} at {} px), global average pooling and one linear layer over {} classes ({}). Grad-CAM at `conv4` is CAM for this architecture.\n\n",
        cfg.channels, cfg.image_size, cfg.labels.len(), cfg.labels.join(", ")
    );
    s.push_str(&format!(
        "## Training\n\nData: `{}` (COCO instances; each image labelled with the category of its largest object, `cue` annotations excluded; {} training images, {} without a label skipped).\n\n```sh\n{command}\n```\n\n",
        data.display(), ckpt.extra.train_images, ckpt.extra.skipped
    ));
    s.push_str(&format!(
        "Cross-entropy, AdamW (lr {}, weight decay {}, cosine decay), batch {}, seed {}; {} epochs in {minutes:.1} min on a 2-core CPU.\n\n| epoch | train loss | val loss | val accuracy | seconds |\n|---|---|---|---|---|\n",
        ckpt.train.settings.lr, ckpt.train.settings.weight_decay, ckpt.train.settings.batch_size, ckpt.train.settings.seed, ckpt.epochs_done
    ));
    for e in &ckpt.log {
        s.push_str(&format!("| {} | {:.4} | {:.4} | {:.3} | {:.0} |\n", e.epoch, e.train_loss, e.val_loss, e.metrics.val_accuracy, e.seconds));
    }
    match test {
        Some(t) => {
            s.push_str(&format!("\n## Test accuracy ({} images)\n\n**{:.3}**\n\n| class | images | accuracy |\n|---|---|---|\n", t.images, t.accuracy));
            for (name, n, acc) in &t.per_class {
                s.push_str(&format!("| {name} | {n} | {acc:.3} |\n"));
            }
        }
        None => s.push_str("\nNo test split was found beside the training data; no test metrics.\n"),
    }
    s.push_str("\nExplain with `gradcam classify --model DIR IMAGE...`; name `conv4`'s units with `gradcam dissect --model DIR --data DATA` (then `--neurons` uses them).\n");
    s
}
