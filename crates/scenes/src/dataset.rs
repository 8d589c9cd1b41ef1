//! Writing ShapeScenes splits as COCO captions, COCO instances and VQA v2 files, and reading any
//! split in those formats back as one joined, cross-checked dataset.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;
use serde_json::json;

use crate::coco::{Caption, Captions, Category, ImageInfo, Instance, Instances};
use crate::rle::encode_counts;
use crate::scene::{generate, generate_biased, Bias, Scene, SHAPES};
use crate::vqa::{Annotation, Question, Vqa};
use crate::{Error, Result};

pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// The category id of spurious cues in a biased classification set (name `cue`; never a class).
pub const CUE_CATEGORY: u64 = 4;

/// What to generate.
#[derive(Debug, Clone)]
pub struct Config {
    /// Scenes in all splits together.
    pub n: usize,
    pub seed: u64,
    /// Fractions of train, val and test (normalised).
    pub fractions: [f64; 3],
    /// Image side in pixels, 64 to 128.
    pub size: u32,
    /// The classification variant with a spurious cue (one object per scene).
    pub bias: Option<Bias>,
}

impl Default for Config {
    fn default() -> Self {
        Config { n: 1000, seed: 0, fractions: [0.8, 0.1, 0.1], size: 64, bias: None }
    }
}

/// Most scenes one dataset holds: ten times COCO's images. Its annotation files are built in
/// memory (about 2 KB a scene) and each scene is a file, so a count from a typo (`--n 2^64-1`)
/// would fill the disk and the memory before failing.
pub const MAX_SCENES: usize = 3_000_000;

/// The scene ids of each split: consecutive ranges, train first.
pub fn split_ranges(n: usize, fractions: [f64; 3]) -> Result<[std::ops::Range<usize>; 3]> {
    let total: f64 = fractions.iter().sum();
    if fractions.iter().any(|f| !(f.is_finite() && *f >= 0.0)) || total <= 0.0 {
        return Err(Error::Config(format!("split fractions {fractions:?} must be non-negative and not all zero")));
    }
    let train = (n as f64 * fractions[0] / total).round() as usize;
    let val = ((n as f64 * fractions[1] / total).round() as usize).min(n - train);
    Ok([0..train, train..train + val, train + val..n])
}

/// Instance annotation id of object `k` of scene `id` (unique within a dataset).
pub fn instance_id(scene: u64, k: usize) -> u64 {
    scene * 4 + k as u64 + 1
}

fn file_name(id: u64) -> String {
    format!("{id:06}.png")
}

/// Generates the dataset into `out/{train,val,test}/` (`images/*.png`, `captions.json`,
/// `instances.json`, `questions.json`, `annotations.json`). `progress` is called once per
/// scene written. The same config gives byte-identical files.
pub fn write(out: &Path, cfg: &Config, progress: &(dyn Fn() + Sync)) -> Result<[usize; 3]> {
    if !(64..=128).contains(&cfg.size) {
        return Err(Error::Config(format!("image size {} is outside 64..=128", cfg.size)));
    }
    if cfg.n > MAX_SCENES {
        return Err(Error::Config(format!("{} scenes: a dataset holds at most {MAX_SCENES} (about 2 KB of annotations in memory and a PNG file each)", cfg.n)));
    }
    let ranges = split_ranges(cfg.n, cfg.fractions)?;
    let mut counts = [0; 3];
    for (s, range) in ranges.into_iter().enumerate() {
        let dir = out.join(SPLITS[s]);
        let images = dir.join("images");
        gradcam_io::create_dir_all(&images)?;
        let scenes: Vec<Scene> = range
            .clone()
            .into_par_iter()
            .map(|id| {
                let scene = match cfg.bias {
                    None => generate(cfg.seed, id as u64, cfg.size),
                    Some(b) => generate_biased(cfg.seed, id as u64, cfg.size, b.cue, if s == 2 { Bias::TEST_P } else { b.p }),
                };
                let mut png = Vec::new();
                scene
                    .image
                    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .map_err(|e| Error::Config(format!("encoding scene {id}: {e}")))?;
                crate::write_atomic(&images.join(file_name(id as u64)), &png)?;
                progress();
                Ok(scene)
            })
            .collect::<Result<_>>()?;
        write_split(&dir, SPLITS[s], cfg, &scenes)?;
        counts[s] = scenes.len();
    }
    Ok(counts)
}

