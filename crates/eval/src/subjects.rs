//! The three kinds of model as [`Subject`]s: an ImageNet classifier on a COCO-format set whose
//! category names are ImageNet class names, the captioner (its caption's colour and shape words)
//! and the VQA model (its answers), both on ShapeScenes-format splits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};
use gradcam_captioner::eval::named_objects;
use gradcam_captioner::model::CaptionSplit;
use gradcam_captioner::Captioner;
use gradcam_core::metrics::BoundingBox;
use gradcam_core::{Context, Explainable, Explainer, Explanation, Map, Request, Target};
use gradcam_encoders::preprocess::{load_image, prepare_with, Resize};
use gradcam_encoders::Network;
use gradcam_scenes::coco::{Instance, Instances};
use gradcam_scenes::scene::{COLORS, SHAPES};
use gradcam_scenes::vqa::{Annotation, Question, Vqa as VqaFile};
use gradcam_scenes::Split;
use gradcam_vqa::{Vqa, VqaSplit};
use image::RgbImage;

use crate::{Case, Error, Example, Object, Result, Subject};

pub(crate) fn object(o: &Instance) -> Object {
    Object { bbox: BoundingBox::from_coco(o.bbox), mask: o.mask.clone() }
}

/// Loads an image and checks it against the size its annotations were made on.
pub(crate) fn load_checked(path: &Path, width: u32, height: u32) -> Result<RgbImage> {
    let img = load_image(path)?;
    if img.dimensions() != (width, height) {
        return Err(Error::Data(format!(
            "{} is {}x{} but its annotations say {width}x{height}; the boxes and masks would not line up",
            path.display(),
            img.width(),
            img.height()
        )));
    }
    Ok(img)
}

fn softmax(row: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(candle_nn::ops::softmax(row, D::Minus1)?.to_vec2::<f32>()?)
}

/// One image of a split with everything it is annotated with, owned.
pub(crate) struct Item {
    pub(crate) path: PathBuf,
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) objects: Vec<Instance>,
    pub(crate) questions: Vec<(Question, Annotation)>,
}

pub(crate) fn items(split: &Split) -> Vec<Item> {
    split
        .examples()
        .into_iter()
        .map(|ex| Item {
            path: ex.path.clone(),
            width: ex.image.width,
            height: ex.image.height,
            objects: ex.objects.iter().map(|&o| o.clone()).collect(),
            questions: ex.questions.iter().filter_map(|(q, a)| a.map(|a| ((*q).clone(), a.clone()))).collect(),
        })
        .collect()
}

