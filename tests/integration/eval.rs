//! `gradcam eval`: every metric against a hand-computed case, and the command end to end for a
//! classifier, the captioner and the VQA model.

use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use gradcam_core::metrics::BoundingBox;
use gradcam_core::{Explainer, GradCam, Map};
use gradcam_eval::{run, Case, Example, Object, Options, Subject, Task, Tolerance};
use gradcam_scenes::rle::Mask;
use serde_json::Value;

use crate::repo;

/// An 8x8 one-channel image of ones whose object is the top-right 4x4 quadrant, a linear scorer
/// (the mean of the input over the object: 1 on the clean image, 0 once the object is gone) and
/// a given map: 1 on the object, 0.1 elsewhere. Every figure of the protocol is known by hand.
struct Quadrant;

const SIDE: usize = 8;

fn on_object(y: usize, x: usize) -> bool {
    y < 4 && x >= 4
}

impl Subject for Quadrant {
    type State = ();
    fn kind(&self) -> &'static str {
        "hand-computed"
    }
    fn len(&self) -> usize {
        1
    }
    fn example(&self, _: usize) -> gradcam_eval::Result<Example<()>> {
        let mut mask = Mask::new(SIDE, SIDE);
        for y in 0..SIDE {
            for x in 0..SIDE {
                if on_object(y, x) {
                    mask.set(y, x);
                }
            }
        }
        let object = Object { bbox: BoundingBox { x0: 4.0, y0: 0.0, x1: 8.0, y1: 4.0 }, mask };
        Ok(Example {
            name: "quadrant".into(),
            image: image::RgbImage::new(SIDE as u32, SIDE as u32),
            input: Tensor::ones((1, 1, SIDE, SIDE), candle_core::DType::F32, &Device::Cpu)?,
            cases: vec![Case { label: "object".into(), group: "g".into(), objects: vec![object], rank: None, prob: 1.0, primary: true }],
            quality: 1.0,
            summary: String::new(),
            state: (),
        })
    }
    fn maps(&self, _: &Example<()>, _: &dyn Explainer) -> gradcam_eval::Result<Vec<Map>> {
        let data = (0..SIDE * SIDE).map(|i| if on_object(i / SIDE, i % SIDE) { 1.0 } else { 0.1 }).collect();
        Ok(vec![Map::new(SIDE, SIDE, data)])
    }
    fn scores(&self, _: &Example<()>, inputs: &Tensor) -> gradcam_eval::Result<Vec<Vec<(f32, f32)>>> {
        let rows = inputs.flatten_from(1)?.to_vec2::<f32>()?;
        Ok(rows
            .iter()
            .map(|r| {
                let s = (0..SIDE * SIDE).filter(|&i| on_object(i / SIDE, i % SIDE)).map(|i| r[i]).sum::<f32>() / 16.0;
                vec![(s, s)]
            })
            .collect())
    }
}

#[test]
fn every_metric_matches_a_hand_computed_case() {
    let options = Options {
        tasks: Task::ALL.to_vec(),
        method: &GradCam,
        limit: 1,
        tolerance: Tolerance::Pixels(0.0),
        box_threshold: 0.15,
        iou: 0.5,
        patch: Some(4),
        stride: Some(4),
        steps: 4,
        reject_below: 0.5,
        batch: 3,
        segment: Default::default(),
    };
    let mut results = Vec::new();
    let s = run(&Quadrant, &options, |_, r| results.push(r.clone())).unwrap();
    let c = &results[0].cases[0];
    // The peak (first maximum) is pixel (0, 4), on the object; the centre (4, 4) is one row below it.
    assert_eq!(c.peak, [0, 4]);
    assert_eq!((c.pointing_hit, c.centre_hit), (Some(true), Some(false)));
    // At 15% of the max only the object's pixels stay: the box is the object's, IoU 1.
    assert_eq!(c.bbox, Some(BoundingBox { x0: 4.0, y0: 0.0, x1: 8.0, y1: 4.0 }));
    assert_eq!(c.iou, Some(1.0));
    // Energy: mean 1 inside against 0.1 outside; 16 of 16 + 48 * 0.1 = 20.8 of the mass inside.
    let e = c.energy.unwrap();
    assert!((e.ratio.unwrap() - 10.0).abs() < 1e-5 && (e.fraction.unwrap() - 16.0 / 20.8).abs() < 1e-6, "{e:?}");
    // Occlusion with 4x4 patches at stride 4: only the patch on the object lowers the score (by
    // 1), and that patch has the largest mean map value: ranks agree, rho = 1.
    assert!((c.faithfulness.unwrap() - 1.0).abs() < 1e-12);
    // Deletion in map order: the first quarter of the pixels is the object, so the curve is
    // 1, 0, 0, 0, 0 and its area (1 + 0) / 2 / 4 = 0.125. Insertion starts from the blurred
    // image, which for an image of ones is the image: the curve is 1 throughout.
    assert!((c.deletion_auc.unwrap() - 0.125).abs() < 1e-9);
    assert!((c.insertion_auc.unwrap() - 1.0).abs() < 1e-9);
    assert_eq!((s.overall.pointing.hits, s.overall.pointing.centre_hits, s.overall.localization.hits), (1, 0, 1));
    assert_eq!(s.protocol.patch, 4);
}

