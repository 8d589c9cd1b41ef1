//! A shard's records: `DIR/records-I-of-N.jsonl`, one line per input, appended and flushed a
//! batch at a time, so that a killed task loses at most one batch; and `DIR/shard-I-of-N.json`,
//! the shard's counts and time, rewritten whole after each batch.

use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result, Shard};

/// What a shard has done, as `shard-I-of-N.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardState {
    /// `I/N`.
    pub shard: String,
    /// The input list (as given).
    pub inputs: String,
    /// Inputs in the whole list.
    pub list_len: usize,
    /// Inputs this shard takes.
    pub total: usize,
    /// Records written (explained or failed).
    pub count: usize,
    /// Of them, failed inputs.
    pub errors: usize,
    /// Time spent explaining, over every run of the shard (resumed runs add theirs).
    pub seconds: f64,
}

impl ShardState {
    /// Records per second of explaining.
    pub fn images_per_s(&self) -> f64 {
        if self.seconds > 0.0 { self.count as f64 / self.seconds } else { 0.0 }
    }
}

/// The part of a record line that resuming and merging read.
#[derive(Deserialize)]
pub(crate) struct Head {
    pub index: usize,
    pub error: Option<serde::de::IgnoredAny>,
}

/// Parses a record line's head, naming the file and line when it is not one.
pub(crate) fn head(line: &str, file: &Path, number: usize) -> Result<Head> {
    serde_json::from_str(line).map_err(|e| Error::Record { file: file.to_path_buf(), line: number, message: e.to_string() })
}

/// A shard's records file, open for appending.
pub struct Records {
    file: std::fs::File,
    path: PathBuf,
    state_path: PathBuf,
    /// The shard's state, as last written.
    pub state: ShardState,
    /// The indices recorded before this run (resumed), ascending.
    done: Vec<usize>,
}

impl Records {
    /// Opens `dir`'s records of `shard` over `inputs` (a list of `list_len`). A file with records
    /// in it is continued with `resume` (its cut last line dropped), and refused without: its
    /// records are never overwritten.
    pub fn open(dir: &Path, shard: Shard, inputs: &str, list_len: usize, resume: bool) -> Result<Records> {
        gradcam_io::create_dir_all(dir)?;
        let path = dir.join(shard.file_name("records", "jsonl"));
        let state_path = dir.join(shard.file_name("shard", "json"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let mut file = std::fs::OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io(&path))?;
        // Two tasks on one shard (a requeued task while the old one still runs) would write each
        // other's records twice: the second is refused while the first holds the lock.
        if let Err(e) = file.try_lock() {
            return match e {
                std::fs::TryLockError::WouldBlock => Err(Error::Busy { file: path }),
                std::fs::TryLockError::Error(source) => Err(Error::Io { path, source }),
            };
        }
        let len = file.metadata().map_err(io(&path))?.len();
        let fresh = ShardState { shard: shard.to_string(), inputs: inputs.to_string(), list_len, total: shard.len_of(list_len), count: 0, errors: 0, seconds: 0.0 };
        if len > 0 && !resume {
            return Err(Error::Exists { file: path });
        }
        let (mut done, mut errors, mut kept) = (Vec::new(), 0, 0u64);
        if len > 0 {
            let mut reader = std::io::BufReader::new(&file);
            let mut line = String::new();
            let mut number = 0;
            loop {
                line.clear();
                let n = reader.read_line(&mut line).map_err(io(&path))?;
                if n == 0 || !line.ends_with('\n') {
                    break; // the end, or a line cut by a kill: dropped, and its input redone
                }
                number += 1;
                let h = head(line.trim_end(), &path, number)?;
                if !shard.takes(h.index) || h.index >= list_len || done.last().is_some_and(|&last| h.index <= last) {
                    return Err(Error::Record { file: path, line: number, message: format!("index {} does not belong here (shard {shard} of a list of {list_len}, in increasing order); was the input list changed?", h.index) });
                }
                done.push(h.index);
                errors += usize::from(h.error.is_some());
                kept += n as u64;
            }
            if kept < len {
                file.set_len(kept).map_err(io(&path))?;
            }
            file.seek(std::io::SeekFrom::End(0)).map_err(io(&path))?;
        }
        let mut state = match std::fs::read(&state_path) {
            Ok(bytes) if len > 0 => serde_json::from_slice::<ShardState>(&bytes).map_err(|e| Error::Record { file: state_path.clone(), line: 1, message: e.to_string() })?,
            _ => fresh.clone(),
        };
        if (&state.shard, &state.inputs, state.list_len) != (&fresh.shard, &fresh.inputs, fresh.list_len) {
            return Err(Error::Changed { file: state_path, was: format!("shard {} of {} ({} inputs)", state.shard, state.inputs, state.list_len), now: format!("shard {} of {} ({} inputs)", fresh.shard, fresh.inputs, fresh.list_len) });
        }
        (state.count, state.errors) = (done.len(), errors);
        let records = Records { file, path, state_path, state, done };
        records.write_state()?;
        Ok(records)
    }

    /// The indices recorded by earlier runs (resumed), ascending; taken once.
    pub fn take_recorded(&mut self) -> Recorded {
        Recorded(std::mem::take(&mut self.done))
    }

    /// The records file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a batch of lines (each a JSON object, no newline) in one write, flushes it, and
    /// records the batch's `seconds` and failed inputs in the shard's state.
    pub fn append(&mut self, lines: &[String], errors: usize, seconds: f64) -> Result<()> {
        let mut bytes = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            bytes.extend_from_slice(line.as_bytes());
            bytes.push(b'\n');
        }
        self.file.write_all(&bytes).and_then(|()| self.file.flush()).map_err(|source| Error::Io { path: self.path.clone(), source })?;
        self.state.count += lines.len();
        self.state.errors += errors;
        self.state.seconds += seconds;
        self.write_state()
    }

