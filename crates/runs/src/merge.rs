//! `gradcam merge DIR`: the shards' records as one file in input order, and the run's summary.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::records::{head, ShardState};
use crate::{Error, Result, Shard};

/// What `merge` writes to `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Records (inputs of the list).
    pub count: usize,
    /// Of them, failed inputs.
    pub errors: usize,
    /// Images per second over the shards running side by side (the sum of their rates).
    pub images_per_s: f64,
    /// The longest shard's time explaining, in seconds.
    pub seconds: f64,
    /// Each shard's figures.
    pub shards: Vec<ShardSummary>,
}

/// One shard's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardSummary {
    pub shard: String,
    pub count: usize,
    pub errors: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// The shards of the run in `dir`: `records-I-of-N.jsonl` for every I of one N, with their states.
fn shards(dir: &Path) -> Result<(usize, Vec<(PathBuf, ShardState)>)> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let mut found: Vec<Shard> = Vec::new();
    for entry in entries {
        let name = entry.map_err(|source| Error::Io { path: dir.to_path_buf(), source })?.file_name().to_string_lossy().into_owned();
        let Some(spec) = name.strip_prefix("records-").and_then(|n| n.strip_suffix(".jsonl")) else { continue };
        if let Some(shard) = spec.split_once("-of-").and_then(|(i, n)| Shard::new(i.parse().ok()?, n.parse().ok()?).ok()) {
            found.push(shard);
        }
    }
    let Some(n) = found.first().map(|s| s.count) else {
        return Err(Error::Merge(format!("{} holds no records-I-of-N.jsonl: is it the --out of a dataset run?", dir.display())));
    };
    if let Some(other) = found.iter().find(|s| s.count != n) {
        return Err(Error::Merge(format!("{} holds shards of {n} and of {}: one run's folder holds one split", dir.display(), other.count)));
    }
    let missing: Vec<String> = (0..n).filter(|i| !found.iter().any(|s| s.index == *i)).map(|i| Shard { index: i, count: n }.file_name("records", "jsonl")).collect();
    if !missing.is_empty() {
        return Err(Error::Merge(format!("{} misses {} of {n} shards: {} (run them, then merge)", dir.display(), missing.len(), missing.join(", "))));
    }
    let mut out = Vec::with_capacity(n);
    for index in 0..n {
        let shard = Shard { index, count: n };
        let state_file = dir.join(shard.file_name("shard", "json"));
        let bytes = std::fs::read(&state_file).map_err(|source| Error::Io { path: state_file.clone(), source })?;
        let state: ShardState = serde_json::from_slice(&bytes).map_err(|e| Error::Record { file: state_file.clone(), line: 1, message: e.to_string() })?;
        out.push((dir.join(shard.file_name("records", "jsonl")), state));
    }
    if let Some((_, s)) = out.iter().find(|(_, s)| (s.list_len, &s.inputs) != (out[0].1.list_len, &out[0].1.inputs)) {
        return Err(Error::Merge(format!("shard {} ran over {} ({} inputs), shard {} over {} ({} inputs)", out[0].1.shard, out[0].1.inputs, out[0].1.list_len, s.shard, s.inputs, s.list_len)));
    }
    Ok((n, out))
}

/// The most shards' files a merge keeps open at once; past it each file is reopened at its
/// offset for each line (within any open-file limit, at the cost of a reopen per record).
pub const OPEN_FILES: usize = 256;

/// A shard's file read a line at a time, kept open between lines or, past [`OPEN_FILES`] files
/// read side by side, reopened at its offset for each line (within any open-file limit).
pub struct LineReader {
    /// The file.
    pub file: PathBuf,
    /// Lines read so far.
    pub lines: usize,
    reader: Option<std::io::BufReader<std::fs::File>>,
    /// Bytes read so far.
    offset: u64,
    keep_open: bool,
}

impl LineReader {
    /// Reads `file` from its start; `keep_open`: hold it open between lines.
    pub fn new(file: PathBuf, keep_open: bool) -> LineReader {
        LineReader { file, lines: 0, reader: None, offset: 0, keep_open }
    }

    /// Appends the next line (with its newline, if it has one) to `line`; 0 at the end.
    pub fn read_line(&mut self, line: &mut String) -> std::io::Result<usize> {
        let mut reader = match self.reader.take() {
            Some(r) => r,
            None => {
                let mut f = std::fs::File::open(&self.file)?;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(self.offset))?;
                std::io::BufReader::new(f)
            }
        };
        let n = reader.read_line(line)?;
        self.offset += n as u64;
        self.lines += usize::from(n > 0);
        if self.keep_open {
            self.reader = Some(reader);
        }
        Ok(n)
    }
}

