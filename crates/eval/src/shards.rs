//! `gradcam eval --shard I/N --out DIR` and `gradcam eval merge DIR`.
//!
//! A shard evaluates the images of the list (the dataset after `--limit`) whose position `i` has
//! `i % N == I`, and writes to DIR:
//! - `results-I-of-N.jsonl`, streamed: a line per image, `{"index":i,` then the fields of the
//!   image's line in an unsharded `results.jsonl`, then `"tally":` its [`ImagePart`] (what it
//!   adds to the summary, floats exact); for `adversarial`, a line per image too:
//!   `{"index":i,"cases":[...],"tally":[...]}`, the unsharded lines of its attacked classes as
//!   strings and their parts;
//! - `failures-I-of-N/` with `--failures K`: the shard's K worst images' page, and
//!   `entries.json` (their indices and what the page says of them);
//! - `shard-I-of-N.json` last, when the shard is done: the list's length, the dataset and the
//!   [`Plan`] (how it measured).
//!
//! The merge checks that the N shards are all there, done, run alike, and hold every index once;
//! then it replays the parts in index order through the same [`Fold`] as an unsharded run (so the
//! summary has the same bits: running means depend on their order), writes `results.jsonl` (the
//! unsharded lines, in order), `summary.json`, `summary.md`, and with `--failures K` the page of
//! the K worst over all shards (the K worst of the union of each shard's K worst), its pictures
//! copied from the shards' pages. Inputs and records are streamed: memory holds a line per shard.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use gradcam_runs::Shard;
use serde::{Deserialize, Serialize};

use crate::adversarial::{AdversarialFold, AdversarialSetup, AttackCase, CasePart as AdvPart};
use crate::fold::{Fold, ImagePart, Setup};
use crate::report::{markdown, page_html, Failure, PageEntry};
use crate::{Error, Result, Step};

/// What a finished shard says of itself: `shard-I-of-N.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardHead {
    /// `I/N`.
    pub shard: String,
    /// Images in the whole list (the dataset after `--limit`).
    pub list: usize,
    /// Images this shard evaluated.
    pub images: usize,
    pub data: PathBuf,
    /// `--failures K`.
    pub failures: usize,
    pub setup: Plan,
}

/// What a shard ran: the maps' evaluations, or the adversarial one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    Maps(Setup),
    Adversarial(AdversarialSetup),
}

/// One of a shard's worst images, as its page shows it: `failures-I-of-N/entries.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Worst {
    index: usize,
    /// The attacked class's place among its image's (adversarial; 0 otherwise).
    #[serde(default)]
    position: usize,
    entry: PageEntry,
}

fn failures_dir(shard: Shard) -> String {
    format!("failures-{}-of-{}", shard.index, shard.count)
}

/// Writes one image's line: the unsharded `results.jsonl` line, or a shard's (with its index and
/// its part of the summary).
pub(crate) fn write_record(w: &mut dyn Write, step: &Step, sharded: bool) -> std::io::Result<()> {
    let result = serde_json::to_string(step.result)?;
    if !sharded {
        return writeln!(w, "{result}");
    }
    // `{...}` without its braces: a result always has fields.
    let fields = &result[1..result.len() - 1];
    writeln!(w, "{{\"index\":{},{fields},\"tally\":{}}}", step.index, serde_json::to_string(step.part)?)
}

/// Writes one image's attacked classes: a line each (unsharded), or a shard's line for the image
/// (its index, the lines as strings, their parts of the summary).
pub(crate) fn write_cases(w: &mut dyn Write, index: usize, cases: &[AttackCase], parts: &[AdvPart], sharded: bool) -> std::io::Result<()> {
    let lines: Vec<String> = cases.iter().map(serde_json::to_string).collect::<std::result::Result<_, _>>()?;
    if !sharded {
        return lines.iter().try_for_each(|l| writeln!(w, "{l}"));
    }
    writeln!(w, "{{\"index\":{index},\"cases\":{},\"tally\":{}}}", serde_json::to_string(&lines)?, serde_json::to_string(parts)?)
}

/// A shard's line of the adversarial evaluation: its image's index, lines and parts.
fn split_cases(line: &str) -> std::result::Result<(usize, Vec<String>, Vec<AdvPart>), String> {
    #[derive(Deserialize)]
    struct Record {
        index: usize,
        cases: Vec<String>,
        tally: Vec<AdvPart>,
    }
    let r: Record = serde_json::from_str(line).map_err(|e| format!("not an adversarial shard's record ({e})"))?;
    Ok((r.index, r.cases, r.tally))
}

