//! Which pixels support the VQA model's answer, and which argue against it?
//!
//! ```sh
//! cargo run --release --example vqa_answer [IMAGE] [QUESTION] [OUT_DIR]
//! ```
//!
//! Asks the model in `models/vqa` a question about a ShapeScenes image, prints its top-3 answers,
//! and writes two maps of the top answer: Grad-CAM (the evidence for it) and the counterfactual
//! (the paper's section 3.3: negated gradients, what would make the model more sure if removed).

use std::path::PathBuf;

use gradcam::models::load_image;
use gradcam::models::{Vqa, VqaSplit};
use gradcam::{Cam, Target};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    let image_path = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("data/shapescenes/test/images/000019.png"));
    let question = args.next().unwrap_or_else(|| "what color is the triangle?".to_string());
    let out = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("gradcam-out/examples/vqa_answer"));
    std::fs::create_dir_all(&out)?;

    let model = Vqa::load(&repo.join("models/vqa"))?;
    let image = load_image(&image_path)?;
    let input = model.preprocess(&image)?.unsqueeze(0)?; // [1, 3, 64, 64]

    // The model split at conv4 for this question: its head gives the answers' scores.
    let q = model.question(&question)?;
    if !q.unknown.is_empty() {
        println!("note: words the model does not know, read as <unk>: {}", q.unknown.join(", "));
    }
    let split = VqaSplit { model: &model, question: model.encode(&q)? };
    let activations = model.features(&input)?;
    let top = model.top_answers(&model.logits(&activations, &split.question)?, 3)?;
    println!("{}: {question}", image_path.display());
    for &(i, p) in &top {
        println!("  {:<10} p {p:.3}", model.cfg.answers[i]);
    }

    let answer = top[0].0;
    let targets = [(0, Target::answer(answer)), (0, Target::answer(answer).counterfactual())];
    let explanations = Cam::new(&split).explain_with(&input, &activations, &targets)?;
    for e in &explanations {
        let kind = if e.is_counterfactual() { "counterfactual" } else { "gradcam" };
        let file = out.join(format!("{}_{}.png", model.cfg.answers[answer], kind));
        e.overlay(&image.clone().into()).save(&file)?;
        let mass: f32 = e.map.iter().sum();
        println!("wrote {} ({kind} map of \"{}\", total mass {mass:.3}{})", file.display(), model.cfg.answers[answer], if e.nonzero() { "" } else { ": empty, nothing argues against it" });
    }
    Ok(())
}
