//! An adversarial image for a classifier (PGD under an L-infinity budget, [`gradcam_eval::attack`])
//! and the original class's map on it beside the map on the clean image (the paper's section
//! 6.2), as `gradcam attack --json` prints it: the adversarial PNG (read back to check that it is
//! the attack), both explanations and a strip of the four pictures.

use std::path::Path;

use gradcam_encoders::preprocess::{load_image, prepare_with, Resize};
use gradcam_encoders::Network;
use gradcam_eval::attack::{attack as pgd_attack, image_of, pixels_of, probabilities, Goal, Pgd};
use serde::Serialize;

use super::classify::{classify, ClassMap};
use super::{Error, Files, Result};

/// How to attack.
#[derive(Debug, Clone)]
pub struct Options {
    /// The class attacked; none: the top-1 prediction on the clean image.
    pub class: Option<usize>,
    /// Push this class's probability up instead of the attacked one's down.
    pub target: Option<usize>,
    /// The budget, in pixel values of [0, 1].
    pub eps: f32,
    /// Gradient steps at most.
    pub steps: usize,
    /// Change per step; none: [`Pgd::default_step`].
    pub step_size: Option<f32>,
    /// The goal's probability; none: 0.001 untargeted, 0.9 targeted.
    pub until: Option<f32>,
    /// How the image becomes the model's input (the adversarial PNG is that input).
    pub resize: Resize,
}

impl Options {
    /// The attack of `class`, checked against a model of `classes` classes.
    pub fn pgd(&self, class: usize, classes: usize) -> Result<Pgd> {
        let goal = match self.target {
            Some(target) => Goal::Targeted { class, target, until: self.until.unwrap_or(0.9) },
            None => Goal::Untargeted { class, until: self.until.unwrap_or(1e-3) },
        };
        let pgd = Pgd { eps: self.eps, steps: self.steps, step_size: self.step_size.unwrap_or(Pgd::default_step(self.eps, self.steps)), goal };
        pgd.check(classes)?;
        Ok(pgd)
    }

    /// Checks the options before any image: the attack of the given class (or of one that is
    /// not the target).
    pub fn check(&self, classes: usize) -> Result<()> {
        self.pgd(self.class.unwrap_or(if self.target == Some(0) { 1 } else { 0 }), classes).map(|_| ())
    }
}

/// A class and its probability.
#[derive(Debug, Clone, Serialize)]
pub struct ClassProb {
    /// The class index.
    pub class: usize,
    /// Its name.
    pub label: String,
    /// Its probability.
    pub prob: f32,
}

/// The record of one attacked image.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The image's name (its path).
    pub image: String,
    /// The adversarial PNG.
    pub adversarial: String,
    /// Largest change of a pixel value, in [0, 1] units.
    pub linf: f32,
    /// L2 norm of the change, in [0, 1] units.
    pub l2: f32,
    /// The top 5 on the clean image.
    pub before: Vec<ClassProb>,
    /// The top 5 on the adversarial image.
    pub after: Vec<ClassProb>,
    /// The class attacked.
    pub original_class: usize,
    /// Its name.
    pub original_label: String,
    /// What the attack wanted.
    pub goal: Goal,
    /// Whether the goal holds on the saved PNG.
    pub success: bool,
    /// Gradient steps taken.
    pub steps: usize,
    /// Times rounding to 8 bits undid the attack (it then went on from the rounded image).
    pub rounding_undid: usize,
    /// The original class's Grad-CAM on the adversarial image.
    pub explanations: Vec<ClassMap>,
    /// The same on the clean image, for comparison.
    pub clean_explanations: Vec<ClassMap>,
    /// Clean image, its map, adversarial image, its map, side by side.
    pub strip: String,
}

fn top5(net: &Network, probs: &[f32]) -> Vec<ClassProb> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order.into_iter().take(5).map(|c| ClassProb { class: c, label: net.label(c), prob: probs[c] }).collect()
}