fn gradcam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).output().expect("gradcam runs")
}

fn summary(out: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

fn check_written(out: &std::path::Path, images: usize) {
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), images);
    assert!(std::fs::read_to_string(out.join("summary.md")).unwrap().contains("pointing game"));
    let page = std::fs::read_to_string(out.join("failures/index.html")).unwrap();
    assert!(page.contains("<img src=\"000_0.png\">"), "{page}");
    assert!(out.join("failures/000_0.png").exists());
}

fn rate(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

#[test]
fn the_same_command_evaluates_the_captioner_and_the_vqa_model() {
    for model in ["models/captioner", "models/vqa"] {
        let out = tempfile::tempdir().unwrap();
        let o = gradcam(&[
            "eval", "all", "--model", repo(model).to_str().unwrap(), "--data", repo("data/shapescenes/test").to_str().unwrap(),
            "--tolerance", "0.0625", "--steps", "5", "--out", out.path().to_str().unwrap(), "--failures", "1",
        ]);
        assert!(o.status.success(), "{model}: {}", String::from_utf8_lossy(&o.stderr));
        let s = summary(out.path());
        assert_eq!(s["images"], 2, "{model}");
        let all = &s["overall"];
        assert!(all["pointing"]["count"].as_u64().unwrap() >= 2, "{model}: {all}");
        for key in ["faithfulness", "deletion_auc", "insertion_auc"] {
            assert!(all[key]["count"].as_u64().unwrap() >= 2, "{model}: {key}");
            let m = rate(&all[key]["mean"]);
            assert!(m.is_finite() && (-1.0..=1.0).contains(&m), "{model}: {key} = {m}");
        }
        check_written(out.path(), 2);
    }
}

#[test]
fn the_same_command_evaluates_a_classifier_on_photos_with_boxes() {
    let weights = crate::effnet_weights();
    let out = tempfile::tempdir().unwrap();
    // The cameraman photo: EfficientNet-Lite0 says "tripod", and the map's peak is on it.
    let o = gradcam(&[
        "eval", "pointing,localization,faithfulness,deletion,energy", "--model", "efficientnet-lite0", "--weights", weights.to_str().unwrap(),
        "--data", repo("data/photos").to_str().unwrap(), "--limit", "5", "--patch", "112", "--stride", "112", "--steps", "4",
        "--out", out.path().to_str().unwrap(), "--failures", "2", "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s, summary(out.path()));
    assert_eq!(s["kind"], "classifier");
    assert_eq!(s["ranked"]["images"], 5);
    assert_eq!(rate(&s["ranked"]["top5_cls_error"]), 0.0, "{s}");
    assert!(s["overall"]["insertion_auc"]["count"] == 0, "insertion was not asked for");
    let lines = std::fs::read_to_string(out.path().join("results.jsonl")).unwrap();
    let camera: Value = lines.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).find(|r| r["image"] == "camera.png").unwrap();
    let tripod = &camera["cases"][0];
    assert_eq!((tripod["label"].as_str(), tripod["rank"].as_u64(), tripod["pointing_hit"].as_bool()), (Some("tripod"), Some(0), Some(true)), "{camera}");
    check_written(out.path(), 5);
}

#[test]
fn eval_errors_name_the_problem() {
    let data = repo("data/shapescenes/test");
    let captioner = repo("models/captioner");
    let cases: [(&[&str], &str); 4] = [
        (&["eval", "speed", "--model", "models/captioner", "--data", "x"], "unknown task \"speed\""),
        (&["eval", "pointing", "--model", "efficientnet-lite0", "--weights", "/nonexistent.safetensors", "--data", data.to_str().unwrap()], "/nonexistent.safetensors"),
        (&["eval", "pointing", "--model", "/nonexistent-model", "--data", data.to_str().unwrap()], "neither a classifier"),
        (&["eval", "pointing", "--model", captioner.to_str().unwrap(), "--data", data.to_str().unwrap(), "--failures", "2"], "--failures writes a page: give --out DIR"),
    ];
    for (args, message) in cases {
        let o = gradcam(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
    // A classifier's ground truth must name ImageNet classes.
    let weights = crate::effnet_weights();
    let o = gradcam(&["eval", "pointing", "--model", "efficientnet-lite0", "--weights", weights.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("category \"circle\" is not an ImageNet class name"), "{err}");
}

#[test]
fn seeded_segmentation_recovers_a_hand_made_object() {
    use gradcam_eval::segment::{iou, random_walker, seeds, threshold, centre_prior, SegmentOptions};
    // A 64 x 64 noisy grey image with a red disc of radius 10 at (20, 40); the "map" is a blob
    // wider than the disc and off its centre by 3 px, as an upsampled 16 x 16 map is.
    let (h, w) = (64usize, 64usize);
    let mut state = 1u64;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 37) as i32 - 18
    };
    let inside = |y: usize, x: usize| (y as f32 - 20.0).powi(2) + (x as f32 - 40.0).powi(2) <= 100.0;
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let n = noise();
        if inside(y as usize, x as usize) {
            image::Rgb([(215 + n / 3) as u8, (35 + n / 3) as u8, 35])
        } else {
            let g = (120 + n) as u8;
            image::Rgb([g, g, g])
        }
    });
    let truth: Vec<bool> = (0..h * w).map(|i| inside(i / w, i % w)).collect();
    let map = gradcam_core::Map::new(h, w, (0..h * w).map(|i| {
        let (y, x) = ((i / w) as f32, (i % w) as f32);
        (-((y - 23.0).powi(2) + (x - 42.0).powi(2)) / (2.0 * 9.0f32.powi(2))).exp()
    }).collect());
    let o = SegmentOptions::default();
    let seeded = random_walker(&img, &seeds(&map, &o), o.beta, o.max_side);
    let (s, t, c) = (iou(&seeded, &truth), iou(&threshold(&map, o.threshold), &truth), iou(&centre_prior(h, w, o.centre_area), &truth));
    assert!(s > 0.9, "seeded IoU {s}");
    assert!(s > t && t > c, "seeded {s}, threshold {t}, centre {c}");
    // A map that is zero everywhere seeds nothing: an empty segmentation.
    let zero = gradcam_core::Map::new(h, w, vec![0.0; h * w]);
    assert!(random_walker(&img, &seeds(&zero, &o), o.beta, o.max_side).iter().all(|&v| !v));
}

/// The files of a finished run in `dir`: results.jsonl, summary.json, summary.md and the
/// failure page with its pictures, by name.
fn run_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = ["results.jsonl", "summary.json", "summary.md"].iter().map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap())).collect();
    let mut page: Vec<_> = std::fs::read_dir(dir.join("failures")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    page.sort();
    files.extend(page.into_iter().map(|f| (format!("failures/{f}"), std::fs::read(dir.join("failures").join(&f)).unwrap())));
    files
}

