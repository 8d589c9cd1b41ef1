//! Grad-CAM for a CNN exported to ONNX from PyTorch, Keras or timm: no code for its layers.
//!
//! ```sh
//! cargo run --release --example onnx_model [MODEL.onnx] [IMAGE] [OUT_DIR] [LAYER]
//! ```
//!
//! Defaults: the small torchvision ResNet of the test fixtures (random weights: the maps show the
//! mechanics, not ImageNet knowledge) and its 96 x 96 input. Lists the graph's 4-D values, splits
//! the graph at LAYER (default: the input of the global pooling), prints the top-3 classes and
//! writes the Grad-CAM overlay of the top-1 class and of its counterfactual.

use std::path::PathBuf;
use std::sync::Arc;

use gradcam::models::{OnnxModel, OnnxOptions};
use gradcam::models::{load_image, prepare_with, Resize};
use gradcam::{Cam, Explainable, Target};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    let model_path = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("tests/fixtures/onnx/resnet.onnx"));
    let image_path = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("tests/fixtures/onnx/input96.png"));
    let out = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("gradcam-out/examples/onnx_model"));
    let layer = args.next();
    std::fs::create_dir_all(&out)?;

    // The graph, its values (what --layer takes) and the network split at one of them.
    let model = Arc::new(OnnxModel::load(&model_path, &OnnxOptions::default())?);
    let spatial: Vec<_> = model.values().into_iter().filter(|v| v.shape.len() == 4).collect();
    println!("{}: {} values of 4 dimensions, the last: {} {:?}", model.name(), spatial.len(), spatial[spatial.len() - 1].name, spatial[spatial.len() - 1].shape);
    let net = model.network(layer.as_deref())?;
    let split = net.split(0);
    println!("explained layer: {}", net.default_layer());

    // The image at the graph's input size and normalisation.
    let image = load_image(&image_path)?;
    let prepared = prepare_with(&image, Resize::CenterCrop, net.preprocess())?;
    let input = prepared.tensor.unsqueeze(0)?;
    let activations = split.features(&input)?;
    let logits = split.head(&activations)?.squeeze(0)?.to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &c in &order[..3.min(order.len())] {
        println!("  {c:>4} {:<20} logit {:.3}", net.label(c), logits[c]);
    }

    // Grad-CAM of the top-1 class and its counterfactual in one backward pass.
    let targets = [(0, Target::class(order[0])), (0, Target::class(order[0]).counterfactual())];
    for e in Cam::new(&split).explain_with(&input, &activations, &targets)? {
        let kind = if e.target.is_counterfactual() { "counterfactual" } else { "gradcam" };
        let file = out.join(format!("{kind}_{}.png", order[0]));
        gradcam::io::write_png(&e.picture(&image, prepared.region)?, &file)?;
        println!("wrote {} ({kind} of {}, map {}x{})", file.display(), net.label(order[0]), e.map_size.0, e.map_size.1);
    }
    Ok(())
}
