//! The model card (`README.md` of a model folder) that `gradcam train clip` writes: the
//! architecture, the exact command, the training log and the phrase ranking measured on the test
//! split.

use std::path::Path;

use crate::train::{Checkpoint, PhraseMetrics, TrainConfig};
use crate::{Error, Result};

/// The command that trains this model again.
pub fn command(data: &Path, out: &Path, tc: &TrainConfig) -> String {
    format!(
        "gradcam train clip --data {} --out {} --epochs {} --batch-size {} --lr {} --seed {} --phrase-share {} --phrase-loss {}",
        data.display(),
        out.display(),
        tc.settings.epochs,
        tc.settings.batch_size,
        tc.settings.lr,
        tc.settings.seed,
        tc.phrase_share,
        tc.phrase_loss
    )
}

/// Test figures of a trained model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestFigures {
    pub images: usize,
    pub objects: usize,
    pub metrics: PhraseMetrics,
}

/// Measures the phrase ranking of the model in `out` on `data/test` when that split exists, and
/// writes `out/README.md`. `progress` hears (images done, images).
pub fn write(data: &Path, out: &Path, tc: &TrainConfig, ckpt: &Checkpoint, minutes: f64, progress: &dyn Fn(usize, usize)) -> Result<Option<TestFigures>> {
    let test = data.join("test");
    let figures = if test.join("instances.json").exists() {
        let model = crate::Trained::load(out)?;
        let split = gradcam_scenes::Split::read(&test)?;
        Some(crate::eval::phrase_test(&model, &split, progress)?)
    } else {
        None
    };
    let path = out.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let cfg: crate::Config = serde_json::from_str(&text).map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    let g = cfg.grid();
    let mut s = String::from("# A small CLIP for ShapeScenes\n\n");
    s.push_str(&format!(
        "Image tower: a vision transformer over {p} x {p} patches of the {size} x {size} image ({g} x {g} tokens and a class token, width {w}, {l} pre-norm blocks of {h} heads, `ln_post` on the class token, projection to {e}). Text tower: a transformer over the word vocabulary of `tokenizer.json` ({v} tokens; `<start>` words `<end>`, at most {c}; width {tw}, {tl} blocks of {th} heads, padding masked out, pooled at the end token, projection to {e}). A text matches an image by the cosine similarity of the two L2-normalised embeddings (CLIP, Radford et al. 2021); Grad-CAM explains that similarity at the last block's attention input (`visual.blocks.{last}.norm1`, a {g} x {g} grid of {w} channels), and attention rollout and relevance read the blocks' attention.\n\n",
        p = cfg.patch, size = cfg.image_size, w = cfg.width, l = cfg.layers, h = cfg.heads, e = cfg.embed, v = cfg.vocab_size, c = cfg.context_length, tw = cfg.text_width, tl = cfg.text_layers, th = cfg.text_heads, last = cfg.layers - 1
    ));
    s.push_str(&format!("## Training\n\nData: `{}` (COCO captions + instances with each object's colour and size).\n\n```sh\n{}\n```\n\n", data.display(), command(data, out, tc)));
    s.push_str(&format!(
        "Each training image is paired with one of its texts: with probability {} an object's phrase (\"red circle\" or \"small red circle\"), else one of its captions. The loss is CLIP's symmetric cross-entropy over the batch's similarities times a learned temperature, every text that describes an image counted as its match, plus {} times the phrase loss: each image's cross-entropy over all 15 colour-shape phrases, its target spread over the pairs in its scene. AdamW (lr {}, weight decay {}, cosine decay), batch {}, seed {}; {} epochs in {minutes:.1} min on a 2-core CPU.\n\n",
        ckpt.train.phrase_share, ckpt.train.phrase_loss, ckpt.train.settings.lr, ckpt.train.settings.weight_decay, ckpt.train.settings.batch_size, ckpt.train.settings.seed, ckpt.epochs_done
    ));
    s.push_str("`phrase vs absent`: of the comparisons of an object's own colour-shape phrase with each colour-shape pair absent from its scene, the share where its own is the more similar to the image; `beats all absent`: the share of objects whose phrase beats every absent pair.\n\n");
    s.push_str("| epoch | train loss | val loss | val phrase vs absent | val beats all absent | seconds |\n|---|---|---|---|---|---|\n");
    for l in &ckpt.log {
        s.push_str(&format!("| {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.0} |\n", l.epoch, l.train_loss, l.val_loss, l.metrics.phrase_vs_absent, l.metrics.phrase_beats_all_absent, l.seconds));
    }
    if let Some(f) = &figures {
        s.push_str(&format!(
            "\n## Test metrics ({} images, {} objects)\n\n- object's phrase more similar than an absent colour-shape pair's: **{:.4}** of comparisons\n- object's phrase more similar than every absent pair's: **{:.4}** of objects\n",
            f.images, f.objects, f.metrics.phrase_vs_absent, f.metrics.phrase_beats_all_absent
        ));
    }
    gradcam_io::write_atomic(&out.join("README.md"), s.as_bytes())?;
    Ok(figures)
}