    fn write_state(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.state).expect("a state serialises");
        Ok(gradcam_io::write_atomic(&self.state_path, &json)?)
    }
}

/// The indices a shard recorded before this run.
pub struct Recorded(Vec<usize>);

impl Recorded {
    /// Whether input `index` is among them.
    pub fn has(&self, index: usize) -> bool {
        self.0.binary_search(&index).is_ok()
    }
}

/// A record's line: `{"index": I, ...the record's fields}`.
pub fn line(index: usize, record_json: &str) -> String {
    line_field("index", index, record_json)
}

/// `record_json` with `"name": value` as its first field.
pub(crate) fn line_field(name: &str, value: impl std::fmt::Display, record_json: &str) -> String {
    match record_json.strip_prefix('{').map(str::trim_start) {
        Some("}") | None => format!("{{\"{name}\":{value}}}"),
        Some(rest) => format!("{{\"{name}\":{value},{rest}"),
    }
}

/// A failed input's line: `{"index", "image", "error"}`.
pub fn error_line(index: usize, image: &Path, error: &str) -> String {
    let text = |s: &str| serde_json::to_string(s).expect("a string serialises");
    format!("{{\"index\":{index},\"image\":{},\"error\":{}}}", text(&image.display().to_string()), text(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_line_starts_with_its_index() {
        assert_eq!(line(7, r#"{"image":"a.png","x":1}"#), r#"{"index":7,"image":"a.png","x":1}"#);
        assert_eq!(line(0, "{}"), r#"{"index":0}"#);
        let e: serde_json::Value = serde_json::from_str(&error_line(3, Path::new("b\".png"), "bad")).unwrap();
        assert_eq!(e, serde_json::json!({"index": 3, "image": "b\".png", "error": "bad"}));
    }

    #[test]
    fn records_resume_after_a_cut_line_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let shard = Shard::new(1, 2).unwrap();
        let mut r = Records::open(dir.path(), shard, "list.txt", 9, false).unwrap();
        r.append(&[line(1, "{}"), error_line(3, Path::new("x.png"), "broken")], 1, 0.5).unwrap();
        drop(r);
        let path = dir.path().join("records-1-of-2.jsonl");
        // A kill in the middle of the next batch's write.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"index\":5,\"ima").unwrap();
        let e = Records::open(dir.path(), shard, "list.txt", 9, false).err().unwrap();
        assert!(e.to_string().contains("--resume"), "{e}");
        let mut r = Records::open(dir.path(), shard, "list.txt", 9, true).unwrap();
        let done = r.take_recorded();
        assert!(done.has(1) && done.has(3) && !done.has(5));
        assert_eq!((r.state.count, r.state.errors, r.state.total, r.state.seconds), (2, 1, 4, 0.5));
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("broken\"}\n"), "the cut line is gone");
        drop(r);
        let held = Records::open(dir.path(), shard, "list.txt", 9, true).unwrap();
        let e = Records::open(dir.path(), shard, "list.txt", 9, true).err().unwrap();
        assert!(e.to_string().contains("another"), "{e}");
        drop(held);
        let e = Records::open(dir.path(), shard, "other.txt", 9, true).err().unwrap();
        assert!(e.to_string().contains("other.txt"), "{e}");
    }
}
