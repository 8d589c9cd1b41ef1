//! The loop of a dataset run, written once for every explaining command: the shard's inputs,
//! streamed, in batches; each batch explained by the command, its records appended and flushed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::records::{error_line, line, line_field, Records};
use crate::{Input, Inputs, Result, Shard};

/// The most inputs one batch takes.
pub const MAX_BATCH: usize = 4096;

/// What a run does.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// The input list.
    pub inputs: &'a Inputs,
    /// The run's folder: the records, and the overlays and maps when asked for.
    pub out: &'a Path,
    /// Which inputs of the list this task takes.
    pub shard: Shard,
    /// Inputs per batch: explained together, and recorded and flushed together.
    pub batch_size: usize,
    /// Continue the shard's records instead of refusing them.
    pub resume: bool,
    /// Also write each record's raw maps as arrays (`out/maps/INDEX.npy`, ...).
    pub maps: Option<crate::maps::MapFormat>,
}

/// How a run went.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The records file.
    pub file: PathBuf,
    /// Inputs of the shard.
    pub total: usize,
    /// Recorded by earlier runs (resumed).
    pub skipped: usize,
    /// Recorded by this run, and of them, failed.
    pub recorded: usize,
    pub errors: usize,
    /// This run's time explaining.
    pub seconds: f64,
}

/// Runs `plan`: `explain` gets each batch of the shard's inputs not yet recorded and gives, per
/// input, its record as a JSON object, or why it failed (recorded as the input's error, and the
/// run goes on). `progress` hears (inputs of the shard done, inputs of the shard) after each
/// batch. Holds one batch's inputs and records at a time.
pub fn run(plan: &Plan<'_>, explain: &mut dyn FnMut(&[Input]) -> Vec<std::result::Result<String, String>>, progress: &mut dyn FnMut(usize, usize)) -> Result<Outcome> {
    if !(1..=MAX_BATCH).contains(&plan.batch_size) {
        return Err(crate::Error::Setting(format!("--batch-size {}: give 1 to {MAX_BATCH}", plan.batch_size)));
    }
    let list_len = plan.inputs.count()?;
    let mut records = Records::open(plan.out, plan.shard, &plan.inputs.path().display().to_string(), list_len, plan.resume)?;
    let (total, skipped) = (records.state.total, records.state.count);
    let mut outcome = Outcome { file: records.path().to_path_buf(), total, skipped, recorded: 0, errors: 0, seconds: 0.0 };
    progress(skipped, total);
    let mut batch: Vec<Input> = Vec::with_capacity(plan.batch_size);
    let done = records.take_recorded();
    let mut inputs = plan.inputs.iter()?.filter(|i| !i.as_ref().is_ok_and(|i| !plan.shard.takes(i.index) || done.has(i.index)));
    loop {
        batch.clear();
        for input in inputs.by_ref() {
            batch.push(input?);
            if batch.len() == plan.batch_size {
                break;
            }
        }
        if batch.is_empty() {
            break;
        }
        let start = Instant::now();
        let todo: Vec<Input> = batch.iter().filter(|i| i.problem.is_none()).cloned().collect();
        let mut results = explain(&todo).into_iter();
        let mut errors = 0;
        let lines: Vec<String> = batch
            .iter()
            .map(|input| {
                let result = match &input.problem {
                    Some(problem) => Err(problem.clone()),
                    None => results.next().unwrap_or_else(|| Err("the command gave no record for this input".into())),
                };
                let result = match (result, plan.maps) {
                    (Ok(json), Some(format)) => crate::maps::write(plan.out, input.index, format, &json).map(|_| json).map_err(|e| e.to_string()),
                    (result, _) => result,
                };
                match result {
                    // A VQA question's record starts with its id too (the records join the
                    // dataset's annotations by it).
                    Ok(json) => match &input.question {
                        Some(q) => line(input.index, &line_field("question_id", q.id, &json)),
                        None => line(input.index, &json),
                    },
                    Err(e) => {
                        errors += 1;
                        error_line(input.index, &input.image, &e)
                    }
                }
            })
            .collect();
        let seconds = start.elapsed().as_secs_f64();
        records.append(&lines, errors, seconds)?;
        outcome.recorded += lines.len();
        outcome.errors += errors;
        outcome.seconds += seconds;
        progress(skipped + outcome.recorded, total);
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(dir: &Path, n: usize) -> Inputs {
        let file = dir.join("list.txt");
        std::fs::write(&file, (0..n).map(|i| format!("{i}.png\n")).collect::<String>()).unwrap();
        Inputs::open(&file).unwrap()
    }

    /// A command that records each input's name, and fails on every fifth.
    fn echo(batch: &[Input]) -> Vec<std::result::Result<String, String>> {
        batch.iter().map(|i| if i.index % 5 == 4 { Err(format!("bad {}", i.index)) } else { Ok(format!("{{\"image\":\"{}\"}}", i.image.display())) }).collect()
    }

    #[test]
    fn shards_record_their_inputs_in_batches_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = list(dir.path(), 11);
        let out = dir.path().join("out");
        let mut batches = Vec::new();
        let plan = Plan { inputs: &inputs, out: &out, shard: Shard::new(1, 3).unwrap(), batch_size: 2, resume: false, maps: None };
        let o = run(&plan, &mut |b| {
            batches.push(b.iter().map(|i| i.index).collect::<Vec<_>>());
            echo(b)
        }, &mut |_, _| ()).unwrap();
        assert_eq!(batches, [vec![1, 4], vec![7, 10]]);
        assert_eq!((o.total, o.recorded, o.errors, o.skipped), (4, 4, 1, 0));
        let text = std::fs::read_to_string(&o.file).unwrap();
        assert_eq!(text.lines().next(), Some(r#"{"index":1,"image":"1.png"}"#));
        assert!(text.lines().nth(1).unwrap().contains(r#""error":"bad 4""#));
        // Cut the last line, as a kill would, and resume: only index 10 is redone.
        std::fs::write(&o.file, &text[..text.len() - 5]).unwrap();
        let mut seen = Vec::new();
        let o = run(&Plan { resume: true, ..plan.clone() }, &mut |b| {
            seen.extend(b.iter().map(|i| i.index));
            echo(b)
        }, &mut |_, _| ()).unwrap();
        assert_eq!((seen, o.skipped, o.recorded), (vec![10], 3, 1));
        assert_eq!(std::fs::read_to_string(&o.file).unwrap(), text);
    }
}
