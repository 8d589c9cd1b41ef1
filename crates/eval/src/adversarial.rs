//! Grad-CAM under adversarial noise (the paper's section 6.2), measured over a dataset: every
//! ground-truth class of every image is attacked (untargeted: until its probability is below
//! 1e-3; targeted: until a random other class's is above 0.9), and the original class's map on
//! the adversarial image is scored against its objects beside the map on the clean image.

use std::collections::BTreeMap;
use std::path::Path;

use gradcam_core::metrics::{energy, threshold_box, BoundingBox, Pointing};
use gradcam_core::{explain, CamMethod, Explainable, Map, Request, Target};
use gradcam_encoders::preprocess::{prepare_with, Resize};
use gradcam_encoders::Network;
use gradcam_scenes::coco::Instances;
use gradcam_scenes::scene::Rng;
use serde::{Deserialize, Serialize};

use crate::attack::{attack, Goal, Pgd};
use crate::fold::{Exact, Hits, Mean};
use crate::Shard;
use crate::{Error, Result, Tolerance};

/// How to attack and measure.
#[derive(Debug, Clone, Serialize)]
pub struct AdversarialOptions {
    pub eps: f32,
    pub steps: usize,
    pub step_size: f32,
    /// Attack towards a random other class (seeded) instead of away from the true one.
    pub targeted: bool,
    pub seed: u64,
    /// The goal: untargeted, the class's probability below this; targeted, the target's above.
    pub until: f32,
    pub limit: usize,
    #[serde(skip)]
    pub tolerance: Tolerance,
    pub box_threshold: f32,
    pub iou: f32,
}

/// Pointing, localization and energy of one set of maps.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MapTally {
    pub pointing: Pointing,
    pub localization: Hits,
    pub energy_fraction: Mean,
}

/// One attacked class of one image.
#[derive(Debug, Clone, Serialize)]
pub struct AttackCase {
    pub image: String,
    pub class: usize,
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<usize>,
    pub success: bool,
    pub steps: usize,
    pub linf: f32,
    pub l2: f32,
    /// The class's probability on the clean and the adversarial image.
    pub prob_clean: f32,
    pub prob_adversarial: f32,
    /// The adversarial image's top-1 class.
    pub top1_adversarial: usize,
    pub pointing_clean: bool,
    pub pointing_adversarial: bool,
    pub iou_clean: f32,
    pub iou_adversarial: f32,
    pub energy_clean: Option<f64>,
    pub energy_adversarial: Option<f64>,
    #[serde(skip)]
    pub maps: (Map, Map),
}

#[derive(Debug, Clone, Serialize)]
pub struct AdversarialSummary {
    pub images: usize,
    pub cases: usize,
    /// Share of attacks whose goal holds on the 8-bit adversarial image.
    pub success_rate: f64,
    pub mean_linf: f64,
    pub mean_l2: f64,
    pub mean_steps: f64,
    /// The original class's maps on the clean images and on the adversarial ones (all cases).
    pub clean: MapTally,
    pub adversarial: MapTally,
    /// The same over successful attacks only.
    pub adversarial_successful: MapTally,
    pub method: String,
    pub options: AdversarialOptions,
    pub tolerance: String,
}

fn cam(net: &Network, layer: usize, pixels: &candle_core::Tensor, class: usize, method: &dyn CamMethod) -> Result<Map> {
    let input = crate::attack::normalize(net, pixels)?;
    let split = net.split(layer);
    let activations = split.features(&input)?;
    let target = Target::class(class);
    let requests = [Request { image: 0, target: &target }];
    Ok(explain(&split, &activations, &requests, method)?.remove(0).cam())
}

/// Hears an image's index, its attacked classes and their parts of the summary.
pub type EachImage<'a> = dyn FnMut(usize, Vec<AttackCase>, &[CasePart]) -> Result<()> + 'a;
type Record<'a> = dyn FnMut(usize, &[AttackCase], &[CasePart]) -> Result<()> + 'a;

