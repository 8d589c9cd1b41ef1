//! `gradcam attack`: an adversarial image for a classifier (PGD under an L-infinity budget), and
//! the Grad-CAM of the original class on it (the paper's section 6.2).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gradcam::pipeline::classify::{classify, ClassMap, Options};
use gradcam::pipeline::Files;
use gradcam::pipeline::render::Stems;
use gradcam_encoders::preprocess::{load_image, prepare_with, Resize};
use gradcam_encoders::Network;
use gradcam_eval::attack::{attack, image_of, pixels_of, probabilities, Goal, Pgd};
use serde::Serialize;

use crate::progress::each_image;
use crate::ModelArgs;

#[derive(clap::Args)]
pub struct AttackArgs {
    /// Images to attack (each at the model's input resolution after --resize).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Layer whose Grad-CAM is shown (default: the model's).
    #[arg(long)]
    layer: Option<String>,
    /// The class to attack (default: the top-1 prediction on the clean image).
    #[arg(long)]
    class: Option<usize>,
    /// Push the class's probability down (the default).
    #[arg(long, conflicts_with = "target")]
    untargeted: bool,
    /// Push this class's probability up instead.
    #[arg(long)]
    target: Option<usize>,
    /// L-infinity budget in pixel values of [0, 1] (8/255 by default).
    #[arg(long, default_value_t = 8.0 / 255.0)]
    eps: f32,
    /// Gradient steps at most (the attack stops once its goal holds on the 8-bit image).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Change per step (default 2.5 eps / steps).
    #[arg(long)]
    step_size: Option<f32>,
    /// The goal: untargeted, the class's probability below this (default 0.001); targeted, the
    /// target's above this (default 0.9).
    #[arg(long)]
    until: Option<f32>,
    /// center-crop, stretch or none (see `classify`). The adversarial PNG is the model's input.
    #[arg(long)]
    resize: Option<Resize>,
    /// Folder for the adversarial PNGs and the maps.
    #[arg(long, default_value = "gradcam-out")]
    out: PathBuf,
    /// Print one JSON object per image.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ClassProb {
    class: usize,
    label: String,
    prob: f32,
}

#[derive(Serialize)]
struct Record {
    image: String,
    /// The adversarial PNG.
    adversarial: String,
    /// Largest change of a pixel value and L2 norm of the change, in [0, 1] units.
    linf: f32,
    l2: f32,
    before: Vec<ClassProb>,
    after: Vec<ClassProb>,
    original_class: usize,
    original_label: String,
    goal: Goal,
    /// Whether the goal holds on the saved PNG.
    success: bool,
    steps: usize,
    /// Times rounding to 8 bits undid the attack (it then went on from the rounded image).
    rounding_undid: usize,
    /// The original class's Grad-CAM on the adversarial image.
    explanations: Vec<ClassMap>,
    /// The same on the clean image, for comparison.
    clean_explanations: Vec<ClassMap>,
    /// Clean image, its map, adversarial image, its map, side by side.
    strip: String,
}

fn top5(net: &Network, probs: &[f32]) -> Vec<ClassProb> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order.into_iter().take(5).map(|c| ClassProb { class: c, label: net.label(c), prob: probs[c] }).collect()
}

pub fn run(args: AttackArgs) -> anyhow::Result<ExitCode> {
    let (net, index) = args.model.load_at(args.layer.as_deref())?;
    let resize = args.resize.unwrap_or(net.default_resize());
    // The options are checked once, before any image.
    let check = |class: usize| -> anyhow::Result<Pgd> {
        let step_size = args.step_size.unwrap_or(Pgd::default_step(args.eps, args.steps));
        let goal = match args.target {
            Some(target) => Goal::Targeted { class, target, until: args.until.unwrap_or(0.9) },
            None => Goal::Untargeted { class, until: args.until.unwrap_or(1e-3) },
        };
        let pgd = Pgd { eps: args.eps, steps: args.steps, step_size, goal };
        pgd.check(net.num_classes())?;
        Ok(pgd)
    };
    let probe = args.class.unwrap_or(if args.target == Some(0) { 1 } else { 0 });
    check(probe)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    each_image(&args.images, |path, stems| attack_one(&net, index, path, &args, resize, &check, stems), |out, r| print(out, r, args.json))
}