#[test]
fn three_shards_merge_into_the_unsharded_run_byte_for_byte() {
    let weights = crate::effnet_weights();
    let photos = repo("data/photos");
    let (captioner, vqa, scenes) = (repo("models/captioner"), repo("models/vqa"), repo("data/shapescenes/train"));
    let classifier = ["pointing,localization,faithfulness,deletion,insertion,energy", "--model", "efficientnet-lite0", "--weights", weights.to_str().unwrap(), "--data", photos.to_str().unwrap(), "--patch", "112", "--stride", "112", "--steps", "4"];
    let scenes = |model: &std::path::Path| ["all".to_string(), "--model".into(), model.to_str().unwrap().into(), "--data".into(), scenes.to_str().unwrap().into(), "--limit".into(), "7".into(), "--steps".into(), "5".into(), "--patch".into(), "16".into(), "--stride".into(), "16".into()];
    // The attack too, towards random targets: a shard draws them for every image of the list.
    let attack = ["adversarial", "--model", "efficientnet-lite0", "--weights", weights.to_str().unwrap(), "--data", photos.to_str().unwrap(), "--limit", "4", "--target", "random", "--attack-steps", "3"];
    let subjects: [(&str, Vec<String>); 4] = [("classifier", classifier.map(String::from).to_vec()), ("captioner", scenes(&captioner).to_vec()), ("vqa", scenes(&vqa).to_vec()), ("adversarial", attack.map(String::from).to_vec())];
    for (kind, args) in subjects {
        let dir = tempfile::tempdir().unwrap();
        let (whole, parts) = (dir.path().join("whole"), dir.path().join("parts"));
        let run = |out: &std::path::Path, extra: &[&str]| {
            let mut all: Vec<&str> = vec!["eval"];
            all.extend(args.iter().map(String::as_str));
            all.extend(["--out", out.to_str().unwrap(), "--failures", "2"]);
            all.extend(extra);
            crate::ok(&gradcam(&all))
        };
        let printed = run(&whole, &[]);
        // In any order, as a job array would run them.
        for i in [2, 0, 1] {
            let o = run(&parts, &["--shard", &format!("{i}/3")]);
            assert!(o.contains(&format!("results-{i}-of-3.jsonl")) && o.contains("gradcam eval merge"), "{kind}: {o}");
        }
        assert!(!parts.join("results.jsonl").exists() && !parts.join("summary.json").exists());
        let merged = crate::ok(&gradcam(&["eval", "merge", parts.to_str().unwrap()]));
        assert_eq!(merged.replace(parts.to_str().unwrap(), "DIR"), printed.replace(whole.to_str().unwrap(), "DIR"), "{kind}: printed as the unsharded run prints");
        for ((name, a), (_, b)) in run_files(&whole).iter().zip(run_files(&parts)) {
            assert!(*a == b, "{kind}: {name} differs:\n{}\n---\n{}", String::from_utf8_lossy(a), String::from_utf8_lossy(&b));
        }
        assert_eq!(run_files(&whole).len(), run_files(&parts).len(), "{kind}: the failure pages have the same pictures");
        let s = summary(&parts);
        let images = match kind { "classifier" => 5, "adversarial" => 4, _ => 7 };
        assert_eq!((s["kind"].as_str().unwrap_or("adversarial"), s["images"].as_u64()), (kind, Some(images)));
        let json = crate::ok(&gradcam(&["eval", "merge", parts.to_str().unwrap(), "--json"]));
        assert_eq!(json.trim_end().as_bytes(), std::fs::read(parts.join("summary.json")).unwrap());
    }
}