#[derive(Serialize)]
struct InstanceJson {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    area: f64,
    iscrowd: u8,
    segmentation: serde_json::Value,
    color: &'static str,
    size: &'static str,
}

fn write_split(dir: &Path, split: &str, cfg: &Config, scenes: &[Scene]) -> Result<()> {
    let mut info = json!({"description": "ShapeScenes: synthetic scenes with ground-truth masks, captions and questions",
                      "version": "1.0", "seed": cfg.seed, "split": split, "generator": concat!("gradcam-scenes ", env!("CARGO_PKG_VERSION"))});
    if let Some(b) = cfg.bias {
        // What the cue means, so that a reader of the files can tell (see `Bias`).
        info["bias"] = json!({"cue": b.cue.name(), "p": if split == "test" { Bias::TEST_P } else { b.p }, "cue_colors": crate::scene::CUE_COLORS, "classes": SHAPES});
    }
    let images: Vec<ImageInfo> = scenes.iter().map(|s| ImageInfo { id: s.id, file_name: file_name(s.id), width: cfg.size, height: cfg.size }).collect();
    let captions: Vec<Caption> = scenes
        .iter()
        .flat_map(|s| s.captions.iter().enumerate().map(move |(k, c)| Caption { id: s.id * 8 + k as u64 + 1, image_id: s.id, caption: c.clone() }))
        .collect();
    crate::json::write(&dir.join("captions.json"), &json!({"info": info, "licenses": [], "images": images, "annotations": captions}))?;

    let mut categories: Vec<Category> = SHAPES.iter().enumerate().map(|(i, s)| Category { id: i as u64 + 1, name: s.to_string(), supercategory: "shape".into() }).collect();
    if cfg.bias.is_some() {
        categories.push(Category { id: CUE_CATEGORY, name: "cue".into(), supercategory: "cue".into() });
    }
    let instances: Vec<InstanceJson> = scenes
        .iter()
        .flat_map(|s| {
            s.objects.iter().enumerate().map(move |(k, o)| InstanceJson {
                id: instance_id(s.id, k),
                image_id: s.id,
                category_id: o.shape as u64 + 1,
                bbox: o.mask.bbox(),
                area: o.mask.area() as f64,
                iscrowd: 0,
                segmentation: json!({"size": [o.mask.height, o.mask.width], "counts": encode_counts(&o.mask.to_counts())}),
                color: o.color_name(),
                size: o.size_name(),
            })
            .chain(s.cue.iter().map(move |c| InstanceJson {
                id: instance_id(s.id, s.objects.len()),
                image_id: s.id,
                category_id: CUE_CATEGORY,
                bbox: c.mask.bbox(),
                area: c.mask.area() as f64,
                iscrowd: 0,
                segmentation: json!({"size": [c.mask.height, c.mask.width], "counts": encode_counts(&c.mask.to_counts())}),
                color: c.color_name(),
                size: "small",
            }))
        })
        .collect();
    crate::json::write(
        &dir.join("instances.json"),
        &json!({"info": info, "licenses": [], "images": images, "categories": categories, "annotations": instances}),
    )?;

    let mut questions = Vec::new();
    let mut annotations = Vec::new();
    for s in scenes {
        for (k, q) in s.questions.iter().enumerate() {
            let question_id = s.id * 8 + k as u64 + 1;
            questions.push(json!({"image_id": s.id, "question": q.question, "question_id": question_id}));
            let answers: Vec<_> = (1..=10).map(|i| json!({"answer": q.answer, "answer_confidence": "yes", "answer_id": i})).collect();
            let evidence: Vec<u64> = q.evidence.iter().map(|&o| instance_id(s.id, o)).collect();
            annotations.push(json!({"question_type": q.question_type, "multiple_choice_answer": q.answer, "answers": answers,
                                    "image_id": s.id, "answer_type": q.answer_type, "question_id": question_id, "evidence": evidence}));
        }
    }
    let common = |key: &str, items: Vec<serde_json::Value>| {
        json!({"info": info, "license": {"name": "CC0"}, "task_type": "Open-Ended", "data_type": "shapescenes", "data_subtype": split, key: items})
    };
    crate::json::write(&dir.join("questions.json"), &common("questions", questions))?;
    crate::json::write(&dir.join("annotations.json"), &common("annotations", annotations))
}

