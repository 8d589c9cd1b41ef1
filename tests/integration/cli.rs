//! The `gradcam` binary end to end: class-discriminative maps, JSON output, bad inputs, errors,
//! and hf-hub loading from an offline cache.

use std::path::Path;
use std::process::{Command, Output};

use gradcam_encoders::{ModelKind, Weights};
use serde_json::Value;

use crate::repo;

fn gradcam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).output().expect("gradcam runs")
}

fn effnet_weights() -> String {
    crate::effnet_weights()
        .display()
        .to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// Column of the peak of a raw map.
fn peak_column(cam: &Value) -> (usize, usize) {
    let rows = cam.as_array().unwrap();
    let w = rows[0].as_array().unwrap().len();
    let mut best = (0, f64::MIN);
    for (i, v) in rows.iter().flat_map(|r| r.as_array().unwrap()).enumerate() {
        if v.as_f64().unwrap() > best.1 {
            best = (i % w, v.as_f64().unwrap());
        }
    }
    (best.0, w)
}

#[test]
fn grad_cam_is_class_discriminative_on_two_photos_side_by_side() {
    // Left half: a tabby cat; right half: an espresso. No resizing: the map is 7 x 14.
    let out = tempfile::tempdir().unwrap();
    let o = gradcam(&[
        "classify", repo("data/photos/images/cat_and_coffee.png").to_str().unwrap(), "--weights", &effnet_weights(),
        "--resize", "none", "--class", "281", "--class", "967", "--json", "--out", out.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = &json_lines(&o)[0];
    assert_eq!(j["input_size"], serde_json::json!([224, 448]));
    let e = j["explanations"].as_array().unwrap();
    assert_eq!(e[0]["class"], 281);
    assert_eq!(e[0]["cam_size"], serde_json::json!([7, 14]));
    let (cat_col, w) = peak_column(&e[0]["cam"]);
    let (cup_col, _) = peak_column(&e[1]["cam"]);
    assert!(cat_col < w / 2, "tabby's map peaks at column {cat_col} of {w}");
    assert!(cup_col >= w / 2, "espresso's map peaks at column {cup_col} of {w}");
    for x in e {
        assert!(Path::new(x["overlay"].as_str().unwrap()).is_file());
        assert_eq!(x["method"], "gradcam");
    }
}

#[test]
fn json_has_the_documented_fields_and_counterfactuals() {
    let out = tempfile::tempdir().unwrap();
    let o = gradcam(&[
        "classify", repo("data/photos/images/chelsea.png").to_str().unwrap(), repo("data/photos/images/coffee.png").to_str().unwrap(),
        "--weights", &effnet_weights(), "--counterfactual", "--top-k", "3", "--json", "--out", out.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2);
    let cat = &lines[0];
    assert_eq!(cat["model"], "efficientnet-lite0");
    assert_eq!(cat["layer"], "_conv_head");
    assert_eq!(cat["predictions"].as_array().unwrap().len(), 3);
    let top = cat["predictions"][0]["class"].as_u64().unwrap();
    assert!((281..=285).contains(&top), "a cat class, got {top}");
    let e = cat["explanations"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0]["counterfactual"], false);
    assert_eq!(e[1]["counterfactual"], true);
    assert_eq!(e[0]["cam_size"], serde_json::json!([7, 7]));
    assert_eq!(lines[1]["predictions"][0]["label"], "espresso");
    let probs: f64 = cat["predictions"].as_array().unwrap().iter().map(|p| p["prob"].as_f64().unwrap()).sum();
    assert!(probs > 0.5 && probs <= 1.0);
}

#[test]
fn bad_images_give_clear_errors_and_the_rest_still_runs() {
    let out = tempfile::tempdir().unwrap();
    let bad = std::fs::read_dir(repo("tests/bad")).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
    assert!(bad.len() >= 4);
    for path in &bad {
        let o = gradcam(&[
            "classify", path.to_str().unwrap(), repo("data/photos/images/coffee.png").to_str().unwrap(),
            "--weights", &effnet_weights(), "--json", "--out", out.path().to_str().unwrap(),
        ]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", path.display());
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(path.file_name().unwrap().to_str().unwrap()), "the error names the file: {err}");
        assert_eq!(json_lines(&o).len(), 1, "the good image is still explained");
    }
    let huge = stderr(&gradcam(&["classify", repo("tests/bad/huge_header.png").to_str().unwrap(), "--weights", &effnet_weights(), "--out", out.path().to_str().unwrap()]));
    assert!(huge.contains("too large"), "{huge}");
    // Nothing half-written is left behind.
    for f in std::fs::read_dir(out.path()).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.ends_with(".png") && !name.starts_with('.'), "{name}");
    }
}

#[test]
fn tiny_gray_and_transparent_images_work() {
    let out = tempfile::tempdir().unwrap();
    let images = ["tests/fixtures/one_pixel.png", "tests/fixtures/chelsea_gray.png", "tests/fixtures/chelsea_rgba.png"].map(|p| repo(p).display().to_string());
    let weights = effnet_weights();
    let mut args = vec!["classify"];
    args.extend(images.iter().map(String::as_str));
    args.extend(["--weights", &weights, "--json", "--out", out.path().to_str().unwrap()]);
    let o = gradcam(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 3);
    for l in &lines {
        for row in l["explanations"][0]["cam"].as_array().unwrap() {
            assert!(row.as_array().unwrap().iter().all(|v| v.as_f64().is_some_and(f64::is_finite)));
        }
    }
    // The 1x1 image cannot be used as it is.
    let o = gradcam(&["classify", &images[0], "--resize", "none", "--weights", &effnet_weights(), "--out", out.path().to_str().unwrap()]);
    assert!(stderr(&o).contains("at least 32 px"), "{}", stderr(&o));
}

#[test]
fn usage_errors_are_clear() {
    let img = repo("data/photos/images/coffee.png");
    let o = gradcam(&["classify", img.to_str().unwrap(), "--weights", &effnet_weights(), "--layer", "nope"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("unknown layer \"nope\"") && err.contains("_blocks.15") && err.contains("_conv_head"), "{err}");

    let o = gradcam(&["classify", img.to_str().unwrap(), "--weights", &effnet_weights(), "--class", "1000"]);
    assert!(stderr(&o).contains("--class 1000 is out of range"), "{}", stderr(&o));

    let o = gradcam(&["classify", img.to_str().unwrap(), "--model", "resnet18", "--weights", &effnet_weights()]);
    assert!(stderr(&o).contains("\"conv1.weight\""), "{}", stderr(&o));

    let o = gradcam(&["classify", img.to_str().unwrap(), "--weights", "/nonexistent/weights.pth"]);
    assert!(stderr(&o).contains("/nonexistent/weights.pth"), "{}", stderr(&o));

    let o = gradcam(&["layers", "--model", "resnet50"]);
    let names = String::from_utf8_lossy(&o.stdout);
    assert!(names.contains("layer4.2  (default)") && names.contains("layer3.5"), "{names}");
}

#[test]
fn hub_weights_load_offline_from_the_cache() {
    // The layout hf-hub itself writes: models--OWNER--NAME/{refs/main, snapshots/REV/FILE}.
    let home = tempfile::tempdir().unwrap();
    let repo_dir = home.path().join("hub/models--timm--resnet18.tv_in1k");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("snapshots").join(rev)).unwrap();
    std::fs::write(repo_dir.join("refs/main"), rev).unwrap();
    let w = Weights::hashed();
    ModelKind::ResNet18.build(&w).unwrap();
    let file = repo_dir.join("snapshots").join(rev).join("model.safetensors");
    w.save_safetensors(&file).unwrap();

    let out = tempfile::tempdir().unwrap();
    let img = repo("data/photos/images/coffee.png");
    let run = |weights: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_gradcam"))
            .args(["classify", img.to_str().unwrap(), "--model", "resnet18", "--weights", weights, "--json", "--out", out.path().to_str().unwrap()])
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{weights}: {}", stderr(&o));
        json_lines(&o).remove(0)
    };
    let from_hub = run("hf:timm/resnet18.tv_in1k");
    let from_file = run(file.to_str().unwrap());
    assert_eq!(from_hub["predictions"], from_file["predictions"]);
    assert_eq!(from_hub["explanations"][0]["cam"], from_file["explanations"][0]["cam"]);

    let o = Command::new(env!("CARGO_BIN_EXE_gradcam"))
        .args(["classify", img.to_str().unwrap(), "--model", "resnet18", "--weights", "hf:timm/not-cached", "--out", out.path().to_str().unwrap()])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(stderr(&o).contains("timm/not-cached") && stderr(&o).contains("HF_HUB_OFFLINE"), "{}", stderr(&o));
}