/// Attacks and measures the first `limit` images of the COCO set in `dir` (instances.json and
/// images/) that `shard` takes; `each` gets every image's index, attacked classes and their parts
/// of the summary as they are done, `progress` hears (images done, images of the shard). The
/// random targets are drawn for every image of the list, so that a shard attacks each class
/// towards the target the whole run would. Gives the summary of the shard's images and the
/// list's length.
#[allow(clippy::too_many_arguments)]
pub fn run(net: &Network, layer: usize, dir: &Path, method: &dyn CamMethod, o: &AdversarialOptions, shard: Shard, progress: &mut dyn FnMut(usize, usize), each: &mut EachImage) -> Result<(AdversarialSummary, usize)> {
    let file = dir.join("instances.json");
    let instances = Instances::read(&file)?;
    let classes = crate::subjects::category_classes(net, &instances, &file)?;
    let n = instances.images.len().min(o.limit);
    let mut rng = Rng::new(o.seed);
    let mut fold = AdversarialFold::default();
    for (i, info) in instances.images.iter().take(n).enumerate() {
        let mut truth: BTreeMap<usize, Vec<&gradcam_scenes::coco::Instance>> = BTreeMap::new();
        for a in instances.annotations.iter().filter(|a| a.image_id == info.id && !a.iscrowd) {
            if let Some(&c) = classes.get(&a.category_id) {
                truth.entry(c).or_default().push(a);
            }
        }
        let mut target = |class: usize| (class + 1 + rng.below(net.num_classes() - 1)) % net.num_classes();
        if !shard.takes(i) {
            if o.targeted {
                truth.keys().for_each(|&class| _ = target(class));
            }
            continue;
        }
        let path = dir.join("images").join(&info.file_name);
        let image = gradcam_encoders::preprocess::load_image(&path)?;
        if image.dimensions() != (info.width, info.height) {
            return Err(Error::Data(format!("{} is {}x{} but its annotations say {}x{}", path.display(), image.width(), image.height(), info.width, info.height)));
        }
        let (h, w) = (info.height as usize, info.width as usize);
        let view = prepare_with(&image, Resize::Stretch, net.preprocess())?.view;
        let x0 = crate::attack::pixels_of(&view)?;
        let clean_probs = crate::attack::probabilities(net, &x0)?;
        let mut cases = Vec::new();
        for (&class, objects) in &truth {
            let goal = if o.targeted {
                Goal::Targeted { class, target: target(class), until: o.until }
            } else {
                Goal::Untargeted { class, until: o.until }
            };
            let adv = attack(net, &x0, &Pgd { eps: o.eps, steps: o.steps, step_size: o.step_size, goal })?;
            let maps = (cam(net, layer, &x0, class, method)?, cam(net, layer, &adv.pixels, class, method)?);
            let score = |m: &Map| -> (bool, f32, Option<f64>) {
                let up = m.resize_bilinear(h, w);
                let tol = o.tolerance.pixels(h, w);
                let (hit, _) = Pointing::hits(&up, |y, x| objects.iter().any(|a| a.mask.near(y, x, tol)));
                let boxes: Vec<BoundingBox> = objects.iter().map(|a| BoundingBox::from_coco(a.bbox)).collect();
                let iou = threshold_box(&up, o.box_threshold).map_or(0.0, |b| boxes.iter().map(|t| b.iou(t)).fold(0.0, f32::max));
                let inside: Vec<bool> = (0..h * w).map(|p| boxes.iter().any(|b| b.contains(p / w, p % w))).collect();
                (hit, iou, energy(&up, &inside).fraction)
            };
            let (pc, ic, ec) = score(&maps.0);
            let (pa, ia, ea) = score(&maps.1);
            let top1 = (0..adv.probs.len()).max_by(|&a, &b| adv.probs[a].total_cmp(&adv.probs[b])).unwrap_or(0);
            cases.push(AttackCase {
                image: info.file_name.clone(),
                class,
                label: net.label(class),
                target: match goal {
                    Goal::Targeted { target, .. } => Some(target),
                    Goal::Untargeted { .. } => None,
                },
                success: adv.success,
                steps: adv.steps,
                linf: adv.linf,
                l2: adv.l2,
                prob_clean: clean_probs[class],
                prob_adversarial: adv.probs[class],
                top1_adversarial: top1,
                pointing_clean: pc,
                pointing_adversarial: pa,
                iou_clean: ic,
                iou_adversarial: ia,
                energy_clean: ec,
                energy_adversarial: ea,
                maps,
            });
        }
        let parts: Vec<CasePart> = cases.iter().map(|c| CasePart::of(c, o.iou)).collect();
        fold.add_image(&parts);
        progress(fold.images, shard.len_of(n));
        each(i, cases, &parts)?;
    }
    Ok((fold.summary(&AdversarialSetup::of(method.name(), o)), n))
}

/// What one attacked class adds to the summary, its floats exact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CasePart {
    pub success: bool,
    pub steps: usize,
    pub linf: Exact<f32>,
    pub l2: Exact<f32>,
    /// Pointing hit, localized, energy fraction: of the clean map and of the adversarial one.
    pub clean: (bool, bool, Option<Exact<f64>>),
    pub adversarial: (bool, bool, Option<Exact<f64>>),
}

