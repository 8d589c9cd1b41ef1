//! `gradcam dissect`: network dissection of a trained model's explained layer against the concept
//! masks of a COCO-instances dataset.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use gradcam_neurons::{dissect_model, split_dir, Dissection, Options};
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

pub fn run(args: DissectArgs) -> anyhow::Result<ExitCode> {
    let options = Options { quantile: args.quantile, iou_threshold: args.iou_threshold };
    let n = args.limit.min(Instances::read(&split_dir(&args.data).join("instances.json"))?.images.len());
    let pb = bar(n as u64, "images");
    let table = dissect_model(&args.model, &args.data, args.limit, options, &|k| pb.inc(k as u64))?;
    pb.finish_and_clear();
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
