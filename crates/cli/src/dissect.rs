//! `gradcam dissect`: network dissection of a trained model's explained layer against the concept
//! masks of a COCO-instances dataset.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Tensor;
use gradcam_encoders::scene_cnn::{self, SceneCnn};
use gradcam_neurons::{concepts, dissect, image_concepts, Dissection, Options};
use gradcam_scenes::coco::Instances;

use crate::progress::bar;

#[derive(clap::Args)]
pub struct DissectArgs {
    /// A trained captioner or VQA model folder (scene CNN encoder).
    #[arg(long, default_value = "models/captioner")]
    model: PathBuf,
    /// A dataset split folder with `instances.json` and `images/`, or a dataset folder whose
    /// `val/` split is used.
    #[arg(long)]
    data: PathBuf,
    /// Where to write the table (JSON); default: MODEL/dissection.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use at most this many images.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Fraction of each unit's highest activations that count as "on".
    #[arg(long, default_value_t = Options::default().quantile)]
    quantile: f64,
    /// Smallest IoU for which a unit gets its best concept's name.
    #[arg(long, default_value_t = Options::default().iou_threshold)]
    iou_threshold: f32,
}

/// The split folder of `--data`: itself when it has `instances.json`, else its `val/`.
fn split_dir(data: &Path) -> PathBuf {
    if data.join("instances.json").exists() || !data.join("val").join("instances.json").exists() {
        data.to_path_buf()
    } else {
        data.join("val")
    }
}

pub fn run(args: DissectArgs) -> anyhow::Result<ExitCode> {
    let (cnn, size) = scene_cnn::load_encoder(&args.model)?;
    let dir = split_dir(&args.data);
    let instances = Instances::read(&dir.join("instances.json"))?;
    let concepts = concepts(&instances);
    if concepts.is_empty() {
        anyhow::bail!("{}: no categories, colours or sizes to dissect against", dir.join("instances.json").display());
    }
    let mut by_image: std::collections::HashMap<u64, Vec<&gradcam_scenes::coco::Instance>> = Default::default();
    for a in &instances.annotations {
        by_image.entry(a.image_id).or_default().push(a);
    }
    let images: Vec<_> = instances.images.iter().take(args.limit).collect();
    let pb = bar(images.len() as u64, "images");
    let mut activations = Vec::with_capacity(images.len());
    let mut masks = Vec::with_capacity(images.len());
    let mut dims = (0, 0, 0);
    for chunk in images.chunks(64) {
        let mut inputs = Vec::with_capacity(chunk.len());
        for info in chunk {
            let path = dir.join("images").join(&info.file_name);
            let img = image::open(&path).with_context(|| format!("reading {}", path.display()))?.to_rgb8();
            inputs.push(SceneCnn::preprocess(&img, size)?);
            let objects = by_image.get(&info.id).map(Vec::as_slice).unwrap_or(&[]);
            masks.push(image_concepts(objects, &concepts, &instances, (img.height() as usize, img.width() as usize)));
        }
        let a = cnn.forward(&Tensor::stack(&inputs, 0)?)?; // [b, K, h, w]
        let (_, k, h, w) = a.dims4()?;
        dims = (k, h, w);
        for row in a.flatten_from(1)?.to_vec2::<f32>()? {
            activations.push(row);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let options = Options { quantile: args.quantile, iou_threshold: args.iou_threshold };
    let units = dissect(&activations, dims, &masks, &concepts, options)?;
    let table = Dissection { layer: scene_cnn::LAYER.into(), data: dir.display().to_string(), images: images.len(), options, concepts, units };
    let out = args.out.clone().unwrap_or_else(|| args.model.join("dissection.json"));
    table.save(&out)?;
    print_summary(&table, &out)?;
    Ok(ExitCode::SUCCESS)
}

fn print_summary(t: &Dissection, out: &Path) -> std::io::Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{} of {} units of {} named (IoU >= {}, top {}% of activations, {} images); table in {}", t.named(), t.units.len(), t.layer, t.options.iou_threshold, t.options.quantile * 100.0, t.images, out.display())?;
    let mut per: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for u in t.units.iter().filter(|u| u.named) {
        *per.entry((u.category.clone().unwrap_or_default(), u.concept.clone().unwrap_or_default())).or_default() += 1;
    }
    for ((cat, concept), n) in per {
        writeln!(o, "  {cat:<7} {concept:<10} {n} units")?;
    }
    writeln!(o, "unit  concept     category  IoU")?;
    for u in &t.units {
        let mark = if u.named { "" } else { "  (below threshold)" };
        writeln!(o, "{:>4}  {:<10}  {:<8}  {:.3}{mark}", u.unit, u.concept.as_deref().unwrap_or("-"), u.category.as_deref().unwrap_or("-"), u.iou)?;
    }
    Ok(())
}