#[test]
fn merge_names_the_missing_shard_and_the_doubled_index() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("parts");
    let (model, data) = (repo("models/captioner"), repo("data/shapescenes/train"));
    let shard = |spec: &str| gradcam(&["eval", "pointing", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--limit", "7", "--out", out.to_str().unwrap(), "--shard", spec]);
    let merge = || gradcam(&["eval", "merge", out.to_str().unwrap()]);
    let fails = |o: Output, message: &str| {
        let e = crate::err(&o);
        assert!(e.contains(message), "{message:?} not in: {e}");
    };
    fails(merge(), "parts");
    std::fs::create_dir(&out).unwrap();
    fails(merge(), "no shard's files");
    crate::ok(&shard("0/3"));
    crate::ok(&shard("2/3"));
    fails(merge(), "shard 1/3 is missing: no results-1-of-3.jsonl");
    crate::ok(&shard("1/3"));
    crate::ok(&merge());
    // Shard 0 took indices 0, 3 and 6.
    let file = out.join("results-0-of-3.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&file).unwrap().lines().map(String::from).collect();
    let edit = |keep: &[usize]| std::fs::write(&file, keep.iter().map(|&i| format!("{}\n", lines[i])).collect::<String>()).unwrap();
    edit(&[0, 0, 1, 2]);
    fails(merge(), "results-0-of-3.jsonl line 2: index 0 appears twice");
    edit(&[0, 1, 2, 1]);
    fails(merge(), "results-0-of-3.jsonl line 4: index 3 appears twice");
    edit(&[0, 2]);
    fails(merge(), "results-0-of-3.jsonl line 2: image 3 is missing");
    edit(&[0, 1]);
    fails(merge(), "image 6 is missing: the file ends after 2 lines");
    edit(&[0, 1, 2]);
    crate::ok(&merge());
    std::fs::remove_file(out.join("shard-1-of-3.json")).unwrap();
    fails(merge(), "shard 1/3 has not finished: no shard-1-of-3.json");
    crate::ok(&shard("1/3"));
    crate::ok(&shard("0/2"));
    fails(merge(), "shards of 2 different splits (of 2, 3)");
    std::fs::remove_file(out.join("results-0-of-2.jsonl")).unwrap();
    std::fs::remove_file(out.join("shard-0-of-2.json")).unwrap();
    crate::ok(&gradcam(&["eval", "pointing", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--limit", "7", "--out", out.to_str().unwrap(), "--shard", "2/3", "--tolerance", "3px"]));
    fails(merge(), "shard 2/3 was run differently from shard 0/3 (its setup differs)");
    // A shard writes into a folder for `eval merge`.
    fails(gradcam(&["eval", "pointing", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--shard", "0/3"]), "--shard 0/3: writes its part for `gradcam eval merge DIR`: give --out DIR");
    fails(shard("3/3"), "give 0 to 2");
    // More shards than images: the third takes none, and the merge is still the whole run.
    let few = dir.path().join("few");
    for i in 0..3 {
        crate::ok(&gradcam(&["eval", "pointing", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--limit", "2", "--out", few.to_str().unwrap(), "--shard", &format!("{i}/3")]));
    }
    assert_eq!(std::fs::read_to_string(few.join("results-2-of-3.jsonl")).unwrap(), "");
    crate::ok(&gradcam(&["eval", "merge", few.to_str().unwrap()]));
    assert_eq!((summary(&few)["images"].as_u64(), std::fs::read_to_string(few.join("results.jsonl")).unwrap().lines().count()), (Some(2), 2));
}
