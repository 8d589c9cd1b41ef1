//! Which pixels made the shipped captioner say each word?
//!
//! ```sh
//! cargo run --release --example caption_words [IMAGE] [OUT_DIR]
//! ```
//!
//! Captions a ShapeScenes image with the captioner in `models/captioner` and backpropagates the
//! log-probability of every word of the caption into the encoder's last convolutional layer
//! (`conv4`): one map per word, from one backward pass, each written as an overlay.

use std::path::PathBuf;

use gradcam::models::{CaptionSplit, Captioner};
use gradcam::models::load_image;
use gradcam::{Cam, Target};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    let image_path = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("data/shapescenes/test/images/000019.png"));
    let out = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("gradcam-out/examples/caption_words"));
    std::fs::create_dir_all(&out)?;

    let model = Captioner::load(&repo.join("models/captioner"))?;
    let image = load_image(&image_path)?;
    let input = model.preprocess(&image)?.unsqueeze(0)?; // [1, 3, 64, 64]

    // Greedy caption.
    let activations = model.features(&input)?; // [1, K, 16, 16]
    let caption = model.greedy(&activations)?.remove(0);
    println!("{}: {}", image_path.display(), caption.words.join(" "));

    // The captioner split at conv4 for this caption: its head gives one log-probability per word.
    let split = CaptionSplit::new(&model, &caption.tokens);
    let words: Vec<Target> = (0..caption.tokens.len()).map(Target::word).collect();
    let explanations = Cam::new(&split).explain_with(&input, &activations, &words.into_iter().map(|t| (0, t)).collect::<Vec<_>>())?;
    for (t, (word, e)) in caption.words.iter().zip(&explanations).enumerate() {
        let file = out.join(format!("{t:02}_{word}.png"));
        e.overlay(&image.clone().into()).save(&file)?;
        let (y, x) = e.cam().argmax();
        println!("  {t:>2} {word:<8} log p {:>7.3}  peak at conv4 cell ({y}, {x})  wrote {}", e.score, file.display());
    }
    Ok(())
}
