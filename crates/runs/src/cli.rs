//! The dataset-run flags of every explaining command (`classify`, `caption`, `vqa`, `match`), and
//! the run with its progress bar (feature `cli`).

use std::path::{Path, PathBuf};

use crate::maps::MapFormat;
use crate::{run, Input, Inputs, Outcome, Plan, Result, Shard};

/// `--inputs` and the flags that go with it.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Explain a dataset: a folder (read recursively, sorted), a text file with one image path per
    /// line, a COCO instances.json (images in images/ beside it) or, for `vqa`, a VQA v2
    /// questions.json. One JSON line per input goes to OUT/records-I-of-N.jsonl, appended and
    /// flushed per batch; `gradcam merge OUT` joins the shards.
    #[arg(long, help_heading = "Dataset runs")]
    pub inputs: Option<PathBuf>,
    /// Inputs per batch: explained together, recorded and flushed together.
    #[arg(long, default_value_t = 16, requires = "inputs", help_heading = "Dataset runs")]
    pub batch_size: usize,
    /// Take shard I of N (0-based): the inputs at positions i with i % N == I. Slurm:
    /// --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.
    #[arg(long, requires = "inputs", help_heading = "Dataset runs")]
    pub shard: Option<Shard>,
    /// Continue this shard's records in OUT: skip the inputs recorded, redo a line cut by a kill.
    #[arg(long, requires = "inputs", help_heading = "Dataset runs")]
    pub resume: bool,
    /// Also write the overlays and strips (to OUT/overlays/, named INDEX_STEM_...); by default a
    /// dataset run writes the records (and their raw maps) only.
    #[arg(long, requires = "inputs", help_heading = "Dataset runs")]
    pub overlays: bool,
    /// Also write each record's raw maps as arrays: OUT/maps/INDEX.npy ([n, h, w], the record's
    /// maps in order) or OUT/maps/INDEX.safetensors (tensors 0, 1, ...).
    #[arg(long, value_enum, requires = "inputs", help_heading = "Dataset runs")]
    pub maps: Option<MapFormat>,
}

/// How often a run whose standard error is not a terminal (a Slurm or Kubernetes log) prints
/// its progress.
pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Seconds as `1h02m03s`.
fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

/// The start of input `index`'s picture stems in a dataset run: unique across shards and
/// resumed runs.
pub fn stem_prefix(index: usize) -> String {
    format!("{index:09}_")
}

impl RunArgs {
    /// Runs the dataset run into `out`: `explain` gets each batch and the folder of its pictures
    /// (`OUT/overlays` with `--overlays`; stems start with [`stem_prefix`]), and gives each
    /// input's record as JSON or its error. Shows a progress bar (images per second,
    /// the shard's ETA) on standard error and a last line on how it went.
    pub fn run(&self, inputs: &Path, out: &Path, explain: &mut dyn FnMut(&[Input], Option<&Path>) -> Vec<std::result::Result<String, String>>) -> Result<Outcome> {
        let list = Inputs::open(inputs)?;
        let shard = self.shard.unwrap_or_default();
        let plan = Plan { inputs: &list, out, shard, batch_size: self.batch_size, resume: self.resume, maps: self.maps };
        let overlays = out.join("overlays");
        if self.overlays {
            gradcam_io::create_dir_all(&overlays)?;
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = "{bar:30} {pos}/{len} inputs of shard ".to_string() + &shard.to_string() + " [{elapsed_precise}<{eta_precise}] {per_sec}";
        bar.set_style(indicatif::ProgressStyle::with_template(&style).expect("a valid template"));
        // A scheduler's log is not a terminal: no bar there, but a line every LOG_EVERY.
        let log = !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let (start, mut logged, mut first) = (std::time::Instant::now(), std::time::Instant::now(), None);
        let outcome = run(&plan, &mut |batch| explain(batch, self.overlays.then_some(overlays.as_path())), &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            let first = *first.get_or_insert(done);
            if log && logged.elapsed() >= LOG_EVERY && done > first {
                logged = std::time::Instant::now();
                let rate = (done - first) as f64 / start.elapsed().as_secs_f64().max(1e-9);
                let eta = (total - done) as f64 / rate.max(1e-9);
                eprintln!("shard {shard}: {done}/{total} inputs, {rate:.1} images/s, ETA {}", clock(eta));
            }
        });
        bar.finish_and_clear();
        let o = outcome?;
        let resumed = if o.skipped > 0 { format!(" ({} recorded before)", o.skipped) } else { String::new() };
        let rate = if o.seconds > 0.0 { o.recorded as f64 / o.seconds } else { 0.0 };
        eprintln!("shard {shard}: {} of {} inputs recorded{resumed}, {} failed, {rate:.1} images/s, in {}; then `gradcam merge {}`", o.recorded, o.total, o.errors, o.file.display(), out.display());
        Ok(o)
    }
}

/// `gradcam merge DIR`: merges the run ([`crate::merge`]), prints its summary as JSON and where the
/// records are.
pub fn merge(dir: &Path) -> Result<()> {
    let summary = crate::merge(dir)?;
    println!("{}", serde_json::to_string_pretty(&summary).expect("a summary serialises"));
    eprintln!("{} records ({} failed) in {}", summary.count, summary.errors, dir.join("records.jsonl").display());
    Ok(())
}