#[test]
fn convert_writes_safetensors_that_load_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lite0.safetensors");
    let o = gradcam(&["convert", &effnet_weights(), out.to_str().unwrap(), "--model", "efficientnet-lite0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = Weights::load(Path::new(&effnet_weights())).unwrap();
    let b = Weights::load(&out).unwrap();
    let (x, y) = (a.get("_blocks.3._depthwise_conv.weight", &[144, 1, 5, 5]).unwrap(), b.get("_blocks.3._depthwise_conv.weight", &[144, 1, 5, 5]).unwrap());
    assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

#[test]
fn classify_takes_any_gradient_cam_method() {
    let out = tempfile::tempdir().unwrap();
    let o = gradcam(&["classify", repo("data/photos/images/coffee.png").to_str().unwrap(), "--weights", &effnet_weights(), "--method", "gradcam++", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = &json_lines(&o)[0]["explanations"][0];
    assert_eq!(e["method"], "gradcam++");
    assert!(e["overlay"].as_str().unwrap().ends_with("_gradcampp.png"));
    let o = gradcam(&["classify", repo("data/photos/images/coffee.png").to_str().unwrap(), "--method", "magic", "--out", out.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown method \"magic\""), "{}", stderr(&o));
}

#[test]
fn caption_and_vqa_take_a_method_too() {
    let out = tempfile::tempdir().unwrap();
    let img = repo("data/shapescenes/test/images/000019.png");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(repo("")).output().unwrap();
    let o = run(&["caption", img.to_str().unwrap(), "--method", "layercam", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["words"].as_array().unwrap().iter().all(|w| w["method"] == "layercam"));
    let o = run(&["vqa", img.to_str().unwrap(), "what color is the triangle?", "--method", "gradcam++", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["explanations"][0]["method"], "gradcam++");
    let o = run(&["vqa", img.to_str().unwrap(), "what color is the triangle?", "--method", "nope", "--out", out.path().to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("unknown method \"nope\""), "{}", stderr(&o));
}

#[test]
fn several_methods_in_one_call_write_guided_images_and_a_comparison_strip() {
    let out = tempfile::tempdir().unwrap();
    let o = gradcam(&[
        "classify", repo("data/photos/images/coffee.png").to_str().unwrap(), "--weights", &effnet_weights(),
        "--method", "gradcam,guided-backprop,guided-gradcam", "--json", "--out", out.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = json_lines(&o)[0]["explanations"].as_array().unwrap().clone();
    let methods: Vec<&str> = e.iter().map(|x| x["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["gradcam", "guided-backprop", "guided-gradcam"]);
    // The guided images are at the input's resolution; the overlay at the photo's.
    let size = |v: &Value| image::image_dimensions(v["overlay"].as_str().unwrap()).unwrap();
    assert_eq!(size(&e[0]), (600, 400));
    assert_eq!((size(&e[1]), size(&e[2])), ((224, 224), (224, 224)));
    assert!(e[2]["overlay"].as_str().unwrap().ends_with("_guided-gradcam.png"));
    let class = e[0]["class"].as_u64().unwrap();
    let strip = std::fs::read_dir(out.path()).unwrap().map(|f| f.unwrap().path()).find(|p| p.to_string_lossy().ends_with("_methods.png")).expect("a comparison strip");
    assert!(strip.to_string_lossy().contains(&format!("coffee_{class}_")));
    // Three panels 224 px high (the overlay scaled to 336 x 224), 4 px apart.
    assert_eq!(image::image_dimensions(&strip).unwrap(), (336 + 224 + 224 + 8, 224));
}

#[test]
fn words_and_answers_get_guided_images_and_smoothed_maps() {
    let out = tempfile::tempdir().unwrap();
    let img = repo("data/shapescenes/test/images/000019.png");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(repo("")).output().unwrap();
    let o = run(&["caption", img.to_str().unwrap(), "--method", "guided-gradcam", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    for w in j["words"].as_array().unwrap() {
        assert_eq!(w["method"], "guided-gradcam");
        assert!(std::path::Path::new(w["overlay"].as_str().unwrap()).exists());
    }
    let o = run(&["vqa", img.to_str().unwrap(), "what color is the triangle?", "--method", "guided-backprop", "--counterfactual", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = j["explanations"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    assert!(e[1]["overlay"].as_str().unwrap().ends_with("_counterfactual_guided-backprop.png"), "{}", e[1]["overlay"]);
    // Several methods: one strip row per method for a caption, a comparison strip per answer.
    let o = run(&["caption", img.to_str().unwrap(), "--method", "gradcam,guided-gradcam", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let n = j["caption"].as_str().unwrap().split(' ').count();
    assert_eq!(j["words"].as_array().unwrap().len(), 2 * n);
    assert!(j["strip"].as_str().unwrap().ends_with("_strip_methods.png"));
    assert_eq!(image::image_dimensions(j["strip"].as_str().unwrap()).unwrap(), (64 * (n as u32 + 1), 128));
    let o = run(&["vqa", img.to_str().unwrap(), "what color is the triangle?", "--method", "gradcam,scorecam", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let answer = j["explanations"][0]["answer"].as_str().unwrap().to_string();
    assert_eq!(j["explanations"][1]["method"], "scorecam");
    assert!(out.path().join(format!("000019_{answer}_methods.png")).exists());
    // The perturbation methods explain words and answers too.
    let o = run(&["caption", img.to_str().unwrap(), "--method", "scorecam", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["words"].as_array().unwrap().iter().all(|w| w["method"] == "scorecam" && w["cam_size"] == serde_json::json!([16, 16])));
    let o = run(&["vqa", img.to_str().unwrap(), "what color is the triangle?", "--method", "ablationcam", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["explanations"][0]["method"], "ablationcam");
    let o = run(&["vqa", img.to_str().unwrap(), "what color is the triangle?", "--method", "ablationcam", "--eigen-smooth", "--out", out.path().to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("work with the gradient-based methods"), "{}", stderr(&o));
    // Smoothing: the augmentation-smoothed map is at the input's resolution.
    let o = run(&["vqa", img.to_str().unwrap(), "what color is the triangle?", "--aug-smooth", "--eigen-smooth", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["explanations"][0]["cam_size"], serde_json::json!([64, 64]));
    assert!(j["explanations"][0]["overlay"].as_str().unwrap().ends_with("_eigen_aug.png"));
}