/// The line of an unsharded `results.jsonl` in a shard's line, with the image's index and part.
fn split_record(line: &str) -> std::result::Result<(usize, String, ImagePart), String> {
    #[derive(Deserialize)]
    struct Record {
        index: usize,
        tally: ImagePart,
    }
    let record: Record = serde_json::from_str(line).map_err(|e| format!("not a shard's record ({e})"))?;
    let prefix = format!("{{\"index\":{},", record.index);
    // A key's quotes are never inside a JSON string (there they are escaped), and the part, last,
    // has no key `tally`: the last `,"tally":` is where it starts.
    let fields = line.strip_prefix(&prefix).zip(line.rfind(",\"tally\":")).filter(|(_, end)| *end >= prefix.len()).map(|(_, end)| &line[prefix.len()..end]);
    let fields = fields.ok_or("not a shard's record (`{\"index\":I,` first, `\"tally\":` last)")?;
    Ok((record.index, format!("{{{fields}}}"), record.tally))
}

/// A shard's last outputs: its failure page with `entries.json` (`chosen` and `failures`, its
/// worst images), then `shard-I-of-N.json`, which says it is done.
/// `chosen` are the failures' (image index, attacked class's position).
pub(crate) fn finish(dir: &Path, shard: Shard, head: &ShardHead, chosen: &[(usize, usize)], failures: &[Failure], title: &str) -> Result<()> {
    if head.failures > 0 {
        let page = dir.join(failures_dir(shard));
        crate::report::write_failures(&page, failures, title)?;
        let entries: Vec<Worst> = chosen.iter().zip(failures).map(|(&(index, position), f)| Worst { index, position, entry: f.entry() }).collect();
        gradcam_io::write_atomic(&page.join("entries.json"), &to_json(&entries)?)?;
    }
    gradcam_io::write_atomic(&dir.join(shard.file_name("shard", "json")), &to_json(head)?)?;
    Ok(())
}

fn to_json(v: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Data(format!("does not serialise: {e}")))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// The shard a file of a run's folder belongs to: `NAME-I-of-N.EXT`.
fn shard_of(file: &str, name: &str, ext: &str) -> Option<Shard> {
    let (i, n) = file.strip_prefix(name)?.strip_prefix('-')?.strip_suffix(ext)?.strip_suffix('.')?.split_once("-of-")?;
    Shard::new(i.parse().ok()?, n.parse().ok()?).ok()
}

