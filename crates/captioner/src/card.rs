//! The model card (`README.md` of a model folder) that `gradcam train captioner` writes: the
//! architecture, the exact command, the training log and the metrics measured on the test split.

use std::path::Path;

use crate::eval::{evaluate, Metrics};
use crate::train::{Checkpoint, TrainConfig};
use crate::{Captioner, Config, Result};

/// The command that trains this model again.
pub fn command(data: &Path, out: &Path, tc: &TrainConfig) -> String {
    format!(
        "gradcam train captioner --data {} --out {} --epochs {} --batch-size {} --lr {} --seed {} --label-smoothing {} --word-loss {} --hidden {} --activation-l1 {}{}",
        data.display(), out.display(), tc.settings.epochs, tc.settings.batch_size, tc.settings.lr, tc.settings.seed, tc.label_smoothing, tc.word_loss, tc.hidden, tc.activation_l1,
        if tc.word_pairs { " --word-pairs" } else { "" }
    )
}

/// Measures the trained model in `out` on `data/test` (at most 1000 images, Grad-CAM maps) when
/// that split exists, and writes `out/README.md`. `progress` hears (images done, images).
pub fn write(data: &Path, out: &Path, tc: &TrainConfig, ckpt: &Checkpoint, minutes: f64, progress: &dyn Fn(usize, usize)) -> Result<Option<Metrics>> {
    let test_dir = data.join("test");
    let metrics = if test_dir.join("captions.json").exists() {
        let model = Captioner::load(out)?;
        let split = gradcam_scenes::Split::read(&test_dir)?;
        let n = split.instances.images.len().min(1000);
        Some(evaluate(&model, &split, n, None, &gradcam_core::GradCam, |i| progress(i, n))?)
    } else {
        None
    };
    let cfg = Config::load(&out.join("config.json"))?;
    let text = card(&command(data, out, tc), &cfg, ckpt, minutes, metrics.as_ref(), data);
    gradcam_io::write_atomic(&out.join("README.md"), text.as_bytes())?;
    Ok(metrics)
}

fn card(command: &str, cfg: &Config, ckpt: &Checkpoint, minutes: f64, metrics: Option<&Metrics>, data: &Path) -> String {
    let mut s = String::new();
    let side = cfg.scene.image_size / 4;
    s.push_str("# Show-and-Tell captioner for ShapeScenes\n\n");
    s.push_str(&format!(
        "A scene CNN (4 convolutions{}, explained layer `conv4`: {} x {side} x {side} at {} px) whose ",
        if cfg.scene.coord_conv { ", CoordConv before `conv4`" } else { "" },
        cfg.scene.channels,
        cfg.scene.image_size
    ));
    s.push_str(&format!(
        "{} features, projected to {}, enter an LSTM (hidden {}) beside every word embedding ({}) (Show and Tell, Vinyals et al. 2015, with the image at every step). ",
        if cfg.scene.pool_moments { "average-, max- and spatial-moment-pooled" } else { "average- and max-pooled" },
        cfg.embed,
        cfg.hidden,
        cfg.embed
    ));
    s.push_str("Every word of a caption is explained by backpropagating its log-probability into `conv4` (Grad-CAM paper, section 8.1).\n\n");
    s.push_str(&format!("## Training\n\nData: `{}` (COCO captions + instances; train split for training, val for validation, test for the metrics below).\n\n", data.display()));
    s.push_str(&format!("```sh\n{command}\n```\n\n"));
    s.push_str(&format!(
        "AdamW (lr {}, weight decay {}, cosine decay), label smoothing {}, auxiliary bag-of-words loss weight {}, batch {} images with all their captions, seed {}; {} epochs in {minutes:.1} min on a 2-core CPU.\n\n",
        ckpt.train.settings.lr, ckpt.train.settings.weight_decay, ckpt.train.label_smoothing, ckpt.train.word_loss, ckpt.train.settings.batch_size, ckpt.train.settings.seed, ckpt.epochs_done
    ));
    s.push_str("| epoch | train loss | val loss | val exact match | seconds |\n|---|---|---|---|---|\n");
    for l in &ckpt.log {
        s.push_str(&format!("| {} | {:.4} | {:.4} | {:.3} | {:.0} |\n", l.epoch, l.train_loss, l.val_loss, l.metrics.val_exact_match, l.seconds));
    }
    if let Some(m) = metrics {
        s.push_str(&format!("\n## Test metrics ({} images, greedy decoding)\n\n", m.images));
        s.push_str(&format!("- exact match of the named (colour, shape) set: **{:.3}**\n- BLEU-4 against the 5 references: **{:.3}**\n\n", m.exact_match, m.bleu4));
        s.push_str(&format!(
            "Per-word pointing game: the peak of each colour or shape word's map, upsampled to the image, on the word's object mask or within {:.0} px (1/16 of the side):\n\n",
            m.tolerance_px
        ));
        s.push_str("| word | words | Grad-CAM | centre baseline |\n|---|---|---|---|\n");
        for (w, p) in &m.pointing {
            s.push_str(&format!("| {w} | {} | {:.3} | {:.3} |\n", p.count, p.accuracy(), p.centre_accuracy()));
        }
        s.push_str("\nReproduce with `gradcam caption --model DIR --eval DATA/test --limit N`.\n");
    }
    s
}