impl CasePart {
    fn of(c: &AttackCase, iou: f32) -> CasePart {
        CasePart {
            success: c.success,
            steps: c.steps,
            linf: Exact(c.linf),
            l2: Exact(c.l2),
            clean: (c.pointing_clean, c.iou_clean >= iou, c.energy_clean.map(Exact)),
            adversarial: (c.pointing_adversarial, c.iou_adversarial >= iou, c.energy_adversarial.map(Exact)),
        }
    }
}

/// The adversarial summary as a fold over the attacked classes in input order (see
/// [`crate::fold`]).
#[derive(Debug, Clone, Default)]
pub struct AdversarialFold {
    images: usize,
    cases: usize,
    successes: usize,
    /// Sums of L-inf, L2 and steps.
    sums: [f64; 3],
    clean: MapTally,
    adversarial: MapTally,
    adversarial_successful: MapTally,
}

impl AdversarialFold {
    /// Adds the next image's attacked classes.
    pub fn add_image(&mut self, parts: &[CasePart]) {
        fn tally(t: &mut MapTally, (hit, located, energy): (bool, bool, Option<Exact<f64>>)) {
            t.pointing.add(hit, false);
            t.localization.add(located);
            if let Some(Exact(e)) = energy {
                t.energy_fraction.add(e);
            }
        }
        self.images += 1;
        for p in parts {
            self.cases += 1;
            self.successes += p.success as usize;
            for (sum, v) in self.sums.iter_mut().zip([p.linf.0 as f64, p.l2.0 as f64, p.steps as f64]) {
                *sum += v;
            }
            tally(&mut self.clean, p.clean);
            tally(&mut self.adversarial, p.adversarial);
            if p.success {
                tally(&mut self.adversarial_successful, p.adversarial);
            }
        }
    }

    pub fn summary(self, setup: &AdversarialSetup) -> AdversarialSummary {
        let k = self.cases.max(1) as f64;
        let options = setup.options();
        AdversarialSummary {
            images: self.images,
            cases: self.cases,
            success_rate: self.successes as f64 / k,
            mean_linf: self.sums[0] / k,
            mean_l2: self.sums[1] / k,
            mean_steps: self.sums[2] / k,
            clean: self.clean,
            adversarial: self.adversarial,
            adversarial_successful: self.adversarial_successful,
            method: setup.method.clone(),
            tolerance: options.tolerance.to_string(),
            options,
        }
    }
}

/// How the attacks ran and were measured, floats exact (a shard's, for the merge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdversarialSetup {
    pub method: String,
    /// eps, step size, until, box threshold, IoU.
    pub values: [Exact<f32>; 5],
    pub steps: usize,
    pub targeted: bool,
    pub seed: u64,
    pub limit: usize,
    /// The pointing tolerance: whether a fraction, and its value.
    pub tolerance: (bool, Exact<f32>),
}

impl AdversarialSetup {
    pub fn of(method: &str, o: &AdversarialOptions) -> AdversarialSetup {
        let tolerance = match o.tolerance {
            Tolerance::Pixels(p) => (false, Exact(p)),
            Tolerance::Fraction(f) => (true, Exact(f)),
        };
        AdversarialSetup { method: method.into(), values: [o.eps, o.step_size, o.until, o.box_threshold, o.iou].map(Exact), steps: o.steps, targeted: o.targeted, seed: o.seed, limit: o.limit, tolerance }
    }

    pub fn options(&self) -> AdversarialOptions {
        let [eps, step_size, until, box_threshold, iou] = self.values.map(|v| v.0);
        let tolerance = if self.tolerance.0 { Tolerance::Fraction(self.tolerance.1 .0) } else { Tolerance::Pixels(self.tolerance.1 .0) };
        AdversarialOptions { eps, steps: self.steps, step_size, targeted: self.targeted, seed: self.seed, until, limit: self.limit, tolerance, box_threshold, iou }
    }
}

impl AdversarialOptions {
    /// The goal's default probability: 0.9 for targeted attacks, 0.001 for untargeted ones.
    pub fn default_until(targeted: bool) -> f32 {
        if targeted { 0.9 } else { 1e-3 }
    }

    /// Refuses options that attack or count nothing (see [`Pgd::check`]).
    pub fn check(&self, classes: usize) -> Result<()> {
        if self.limit == 0 {
            return Err(gradcam_core::SettingError::new(vec!["limit"], "must be at least 1").into());
        }
        Pgd { eps: self.eps, steps: self.steps, step_size: self.step_size, goal: Goal::Untargeted { class: 0, until: self.until } }.check(classes)
    }
}

