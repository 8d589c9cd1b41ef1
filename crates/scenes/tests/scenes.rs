//! ShapeScenes: round trip through the COCO / VQA files, determinism, captions and answers
//! recomputed from the instances alone, pycocotools-compatible RLE, malformed files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use gradcam_scenes::coco::{Instance, Instances};
use gradcam_scenes::dataset::{instance_id, split_ranges, write, SPLITS};
use gradcam_scenes::rle::{decode_counts, encode_counts, Mask};
use gradcam_scenes::scene::{generate, COLORS, SHAPES};
use gradcam_scenes::{Config, Split};
use serde_json::{json, Value};

/// A file of the repository (the committed ShapeScenes sample and the pycocotools fixtures).
fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn make(dir: &Path, n: usize, seed: u64) -> Config {
    let cfg = Config { n, seed, fractions: [0.6, 0.2, 0.2], size: 64, bias: None };
    write(dir, &cfg, &|| {}).unwrap();
    cfg
}

#[test]
fn round_trip_matches_the_generated_scenes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = make(dir.path(), 40, 7);
    let ranges = split_ranges(cfg.n, cfg.fractions).unwrap();
    for (s, range) in SPLITS.iter().zip(ranges) {
        let split = Split::read(&dir.path().join(s)).unwrap();
        let examples = split.examples();
        assert_eq!(examples.len(), range.len());
        for (ex, id) in examples.iter().zip(range) {
            let scene = generate(cfg.seed, id as u64, cfg.size);
            assert_eq!(ex.image.id, id as u64);
            let img = image::open(&ex.path).unwrap().to_rgb8();
            assert_eq!(img, scene.image, "pixels of scene {id}");
            assert_eq!(ex.captions, scene.captions.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(ex.objects.len(), scene.objects.len());
            for (k, (read, made)) in ex.objects.iter().zip(&scene.objects).enumerate() {
                assert_eq!(read.id, instance_id(id as u64, k));
                assert_eq!(read.mask, made.mask, "mask of object {k} of scene {id}");
                assert_eq!(read.bbox, made.mask.bbox());
                assert_eq!(read.area, made.mask.area() as f64);
                assert_eq!(split.instances.category_name(read.category_id), Some(made.shape_name()));
                assert_eq!(read.color.as_deref(), Some(made.color_name()));
                assert_eq!(read.size.as_deref(), Some(made.size_name()));
            }
            assert_eq!(ex.questions.len(), scene.questions.len());
            for ((q, a), made) in ex.questions.iter().zip(&scene.questions) {
                let a = a.expect("every question is annotated");
                assert_eq!(q.question, made.question);
                assert_eq!(a.multiple_choice_answer, made.answer);
                assert_eq!(a.answers.len(), 10);
                let evidence: Vec<u64> = made.evidence.iter().map(|&o| instance_id(id as u64, o)).collect();
                assert_eq!(a.evidence.as_ref(), Some(&evidence));
            }
        }
    }
}

#[test]
fn the_same_seed_gives_byte_identical_files() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make(a.path(), 25, 3);
    make(b.path(), 25, 3);
    let files = |root: &Path| -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for s in SPLITS {
            for sub in ["", "images"] {
                for e in std::fs::read_dir(root.join(s).join(sub)).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_file() {
                        out.insert(p.strip_prefix(root).unwrap().display().to_string(), std::fs::read(&p).unwrap());
                    }
                }
            }
        }
        out
    };
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(fa.len(), 25 + 3 * 4);
    assert!(fa == fb, "the two runs differ");
    let c = tempfile::tempdir().unwrap();
    make(c.path(), 25, 4);
    assert_ne!(files(c.path()), fa, "another seed gives another dataset");
}

/// Spatial relation of two objects from their COCO boxes alone.
fn relation(a: &Instance, b: &Instance) -> &'static str {
    let centre = |i: &Instance| (i.bbox[0] + i.bbox[2] / 2.0, i.bbox[1] + i.bbox[3] / 2.0);
    let ((ax, ay), (bx, by)) = (centre(a), centre(b));
    let (dx, dy) = (ax - bx, ay - by);
    match (dx.abs() >= dy.abs(), dx < 0.0, dy < 0.0) {
        (true, true, _) => "left of",
        (true, false, _) => "right of",
        (false, _, true) => "above",
        _ => "below",
    }
}

