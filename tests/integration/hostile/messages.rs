//! Messages (issue 34): each names the problem and the file once, and blames the right thing;
//! file names from datasets and labels stay inside their folders and within a safe length.

use std::path::Path;

use super::{fails_with, gradcam, split_copy};

/// `text` occurs exactly `n` times in `s`.
fn occurs(s: &str, text: &str, n: usize) {
    assert_eq!(s.matches(text).count(), n, "{text:?} {n} times in:\n{s}");
}

fn stderr(args: &[&str]) -> String {
    let o = gradcam(args);
    crate::err(&o)
}

/// A failed write names the output and the system's reason, never the checkpoint or the
/// temporary file (`.NAME.XXXXXX.tmp`).
#[test]
fn write_failures_name_the_output_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let checkpoint = "tests/fixtures/tiny_zip.pth";
    for (out, why) in [(d.join("missing/w.safetensors"), "No such file or directory"), (file.join("w.safetensors"), "Not a directory")] {
        let e = stderr(&["convert", checkpoint, out.to_str().unwrap()]);
        assert!(e.contains(&format!("cannot write {}: {why}", out.display())) && !e.contains("checkpoint") && !e.contains(".w.safetensors."), "{e}");
    }
    fails_with(&["convert", checkpoint, d.to_str().unwrap()], "exists and is not a regular file (a directory)");
    // demo bias: a file where a model's folder goes, a folder where its weights go.
    let out = d.join("bias");
    std::fs::create_dir_all(out.join("models")).unwrap();
    std::fs::write(out.join("models/biased"), b"x").unwrap();
    let args = ["demo", "bias", "--out", out.to_str().unwrap(), "--scenes", "20", "--epochs", "1"];
    let e = stderr(&args);
    assert!(e.contains(&format!("cannot create the folder {}: File exists", out.join("models/biased").display())) && !e.contains("checkpoint"), "{e}");
    std::fs::remove_file(out.join("models/biased")).unwrap();
    std::fs::create_dir_all(out.join("models/biased/model.safetensors")).unwrap();
    let e = stderr(&args);
    assert!(e.contains(&format!("{} exists and is not a regular file", out.join("models/biased/model.safetensors").display())) && !e.contains("checkpoint"), "{e}");
}

/// A missing file: its path and the system's reason, each printed once.
#[test]
fn a_missing_file_is_named_once_with_its_reason_once() {
    let missing = "/nonexistent/scene.png";
    let os = "No such file or directory (os error 2)";
    for args in [
        vec!["caption", missing],
        vec!["classify", missing, "--model", "tests/fixtures/onnx/resnet.onnx"],
        vec!["vqa", missing, "what color is the circle?"],
        vec!["convert", "/nonexistent/w.pth", "/tmp/w.safetensors"],
        vec!["classify", "tests/fixtures/onnx/input96.png", "--model", "/nonexistent/m.onnx"],
    ] {
        let e = stderr(&args);
        occurs(&e, os, 1);
        occurs(&e, "/nonexistent/", 1);
    }
    // The dataset's file, not the model, is what is missing.
    let e = stderr(&["eval", "pointing", "--model", "models/captioner", "--data", "/nonexistent"]);
    assert!(e.starts_with("error: /nonexistent/") && e.contains(&format!(".json: {os}")) && !e.contains("loading"), "{e}");
    occurs(&e, os, 1);
}

/// Two splits of the sample scenes under `data` without the files `without`.
fn data_without(data: &Path, without: &[&str]) {
    for split in ["train", "val"] {
        split_copy(&data.join(split));
        for f in without {
            std::fs::remove_file(data.join(split).join(f)).unwrap();
        }
    }
}

#[test]
fn training_reads_only_what_it_needs_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    data_without(&data, &["captions.json"]);
    let (d, out) = (data.to_str().unwrap(), dir.path().join("m"));
    let o = gradcam(&["train", "classifier", "--data", d, "--out", out.to_str().unwrap(), "--epochs", "1"]);
    crate::ok(&o);
    assert!(out.join("model.safetensors").exists());
    let e = stderr(&["train", "captioner", "--data", d, "--out", dir.path().join("c").to_str().unwrap(), "--epochs", "1"]);
    assert!(e.contains(&format!("{} does not exist", data.join("train/captions.json").display())), "{e}");
    // The VQA model reads instances and questions.
    crate::ok(&gradcam(&["train", "vqa", "--data", d, "--out", dir.path().join("v").to_str().unwrap(), "--epochs", "1"]));
}

/// --resume with nothing to resume is an error naming the folder and the file, before anything
/// is written (it used to start afresh without a word).
#[test]
fn resume_without_a_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    for model in ["classifier", "captioner", "vqa", "clip"] {
        let e = stderr(&["train", model, "--data", "data/shapescenes", "--out", out.to_str().unwrap(), "--epochs", "1", "--resume"]);
        assert!(e.contains(&format!("--resume finds nothing to continue from: {} holds no checkpoint.json", out.display())), "{e}");
        assert!(!out.exists(), "nothing written");
    }
}

/// Labels of 5,000 characters (and a long image name) make files of a safe length, one per label.
#[test]
fn long_labels_make_files_of_a_safe_length() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, (0..10).map(|i| format!("{} {i}\n", "a long label".repeat(420))).collect::<String>()).unwrap();
    let image = dir.path().join(format!("{}.png", "i".repeat(240)));
    std::fs::copy(crate::repo("tests/fixtures/onnx/input96.png"), &image).unwrap();
    let out = dir.path().join("out");
    let args = ["classify", image.to_str().unwrap(), "--model", "tests/fixtures/onnx/resnet.onnx", "--resize", "none", "--labels", labels.to_str().unwrap(), "--class", "0", "--class", "1", "--out", out.to_str().unwrap()];
    crate::ok(&gradcam(&args));
    let names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "a file per class: {names:?}");
    assert!(names.iter().all(|n| n.len() <= 200), "{names:?}");
}

/// A COCO `file_name` outside the images folder (`../`, absolute) is refused by every reader,
/// naming the file, the record and the name; the file it points at is never read.
#[test]
fn annotation_file_names_outside_the_images_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let split = dir.path().join("split");
    split_copy(&split);
    let outside = dir.path().join("outside.png");
    std::fs::copy(split.join("images/000018.png"), &outside).unwrap();
    let s = split.to_str().unwrap();
    for (file, name) in [("instances.json", "../../outside.png".to_string()), ("captions.json", outside.display().to_string())] {
        let path = split.join(file);
        let original = std::fs::read_to_string(&path).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v["images"][0]["file_name"] = serde_json::json!(name);
        std::fs::write(&path, v.to_string()).unwrap();
        let message = format!("{}: images[0] (id 18): field `file_name`: {name:?} is not a file inside the images folder", path.display());
        fails_with(&["caption", "--eval", s], &message);
        fails_with(&["eval", "pointing", "--model", "models/captioner", "--data", s], &message);
        if file == "instances.json" {
            fails_with(&["dissect", "--data", s, "--out", dir.path().join("d.json").to_str().unwrap()], &message);
        }
        std::fs::write(&path, original).unwrap();
    }
}
