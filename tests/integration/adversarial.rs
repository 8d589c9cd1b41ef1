//! `gradcam attack` and `gradcam eval adversarial`: the attack's gradient against finite
//! differences, its budget, its PNG, its errors; and `eval segmentation` on the shipped models.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gradcam_classifier::train::Trainable;
use gradcam_eval::attack::{attack, objective_gradient, pixels_of, probabilities, Goal, Pgd};
use gradcam_scenes::scene::SHAPES;
use serde_json::Value;

use crate::{err, gradcam, ok, repo};


/// A small scene classifier folder with seeded random weights (8 units at conv4, 3 classes).
pub(crate) fn tiny_classifier(dir: &Path) -> gradcam_encoders::Network {
    let varmap = VarMap::new();
    Trainable::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), 8, 3).unwrap();
    gradcam_encoders::scene_cnn::init_parameters(&varmap, 11).unwrap();
    // Larger classifier weights than the initialisation's, so that the classes differ clearly.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name == "classifier.weight" {
            var.set(&(var.as_tensor() * 20.0).unwrap()).unwrap();
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    gradcam_classifier::Config::new(64, 8, SHAPES.iter().map(|s| s.to_string()).collect(), vec![1, 2, 3]).save(dir).unwrap();
    varmap.save(dir.join("model.safetensors")).unwrap();
    gradcam_classifier::load(dir).unwrap()
}

#[test]
fn the_attack_gradient_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let net = tiny_classifier(dir.path());
    let img = image::open(repo("data/shapescenes/test/images/000018.png")).unwrap().to_rgb8();
    let x = pixels_of(&img).unwrap().to_dtype(DType::F64).unwrap().to_dtype(DType::F32).unwrap();
    for goal in [Goal::Untargeted { class: 1, until: 1e-3 }, Goal::Targeted { class: 1, target: 2, until: 0.9 }] {
        let (f0, g, _) = objective_gradient(&net, &x, &goal).unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The pixels with the largest gradients, and a few others.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let h = 1e-2f32;
        for &i in order.iter().take(6).chain([100, 5000, 9000].iter()) {
            let at = |d: f32| {
                let mut v = base.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
                objective_gradient(&net, &t, &goal).unwrap().0 as f64
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            assert!((fd - g[i] as f64).abs() < 6e-2 * scale + 1e-5, "{goal:?} pixel {i}: analytic {} vs finite difference {fd} (objective {f0})", g[i]);
        }
        // Along the directions PGD moves (the gradient's sign) and a random one, where every
        // pixel adds to the change and f32 rounding does not matter.
        let mut state = 7u64;
        let random: Vec<f32> = (0..g.len()).map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if (state >> 40) & 1 == 1 { 1.0 } else { -1.0 }
        }).collect();
        for dir in [g.iter().map(|v| v.signum()).collect::<Vec<f32>>(), random] {
            let analytic: f64 = g.iter().zip(&dir).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            let h = 1e-3f32;
            let at = |d: f32| {
                let v: Vec<f32> = base.iter().zip(&dir).map(|(x, s)| x + d * s).collect();
                objective_gradient(&net, &Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap(), &goal).unwrap().0 as f64
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            let norm: f64 = g.iter().map(|v| v.abs() as f64).sum();
            assert!((fd - analytic).abs() < 2e-2 * norm, "{goal:?}: directional derivative {analytic} vs finite difference {fd}");
        }
    }
}