/// Attacks the image at `path` with `net` and explains the original class at layer `layer` on
/// the clean and the adversarial image, writing `STEM_adversarial.png`, the maps and
/// `STEM_attack.png` (the strip) to `files`' folder.
pub fn attack(net: &Network, layer: usize, path: &Path, files: Files<'_>, options: &Options) -> Result<Record> {
    let dir = files.dir.ok_or_else(|| Error::Request("an attack writes its adversarial image: give it a folder".into()))?;
    let view = prepare_with(&load_image(path)?, options.resize, net.preprocess())?.view;
    let x0 = pixels_of(&view)?;
    let before = probabilities(net, &x0)?;
    let class = options.class.unwrap_or_else(|| (0..before.len()).max_by(|&a, &b| before[a].total_cmp(&before[b])).unwrap_or(0));
    let pgd = options.pgd(class, net.num_classes())?;
    let adv = pgd_attack(net, &x0, &pgd)?;
    let adv_path = dir.join(format!("{}_adversarial.png", files.stem));
    let adv_img = image_of(&adv.pixels)?;
    gradcam_io::write_png(&adv_img, &adv_path)?;
    // The PNG is the attack: read back, it gives the same probabilities.
    let again = probabilities(net, &pixels_of(&load_image(&adv_path)?)?)?;
    let moved = again.iter().zip(&adv.probs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    if moved >= 1e-4 {
        return Err(Error::Request(format!("{} read back gives other probabilities (by {moved}); the PNG is not the attack", adv_path.display())));
    }
    let explain_options = super::classify::Options { classes: vec![class], top_k: 5, resize: Resize::None, ..Default::default() };
    let name = path.display().to_string();
    let explain = |image: &image::RgbImage, suffix: &str| classify(net, layer, image, &name, Files::new(dir, &format!("{}_{suffix}", files.stem)), &explain_options, None);
    let (on_adv, on_clean) = (explain(&adv_img, "adversarial")?, explain(&view, "clean")?);
    let picture = |r: &super::classify::Record| load_image(Path::new(&r.explanations[0].map.overlay));
    let strip = super::render::comparison_strip(&[view.clone(), picture(&on_clean)?, adv_img, picture(&on_adv)?], view.height().clamp(64, 224));
    let strip_path = dir.join(format!("{}_attack.png", files.stem));
    gradcam_io::write_png(&strip, &strip_path)?;
    Ok(Record {
        image: name,
        adversarial: adv_path.display().to_string(),
        linf: adv.linf,
        l2: adv.l2,
        before: top5(net, &before),
        after: top5(net, &adv.probs),
        original_class: class,
        original_label: net.label(class),
        goal: pgd.goal,
        success: adv.success,
        steps: adv.steps,
        rounding_undid: adv.rounding_undid,
        explanations: on_adv.explanations,
        clean_explanations: on_clean.explanations,
        strip: strip_path.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_before_any_image() {
        let o = Options { class: None, target: None, eps: 8.0 / 255.0, steps: 10, step_size: None, until: None, resize: Resize::None };
        assert!(o.check(10).is_ok());
        let pgd = o.pgd(3, 10).unwrap();
        assert_eq!(pgd.goal, Goal::Untargeted { class: 3, until: 1e-3 });
        assert!((pgd.step_size - 2.5 * o.eps / 10.0).abs() < 1e-9);
        assert_eq!(Options { target: Some(0), ..o.clone() }.pgd(2, 10).unwrap().goal, Goal::Targeted { class: 2, target: 0, until: 0.9 });
        let Err(Error::Eval(e)) = (Options { eps: 0.0, ..o.clone() }).check(10) else { panic!("eps 0 is refused") };
        assert_eq!(e.setting().map(|s| s.settings.clone()), Some(vec!["eps"]));
        assert!(matches!((Options { class: Some(10), ..o }).check(10), Err(Error::Eval(_))));
    }
}
