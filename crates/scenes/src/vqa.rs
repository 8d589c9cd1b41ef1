//! VQA v2 questions and annotations files: readers for any such file (ours and anyone's), with
//! checked references, and our `evidence` extension (the COCO annotation ids a correct answer
//! depends on).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::json::{read, Record};
use crate::{Error, Result};

/// The image files of a folder by the number at the end of their name (`000123.png`,
/// `COCO_val2014_000000000123.jpg`), as VQA v2's questions name images. Two files with the same
/// number are an error: which one a question means would be a guess.
pub fn images_by_id(dir: &Path) -> Result<HashMap<u64, PathBuf>> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut m: HashMap<u64, PathBuf> = HashMap::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let digits: String = stem.chars().rev().take_while(char::is_ascii_digit).collect::<Vec<_>>().into_iter().rev().collect();
        let Ok(id) = digits.parse() else { continue };
        if let Some(other) = m.insert(id, p.clone()) {
            return Err(Error::Config(format!("{} and {} both end in image id {id}; keep one of them in {}", other.display(), p.display(), dir.display())));
        }
    }
    Ok(m)
}

/// An entry of a questions file.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub question_id: u64,
    pub image_id: u64,
    pub question: String,
}

/// An entry of an annotations file.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    pub question_id: u64,
    pub image_id: u64,
    pub question_type: Option<String>,
    pub answer_type: String,
    pub multiple_choice_answer: String,
    /// The annotators' answers (ten in VQA v2).
    pub answers: Vec<String>,
    /// ShapeScenes' extension; `None` in other datasets.
    pub evidence: Option<Vec<u64>>,
}

/// A questions file with, optionally, its annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct Vqa {
    pub questions: Vec<Question>,
    pub annotations: Vec<Annotation>,
}

impl Vqa {
    /// Reads `questions` and, if given, `annotations`, checking that every annotation answers a
    /// question of the same image, and (when `image_ids` is given) that every question's image
    /// exists.
    pub fn read(questions: &Path, annotations: Option<&Path>, image_ids: Option<&HashSet<u64>>) -> Result<Self> {
        let root = read(questions)?;
        let mut seen = HashMap::new();
        let qs: Vec<Question> = Record::list(questions, &root, "questions")?
            .iter()
            .map(|r| {
                let q = Question { question_id: r.u64("question_id")?, image_id: r.u64("image_id")?, question: r.str("question")?.to_string() };
                if let Some(ids) = image_ids {
                    if !ids.contains(&q.image_id) {
                        return Err(r.err("image_id", format!("image {} is not in the image list", q.image_id)));
                    }
                }
                if seen.insert(q.question_id, q.image_id).is_some() {
                    return Err(r.err("question_id", format!("question {} appears twice", q.question_id)));
                }
                Ok(q)
            })
            .collect::<Result<_>>()?;
        let mut anns = Vec::new();
        if let Some(path) = annotations {
            let root = read(path)?;
            for r in Record::list(path, &root, "annotations")? {
                let question_id = r.u64("question_id")?;
                let image_id = r.u64("image_id")?;
                match seen.get(&question_id) {
                    None => return Err(r.err("question_id", format!("question {question_id} is not in {}", questions.display()))),
                    Some(&img) if img != image_id => {
                        return Err(r.err("image_id", format!("question {question_id} is about image {img}, not {image_id}")))
                    }
                    _ => {}
                }
                let answers = r
                    .field("answers")?
                    .as_array()
                    .ok_or_else(|| r.err("answers", "must be an array"))?
                    .iter()
                    .map(|a| a.get("answer").and_then(|v| v.as_str()).map(str::to_string).ok_or_else(|| r.err("answers", "each answer needs an `answer` string")))
                    .collect::<Result<_>>()?;
                anns.push(Annotation {
                    question_id,
                    image_id,
                    question_type: r.opt_str("question_type")?,
                    answer_type: r.str("answer_type")?.to_string(),
                    multiple_choice_answer: r.str("multiple_choice_answer")?.to_string(),
                    answers,
                    evidence: if r.opt("evidence").is_some() { Some(r.u64s("evidence")?) } else { None },
                });
            }
        }
        Ok(Vqa { questions: qs, annotations: anns })
    }

    /// The running VQA accuracy of answers to this file's questions, overall and per question type
    /// (or answer type when the annotations have none).
    pub fn tally(&self) -> Tally<'_> {
        Tally { annotations: self.annotations.iter().map(|a| (a.question_id, a)).collect(), per_type: Default::default() }
    }

    /// VQA accuracy of one predicted answer: min(#annotators who gave it / 3, 1).
    pub fn accuracy(annotation: &Annotation, predicted: &str) -> f64 {
        let n = annotation.answers.iter().filter(|a| a.as_str() == predicted).count();
        (n as f64 / 3.0).min(1.0)
    }
}

/// VQA accuracy of answers as they come ([`Vqa::tally`]).
pub struct Tally<'a> {
    annotations: HashMap<u64, &'a Annotation>,
    per_type: std::collections::BTreeMap<String, (usize, f64)>,
}

impl Tally<'_> {
    /// Counts `answer` to question `question_id` (nothing when it has no annotation).
    pub fn add(&mut self, question_id: u64, answer: &str) {
        let Some(a) = self.annotations.get(&question_id) else { return };
        let accuracy = Vqa::accuracy(a, answer);
        for key in ["overall".to_string(), a.question_type.clone().unwrap_or_else(|| a.answer_type.clone())] {
            let e = self.per_type.entry(key).or_default();
            e.0 += 1;
            e.1 += accuracy;
        }
    }

    /// (`overall` or the type, questions, mean accuracy), by name.
    pub fn rows(&self) -> impl Iterator<Item = (&str, usize, f64)> {
        self.per_type.iter().map(|(k, &(n, sum))| (k.as_str(), n, sum / n as f64))
    }
}