#[test]
fn the_budget_holds_on_every_pixel_and_the_png_is_the_attack() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let net = tiny_classifier(&model);
    let image = repo("data/shapescenes/test/images/000019.png");
    let img = image::open(&image).unwrap().to_rgb8();
    let x0 = pixels_of(&img).unwrap();
    let clean = probabilities(&net, &x0).unwrap();
    let top = (0..3).max_by(|&a, &b| clean[a].total_cmp(&clean[b])).unwrap();
    let eps = 4.0 / 255.0;
    let adv = attack(&net, &x0, &Pgd { eps, steps: 20, step_size: 1.0 / 255.0, goal: Goal::Untargeted { class: top, until: 0.05 } }).unwrap();
    let (a, b) = (adv.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap(), x0.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
        assert!((p - q).abs() <= eps + 1e-6, "value {i} moved {} > eps {eps}", (p - q).abs());
        assert!((0.0..=1.0).contains(p) && ((p * 255.0) - (p * 255.0).round()).abs() < 1e-3, "value {i} = {p} is not an 8-bit value in [0, 1]");
    }
    assert!(adv.linf <= eps + 1e-6 && adv.probs[top] < clean[top], "{} -> {}", clean[top], adv.probs[top]);

    // The CLI: the saved PNG, classified again, gives the attack's probabilities.
    let out = dir.path().join("out");
    let o = ok(&gradcam(&["attack", image.to_str().unwrap(), "--model", model.to_str().unwrap(), "--eps", "0.0157", "--steps", "20", "--until", "0.05", "--out", out.to_str().unwrap(), "--json"]));
    let r: Value = serde_json::from_str(o.trim()).unwrap();
    for f in ["image", "adversarial", "linf", "l2", "before", "after", "original_class", "success", "explanations"] {
        assert!(!r[f].is_null(), "field {f} missing: {r}");
    }
    assert!(r["linf"].as_f64().unwrap() <= 0.0157 + 1e-6);
    assert_eq!(r["original_class"], top);
    let e = &r["explanations"][0];
    assert_eq!(e["class"], top);
    assert_eq!(e["cam_size"], serde_json::json!([16, 16]));
    assert!(Path::new(e["overlay"].as_str().unwrap()).is_file());
    let adv_png = r["adversarial"].as_str().unwrap();
    let again: Value = serde_json::from_str(ok(&gradcam(&["classify", adv_png, "--model", model.to_str().unwrap(), "--json", "--out", out.to_str().unwrap()])).trim()).unwrap();
    for (p, q) in again["predictions"].as_array().unwrap().iter().zip(r["after"].as_array().unwrap()) {
        assert_eq!(p["class"], q["class"]);
        assert!((p["prob"].as_f64().unwrap() - q["prob"].as_f64().unwrap()).abs() < 1e-4, "{p} vs {q}");
    }
}

#[test]
fn attack_options_that_cannot_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    tiny_classifier(&model);
    let image = repo("data/shapescenes/test/images/000019.png");
    let run = |extra: &[&str]| gradcam(&[&["attack", image.to_str().unwrap(), "--model", model.to_str().unwrap(), "--out", dir.path().join("o").to_str().unwrap()], extra].concat());
    assert!(err(&run(&["--eps", "0"])).contains("--eps 0"));
    assert!(err(&run(&["--eps", "1.5"])).contains("0.000001 to 1"));
    assert!(err(&run(&["--steps", "0"])).contains("give 1 to 10000"));
    // Issue 34: a budget whose default step underflows blamed `--step-size 0`; a billion steps
    // never ended.
    let tiny = err(&run(&["--eps", "1e-45"]));
    assert!(tiny.contains("--eps") && !tiny.contains("step"), "{tiny}");
    assert!(err(&run(&["--steps", "1000000000"])).contains("--steps 1000000000: give 1 to 10000"));
    assert!(err(&run(&["--step-size", "0"])).contains("--step-size 0"));
    assert!(err(&run(&["--target", "7"])).contains("class 7 is out of range"));
    assert!(err(&run(&["--class", "3"])).contains("class 3 is out of range"));
    assert!(err(&run(&["--class", "1", "--target", "1"])).contains("is the class attacked"));
    assert!(err(&run(&["--until", "1"])).contains("--until"));
}