/// Checks the options, attacks and measures (see [`run`]) and writes the outputs to `out`: the
/// cases (results.jsonl, streamed), the summary, and the failure page of the cases whose
/// adversarial map keeps least of its mass on the object; a shard's outputs are
/// [`crate::shards`]'s.
pub fn evaluate(net: &Network, layer: usize, data: &Path, method: &dyn CamMethod, o: &AdversarialOptions, out: Option<crate::Outputs>, progress: &mut dyn FnMut(usize, usize)) -> Result<AdversarialSummary> {
    o.check(net.num_classes())?;
    crate::session::create(out)?;
    let shard = out.and_then(|o| o.shard);
    let k = out.map_or(0, |o| o.failures);
    // The `k` worst cases so far, by (energy on the object after the attack, image, class).
    let mut worst: Vec<((f64, usize, usize), AttackCase)> = Vec::new();
    let empty = || Error::Empty { data: data.to_path_buf(), what: "annotated object of the model's classes" };
    let mut go = |record: &mut Record| {
        let (summary, list) = run(net, layer, data, method, o, shard.unwrap_or(Shard::ALL), progress, &mut |index, cases, parts| {
            record(index, &cases, parts)?;
            for (at, case) in cases.into_iter().enumerate() {
                let key = (case.energy_adversarial.unwrap_or(0.0), index, at);
                let place = worst.partition_point(|w| w.0 .0.total_cmp(&key.0).then((w.0 .1, w.0 .2).cmp(&(key.1, key.2))).is_lt());
                if place < k {
                    worst.insert(place, (key, case));
                    worst.truncate(k);
                }
            }
            Ok(())
        })?;
        if summary.cases == 0 && shard.is_none() {
            return Err(empty());
        }
        Ok((summary, list))
    };
    let Some(out) = out else { return go(&mut |_, _, _| Ok(())).map(|r| r.0) };
    let file = out.dir.join(shard.map_or("results.jsonl".into(), |s| s.file_name("results", "jsonl")));
    let io = |source| Error::Io { path: file.clone(), source };
    let (summary, list) = crate::session::streamed(&file, |w| go(&mut |index, cases, parts| crate::shards::write_cases(w, index, cases, parts, shard.is_some()).map_err(io)))?;
    let (chosen, cases): (Vec<_>, Vec<AttackCase>) = worst.into_iter().unzip();
    let failures = failures(net, &cases, data, k)?;
    let title = failures_title(failures.len(), data);
    match shard {
        Some(shard) => {
            let head = crate::shards::ShardHead { shard: shard.to_string(), list, images: summary.images, data: data.to_path_buf(), failures: k, setup: crate::shards::Plan::Adversarial(AdversarialSetup::of(method.name(), o)) };
            let chosen: Vec<(usize, usize)> = chosen.iter().map(|c| (c.1, c.2)).collect();
            crate::shards::finish(out.dir, shard, &head, &chosen, &failures, &title)?
        }
        None => crate::session::write_summary(out.dir, &summary, &markdown(&summary), (k > 0).then_some((&failures[..], &title[..])))?,
    }
    Ok(summary)
}

/// The adversarial failure page's title.
pub(crate) fn failures_title(n: usize, data: &Path) -> String {
    format!("{n} attacked classes of {} with the least map energy on the object after the attack", data.display())
}

/// The `k` cases whose adversarial map keeps least of its mass on the object, each with its
/// clean and adversarial maps on the clean image (of the dataset folder `data`).
pub fn failures(net: &Network, cases: &[AttackCase], data: &Path, k: usize) -> Result<Vec<crate::report::Failure>> {
    let mut order: Vec<&AttackCase> = cases.iter().collect();
    order.sort_by(|a, b| a.energy_adversarial.unwrap_or(0.0).total_cmp(&b.energy_adversarial.unwrap_or(0.0)));
    order
        .into_iter()
        .take(k)
        .map(|c| {
            let image = gradcam_encoders::preprocess::load_image(&data.join("images").join(&c.image))?;
            let after = if c.success { "attack succeeded" } else { "attack FAILED" };
            Ok(crate::report::Failure {
                name: c.image.clone(),
                summary: format!("{} {}: p {:.4} clean, {:.2e} adversarial (top-1 now {}; {after}, L-inf {:.1}/255); maps of {} drawn on the clean image", c.class, c.label, c.prob_clean, c.prob_adversarial, net.label(c.top1_adversarial), c.linf * 255.0, c.label),
                quality: c.energy_adversarial.unwrap_or(0.0),
                image,
                maps: vec![(format!("clean: {}", c.label), c.maps.0.clone()), (format!("adversarial: {}", c.label), c.maps.1.clone())],
            })
        })
        .collect()
}

