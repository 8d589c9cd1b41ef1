//! The VQA model on one image and question: the top answers and every method's map of the
//! predicted answer (and any other asked for), with their counterfactuals, as `gradcam vqa --json`
//! prints them.

use gradcam_core::map::Region;
use crate::pipeline::render::{fit, render, write_method_strips, Subject};
use gradcam_core::{Target, UnitNames};
use gradcam_vqa::{Vqa, VqaSplit};
use image::RgbImage;
use serde::Serialize;

use super::{named_report, Files, MapRecord, Progress, Result, Settings};

/// What to answer and explain.
#[derive(Debug, Clone)]
pub struct Options {
    /// Also explain these answers ("why would it say yellow?").
    pub answers: Vec<String>,
    /// Also explain each answer's counterfactual.
    pub counterfactual: bool,
    /// How many answers to report.
    pub top_k: usize,
    /// Methods and smoothing.
    pub settings: Settings,
}

impl Default for Options {
    fn default() -> Self {
        Options { answers: Vec::new(), counterfactual: false, top_k: 3, settings: Settings::default() }
    }
}

/// One answer and its probability.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The answer.
    pub answer: String,
    /// Its softmax probability.
    pub prob: f32,
}

/// One map of one answer.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerMap {
    /// The answer explained.
    pub answer: String,
    /// The map.
    #[serde(flatten)]
    pub map: MapRecord,
}

/// The record of one question.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The image's name (its path).
    pub image: String,
    /// The question as asked.
    pub question: String,
    /// The top answers.
    pub answers: Vec<Answer>,
    /// Every method's map of every explained answer, method by method.
    pub explanations: Vec<AnswerMap>,
    /// Words the model does not know (read as `<unk>`).
    pub unknown_words: Vec<String>,
    /// Whether the question was cut to the model's maximum length.
    pub truncated: bool,
}

/// Answers `question` about `img` and explains the answers, writing the pictures to `files`;
/// with `names`, each map gets its neuron report.
#[allow(clippy::too_many_arguments)]
pub fn answer(model: &Vqa, img: &RgbImage, name: &str, question: &str, files: Files<'_>, options: &Options, names: Option<&UnitNames>, progress: Option<&Progress>) -> Result<Record> {
    let q = model.question(question)?;
    let input = model.preprocess(img)?.unsqueeze(0)?;
    let a = model.features(&input)?;
    let split = VqaSplit { model, question: model.encode(&q)? };
    let logits = model.logits(&a, &split.question)?;
    let top = model.top_answers(&logits, options.top_k.max(1))?;
    let mut explained = vec![top[0].0];
    for name in &options.answers {
        let i = model.answer_index(name)?;
        if !explained.contains(&i) {
            explained.push(i);
        }
    }
    let subjects: Vec<Subject> = explained.iter().flat_map(|&i| Subject::new(Target::answer(i), model.cfg.answers[i].clone()).and_counterfactual(options.counterfactual)).collect();
    let (picture_base, region) = fit(img, Region { x: 0, y: 0, width: img.width(), height: img.height() });
    let out = files.output(&picture_base, region);
    let neurons = names.map(named_report);
    let cam = options.settings.cam(&split, progress);
    let rendered = render(&cam, &options.settings.methods, &input, &a, &subjects, &out, neurons.as_ref().map(|f| f as _))?;
    if options.settings.methods.len() > 1 {
        write_method_strips(&rendered, &subjects, &out, picture_base.height().max(64))?;
    }
    let explanations = rendered.iter().flatten().map(|r| Ok(AnswerMap { answer: model.cfg.answers[r.explanation.target.index().expect("an answer")].clone(), map: MapRecord::new(r)? }));
    Ok(Record {
        image: name.to_string(),
        question: question.to_string(),
        answers: top.iter().map(|&(i, p)| Answer { answer: model.cfg.answers[i].clone(), prob: p }).collect(),
        explanations: explanations.collect::<Result<_>>()?,
        unknown_words: q.unknown,
        truncated: q.truncated,
    })
}

/// One question of a batch ([`batch`]), answered or not.
pub struct Answered<'a> {
    /// The question.
    pub question: &'a gradcam_scenes::vqa::Question,
    /// Its image.
    pub image: &'a std::path::Path,
    /// The stem of its files.
    pub stem: String,
    /// Its record, or why there is none.
    pub record: Result<Record>,
}

/// Answers and explains every question of the VQA v2 questions file `questions` about the images
/// of the folder `images` (matched by the number at the end of their file names, each decoded
/// once for its run of questions), the pictures written to `dir` with the stem
/// `q{question_id}_{image stem}` (made unique by `stems`). `each` hears every question (and the
/// number of questions); a question that fails does not stop the others. Returns the VQA
/// accuracy per question type and overall, from `annotations` when given.
#[allow(clippy::too_many_arguments)]
pub fn batch(
    model: &Vqa,
    (questions, annotations, images): (&std::path::Path, Option<&std::path::Path>, &std::path::Path),
    dir: &std::path::Path,
    options: &Options,
    names: Option<&UnitNames>,
    progress: Option<&Progress>,
    stems: &mut super::render::Stems,
    each: &mut dyn FnMut(Answered<'_>, usize),
) -> Result<Vec<(String, usize, f64)>> {
    let file = gradcam_scenes::vqa::Vqa::read(questions, annotations, None)?;
    let files = gradcam_scenes::vqa::images_by_id(images)?;
    let mut tally = file.tally();
    let mut cache: Option<(u64, RgbImage)> = None;
    for q in &file.questions {
        let Some(path) = files.get(&q.image_id) else {
            let record = Err(super::Error::Request(format!("no image for image_id {} in {}", q.image_id, images.display())));
            each(Answered { question: q, image: images, stem: String::new(), record }, file.questions.len());
            continue;
        };
        let stem = stems.unique(std::path::Path::new(&format!("q{}_{}", q.question_id, path.file_stem().unwrap_or_default().to_string_lossy())));
        let record = (|| {
            if cache.as_ref().map(|c| c.0) != Some(q.image_id) {
                cache = Some((q.image_id, gradcam_encoders::preprocess::load_image(path)?));
            }
            let img = &cache.as_ref().expect("just set").1;
            answer(model, img, &path.display().to_string(), &q.question, Files::new(dir, &stem), options, names, progress)
        })();
        if let Ok(r) = &record {
            tally.add(q.question_id, &r.answers[0].answer);
        }
        each(Answered { question: q, image: path, stem, record }, file.questions.len());
    }
    Ok(tally.rows().map(|(k, n, a)| (k.to_string(), n, a)).collect())
}