/// Merges the run in `dir`: writes `dir/records.jsonl`, every shard's lines in input order (each
/// line as the shard wrote it), and `dir/summary.json`. Refuses, writing nothing, a run with a
/// shard missing or unfinished, or an index missing or recorded twice.
pub fn merge(dir: &Path) -> Result<Summary> {
    let (n, shards) = shards(dir)?;
    let list_len = shards[0].1.list_len;
    let mut readers: Vec<LineReader> = shards.iter().map(|(file, _)| LineReader::new(file.clone(), n <= OPEN_FILES)).collect();
    let mut failure: Option<Error> = None;
    let mut errors = vec![0usize; n];
    let target = dir.join("records.jsonl");
    let written = gradcam_io::write_atomic_with(&target, |out| {
        let mut out = std::io::BufWriter::new(out);
        let mut line = String::new();
        let mut step = |index: usize, out: &mut dyn Write| -> Result<()> {
            let cursor = &mut readers[index % n];
            line.clear();
            let read = cursor.read_line(&mut line).map_err(|source| Error::Io { path: cursor.file.clone(), source })?;
            let (file, number) = (&cursor.file, cursor.lines);
            let shard = Shard { index: index % n, count: n };
            if read == 0 {
                return Err(Error::Merge(format!("index {index} is missing: {} ends before it (shard {shard} is unfinished: run it again with --resume)", file.display())));
            }
            if !line.ends_with('\n') {
                return Err(Error::Merge(format!("{} ends in a cut line (shard {shard} was stopped while writing: run it again with --resume)", file.display())));
            }
            let h = head(line.trim_end(), file, number)?;
            if h.index != index {
                let why = if h.index < index { "twice or out of order" } else { "after a gap" };
                return Err(Error::Merge(format!("{} line {number}: index {} where {index} was due ({why}); index {index} is missing or the file was edited", file.display(), h.index)));
            }
            errors[index % n] += usize::from(h.error.is_some());
            out.write_all(line.as_bytes()).map_err(|source| Error::Io { path: target.clone(), source })
        };
        for index in 0..list_len {
            if let Err(e) = step(index, &mut out) {
                failure = Some(e);
                return Err(std::io::Error::other("merge refused"));
            }
        }
        out.flush()
    });
    if let Some(e) = failure {
        return Err(e);
    }
    written?;
    for cursor in &mut readers {
        let mut rest = String::new();
        if cursor.read_line(&mut rest).map_err(|source| Error::Io { path: cursor.file.clone(), source })? > 0 {
            let _ = std::fs::remove_file(&target);
            return Err(Error::Merge(format!("{} line {}: a record past the list's {list_len} inputs ({}); the file holds more than its shard", cursor.file.display(), cursor.lines, rest.trim_end().chars().take(80).collect::<String>())));
        }
    }
    let shards: Vec<ShardSummary> = shards
        .iter()
        .zip(&errors)
        .map(|((_, s), &errors)| ShardSummary { shard: s.shard.clone(), count: s.total, errors, seconds: s.seconds, images_per_s: s.images_per_s() })
        .collect();
    let summary = Summary {
        count: list_len,
        errors: errors.iter().sum(),
        images_per_s: shards.iter().map(|s| s.images_per_s).sum(),
        seconds: shards.iter().map(|s| s.seconds).fold(0.0, f64::max),
        shards,
    };
    gradcam_io::write_atomic(&dir.join("summary.json"), &serde_json::to_vec_pretty(&summary).expect("a summary serialises"))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{run, Inputs, Plan};

    fn run_shards(dir: &Path, n: usize, len: usize) -> PathBuf {
        let list = dir.join("list.txt");
        std::fs::write(&list, (0..len).map(|i| format!("{i}.png\n")).collect::<String>()).unwrap();
        let inputs = Inputs::open(&list).unwrap();
        let out = dir.join(format!("out{n}"));
        for i in 0..n {
            let plan = Plan { inputs: &inputs, out: &out, shard: Shard::new(i, n).unwrap(), batch_size: 3, resume: false, maps: None };
            run(&plan, &mut |b| b.iter().map(|i| if i.index == 5 { Err("bad".into()) } else { Ok(format!("{{\"image\":\"{}\"}}", i.image.display())) }).collect(), &mut |_, _| ()).unwrap();
        }
        out
    }

    #[test]
    fn shards_merge_to_the_unsharded_records() {
        let dir = tempfile::tempdir().unwrap();
        let one = run_shards(dir.path(), 1, 10);
        let four = run_shards(dir.path(), 4, 10);
        let (a, b) = (merge(&one).unwrap(), merge(&four).unwrap());
        assert_eq!((a.count, a.errors, b.count, b.errors, b.shards.len()), (10, 1, 10, 1, 4));
        assert_eq!(b.shards.iter().map(|s| s.count).collect::<Vec<_>>(), [3, 3, 2, 2]);
        let read = |d: &Path| std::fs::read_to_string(d.join("records.jsonl")).unwrap();
        assert_eq!(read(&one), read(&four));
        assert!(four.join("summary.json").exists());
    }

    #[test]
    fn more_shards_than_files_kept_open_merge_too() {
        let dir = tempfile::tempdir().unwrap();
        let many = run_shards(dir.path(), OPEN_FILES + 3, 2 * OPEN_FILES + 20);
        let one = run_shards(dir.path(), 1, 2 * OPEN_FILES + 20);
        assert_eq!(merge(&many).unwrap().count, merge(&one).unwrap().count);
        let read = |d: &Path| std::fs::read_to_string(d.join("records.jsonl")).unwrap();
        assert_eq!(read(&many), read(&one));
    }

    #[test]
    fn missing_doubled_and_unfinished_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let four = run_shards(dir.path(), 4, 10);
        let f2 = four.join("records-2-of-4.jsonl");
        let text = std::fs::read_to_string(&f2).unwrap();
        let first = text.lines().next().unwrap();
        std::fs::write(&f2, format!("{first}\n{text}")).unwrap();
        let e = merge(&four).unwrap_err().to_string();
        assert!(e.contains("index 2 where 6 was due"), "{e}");
        assert!(!four.join("records.jsonl").exists(), "nothing half-written");
        std::fs::write(&f2, &text[..text.len() - 3]).unwrap();
        assert!(merge(&four).unwrap_err().to_string().contains("cut line"));
        std::fs::write(&f2, text.lines().next().unwrap().to_string() + "\n").unwrap();
        let e = merge(&four).unwrap_err().to_string();
        assert!(e.contains("index 6 is missing") && e.contains("--resume"), "{e}");
        std::fs::remove_file(&f2).unwrap();
        assert!(merge(&four).unwrap_err().to_string().contains("records-2-of-4.jsonl"));
    }
}