/// The summary as a Markdown table.
pub fn markdown(s: &AdversarialSummary) -> String {
    let o = &s.options;
    let kind = if o.targeted { format!("targeted at a random class until p > {}", o.until) } else { format!("untargeted until p < {}", o.until) };
    let mut out = format!(
        "| adversarial ({}, {} images, {} attacked classes; PGD eps {:.4} = {:.1}/255, ≤ {} steps, {kind}) | clean | adversarial | adversarial, successful attacks |\n|---|---|---|---|\n",
        s.method, s.images, s.cases, o.eps, o.eps * 255.0, o.steps
    );
    let row = |name: String, f: &dyn Fn(&MapTally) -> String| format!("| {name} | {} | {} | {} |\n", f(&s.clean), f(&s.adversarial), f(&s.adversarial_successful));
    out.push_str(&row(format!("pointing game ({}), original class", s.tolerance), &|t| format!("{:.3} (n={})", t.pointing.accuracy(), t.pointing.count)));
    out.push_str(&row(format!("localization, box at {:.0}% of max, IoU ≥ {}", o.box_threshold * 100.0, o.iou), &|t| format!("{:.3}", t.localization.rate())));
    out.push_str(&row("energy in box, share of the map's mass".into(), &|t| format!("{:.3}", t.energy_fraction.mean)));
    out.push_str(&format!(
        "\nattack success {:.3} ({} of {}); mean L-inf {:.4} ({:.2}/255), mean L2 {:.3}, mean steps {:.1}\n",
        s.success_rate,
        (s.success_rate * s.cases as f64).round(),
        s.cases,
        s.mean_linf,
        s.mean_linf * 255.0,
        s.mean_l2,
        s.mean_steps
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_that_attack_nothing_are_refused_by_name() {
        let o = AdversarialOptions { eps: 8.0 / 255.0, steps: 10, step_size: 0.002, targeted: false, seed: 0, until: AdversarialOptions::default_until(false), limit: 5, tolerance: Tolerance::Pixels(15.0), box_threshold: 0.15, iou: 0.5 };
        assert!(o.check(10).is_ok());
        assert_eq!(AdversarialOptions::default_until(true), 0.9);
        let name = |o: AdversarialOptions| o.check(10).unwrap_err().setting().map(|s| s.settings.clone());
        assert_eq!(name(AdversarialOptions { limit: 0, ..o.clone() }), Some(vec!["limit"]));
        assert_eq!(name(AdversarialOptions { steps: 0, ..o.clone() }), Some(vec!["steps"]));
        assert_eq!(name(AdversarialOptions { until: 1.0, ..o.clone() }), Some(vec!["until"]));
        let eps = AdversarialOptions { eps: 0.0, ..o }.check(10).unwrap_err();
        assert!(eps.to_string().starts_with("eps 0: the budget is a pixel-value change from 0.000001 to 1"), "{eps}");
    }

    #[test]
    fn a_shard_setup_gives_back_the_options() {
        for tolerance in [Tolerance::Pixels(15.0), Tolerance::Fraction(0.0625)] {
            let o = AdversarialOptions { eps: 8.0 / 255.0, steps: 10, step_size: 0.1 / 3.0, targeted: true, seed: 7, until: 0.9, limit: usize::MAX, tolerance, box_threshold: 0.15, iou: 0.5 };
            let setup: AdversarialSetup = serde_json::from_str(&serde_json::to_string(&AdversarialSetup::of("gradcam", &o)).unwrap()).unwrap();
            let back = setup.options();
            assert_eq!(serde_json::to_string(&back).unwrap(), serde_json::to_string(&o).unwrap());
            assert_eq!((back.tolerance, back.eps.to_bits(), back.step_size.to_bits()), (o.tolerance, o.eps.to_bits(), o.step_size.to_bits()));
        }
    }

    #[test]
    fn an_attack_names_the_class_out_of_range() {
        let pgd = Pgd { eps: 0.03, steps: 1, step_size: 0.01, goal: Goal::Targeted { class: 1, target: 7, until: 0.9 } };
        assert!(matches!(pgd.check(5), Err(Error::Core(gradcam_core::Error::ClassOutOfRange { class: 7, num_classes: 5 }))));
        let same = Pgd { goal: Goal::Targeted { class: 1, target: 1, until: 0.9 }, ..pgd };
        assert_eq!(same.check(5).unwrap_err().to_string(), "target 1: is the class attacked; give another class");
    }
}