#[test]
fn eval_adversarial_reports_clean_and_adversarial_maps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adv");
    let o = ok(&gradcam(&["eval", "adversarial", "--model", "efficientnet-lite0", "--data", repo("data/photos").to_str().unwrap(), "--limit", "2", "--json", "--out", out.to_str().unwrap(), "--failures", "2"]));
    let s: Value = serde_json::from_str(&o).unwrap();
    assert_eq!(s["images"], 2);
    assert!(s["cases"].as_u64().unwrap() >= 2);
    assert_eq!(s["success_rate"], 1.0, "8/255 breaks EfficientNet-Lite0 on every photo: {s}");
    for k in ["clean", "adversarial"] {
        assert!(s[k]["pointing"]["count"].as_u64().unwrap() >= 2, "{s}");
    }
    assert!(out.join("failures/index.html").is_file() && out.join("results.jsonl").is_file());
    assert!(err(&gradcam(&["eval", "adversarial,pointing", "--model", "efficientnet-lite0", "--data", "data/photos"])).contains("alone"));
    assert!(err(&gradcam(&["eval", "adversarial", "--model", repo("models/captioner").to_str().unwrap(), "--data", "data/photos"])).contains("attacks classifiers"));
}

#[test]
fn eval_segmentation_reports_every_field_for_captions_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["models/captioner", "models/vqa"] {
        let out = dir.path().join(model.replace('/', "_"));
        let o = ok(&gradcam(&["eval", "segmentation", "--model", repo(model).to_str().unwrap(), "--data", repo("data/shapescenes/test").to_str().unwrap(), "--json", "--out", out.to_str().unwrap(), "--failures", "1"]));
        let page = std::fs::read_to_string(out.join("failures/index.html")).unwrap();
        assert!(page.contains("seeded segmentation"), "the failure page shows the segmentation");
        let s: Value = serde_json::from_str(&o).unwrap();
        let seg = &s["overall"]["segmentation"];
        assert!(seg["count"].as_u64().unwrap() > 0, "{model}: {seg}");
        for f in ["miou_seeded", "miou_threshold", "miou_centre"] {
            assert!((0.0..=1.0).contains(&seg[f].as_f64().unwrap()), "{model}: {f} in {seg}");
        }
        for (_, g) in s["groups"].as_object().unwrap() {
            assert!(g["segmentation"]["count"].is_u64());
        }
    }
    assert!(err(&gradcam(&["eval", "segmentation", "--model", repo("models/captioner").to_str().unwrap(), "--data", repo("data/shapescenes/test").to_str().unwrap(), "--seed-high", "0.1", "--seed-low", "0.5"])).contains("low < high"));
}

#[test]
fn after_the_attack_each_class_of_the_two_object_photo_is_gone_yet_its_map_stays_on_its_half() {
    let dir = tempfile::tempdir().unwrap();
    let image = repo("data/photos/images/cat_and_coffee.png");
    // tabby is the left half, espresso the right.
    for (class, left) in [(281, true), (967, false)] {
        let o = ok(&gradcam(&["attack", image.to_str().unwrap(), "--resize", "none", "--class", &class.to_string(), "--out", dir.path().to_str().unwrap(), "--json"]));
        let r: Value = serde_json::from_str(o.trim()).unwrap();
        assert_eq!(r["success"], true, "{r}");
        assert!(r["after"].as_array().unwrap().iter().all(|p| p["class"] != class), "{class} still in the top 5: {}", r["after"]);
        let cam: Vec<Vec<f64>> = serde_json::from_value(r["explanations"][0]["cam"].clone()).unwrap();
        let w = cam[0].len();
        let (mut best, mut at) = (f64::MIN, 0);
        for row in &cam {
            for (x, &v) in row.iter().enumerate() {
                if v > best {
                    (best, at) = (v, x);
                }
            }
        }
        assert_eq!(at < w / 2, left, "class {class}: the adversarial map peaks at column {at} of {w}");
    }
}
