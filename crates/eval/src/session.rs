//! An evaluation from names to files: the model a name means (a classifier, or a captioner's or
//! VQA model's folder), its [`Subject`] over a dataset, the run, and what the run leaves in its
//! output folder (results.jsonl, summary.json, summary.md and the failures page).

use std::io::Write;
use std::path::{Path, PathBuf};

use gradcam_captioner::Captioner;
use gradcam_core::SettingError;
use gradcam_encoders::onnx::OnnxOptions;
use gradcam_encoders::ModelName;
use gradcam_vqa::Vqa;
use serde::Serialize;

use crate::report::{keep_worst, markdown, worst, write_failures, Failure};
use crate::clip::ClipSubject;
use crate::fold::Setup;
use crate::shards::{Plan, ShardHead};
use crate::subjects::{CaptionerSubject, ClassifierSubject, VqaSubject};
use crate::{run_shard, Error, Options, Result, Shard, Step, Subject, Summary, Task};

/// Where a run writes its outputs, how many failure cases its page shows (0: no page), and the
/// shard it is (its outputs are then the shard's, for `gradcam eval merge`).
#[derive(Debug, Clone, Copy)]
pub struct Outputs<'a> {
    pub dir: &'a Path,
    pub failures: usize,
    pub shard: Option<gradcam_runs::Shard>,
}

/// Writes `dir/results.jsonl` (a line per result), `summary.json`, `summary.md` (`table`) and,
/// with `failures`, the page `dir/failures/index.html` titled by its second element.
pub fn write_run<R: Serialize>(dir: &Path, results: impl IntoIterator<Item = R>, summary: &impl Serialize, table: &str, failures: Option<(&[Failure], &str)>) -> Result<()> {
    let file = dir.join("results.jsonl");
    streamed(&file, |w| {
        for r in results {
            serde_json::to_writer(&mut *w, &r).map_err(|e| Error::Data(format!("a result does not serialise: {e}")))?;
            w.write_all(b"\n").map_err(|source| Error::Io { path: file.clone(), source })?;
        }
        Ok(())
    })?;
    write_summary(dir, summary, table, failures)
}

/// Writes `dir/summary.json`, `summary.md` (`table`) and, with `failures`, the page
/// `dir/failures/index.html` titled by its second element.
pub fn write_summary(dir: &Path, summary: &impl Serialize, table: &str, failures: Option<(&[Failure], &str)>) -> Result<()> {
    let summary = serde_json::to_vec_pretty(summary).map_err(|e| Error::Data(format!("the summary does not serialise: {e}")))?;
    gradcam_io::write_atomic(&dir.join("summary.json"), &summary)?;
    gradcam_io::write_atomic(&dir.join("summary.md"), table.as_bytes())?;
    match failures {
        Some((failures, title)) => write_failures(&dir.join("failures"), failures, title),
        None => Ok(()),
    }
}

/// Writes `path` atomically through `write`, which streams into it (buffered): a run's records
/// go to the file as they are made, and the file appears complete or not at all.
pub(crate) fn streamed<T>(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<T>) -> Result<T> {
    let mut outcome = None;
    let written = gradcam_io::write_atomic_with(path, |file| {
        let mut w = std::io::BufWriter::new(file);
        let r = write(&mut w);
        let failed = r.is_err();
        outcome = Some(r);
        if failed {
            return Err(std::io::Error::other("the run stopped"));
        }
        w.flush()
    });
    match (outcome, written) {
        (Some(Err(e)), _) => Err(e),
        (_, Err(e)) => Err(e.into()),
        (Some(Ok(v)), Ok(())) => Ok(v),
        (None, Ok(())) => unreachable!("write_atomic_with writes through its closure"),
    }
}

/// Creates the output folder (and its parents).
pub(crate) fn create(out: Option<Outputs>) -> Result<()> {
    match out {
        Some(o) => Ok(gradcam_io::create_dir_all(o.dir)?),
        None => Ok(()),
    }
}

/// The model a name means: a classifier (a built-in architecture, an ONNX file or a trained
/// classifier folder), or a captioner's or VQA model's folder (told apart by its config.json).
#[derive(Debug, Clone)]
pub enum ModelRef {
    Classifier(ModelName),
    Captioner(PathBuf),
    Vqa(PathBuf),
    /// A CLIP's folder (`"kind": "clip"`).
    Clip(PathBuf),
}