/// The answer to a question, computed from the instances file alone.
fn answer(question: &str, objects: &[&Instance], instances: &Instances) -> String {
    let shape = |o: &Instance| instances.category_name(o.category_id).unwrap().to_string();
    let color = |o: &Instance| o.color.clone().unwrap();
    let q = question.trim_end_matches('?');
    if let Some(s) = q.strip_prefix("what color is the ") {
        let hits: Vec<_> = objects.iter().filter(|o| shape(o) == s).collect();
        assert_eq!(hits.len(), 1, "{question}: the shape names one object");
        return color(hits[0]);
    }
    if let Some(c) = q.strip_prefix("what shape is the ").and_then(|r| r.strip_suffix(" object")) {
        let hits: Vec<_> = objects.iter().filter(|o| color(o) == c).collect();
        assert_eq!(hits.len(), 1, "{question}: the colour names one object");
        return shape(hits[0]);
    }
    if let Some(rest) = q.strip_prefix("is there a ") {
        let found = objects.iter().any(|o| format!("{} {}", color(o), shape(o)) == rest);
        return if found { "yes" } else { "no" }.to_string();
    }
    if let Some(rest) = q.strip_prefix("how many ") {
        let rest = rest.trim_end_matches(" are there");
        let n = if let Some(c) = rest.strip_suffix(" objects") {
            objects.iter().filter(|o| color(o) == c).count()
        } else {
            objects.iter().filter(|o| format!("{}s", shape(o)) == rest).count()
        };
        return n.to_string();
    }
    let rest = q.strip_prefix("what is ").unwrap_or_else(|| panic!("unknown question {question}"));
    for rel in ["left of", "right of", "above", "below"] {
        if let Some(reference) = rest.strip_prefix(rel).map(|r| r.trim_start().trim_start_matches("the ")) {
            let r = objects.iter().find(|o| format!("{} {}", color(o), shape(o)) == reference).expect("the reference exists");
            let hits: Vec<_> = objects.iter().filter(|o| o.id != r.id && relation(o, r) == rel).collect();
            assert_eq!(hits.len(), 1, "{question}: exactly one object is {rel} the reference");
            return format!("{} {}", color(hits[0]), shape(hits[0]));
        }
    }
    panic!("unknown question {question}")
}

#[test]
fn captions_name_every_object_once_and_answers_follow_from_the_instances() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 300, 11);
    let mut per_type: HashMap<String, usize> = HashMap::new();
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for s in SPLITS {
        let split = Split::read(&dir.path().join(s)).unwrap();
        for ex in split.examples() {
            *counts.entry(ex.objects.len()).or_default() += 1;
            let names: Vec<String> = ex
                .objects
                .iter()
                .map(|o| format!("{} {}", o.color.as_deref().unwrap(), split.instances.category_name(o.category_id).unwrap()))
                .collect();
            assert_eq!(ex.captions.len(), 5);
            for caption in &ex.captions {
                let words: Vec<&str> = caption.split(' ').collect();
                let pairs: Vec<String> = words
                    .windows(2)
                    .filter(|w| COLORS.contains(&w[0]) && SHAPES.contains(&w[1]))
                    .map(|w| format!("{} {}", w[0], w[1]))
                    .collect();
                let mut sorted = pairs.clone();
                sorted.sort();
                let mut expected = names.clone();
                expected.sort();
                assert_eq!(sorted, expected, "{caption:?} must name {names:?} once each");
                // No colour or shape word outside those pairs.
                let loose = words.iter().filter(|w| COLORS.contains(w) || SHAPES.contains(w)).count();
                assert_eq!(loose, 2 * names.len(), "{caption:?}");
            }
            for (q, a) in &ex.questions {
                let a = a.unwrap();
                assert_eq!(answer(&q.question, &ex.objects, &split.instances), a.multiple_choice_answer, "{}", q.question);
                *per_type.entry(a.question_type.clone().unwrap()).or_default() += 1;
            }
        }
    }
    for t in ["color", "shape", "exist", "count", "spatial"] {
        assert!(per_type.get(t).copied().unwrap_or(0) > 30, "few {t} questions: {per_type:?}");
    }
    for n in 1..=3 {
        assert!(counts.get(&n).copied().unwrap_or(0) > 50, "scenes with {n} objects: {counts:?}");
    }
}