/// The shard count of the shards' files in `dir`, checked: one split, every shard there and done.
fn shard_count(dir: &Path) -> Result<usize> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut found: BTreeMap<usize, (BTreeSet<usize>, BTreeSet<usize>)> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name().to_string_lossy().into_owned();
        if let Some(s) = shard_of(&name, "results", "jsonl") {
            found.entry(s.count).or_default().0.insert(s.index);
        } else if let Some(s) = shard_of(&name, "shard", "json") {
            found.entry(s.count).or_default().1.insert(s.index);
        }
    }
    let counts: Vec<usize> = found.keys().copied().collect();
    let n = match counts[..] {
        [] => return Err(Error::Data(format!("{}: no shard's files (results-I-of-N.jsonl, shard-I-of-N.json) to merge; run `gradcam eval TASKS ... --shard I/N --out {}` for I = 0 to N-1 first", dir.display(), dir.display()))),
        [n] => n,
        _ => return Err(Error::Data(format!("{}: holds shards of {} different splits (of {}); merge one split per folder", dir.display(), counts.len(), counts.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")))),
    };
    let (results, heads) = &found[&n];
    for index in 0..n {
        let shard = Shard { index, count: n };
        if !results.contains(&index) {
            return Err(Error::Data(format!("{}: shard {shard} is missing: no {} (run it with --shard {shard} --out {})", dir.display(), shard.file_name("results", "jsonl"), dir.display())));
        }
        if !heads.contains(&index) {
            return Err(Error::Data(format!("{}: shard {shard} has not finished: no {} beside its {} (a shard writes it when it is done; run it again)", dir.display(), shard.file_name("shard", "json"), shard.file_name("results", "jsonl"))));
        }
    }
    Ok(n)
}

/// `gradcam eval merge DIR`'s result: the summary as JSON and as a table.
pub struct Merged {
    pub json: String,
    pub table: String,
    /// Whether it was the adversarial evaluation (its results are per attacked class).
    pub adversarial: bool,
    /// Whether a failure page was written (the shards ran with `--failures`).
    pub failures: bool,
}

/// Merges the shards in `dir` (see the module's documentation).
pub fn merge(dir: &Path) -> Result<Merged> {
    let n = shard_count(dir)?;
    let shards: Vec<Shard> = (0..n).map(|index| Shard { index, count: n }).collect();
    let heads: Vec<ShardHead> = shards.iter().map(|s| read_json(&dir.join(s.file_name("shard", "json")))).collect::<Result<_>>()?;
    for (s, head) in shards.iter().zip(&heads) {
        let file = s.file_name("shard", "json");
        if head.shard != s.to_string() {
            return Err(Error::Data(format!("{}: says it is shard {}, not {s}", dir.join(&file).display(), head.shard)));
        }
        let first = &heads[0];
        let differ: Vec<&str> = [("list", head.list != first.list), ("data", head.data != first.data), ("failures", head.failures != first.failures), ("setup", head.setup != first.setup)].into_iter().filter(|d| d.1).map(|d| d.0).collect();
        if !differ.is_empty() {
            return Err(Error::Data(format!("{}: shard {s} was run differently from shard {} (its {} {}); run every shard with the same command", dir.display(), shards[0], differ.join(" and "), if differ.len() == 1 { "differs" } else { "differ" })));
        }
    }
    let head = &heads[0];
    let mut readers: Vec<Records> = shards.iter().map(|s| Records::new(dir.join(s.file_name("results", "jsonl")), n <= gradcam_runs::OPEN_FILES)).collect::<Result<_>>()?;
    let out = dir.join("results.jsonl");
    let (json, table, title) = match &head.setup {
        Plan::Maps(setup) => {
            let mut fold = Fold::default();
            streamed_merge(&out, head.list, &mut readers, &mut |line, expected| {
                let (index, result, part) = split_record(line)?;
                if index == expected {
                    fold.add(&part);
                }
                Ok((index, vec![result]))
            })?;
            let s = fold.summary(setup);
            let title = |k: usize| format!("{k} worst-predicted images of {} ({}, {})", head.data.display(), s.kind, s.method);
            (to_json(&s)?, markdown(&s), title(head.failures.min(s.images)))
        }
        Plan::Adversarial(setup) => {
            let mut fold = AdversarialFold::default();
            streamed_merge(&out, head.list, &mut readers, &mut |line, expected| {
                let (index, cases, parts) = split_cases(line)?;
                if index == expected {
                    fold.add_image(&parts);
                }
                Ok((index, cases))
            })?;
            let s = fold.summary(setup);
            if s.cases == 0 {
                return Err(Error::Empty { data: head.data.clone(), what: "annotated object of the model's classes" });
            }
            (to_json(&s)?, crate::adversarial::markdown(&s), crate::adversarial::failures_title(head.failures.min(s.cases), &head.data))
        }
    };
    gradcam_io::write_atomic(&dir.join("summary.json"), &json)?;
    gradcam_io::write_atomic(&dir.join("summary.md"), table.as_bytes())?;
    if head.failures > 0 {
        let entries = merge_failures(dir, &shards, head.failures)?;
        gradcam_io::write_atomic(&dir.join("failures/index.html"), page_html(&title, &entries).as_bytes())?;
    }
    let json = String::from_utf8(json).expect("JSON is UTF-8");
    Ok(Merged { json, table, adversarial: matches!(head.setup, Plan::Adversarial(_)), failures: head.failures > 0 })
}

/// A shard's records file, read a line at a time ([`gradcam_runs::LineReader`]).
struct Records(gradcam_runs::LineReader);

impl Records {
    fn new(path: PathBuf, keep_open: bool) -> Result<Records> {
        std::fs::File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        Ok(Records(gradcam_runs::LineReader::new(path, keep_open)))
    }

    /// The next line, without its newline; `None` at the end.
    fn next(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        if self.0.read_line(&mut line).map_err(|source| Error::Io { path: self.0.file.clone(), source })? == 0 {
            return Ok(None);
        }
        let line = line.strip_suffix('\n').unwrap_or(&line);
        Ok(Some(line.strip_suffix('\r').unwrap_or(line).to_string()))
    }
}

/// A shard's line parsed: its index and the unsharded lines it holds (the parse adds its part to
/// the summary when the index is the one expected).
type Parse<'a> = dyn FnMut(&str, usize) -> std::result::Result<(usize, Vec<String>), String> + 'a;

/// Reads the shards' records in index order (`i` from shard `i % N`) through `parse`, checking
/// each index comes once, and writes the unsharded lines into `out`.
fn streamed_merge(out: &Path, list: usize, readers: &mut [Records], parse: &mut Parse) -> Result<()> {
    let n = readers.len();
    crate::session::streamed(out, |w| {
        for i in 0..list {
            let shard = Shard::of(i, n);
            let records = &mut readers[shard.index];
            let Some(line) = records.next()? else {
                return Err(Error::Data(format!("{}: image {i} is missing: the file ends after {} lines, and shard {shard} takes {} of the list's {list} images", records.0.file.display(), records.0.lines, shard.len_of(list))));
            };
            let (path, at) = (&records.0.file, records.0.lines);
            let (index, lines) = parse(&line, i).map_err(|e| Error::Data(format!("{} line {at}: {e}", path.display())))?;
            if index != i {
                let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                return Err(Error::Data(misplaced(&name, at, index, i, shard, list)));
            }
            for l in lines {
                writeln!(w, "{l}").map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
            }
        }
        for records in readers.iter_mut() {
            if let Some(line) = records.next()? {
                let (path, at) = (&records.0.file, records.0.lines);
                #[derive(Deserialize)]
                struct Index {
                    index: usize,
                }
                let index = serde_json::from_str::<Index>(&line).map_err(|e| Error::Data(format!("{} line {at}: not a shard's record ({e})", path.display())))?.index;
                let what = if index < list { format!("index {index} appears twice") } else { format!("index {index} is past the list's {list} images") };
                return Err(Error::Data(format!("{} line {at}: {what}", path.display())));
            }
        }
        Ok(())
    })
}

/// Why `index` at line `at` of a shard's records is not the `expected` one.
fn misplaced(file: &str, at: usize, index: usize, expected: usize, shard: Shard, list: usize) -> String {
    if index >= list {
        format!("{file} line {at}: index {index} is past the list's {list} images")
    } else if !shard.takes(index) {
        format!("{file} line {at}: index {index} is shard {}'s, not shard {shard}'s", Shard::of(index, shard.count))
    } else if index < expected {
        format!("{file} line {at}: index {index} appears twice")
    } else {
        format!("{file} line {at}: image {expected} is missing (the line has index {index}; shard {shard} holds {expected})")
    }
}

/// The failure page's entries over all shards: the `k` worst of their worst (by quality, then
/// input order), pictures copied from the shards' pages into `dir/failures/`.
fn merge_failures(dir: &Path, shards: &[Shard], k: usize) -> Result<Vec<PageEntry>> {
    let mut all = Vec::new();
    for &s in shards {
        let page = dir.join(failures_dir(s));
        let worst: Vec<Worst> = read_json(&page.join("entries.json"))?;
        all.extend(worst.into_iter().enumerate().map(|(at, w)| (page.clone(), at, w)));
    }
    all.sort_by(|a, b| a.2.entry.quality.0.total_cmp(&b.2.entry.quality.0).then((a.2.index, a.2.position).cmp(&(b.2.index, b.2.position))));
    all.truncate(k);
    let to = dir.join("failures");
    gradcam_io::create_dir_all(&to)?;
    let copy = |from: PathBuf, name: String| -> Result<()> {
        let bytes = std::fs::read(&from).map_err(|source| Error::Io { path: from.clone(), source })?;
        Ok(gradcam_io::write_atomic(&to.join(name), &bytes)?)
    };
    for (i, (page, at, w)) in all.iter().enumerate() {
        copy(page.join(format!("{at:03}_image.png")), format!("{i:03}_image.png"))?;
        for k in 0..w.entry.labels.len() {
            copy(page.join(format!("{at:03}_{k}.png")), format!("{i:03}_{k}.png"))?;
        }
    }
    Ok(all.into_iter().map(|w| w.2.entry).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fold::Exact;

    #[test]
    fn a_record_gives_back_the_unsharded_line() {
        let line = r#"{"index":12,"image":"a \"tally\":b.png","summary":"x,\"tally\":","quality":0.5,"cases":[],"tally":{"cases":[{"group":"g","means":["0.1",null,null,null,null]}]}}"#;
        let (index, result, part) = split_record(line).unwrap();
        assert_eq!(index, 12);
        assert_eq!(result, r#"{"image":"a \"tally\":b.png","summary":"x,\"tally\":","quality":0.5,"cases":[]}"#);
        assert_eq!(part.cases[0].means[0], Some(Exact(0.1)));
        assert!(split_record(r#"{"image":"a","index":3,"tally":{"cases":[]}}"#).unwrap_err().contains("`{\"index\":I,` first"));
        assert!(split_record("{}").unwrap_err().starts_with("not a shard's record"));
    }

    #[test]
    fn more_shards_than_files_kept_open_merge_in_index_order() {
        let dir = tempfile::tempdir().unwrap();
        let (n, list) = (gradcam_runs::OPEN_FILES + 44, 2 * gradcam_runs::OPEN_FILES + 100);
        let setup = Setup { kind: "k".into(), method: "m".into(), tasks: vec![crate::Task::Energy], tolerance: "15 px".into(), box_threshold: Exact(0.15), iou: Exact(0.5), steps: 20, reject_below: Exact(0.5), segment: ([Exact(0.5); 5], 128) };
        for s in (0..n).map(|index| Shard { index, count: n }) {
            let head = ShardHead { shard: s.to_string(), list, images: s.len_of(list), data: "d".into(), failures: 0, setup: Plan::Maps(setup.clone()) };
            std::fs::write(dir.path().join(s.file_name("shard", "json")), to_json(&head).unwrap()).unwrap();
            let lines: String = (0..list).filter(|&i| s.takes(i)).map(|i| format!("{{\"index\":{i},\"image\":\"{i}.png\",\"tally\":{{\"cases\":[{{\"group\":\"g\",\"means\":[null,null,null,null,\"{}\"]}}]}}}}\n", 1.0 / (i + 1) as f64)).collect();
            std::fs::write(dir.path().join(s.file_name("results", "jsonl")), lines).unwrap();
        }
        let merged = merge(dir.path()).unwrap();
        let mut fold = Fold::default();
        let part = |i: usize| ImagePart { cases: vec![crate::fold::CasePart { group: "g".into(), pointing: None, localization: None, means: [None, None, None, None, Some(Exact(1.0 / (i + 1) as f64))], segmentation: None }], ranked: None, occlusion: None };
        (0..list).for_each(|i| fold.add(&part(i)));
        assert_eq!(merged.json.as_bytes(), to_json(&fold.summary(&setup)).unwrap(), "added in index order");
        assert!(merged.json.contains(&format!("\"images\": {list}")));
        let results = std::fs::read_to_string(dir.path().join("results.jsonl")).unwrap();
        assert!(results.lines().enumerate().all(|(i, l)| l == format!("{{\"image\":\"{i}.png\"}}")), "{results}");
    }

    #[test]
    fn shard_files_are_named_and_read_back() {
        assert_eq!(shard_of("results-2-of-3.jsonl", "results", "jsonl"), Some(Shard { index: 2, count: 3 }));
        assert_eq!(shard_of("shard-0-of-1.json", "shard", "json"), Some(Shard::ALL));
        for bad in ["results-3-of-3.jsonl", "results.jsonl", "results-1-of-3.json", "shard-1-of-3.jsonl"] {
            assert_eq!(shard_of(bad, "results", "jsonl").or(shard_of(bad, "shard", "json")), None, "{bad}");
        }
        assert_eq!(misplaced("r", 2, 3, 6, Shard { index: 0, count: 3 }, 9), "r line 2: index 3 appears twice");
        assert_eq!(misplaced("r", 2, 9, 6, Shard { index: 0, count: 3 }, 12), "r line 2: image 6 is missing (the line has index 9; shard 0/3 holds 6)");
        assert_eq!(misplaced("r", 2, 7, 6, Shard { index: 0, count: 3 }, 12), "r line 2: index 7 is shard 1/3's, not shard 0/3's");
    }
}
