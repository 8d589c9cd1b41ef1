//! The summary as a fold over the images in input order: each image's [`ImagePart`] (what it
//! adds to every tally, its floats kept exactly) is added by [`Fold::add`], and
//! [`Fold::summary`] closes it. `gradcam eval` folds as it goes; `gradcam eval merge` replays the
//! parts its shards wrote, in index order, through the same fold: running means depend on the
//! order of their terms, so the same order gives the same bits.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::str::FromStr;

use gradcam_core::metrics::Pointing;
use serde::{Deserialize, Serialize};

use crate::run::{ExampleResult, Options};
use crate::segment::SegmentOptions;
use crate::Task;

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
    pub kind: String,
    pub method: String,
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

/// A number written as Rust prints it (`{:?}`, the shortest text that parses back to the same
/// bits, `NaN` and `inf` included) and read back with `str::parse`: exact, unlike a JSON number
/// read by a float parser that may round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exact<T>(pub T);

impl<T: Debug> Serialize for Exact<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:?}", self.0))
    }
}

impl<'de, T: FromStr> Deserialize<'de> for Exact<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Exact).map_err(|_| serde::de::Error::custom(format!("{s:?} is not a number")))
    }
}

/// What one case adds to its tallies (overall and its group's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CasePart {
    pub group: String,
    /// Pointing game: (hit, centre hit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointing: Option<(bool, bool)>,
    /// Localization: whether the box reached the IoU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localization: Option<bool>,
    /// Faithfulness, deletion AUC, insertion AUC, energy ratio and energy fraction.
    pub means: [Option<Exact<f64>>; 5],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<[Exact<f64>; 3]>,
}

/// What one image adds to the per-image (ILSVRC-style) figures of a subject that ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedPart {
    /// Wrong at top-1 and top-5 classification, top-1 and top-5 localization.
    pub errors: [bool; 4],
    /// The pointing recall variant over the top 5: (hit, centre hit) per prediction.
    pub recall: Vec<(bool, bool)>,
}

/// What one image adds to the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagePart {
    pub cases: Vec<CasePart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranked: Option<RankedPart>,
    /// The occlusion patch and stride, when faithfulness was measured on this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occlusion: Option<(usize, usize)>,
}

impl ImagePart {
    /// The part of an image's `result` under `options`.
    pub fn of(result: &ExampleResult, options: &Options, occlusion: Option<(usize, usize)>) -> ImagePart {
        let has = |t: Task| options.tasks.contains(&t);
        let cases = result
            .cases
            .iter()
            .map(|c| CasePart {
                group: c.group.clone(),
                pointing: c.pointing_hit.zip(c.centre_hit),
                localization: (c.objects > 0 && has(Task::Localization)).then(|| c.iou.is_some_and(|v| v >= options.iou)),
                means: [c.faithfulness, c.deletion_auc, c.insertion_auc, c.energy.and_then(|e| e.ratio), c.energy.and_then(|e| e.fraction)].map(|v| v.map(Exact)),
                segmentation: c.segmentation.map(|s| s.map(Exact)),
            })
            .collect();
        // ILSVRC-style figures, when the subject ranks its predictions.
        let top: Vec<_> = result.cases.iter().filter(|c| c.rank.is_some()).collect();
        let ranked = (!top.is_empty()).then(|| {
            let right = |k: usize| top.iter().any(|c| c.rank < Some(k) && c.objects > 0);
            let located = |k: usize| top.iter().any(|c| c.rank < Some(k) && c.objects > 0 && c.iou.is_some_and(|v| v >= options.iou));
            let mut recall = Vec::new();
            if has(Task::Pointing) {
                let strongest = top.iter().map(|c| c.peak_value).fold(0f32, f32::max);
                for c in &top {
                    let kept = c.peak_value >= options.reject_below * strongest && strongest > 0.0;
                    let present = c.objects > 0;
                    let hit = if present { kept && c.pointing_hit == Some(true) } else { !kept };
                    recall.push((hit, present && c.centre_hit == Some(true)));
                }
            }
            RankedPart { errors: [!right(1), !right(5), !located(1), !located(5)], recall }
        });
        ImagePart { cases, ranked, occlusion }
    }
}

/// How a run measured, as its summary's protocol reports it (floats kept exactly, so that a
/// merge reports the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    pub kind: String,
    pub method: String,
    pub tasks: Vec<Task>,
    pub tolerance: String,
    pub box_threshold: Exact<f32>,
    pub iou: Exact<f32>,
    pub steps: usize,
    pub reject_below: Exact<f32>,
    /// The segmentation's high, low, threshold, beta and centre area, and its walker's side.
    pub segment: ([Exact<f32>; 5], u32),
}

impl Setup {
    pub fn of(kind: &str, options: &Options) -> Setup {
        let s = &options.segment;
        Setup {
            kind: kind.into(),
            method: options.method.name().into(),
            tasks: options.tasks.clone(),
            tolerance: options.tolerance.to_string(),
            box_threshold: Exact(options.box_threshold),
            iou: Exact(options.iou),
            steps: options.steps,
            reject_below: Exact(options.reject_below),
            segment: ([s.high, s.low, s.threshold, s.beta, s.centre_area].map(Exact), s.max_side),
        }
    }

    fn has(&self, t: Task) -> bool {
        self.tasks.contains(&t)
    }
}

/// The tallies so far, over the images added in order.
#[derive(Debug, Clone, Default)]
pub struct Fold {
    images: usize,
    cases: usize,
    overall: Tally,
    groups: BTreeMap<String, Tally>,
    ranked: Ranked,
    /// Images wrong at top-1 / top-5 classification, top-1 / top-5 localization.
    errors: [usize; 4],
    occlusion: (usize, usize),
}