#[test]
fn rle_matches_pycocotools() {
    // Made by tests/fixtures/make_rle_fixture.py with pycocotools.
    let f: Value = serde_json::from_str(&std::fs::read_to_string(repo("tests/fixtures/rle_pycocotools.json")).unwrap()).unwrap();
    for m in f["masks"].as_array().unwrap() {
        let (h, w) = (m["height"].as_u64().unwrap() as usize, m["width"].as_u64().unwrap() as usize);
        let rows: Vec<&str> = m["rows"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
        let mut mask = Mask::new(h, w);
        for (y, row) in rows.iter().enumerate() {
            for (x, c) in row.chars().enumerate() {
                if c == '1' {
                    mask.set(y, x);
                }
            }
        }
        let counts = m["counts"].as_str().unwrap();
        assert_eq!(encode_counts(&mask.to_counts()), counts);
        assert_eq!(Mask::from_counts(h, w, &decode_counts(counts).unwrap()).unwrap(), mask);
        assert_eq!(mask.area() as u64, m["area"].as_u64().unwrap());
        let bbox: Vec<f64> = m["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(mask.bbox().to_vec(), bbox);
    }
    // The committed sample, decoded by pycocotools: same areas and boxes, same re-encoding.
    for (s, anns) in f["sample"].as_object().unwrap() {
        let instances = Instances::read(&repo(&format!("data/shapescenes/{s}/instances.json"))).unwrap();
        for a in anns.as_array().unwrap() {
            let ours = instances.annotations.iter().find(|i| i.id == a["id"].as_u64().unwrap()).unwrap();
            assert_eq!(ours.mask.area() as u64, a["area"].as_u64().unwrap());
            let bbox: Vec<f64> = a["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(ours.mask.bbox().to_vec(), bbox);
            assert_eq!(encode_counts(&ours.mask.to_counts()), a["counts"].as_str().unwrap());
        }
    }
}

/// Writes a split whose `file` is replaced by `edit` applied to a valid one, and reads it.
fn read_with(file: &str, edit: impl Fn(&mut Value)) -> String {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 10, 1);
    let path = dir.path().join("train").join(file);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    Split::read(&dir.path().join("train")).unwrap_err().to_string()
}

#[test]
fn malformed_files_name_the_file_the_record_and_the_field() {
    let e = read_with("captions.json", |v| {
        v["annotations"][2].as_object_mut().unwrap().remove("caption");
    });
    assert!(e.contains("captions.json") && e.contains("annotations[2]") && e.contains("`caption`") && e.contains("missing"), "{e}");

    let e = read_with("captions.json", |v| v["annotations"][0]["image_id"] = json!(999_999));
    assert!(e.contains("annotations[0]") && e.contains("`image_id`") && e.contains("999999"), "{e}");

    let e = read_with("instances.json", |v| v["annotations"][1]["category_id"] = json!(42));
    assert!(e.contains("instances.json") && e.contains("annotations[1]") && e.contains("`category_id`"), "{e}");

    let e = read_with("instances.json", |v| v["annotations"][0]["segmentation"]["size"] = json!([64, 80]));
    assert!(e.contains("`segmentation`") && e.contains("outside the image"), "{e}");

    let e = read_with("instances.json", |v| v["annotations"][0]["bbox"] = json!([60.0, 60.0, 10.0, 10.0]));
    assert!(e.contains("`bbox`") && e.contains("outside"), "{e}");

    let e = read_with("instances.json", |v| v["annotations"][0]["segmentation"]["counts"] = json!("\u{1}bad"));
    assert!(e.contains("`segmentation`") && e.contains("invalid character"), "{e}");

    let e = read_with("annotations.json", |v| v["annotations"][0]["evidence"] = json!([123_456_789]));
    assert!(e.contains("annotations.json") && e.contains("`evidence`") && e.contains("123456789"), "{e}");

    let e = read_with("annotations.json", |v| v["annotations"][0]["question_id"] = json!(5));
    assert!(e.contains("`question_id`") && e.contains("question 5 is not in"), "{e}");

    let e = read_with("questions.json", |v| v["questions"] = json!({"not": "a list"}));
    assert!(e.contains("questions.json") && e.contains("`questions`") && e.contains("array"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 10, 1);
    std::fs::write(dir.path().join("train/captions.json"), b"{\"images\": [").unwrap();
    let e = Split::read(&dir.path().join("train")).unwrap_err().to_string();
    assert!(e.contains("captions.json") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn image_file_names_stay_inside_the_images_folder() {
    for file in ["instances.json", "captions.json"] {
        for name in ["../../secret.png", "/etc/passwd", "images/../../x.png", "", "."] {
            let e = read_with(file, |v| v["images"][1]["file_name"] = json!(name));
            assert!(e.contains(file) && e.contains("images[1]") && e.contains("`file_name`") && e.contains(&format!("{name:?} is not a file inside the images folder")), "{e}");
        }
    }
    // A folder below images/ is inside it.
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 10, 1);
    let path = dir.path().join("train/instances.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["images"][0]["file_name"] = json!("./sub/a.png");
    std::fs::write(&path, v.to_string()).unwrap();
    let split = Split::read(&dir.path().join("train")).unwrap();
    assert_eq!(split.examples()[0].path, dir.path().join("train/images/./sub/a.png"));
}

#[test]
fn captions_are_read_only_where_they_are_needed() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 10, 1);
    let train = dir.path().join("train");
    std::fs::remove_file(train.join("captions.json")).unwrap();
    let split = Split::read(&train).unwrap();
    assert!(split.captions.is_none() && split.examples().iter().all(|ex| ex.captions.is_empty()));
    let e = split.captions("the captioner trains on captions").unwrap_err().to_string();
    assert_eq!(e, format!("{} does not exist: the captioner trains on captions", train.join("captions.json").display()));
    std::fs::remove_file(train.join("instances.json")).unwrap();
    let e = Split::read(&train).unwrap_err();
    assert!(e.to_string().contains("instances.json"), "{e}");
}

#[test]
fn polygons_from_other_datasets_are_rasterised() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("instances.json");
    let doc = json!({
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 8}],
        "categories": [{"id": 3, "name": "box"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [2, 1, 4, 3], "area": 12,
                         "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]], "iscrowd": 0}]
    });
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let inst = Instances::read(&file).unwrap();
    let m = &inst.annotations[0].mask;
    assert_eq!(m.area(), 12);
    assert_eq!(m.bbox(), [2.0, 1.0, 4.0, 3.0]);
    assert_eq!(inst.annotations[0].color, None);
}
