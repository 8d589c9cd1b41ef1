//! The model card (`README.md` of a model folder) that `gradcam train vqa` writes: the
//! architecture, the exact command, the training log and the metrics measured on the test split.

use std::path::Path;

use crate::eval::{evaluate, Metrics};
use crate::train::{Checkpoint, TrainConfig};
use crate::{Config, Error, Result, Vqa};

/// The command that trains this model again.
pub fn command(data: &Path, out: &Path, tc: &TrainConfig) -> String {
    let mut command = format!("gradcam train vqa --data {} --out {} --epochs {} --batch-size {} --lr {} --seed {}", data.display(), out.display(), tc.settings.epochs, tc.settings.batch_size, tc.settings.lr, tc.settings.seed);
    if let Some(dir) = &tc.encoder_from {
        command.push_str(&format!(" --encoder-from {}", dir.display()));
    }
    if tc.freeze_encoder {
        command.push_str(" --freeze-encoder");
    }
    if let Some(lr) = tc.encoder_lr {
        command.push_str(&format!(" --encoder-lr {lr}"));
    }
    if tc.drop_background_units {
        command.push_str(" --drop-background-units");
    }
    command
}

/// Measures the trained model in `out` on every question of `data/test` (Grad-CAM maps) when that
/// split exists, and writes `out/README.md`. `progress` hears (questions done, questions).
pub fn write(data: &Path, out: &Path, tc: &TrainConfig, ckpt: &Checkpoint, minutes: f64, progress: &dyn Fn(usize, usize)) -> Result<Option<Metrics>> {
    let test_dir = data.join("test");
    let metrics = if test_dir.join("questions.json").exists() {
        let model = Vqa::load(out)?;
        let split = gradcam_scenes::Split::read(&test_dir)?;
        let n = split.vqa.as_ref().map_or(0, |v| v.questions.len());
        Some(evaluate(&model, &split, n, &gradcam_core::GradCam, |i| progress(i, n))?)
    } else {
        None
    };
    let path = out.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let cfg: Config = serde_json::from_str(&text).map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    let text = card(&command(data, out, tc), &cfg, ckpt, minutes, metrics.as_ref(), data);
    gradcam_io::write_atomic(&out.join("README.md"), text.as_bytes())?;
    Ok(metrics)
}

fn card(command: &str, cfg: &Config, ckpt: &Checkpoint, minutes: f64, metrics: Option<&Metrics>, data: &Path) -> String {
    let side = cfg.scene.image_size / 4;
    let mut s = String::from("# VQA fusion model for ShapeScenes\n\n");
    s.push_str(&format!(
        "Question words through embeddings ({}) and an LSTM ({}); the image through the scene CNN (explained layer `conv4`, {} x {side} x {side} at {} px{}), {}; both projected to {} with tanh, fused by element-wise product, then an MLP ({}, ReLU) over the answers. ",
        cfg.embed,
        cfg.hidden,
        cfg.scene.channels,
        cfg.scene.image_size,
        if cfg.scene.coord_conv { ", CoordConv before `conv4`" } else { "" },
        if cfg.scene.pool_moments { "average-, max- and spatial-moment-pooled" } else { "average- and max-pooled" },
        cfg.joint,
        cfg.mlp
    ));
    if let Some(dir) = &ckpt.train.encoder_from {
        s.push_str(&format!(
            "The encoder starts from the trained model in `{}`{}. ",
            dir.display(),
            match (ckpt.train.freeze_encoder, ckpt.train.encoder_lr) {
                (true, _) => " and stays fixed".to_string(),
                (false, Some(lr)) => format!(" and is fine-tuned with learning rate {lr}"),
                (false, None) => " and is fine-tuned".to_string(),
            }
        ));
    }
    if ckpt.train.drop_background_units {
        let units: Vec<String> = ckpt.extra.dropped_units.iter().map(|(u, share)| format!("unit {u}, active at {:.1}% of positions", 100.0 * share)).collect();
        s.push_str(&format!(
            "Left out of that encoder: the units active at more than {:.0}% of the `conv4` positions of the first {} training images, which fire over the background ({}). ",
            100.0 * crate::train::BACKGROUND_SHARE,
            crate::train::SCANNED_IMAGES,
            if units.is_empty() { "none found".to_string() } else { units.join("; ") }
        ));
    }
    s.push_str("An answer is explained by backpropagating its pre-softmax score into `conv4` (Grad-CAM paper, section 8.2); its negation gives the counterfactual map.\n\n");
    s.push_str(&format!("## Training\n\nData: `{}` (VQA v2 questions + annotations, COCO instances).\n\n```sh\n{command}\n```\n\n", data.display()));
    s.push_str(&format!(
        "AdamW (lr {}, weight decay {}, cosine decay), batch {} images with all their questions, seed {}; {} epochs in {minutes:.1} min on a 2-core CPU.\n\n",
        ckpt.train.settings.lr, ckpt.train.settings.weight_decay, ckpt.train.settings.batch_size, ckpt.train.settings.seed, ckpt.epochs_done
    ));
    s.push_str("| epoch | train loss | val loss | val accuracy | seconds |\n|---|---|---|---|---|\n");
    for l in &ckpt.log {
        s.push_str(&format!("| {} | {:.4} | {:.4} | {:.3} | {:.0} |\n", l.epoch, l.train_loss, l.val_loss, l.metrics.val_accuracy, l.seconds));
    }
    if let Some(m) = metrics {
        s.push_str(&format!("\n## Test metrics ({} questions)\n\n| question type | questions | VQA accuracy |\n|---|---|---|\n", m.overall.questions));
        s.push_str(&format!("| all | {} | **{:.3}** |\n", m.overall.questions, m.overall.accuracy));
        for (k, a) in &m.per_type {
            s.push_str(&format!("| {k} | {} | {:.3} |\n", a.questions, a.accuracy));
        }
        s.push_str(&format!(
            "\nAnswer pointing game on the {} questions whose evidence is one object (peak of the predicted answer's map within {:.0} px of the object's mask): **{:.3}**, centre baseline {:.3}.\n\n",
            m.pointing.count, m.tolerance_px, m.pointing.accuracy(), m.pointing.centre_accuracy()
        ));
        s.push_str(&format!(
            "Counterfactual check on the {} questions about one object in scenes of two or more: the counterfactual map of the correct answer puts less of its mass on the object than the answer's own map in **{:.3}** of them. {} of those counterfactual maps are empty (nothing argues against the answer; an empty map has no mass anywhere and counts as less); over the others alone: {:.3}.\n\n",
            m.counterfactual.questions,
            m.counterfactual.less_mass as f64 / m.counterfactual.questions.max(1) as f64,
            m.counterfactual.empty,
            m.counterfactual.less_mass_nonempty as f64 / (m.counterfactual.questions - m.counterfactual.empty).max(1) as f64
        ));
        s.push_str("| question type | pointing (questions) | centre baseline | counterfactual less mass (questions) |\n|---|---|---|---|\n");
        for (k, p) in &m.pointing_per_type {
            let c = m.counterfactual_per_type.get(k).cloned().unwrap_or_default();
            let cf = if c.questions > 0 { format!("{:.3} ({})", c.less_mass as f64 / c.questions as f64, c.questions) } else { "-".into() };
            s.push_str(&format!("| {k} | {:.3} ({}) | {:.3} | {cf} |\n", p.accuracy(), p.count, p.centre_accuracy()));
        }
        s.push_str(&format!("\nReproduce with `gradcam vqa --model DIR --eval DATA/test --limit {}`.\n", m.overall.questions));
    }
    s
}