fn attack_one(net: &Network, index: usize, path: &Path, args: &AttackArgs, resize: Resize, check: &dyn Fn(usize) -> anyhow::Result<Pgd>, stems: &mut Stems) -> anyhow::Result<Record> {
    let img = load_image(path)?;
    let view = prepare_with(&img, resize, net.preprocess())?.view;
    let x0 = pixels_of(&view)?;
    let before = probabilities(net, &x0)?;
    let class = args.class.unwrap_or_else(|| (0..before.len()).max_by(|&a, &b| before[a].total_cmp(&before[b])).unwrap_or(0));
    let pgd = check(class)?;
    let adv = attack(net, &x0, &pgd)?;
    let stem = stems.unique(path);
    let adv_path = args.out.join(format!("{stem}_adversarial.png"));
    let adv_img = image_of(&adv.pixels)?;
    gradcam_io::write_png(&adv_img, &adv_path)?;
    // The PNG is the attack: read back, it gives the same probabilities.
    let reread = pixels_of(&load_image(&adv_path)?)?;
    let again = probabilities(net, &reread)?;
    let moved = again.iter().zip(&adv.probs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    anyhow::ensure!(moved < 1e-4, "{} read back gives other probabilities (by {moved}); the PNG is not the attack", adv_path.display());
    if adv.rounding_undid > 0 && !args.json {
        eprintln!("note: {}: rounding to 8 bits undid the attack {} time(s); it went on from the rounded image", path.display(), adv.rounding_undid);
    }
    let options = Options { classes: vec![class], top_k: 5, resize: Resize::None, ..Default::default() };
    let name = path.display().to_string();
    let explain = |image: &image::RgbImage, stem: &str| classify(net, index, image, &name, Files { dir: Some(&args.out), stem }, &options, None);
    let on_adv = explain(&adv_img, &format!("{stem}_adversarial"))?;
    let on_clean = explain(&view, &format!("{stem}_clean"))?;
    let picture = |r: &gradcam::pipeline::classify::Record| -> anyhow::Result<image::RgbImage> {
        let file = &r.explanations[0].map.overlay;
        Ok(load_image(Path::new(file))?)
    };
    let strip = gradcam::pipeline::render::comparison_strip(&[view.clone(), picture(&on_clean)?, adv_img.clone(), picture(&on_adv)?], view.height().clamp(64, 224));
    let strip_path = args.out.join(format!("{stem}_attack.png"));
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

fn print(out: &mut impl Write, r: &Record, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        return writeln!(out);
    }
    let what = match r.goal {
        Goal::Untargeted { until, .. } => format!("untargeted, until p < {until}"),
        Goal::Targeted { target, until, .. } => format!("targeted at {target}, until p > {until}"),
    };
    writeln!(out, "{}: attacked {} {} ({what}): {} after {} steps; L-inf {:.4} ({:.1}/255), L2 {:.3}", r.image, r.original_class, r.original_label.escape_debug(), if r.success { "succeeded" } else { "FAILED" }, r.steps, r.linf, r.linf * 255.0, r.l2)?;
    for (name, list) in [("before", &r.before), ("after", &r.after)] {
        let items: Vec<String> = list.iter().map(|c| format!("{} {} {:.4}", c.class, c.label.escape_debug(), c.prob)).collect();
        writeln!(out, "  {name}: {}", items.join(", "))?;
    }
    let p = |v: &[ClassMap]| v.first().map(|e| e.map.overlay.clone()).unwrap_or_default();
    writeln!(out, "  adversarial image: {}", r.adversarial)?;
    writeln!(out, "  Grad-CAM for {} on it: {} (clean: {}); strip {}", r.original_label.escape_debug(), p(&r.explanations), p(&r.clean_explanations), r.strip)
}