/// One image of a split with everything known about it.
#[derive(Debug, Clone)]
pub struct Example<'a> {
    pub image: &'a ImageInfo,
    pub path: PathBuf,
    pub captions: Vec<&'a str>,
    pub objects: Vec<&'a Instance>,
    pub questions: Vec<(&'a Question, Option<&'a Annotation>)>,
}

/// A split read back from its files (any dataset in these formats): `instances.json` always; the
/// captions file is optional for datasets without captions, the questions files for datasets
/// without VQA.
#[derive(Debug, Clone)]
pub struct Split {
    pub dir: PathBuf,
    /// `captions.json`, when the split has one ([`Split::captions`] for those who need it).
    pub captions: Option<Captions>,
    pub instances: Instances,
    pub vqa: Option<Vqa>,
}

impl Split {
    /// Reads `dir/{captions,instances,questions,annotations}.json` (captions and questions when
    /// present), checking that the files agree on their images and that every `evidence` id is an
    /// object of the question's image.
    pub fn read(dir: &Path) -> Result<Self> {
        let instances = Instances::read(&dir.join("instances.json"))?;
        let captions_file = dir.join("captions.json");
        let captions = if captions_file.exists() { Some(Captions::read(&captions_file)?) } else { None };
        let image_ids: HashSet<u64> = instances.images.iter().map(|i| i.id).collect();
        if let Some(c) = captions.iter().flat_map(|c| &c.images).find(|i| !image_ids.contains(&i.id)) {
            return Err(Error::Field {
                file: dir.join("captions.json"),
                record: format!("images (id {})", c.id),
                field: "id".into(),
                message: format!("image {} is not in instances.json", c.id),
            });
        }
        let questions = dir.join("questions.json");
        let vqa = if questions.exists() {
            let ann = dir.join("annotations.json");
            let vqa = Vqa::read(&questions, ann.exists().then_some(ann.as_path()), Some(&image_ids))?;
            let object_image: HashMap<u64, u64> = instances.annotations.iter().map(|a| (a.id, a.image_id)).collect();
            for a in &vqa.annotations {
                for e in a.evidence.iter().flatten() {
                    if object_image.get(e) != Some(&a.image_id) {
                        return Err(Error::Field {
                            file: ann.clone(),
                            record: format!("annotations (question_id {})", a.question_id),
                            field: "evidence".into(),
                            message: format!("object {e} is not an object of image {} in instances.json", a.image_id),
                        });
                    }
                }
            }
            Some(vqa)
        } else {
            None
        };
        Ok(Split { dir: dir.to_path_buf(), captions, instances, vqa })
    }

    /// The captions, for a use that needs them (`why`, as in "the captioner trains on captions"):
    /// an error naming the missing file when the split has none.
    pub fn captions(&self, why: &str) -> Result<&Captions> {
        self.captions.as_ref().ok_or_else(|| Error::Config(format!("{} does not exist: {why}", self.dir.join("captions.json").display())))
    }

    /// Every image with its captions (none without a captions file), objects and questions, in
    /// `instances.json` order.
    pub fn examples(&self) -> Vec<Example<'_>> {
        let captions = self.captions.as_ref().map(Captions::by_image).unwrap_or_default();
        let mut objects: HashMap<u64, Vec<&Instance>> = HashMap::new();
        for a in &self.instances.annotations {
            objects.entry(a.image_id).or_default().push(a);
        }
        let mut questions: HashMap<u64, Vec<(&Question, Option<&Annotation>)>> = HashMap::new();
        if let Some(vqa) = &self.vqa {
            let ann: HashMap<u64, &Annotation> = vqa.annotations.iter().map(|a| (a.question_id, a)).collect();
            for q in &vqa.questions {
                questions.entry(q.image_id).or_default().push((q, ann.get(&q.question_id).copied()));
            }
        }
        self.instances
            .images
            .iter()
            .map(|image| Example {
                image,
                path: self.dir.join("images").join(&image.file_name),
                captions: captions.get(&image.id).cloned().unwrap_or_default(),
                objects: objects.remove(&image.id).unwrap_or_default(),
                questions: questions.remove(&image.id).unwrap_or_default(),
            })
            .collect()
    }

}