/// The raw maps of `requests` by `method` on `model`, for the example `ex` (whose input the
/// attention methods read) with the explained layer's `activations`.
pub(crate) fn cams<S>(model: &dyn Explainable, ex: &Example<S>, activations: &Tensor, requests: &[Request<'_>], method: &dyn Explainer) -> Result<Vec<Map>> {
    let cx = Context { model, input: &ex.input, activations, progress: &|_| Ok(()) };
    Ok(method.explain(&cx, requests)?.iter().map(Explanation::cam).collect())
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Each category's class in `net` by name; categories named `cue` (the spurious marks of a biased
/// ShapeScenes set) are not objects and are left out unless the model has such a class.
pub fn category_classes(net: &Network, instances: &Instances, file: &Path) -> Result<BTreeMap<u64, usize>> {
    let names: Vec<String> = (0..net.num_classes()).map(|c| net.label(c)).collect();
    let mut classes = BTreeMap::new();
    for c in &instances.categories {
        match names.iter().position(|n| n.eq_ignore_ascii_case(c.name.trim())) {
            Some(class) => {
                classes.insert(c.id, class);
            }
            None if c.name == "cue" => {}
            None => {
                return Err(Error::UnknownCategory { file: file.to_path_buf(), category: c.name.clone(), imagenet: net.num_classes() == 1000 && !net.has_labels() });
            }
        }
    }
    Ok(classes)
}

/// An ImageNet classifier. The dataset is `DIR/instances.json` (COCO instances; boxes, masks
/// optional) and `DIR/images/`; each category is named by an ImageNet class name (`tabby`,
/// `espresso`) so that its boxes are that class's ground truth. Images are stretched to 224x224 so
/// that the model sees every box.
pub struct ClassifierSubject {
    net: Network,
    layer: usize,
    dir: PathBuf,
    instances: Instances,
    /// ImageNet class of each category id.
    classes: BTreeMap<u64, usize>,
}

pub struct ClassifierState {
    activations: Tensor,
    /// The ImageNet class of each case.
    classes: Vec<usize>,
}

impl ClassifierSubject {
    pub fn new(net: Network, layer: usize, dir: &Path) -> Result<Self> {
        let instances = Instances::read(&dir.join("instances.json"))?;
        let classes = category_classes(&net, &instances, &dir.join("instances.json"))?;
        Ok(Self { net, layer, dir: dir.to_path_buf(), instances, classes })
    }
}

impl Subject for ClassifierSubject {
    type State = ClassifierState;

    fn kind(&self) -> &'static str {
        "classifier"
    }

    fn len(&self) -> usize {
        self.instances.images.len()
    }

    fn example(&self, i: usize) -> Result<Example<ClassifierState>> {
        let info = &self.instances.images[i];
        let path = self.dir.join("images").join(&info.file_name);
        let image = load_checked(&path, info.width, info.height)?;
        let input = prepare_with(&image, Resize::Stretch, self.net.preprocess())?.tensor.unsqueeze(0)?; // [1, 3, h, w]
        let split = self.net.split(self.layer);
        let activations = split.features(&input)?;
        let logits = split.head(&activations)?; // [1, classes]
        let probs = softmax(&logits)?.remove(0);
        if probs.iter().any(|p| !p.is_finite()) {
            return Err(Error::Data("the model produced non-finite scores; are the weights corrupt?".into()));
        }
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut truth: BTreeMap<usize, Vec<Object>> = BTreeMap::new();
        for o in self.instances.annotations.iter().filter(|o| o.image_id == info.id && !o.iscrowd) {
            if let Some(&c) = self.classes.get(&o.category_id) {
                truth.entry(c).or_default().push(object(o));
            }
        }
        let top5 = &order[..5.min(order.len())];
        let mut classes: Vec<usize> = top5.to_vec();
        classes.extend(truth.keys().filter(|c| !top5.contains(c)));
        let name = |c: usize| self.net.label(c);
        let cases = classes
            .iter()
            .map(|&c| {
                let rank = top5.iter().position(|&o| o == c);
                Case { label: name(c), group: "class".into(), objects: truth.get(&c).cloned().unwrap_or_default(), rank, prob: probs[c], primary: rank == Some(0) }
            })
            .collect();
        let truth_names: Vec<String> = truth.keys().map(|&c| name(c)).collect();
        Ok(Example {
            name: info.file_name.clone(),
            image,
            input,
            cases,
            quality: truth.keys().map(|&c| probs[c] as f64).fold(0.0, f64::max),
            summary: format!("top-1 {} (p {:.2}); truth: {}", name(order[0]), probs[order[0]], truth_names.join(", ")),
            state: ClassifierState { activations, classes },
        })
    }

    fn maps(&self, ex: &Example<ClassifierState>, method: &dyn Explainer) -> Result<Vec<Map>> {
        let classes: Vec<Target> = ex.state.classes.iter().map(|&c| Target::class(c)).collect();
        let requests: Vec<Request> = classes.iter().map(|target| Request { image: 0, target }).collect();
        cams(&self.net.split(self.layer), ex, &ex.state.activations, &requests, method)
    }

    fn scores(&self, ex: &Example<ClassifierState>, inputs: &Tensor) -> Result<Vec<Vec<(f32, f32)>>> {
        let logits = self.net.forward(inputs)?; // [n, classes]
        let probs = softmax(&logits)?;
        let logits = logits.to_vec2::<f32>()?;
        Ok(logits.iter().zip(&probs).map(|(l, p)| ex.state.classes.iter().map(|&c| (l[c], p[c])).collect()).collect())
    }
}

/// The captioner: each colour or shape word of its greedy caption is a case; its objects are the
/// image's objects of that colour and shape (the word's neighbour in "red circle" narrows it).
pub struct CaptionerSubject {
    model: Captioner,
    items: Vec<Item>,
    split: Split,
}

pub struct CaptionerState {
    tokens: Vec<u32>,
    activations: Tensor,
    /// The word position of each case.
    steps: Vec<usize>,
}

impl CaptionerSubject {
    pub fn new(model: Captioner, dir: &Path) -> Result<Self> {
        let split = Split::read(dir)?;
        Ok(Self { model, items: items(&split), split })
    }
}

impl Subject for CaptionerSubject {
    type State = CaptionerState;

    fn kind(&self) -> &'static str {
        "captioner"
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn example(&self, i: usize) -> Result<Example<CaptionerState>> {
        let item = &self.items[i];
        let image = load_checked(&item.path, item.width, item.height)?;
        let input = self.model.preprocess(&image)?.unsqueeze(0)?;
        let activations = self.model.features(&input)?;
        let caption = self.model.greedy(&activations)?.remove(0);
        let words = &caption.words;
        let shape_of = |o: &Instance| self.split.instances.category_name(o.category_id).unwrap_or("");
        let (mut cases, mut steps) = (Vec::new(), Vec::new());
        for (t, word) in words.iter().enumerate() {
            let (group, color, shape) = if COLORS.contains(&word.as_str()) {
                ("color", Some(word.as_str()), words.get(t + 1).map(String::as_str).filter(|w| SHAPES.contains(w)))
            } else if SHAPES.contains(&word.as_str()) {
                ("shape", t.checked_sub(1).map(|p| words[p].as_str()).filter(|w| COLORS.contains(w)), Some(word.as_str()))
            } else {
                continue;
            };
            let objects = item
                .objects
                .iter()
                .filter(|o| color.is_none_or(|c| o.color.as_deref() == Some(c)) && shape.is_none_or(|s| shape_of(o) == s))
                .map(object)
                .collect();
            cases.push(Case { label: word.clone(), group: group.into(), objects, rank: None, prob: caption.logprobs[t].exp(), primary: true });
            steps.push(t);
        }
        let truth: BTreeSet<(String, String)> = item.objects.iter().map(|o| (o.color.clone().unwrap_or_default(), shape_of(o).to_string())).collect();
        let named = named_objects(words);
        let union = named.union(&truth).count();
        Ok(Example {
            name: file_name(&item.path),
            image,
            input,
            cases,
            // Jaccard overlap of the named (colour, shape) pairs with the true ones.
            quality: if union == 0 { 1.0 } else { named.intersection(&truth).count() as f64 / union as f64 },
            summary: format!(
                "\"{}\"; objects: {}",
                words.join(" "),
                truth.iter().map(|(c, s)| format!("{c} {s}")).collect::<Vec<_>>().join(", ")
            ),
            state: CaptionerState { tokens: caption.tokens.clone(), activations, steps },
        })
    }

    fn maps(&self, ex: &Example<CaptionerState>, method: &dyn Explainer) -> Result<Vec<Map>> {
        if ex.cases.is_empty() {
            return Ok(Vec::new());
        }
        let targets: Vec<Target> = ex.state.steps.iter().map(|&t| Target::word(t)).collect();
        let requests: Vec<Request> = targets.iter().map(|target| Request { image: 0, target }).collect();
        cams(&CaptionSplit::new(&self.model, &ex.state.tokens), ex, &ex.state.activations, &requests, method)
    }

    fn scores(&self, ex: &Example<CaptionerState>, inputs: &Tensor) -> Result<Vec<Vec<(f32, f32)>>> {
        if ex.cases.is_empty() {
            return Ok(vec![Vec::new(); inputs.dim(0)?]);
        }
        let a = self.model.features(inputs)?;
        let logp = self.model.word_logprobs(&a, &ex.state.tokens, false)?.to_vec2::<f32>()?; // [n, words]
        Ok(logp.iter().map(|row| ex.state.steps.iter().map(|&t| (row[t], row[t].exp())).collect()).collect())
    }
}

/// The VQA model: each annotated question's predicted answer is a case, grouped by question type;
/// its object is the question's `evidence` when that is one object.
pub struct VqaSubject {
    model: Vqa,
    items: Vec<Item>,
}

pub struct VqaState {
    activations: Tensor,
    /// Per case: the encoded question and the predicted answer.
    questions: Vec<(Tensor, usize)>,
}

impl VqaSubject {
    pub fn new(model: Vqa, dir: &Path) -> Result<Self> {
        let split = Split::read(dir)?;
        if split.vqa.as_ref().is_none_or(|v| v.annotations.is_empty()) {
            return Err(Error::Data(format!("{} has no questions.json with annotations.json: nothing to evaluate a VQA model on", dir.display())));
        }
        Ok(Self { model, items: items(&split) })
    }
}

impl Subject for VqaSubject {
    type State = VqaState;

    fn kind(&self) -> &'static str {
        "vqa"
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn example(&self, i: usize) -> Result<Example<VqaState>> {
        let item = &self.items[i];
        let image = load_checked(&item.path, item.width, item.height)?;
        let input = self.model.preprocess(&image)?.unsqueeze(0)?;
        let activations = self.model.features(&input)?;
        let (mut cases, mut questions, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
        let mut accuracy = 0.0;
        for (q, ann) in &item.questions {
            let encoded = self.model.encode(&self.model.question(&q.question)?)?;
            let logits = self.model.logits(&activations, &encoded)?;
            let (answer, prob) = self.model.top_answers(&logits, 1)?[0];
            let text = &self.model.cfg.answers[answer];
            let acc = VqaFile::accuracy(ann, text);
            accuracy += acc;
            if acc < 1.0 {
                wrong.push(format!("{} {text} (truth {})", q.question, ann.multiple_choice_answer));
            }
            let evidence: Vec<&Instance> = ann.evidence.iter().flatten().filter_map(|id| item.objects.iter().find(|o| o.id == *id)).collect();
            let objects = if evidence.len() == 1 { vec![object(evidence[0])] } else { Vec::new() };
            let group = ann.question_type.clone().unwrap_or_else(|| ann.answer_type.clone());
            cases.push(Case { label: format!("{} {text}", q.question), group, objects, rank: None, prob, primary: true });
            questions.push((encoded, answer));
        }
        let n = item.questions.len();
        Ok(Example {
            name: file_name(&item.path),
            image,
            input,
            cases,
            quality: if n == 0 { 1.0 } else { accuracy / n as f64 },
            summary: if wrong.is_empty() { format!("{n} questions, all answered right") } else { format!("wrong: {}", wrong.join("; ")) },
            state: VqaState { activations, questions },
        })
    }

    fn maps(&self, ex: &Example<VqaState>, method: &dyn Explainer) -> Result<Vec<Map>> {
        let mut maps = Vec::with_capacity(ex.cases.len());
        for (q, answer) in &ex.state.questions {
            let split = VqaSplit { model: &self.model, question: q.clone() };
            let target = Target::answer(*answer);
            maps.extend(cams(&split, ex, &ex.state.activations, &[Request { image: 0, target: &target }], method)?);
        }
        Ok(maps)
    }

    fn scores(&self, ex: &Example<VqaState>, inputs: &Tensor) -> Result<Vec<Vec<(f32, f32)>>> {
        let n = inputs.dim(0)?;
        let a = self.model.features(inputs)?;
        let mut out = vec![Vec::with_capacity(ex.cases.len()); n];
        for (q, answer) in &ex.state.questions {
            let logits = self.model.logits(&a, q)?; // [n, answers]
            let probs = softmax(&logits)?;
            for (r, (l, p)) in logits.to_vec2::<f32>()?.iter().zip(&probs).enumerate() {
                out[r].push((l[*answer], p[*answer]));
            }
        }
        Ok(out)
    }
}
