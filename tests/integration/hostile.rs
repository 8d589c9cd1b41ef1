//! Hostile input (issue "no abort, no hang, no runaway memory"): each finding fixed so far, with
//! the input made here.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::repo;

/// Runs the CLI from the repository root; fails the test if it runs for more than a minute.
fn gradcam(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(repo("")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            panic!("gradcam {args:?} still runs after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn fails_with(args: &[&str], message: &str) {
    let o = gradcam(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(matches!(o.status.code(), Some(1 | 2)), "{args:?}: {:?} {stderr}", o.status);
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A copy of the test split of the sample scenes.
fn split_copy(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for f in ["captions.json", "instances.json", "questions.json", "annotations.json"] {
        std::fs::copy(repo("data/shapescenes/test").join(f), dir.join(f)).unwrap();
    }
    for f in ["000018.png", "000019.png"] {
        std::fs::copy(repo("data/shapescenes/test/images").join(f), dir.join("images").join(f)).unwrap();
    }
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[test]
fn a_fifo_named_as_an_image_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("scene.png");
    mkfifo(&fifo);
    let out = dir.path().join("out");
    fails_with(&["caption", fifo.to_str().unwrap(), "--out", out.to_str().unwrap()], "not a regular file");
    // The same inside a dataset: caption --eval, vqa --eval and dissect read instances.json's images.
    let split = dir.path().join("split");
    split_copy(&split);
    std::fs::remove_file(split.join("images/000019.png")).unwrap();
    mkfifo(&split.join("images/000019.png"));
    let s = split.to_str().unwrap();
    fails_with(&["caption", "--eval", s], "not a regular file");
    fails_with(&["vqa", "--eval", s], "not a regular file");
    fails_with(&["dissect", "--data", s, "--out", out.join("d.json").to_str().unwrap()], "not a regular file");
}

#[test]
fn flags_that_would_exhaust_the_machine_are_refused() {
    fails_with(&["--threads", "100000", "layers"], "--threads 100000: give 1 to 1024");
    fails_with(&["--threads", "0", "layers"], "give 1 to 1024");
    fails_with(&["eval", "deletion", "--model", "models/captioner", "--data", "data/shapescenes/test", "--steps", "1000000"], "more steps than the input has pixels");
}

#[test]
fn vqa_eval_refuses_a_folder_without_questions() {
    let dir = tempfile::tempdir().unwrap();
    split_copy(dir.path());
    std::fs::remove_file(dir.path().join("questions.json")).unwrap();
    std::fs::remove_file(dir.path().join("annotations.json")).unwrap();
    fails_with(&["vqa", "--eval", dir.path().to_str().unwrap()], "no questions.json with annotations.json");
}

#[test]
fn a_config_with_a_huge_image_size_is_refused() {
    for (model, args) in [("captioner", vec!["caption", "data/shapescenes/test/images/000018.png"]), ("vqa", vec!["vqa", "data/shapescenes/test/images/000018.png", "what color is it?"])] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(repo("models").join(model).join(f), dir.path().join(f)).unwrap();
        }
        let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&config).unwrap();
        for size in [100_000u64, 1 << 31] {
            cfg["image_size"] = serde_json::json!(size);
            std::fs::write(dir.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
            let mut a = args.clone();
            a.extend(["--model", dir.path().to_str().unwrap(), "--out", dir.path().to_str().unwrap()]);
            fails_with(&a, "image_size");
        }
    }
}

/// torchvision's ResNet-50 saved with safetensors has a header length whose first byte is 0x80,
/// a pickle's protocol marker: the format is told by the safetensors header, not that byte.
#[test]
fn safetensors_whose_header_length_starts_with_0x80_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let t = candle_core::Tensor::new(&[1f32, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
    let mut name = String::from("w");
    loop {
        candle_core::safetensors::save(&std::collections::HashMap::from([(name.clone(), t.clone())]), &path).unwrap();
        if std::fs::read(&path).unwrap()[0] == 0x80 {
            break;
        }
        name.push('x');
        assert!(name.len() < 400, "no header length ending in 0x80");
    }
    let w = gradcam_encoders::Weights::load(&path).unwrap();
    assert_eq!(w.names(), vec![name.clone()]);
}

/// A copy of a shipped model folder.
fn model_copy(model: &str, dir: &Path) {
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(repo("models").join(model).join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn non_finite_weights_are_refused_at_load() {
    for (model, args) in [("captioner", vec!["caption", "data/shapescenes/test/images/000018.png"]), ("vqa", vec!["vqa", "data/shapescenes/test/images/000018.png", "what color is it?"])] {
        for bad in [f32::NAN, f32::INFINITY] {
            let dir = tempfile::tempdir().unwrap();
            model_copy(model, dir.path());
            let path = dir.path().join("model.safetensors");
            let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
            let name = tensors.keys().find(|k| k.ends_with("weight")).unwrap().clone();
            let t = &tensors[&name];
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let middle = v.len() / 2;
            v[middle] = bad;
            tensors.insert(name.clone(), candle_core::Tensor::from_vec(v, t.shape(), &candle_core::Device::Cpu).unwrap());
            candle_core::safetensors::save(&tensors, &path).unwrap();
            let mut a = args.clone();
            a.extend(["--model", dir.path().to_str().unwrap(), "--out", dir.path().to_str().unwrap()]);
            fails_with(&a, &format!("tensor \"{name}\" holds NaN or infinite values"));
        }
    }
}

#[test]
fn a_tokenizer_with_misplaced_special_tokens_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    model_copy("captioner", dir.path());
    let path = dir.path().join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // <end> and the word with id 7 trade places.
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    let word = vocab.iter().find(|(_, id)| id.as_u64() == Some(7)).map(|(w, _)| w.clone()).unwrap();
    vocab.insert("<end>".into(), serde_json::json!(7));
    vocab.insert(word, serde_json::json!(2));
    for a in t["added_tokens"].as_array_mut().unwrap() {
        if a["content"] == "<end>" {
            a["id"] = serde_json::json!(7);
        }
    }
    std::fs::write(&path, serde_json::to_string(&t).unwrap()).unwrap();
    fails_with(&["caption", "data/shapescenes/test/images/000018.png", "--model", dir.path().to_str().unwrap(), "--out", dir.path().to_str().unwrap()], "must have ids 0 to 3");
}

#[test]
fn training_settings_that_cannot_train_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    for lr in ["NaN", "inf", "1e30", "0", "-1"] {
        for what in ["captioner", "vqa"] {
            fails_with(&["train", what, "--data", "data/shapescenes", "--out", out.to_str().unwrap(), &format!("--lr={lr}")], "learning rate");
            assert!(!out.exists(), "train {what} --lr {lr} wrote {}", out.display());
        }
    }
    fails_with(&["train", "captioner", "--data", "data/shapescenes", "--out", out.to_str().unwrap(), "--batch-size", "0"], "at least 1");
}

#[test]
fn a_caption_longer_than_the_model_takes_is_refused_at_once() {
    let words = vec!["red"; 24_000].join(" ");
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    fails_with(&["caption", "data/shapescenes/test/images/000018.png", "--caption", &words, "--out", dir.path().to_str().unwrap()], "the caption has 24000 words; the model takes at most 20");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn smaller_things() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    for caption in ["<end> <end>", "<start> a red circle"] {
        fails_with(&["caption", "data/shapescenes/test/images/000018.png", "--caption", caption, "--out", out], "not words to explain");
    }
    for (flag, value) in [("--iou-threshold", "NaN"), ("--quantile", "0"), ("--quantile", "1.5")] {
        fails_with(&["dissect", "--data", "data/shapescenes/test", flag, value, "--out", &format!("{out}/d.json")], "must be in (0, 1)");
    }
    // The README's form of --split-fractions, with commas.
    let o = gradcam(&["scenes", "--out", &format!("{out}/scenes"), "--n", "10", "--split-fractions", "0.8,0.1,0.1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