impl Fold {
    /// Adds the next image.
    pub fn add(&mut self, part: &ImagePart) {
        self.images += 1;
        self.cases += part.cases.len();
        for c in &part.cases {
            for t in [&mut self.overall, self.groups.entry(c.group.clone()).or_default()] {
                if let Some((hit, centre)) = c.pointing {
                    t.pointing.add(hit, centre);
                }
                if let Some(hit) = c.localization {
                    t.localization.add(hit);
                }
                let means = [&mut t.faithfulness, &mut t.deletion_auc, &mut t.insertion_auc, &mut t.energy_ratio, &mut t.energy_fraction];
                for (m, v) in means.into_iter().zip(c.means) {
                    if let Some(Exact(v)) = v {
                        m.add(v);
                    }
                }
                if let Some(ious) = c.segmentation {
                    t.segmentation.add(ious.map(|v| v.0));
                }
            }
        }
        if let Some(r) = &part.ranked {
            self.ranked.images += 1;
            for (n, wrong) in self.errors.iter_mut().zip(r.errors) {
                *n += wrong as usize;
            }
            for &(hit, centre) in &r.recall {
                self.ranked.pointing_recall.add(hit, centre);
            }
        }
        if let Some(o) = part.occlusion {
            self.occlusion = o;
        }
    }

    /// Images added so far.
    pub fn images(&self) -> usize {
        self.images
    }

    /// The summary of the images added.
    pub fn summary(self, setup: &Setup) -> Summary {
        let d = self.ranked.images as f64;
        let [top1_cls, top5_cls, top1_loc, top5_loc] = self.errors.map(|n| n as f64 / d);
        let located = setup.has(Task::Localization);
        let ranked = (self.ranked.images > 0).then_some(Ranked {
            top1_cls_error: top1_cls,
            top5_cls_error: top5_cls,
            top1_loc_error: if located { top1_loc } else { f64::NAN },
            top5_loc_error: if located { top5_loc } else { f64::NAN },
            ..self.ranked
        });
        let ([high, low, threshold, beta, centre_area], max_side) = setup.segment;
        Summary {
            kind: setup.kind.clone(),
            method: setup.method.clone(),
            tasks: setup.tasks.clone(),
            images: self.images,
            cases: self.cases,
            overall: self.overall,
            groups: self.groups,
            ranked,
            protocol: Protocol {
                tolerance: setup.tolerance.clone(),
                box_threshold: setup.box_threshold.0,
                iou: setup.iou.0,
                patch: self.occlusion.0,
                stride: self.occlusion.1,
                steps: setup.steps,
                reject_below: setup.reject_below.0,
                removed_pixels: "0 in the normalised input (the mean colour for ImageNet models, mid-grey for the scene CNN)",
                insertion_start: "the input blurred by three box filters of radius 1/32 of its side",
                segment: SegmentOptions { high: high.0, low: low.0, threshold: threshold.0, beta: beta.0, centre_area: centre_area.0, max_side },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_numbers_come_back_with_the_same_bits() {
        for v in [0.1 + 0.2, 1.0 / 3.0, -0.0, 5e-324, 1.7976931348623157e308, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.8164965809277261] {
            let text = serde_json::to_string(&Exact(v)).unwrap();
            let back: Exact<f64> = serde_json::from_str(&text).unwrap();
            assert_eq!(back.0.to_bits(), v.to_bits(), "{text}");
        }
        let f: Exact<f32> = serde_json::from_str(&serde_json::to_string(&Exact(0.15f32)).unwrap()).unwrap();
        assert_eq!(f.0, 0.15f32);
        assert!(serde_json::from_str::<Exact<f64>>("\"x\"").unwrap_err().to_string().contains("\"x\" is not a number"));
    }

    fn part(group: &str, v: f64) -> ImagePart {
        let case = CasePart { group: group.into(), pointing: Some((v > 0.5, false)), localization: Some(true), means: [Some(Exact(v)), None, None, None, None], segmentation: None };
        ImagePart { cases: vec![case], ranked: Some(RankedPart { errors: [v > 0.5, false, true, false], recall: vec![(true, false)] }), occlusion: Some((4, 2)) }
    }

    #[test]
    fn a_fold_replayed_in_order_gives_the_same_summary() {
        let parts: Vec<ImagePart> = (0..7).map(|i| part(["a", "b"][i % 2], (i as f64 * 0.37).sin().abs())).collect();
        let setup = Setup { kind: "k".into(), method: "m".into(), tasks: Task::ALL.to_vec(), tolerance: "15 px".into(), box_threshold: Exact(0.15), iou: Exact(0.5), steps: 20, reject_below: Exact(0.5), segment: ([Exact(0.5); 5], 128) };
        let once = |parts: &[ImagePart]| {
            let mut f = Fold::default();
            parts.iter().for_each(|p| f.add(p));
            serde_json::to_string_pretty(&f.summary(&setup)).unwrap()
        };
        // Through the text a shard writes and back.
        let replayed: Vec<ImagePart> = parts.iter().map(|p| serde_json::from_str(&serde_json::to_string(p).unwrap()).unwrap()).collect();
        assert_eq!(replayed, parts);
        assert_eq!(once(&replayed), once(&parts));
        let s: serde_json::Value = serde_json::from_str(&once(&parts)).unwrap();
        assert_eq!((s["images"].as_u64(), s["ranked"]["top1_loc_error"].as_f64(), s["groups"]["a"]["pointing"]["count"].as_u64()), (Some(7), Some(1.0), Some(4)));
    }
}