impl ModelRef {
    pub fn parse(model: &str) -> Result<Self> {
        if let Some(name) = classifier_name(model) {
            return Ok(ModelRef::Classifier(name));
        }
        let dir = PathBuf::from(model);
        let config = dir.join("config.json");
        let text = std::fs::read_to_string(&config).map_err(|e| SettingError::value("model", model, "neither a classifier (efficientnet-lite0, vgg16, resnet18, resnet50, FILE.onnx) nor a model folder with config.json").because(e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Data(format!("parsing {}: {e}", config.display())))?;
        Ok(if json.get("kind").and_then(|k| k.as_str()) == Some("clip") {
            ModelRef::Clip(dir)
        } else if json.get("answers").is_some() {
            ModelRef::Vqa(dir)
        } else {
            ModelRef::Captioner(dir)
        })
    }

    /// The subject over the dataset folder `data`; `weights`, `onnx` and `layer` are a
    /// classifier's (see [`ModelName::load`]) and refused for the model folders.
    pub fn subject(&self, weights: Option<&str>, onnx: &OnnxOptions, layer: Option<&str>, data: &Path) -> Result<AnySubject> {
        let (dir, given) = match self {
            ModelRef::Classifier(name) => {
                let (net, layer) = name.load(weights, onnx, layer).map_err(loading(name))?;
                return Ok(AnySubject::Classifier(ClassifierSubject::new(net, layer, data)?));
            }
            ModelRef::Captioner(dir) | ModelRef::Vqa(dir) => (dir, [weights.map(|_| "weights"), layer.map(|_| "layer")]),
            // A CLIP's layer is one of its blocks' attention inputs.
            ModelRef::Clip(dir) => (dir, [weights.map(|_| "weights"), None]),
        };
        let given: Vec<&'static str> = given.into_iter().flatten().chain(onnx.given()).collect();
        if !given.is_empty() {
            return Err(SettingError::new(given, format!("are for classifiers; {} is a model folder", dir.display())).into());
        }
        Ok(match self {
            ModelRef::Vqa(dir) => AnySubject::Vqa(VqaSubject::new(Vqa::load(dir).map_err(loading(dir.display()))?, data)?),
            ModelRef::Clip(dir) => AnySubject::Clip(ClipSubject::new(gradcam_clip::Trained::load(dir).map_err(loading(dir.display()))?, layer, data)?),
            _ => AnySubject::Captioner(CaptionerSubject::new(Captioner::load(dir).map_err(loading(dir.display()))?, data)?),
        })
    }
}

/// A failure to load `model` as [`Error::Loading`] (the dataset's errors are not the model's).
pub(crate) fn loading<E: Into<Error>>(model: impl std::fmt::Display) -> impl FnOnce(E) -> Error {
    move |e| Error::Loading { model: model.to_string(), source: Box::new(e.into()) }
}

/// A name as a classifier: a built-in name, an ONNX file or a trained classifier folder (not a
/// captioner's or VQA model's folder).
pub fn classifier_name(model: &str) -> Option<ModelName> {
    model.parse::<ModelName>().ok().filter(|n| !matches!(n, ModelName::Folder(d) if !gradcam_encoders::scene_classifier::is_classifier_dir(d)))
}

/// A subject of any of the three kinds.
pub enum AnySubject {
    Classifier(ClassifierSubject),
    Captioner(CaptionerSubject),
    Vqa(VqaSubject),
    Clip(ClipSubject),
}

impl AnySubject {
    /// [`run`] over the dataset `data`, the outputs written to `out`. `progress` hears (images
    /// done, images).
    pub fn evaluate(&self, data: &Path, options: &Options, out: Option<Outputs>, progress: &mut dyn FnMut(usize, usize)) -> Result<Summary> {
        match self {
            AnySubject::Classifier(s) => evaluate(s, data, options, out, progress),
            AnySubject::Captioner(s) => evaluate(s, data, options, out, progress),
            AnySubject::Vqa(s) => evaluate(s, data, options, out, progress),
            AnySubject::Clip(s) => evaluate(s, data, options, out, progress),
        }
    }
}

/// Checks `options`, runs the evaluation of `subject` on its dataset `data` and writes the
/// outputs to `out` (the failure page shows the examples of lowest quality): results.jsonl as the
/// images are done, then the summary; a shard's outputs are [`crate::shards`]'s.
pub fn evaluate<S: Subject>(subject: &S, data: &Path, options: &Options, out: Option<Outputs>, progress: &mut dyn FnMut(usize, usize)) -> Result<Summary> {
    options.check()?;
    let n = subject.len().min(options.limit);
    if n == 0 {
        return Err(Error::Empty { data: data.to_path_buf(), what: "images" });
    }
    create(out)?;
    let shard = out.and_then(|o| o.shard);
    let k = out.map_or(0, |o| o.failures);
    let mut chosen = Vec::new();
    let mut go = |record: &mut dyn FnMut(&Step) -> Result<()>| {
        run_shard(subject, options, shard.unwrap_or(Shard::ALL), |step| {
            progress(step.done, step.of);
            keep_worst(&mut chosen, (step.result.quality, step.index), k);
            record(&step)
        })
    };
    let Some(o) = out else { return go(&mut |_| Ok(())) };
    let file = o.dir.join(shard.map_or("results.jsonl".into(), |s| s.file_name("results", "jsonl")));
    let summary = streamed(&file, |w| go(&mut |step| crate::shards::write_record(w, step, shard.is_some()).map_err(|source| Error::Io { path: file.clone(), source })))?;
    let segment = options.tasks.contains(&Task::Segmentation).then_some(&options.segment);
    let failures = worst(subject, &chosen, options.method, segment)?;
    let title = format!("{} worst-predicted images of {} ({}, {})", failures.len(), data.display(), subject.kind(), summary.method);
    match shard {
        Some(shard) => {
            let head = ShardHead { shard: shard.to_string(), list: n, images: shard.len_of(n), data: data.to_path_buf(), failures: o.failures, setup: Plan::Maps(Setup::of(subject.kind(), options)) };
            let chosen: Vec<(usize, usize)> = chosen.iter().map(|c| (c.1, 0)).collect();
            crate::shards::finish(o.dir, shard, &head, &chosen, &failures, &title)?
        }
        None => write_summary(o.dir, &summary, &markdown(&summary), (o.failures > 0).then_some((&failures[..], &title[..])))?,
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_writes_its_four_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let image = image::RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]));
        let failure = Failure { name: "a.png".into(), summary: "wrong".into(), quality: 0.1, image, maps: vec![("red".into(), gradcam_core::Map::new(2, 2, vec![0.0, 1.0, 0.5, 0.2]))] };
        write_run(dir.path(), [serde_json::json!({"a": 1}), serde_json::json!({"a": 2})], &serde_json::json!({"n": 2}), "| table |\n", Some((&[failure], "worst"))).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("results.jsonl")).unwrap(), "{\"a\":1}\n{\"a\":2}\n");
        assert!(std::fs::read_to_string(dir.path().join("summary.json")).unwrap().contains("\"n\": 2"));
        assert_eq!(std::fs::read_to_string(dir.path().join("summary.md")).unwrap(), "| table |\n");
        let page = std::fs::read_to_string(dir.path().join("failures/index.html")).unwrap();
        assert!(page.contains("<h1>worst</h1>") && dir.path().join("failures/000_0.png").exists(), "{page}");
    }

    #[test]
    fn names_are_told_apart() {
        assert!(matches!(ModelRef::parse("resnet18").unwrap(), ModelRef::Classifier(_)));
        let dir = tempfile::tempdir().unwrap();
        let err = ModelRef::parse(dir.path().to_str().unwrap()).unwrap_err();
        assert_eq!(err.setting().map(|s| s.settings.clone()), Some(vec!["model"]));
        std::fs::write(dir.path().join("config.json"), r#"{"answers": ["yes"]}"#).unwrap();
        assert!(matches!(ModelRef::parse(dir.path().to_str().unwrap()).unwrap(), ModelRef::Vqa(_)));
        std::fs::write(dir.path().join("config.json"), r#"{"vocab": 10}"#).unwrap();
        let captioner = ModelRef::parse(dir.path().to_str().unwrap()).unwrap();
        let err = captioner.subject(Some("w.pth"), &OnnxOptions::default(), Some("conv4"), dir.path()).err().unwrap();
        assert_eq!(err.to_string(), format!("weights and layer are for classifiers; {} is a model folder", dir.path().display()));
    }
}
