//! `gradcam dissect`: network dissection of a trained model's explained layer against the concept
//! masks of a COCO-instances dataset.

use std::{io::Write, path::PathBuf, process::ExitCode};

use gradcam_neurons::{dissect_model, Options};

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
    let pb = bar(0, "images");
    let table = dissect_model(&args.model, &args.data, args.limit, options, &|k, n| {
        pb.set_length(n as u64);
        pb.inc(k as u64)
    })?;
    pb.finish_and_clear();
    let out = args.out.clone().unwrap_or_else(|| args.model.join("dissection.json"));
    table.save(&out)?;
    let (t, o) = (&table, &table.options);
    let line = format!("{} of {} units of {} named (IoU >= {}, top {}% of activations, {} images)", t.named(), t.units.len(), t.layer, o.iou_threshold, o.quantile * 100.0, t.images);
    write!(std::io::stdout().lock(), "{line}; table in {}\n{t}", out.display())?;
    Ok(ExitCode::SUCCESS)
}
