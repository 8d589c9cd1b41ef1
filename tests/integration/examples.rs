//! The library as users meet it: every program of `examples/` runs and writes what it says, and a
//! program outside the repository that depends on the `gradcam` crate by path builds its own
//! candle CNN and explains it (`examples/custom_model.rs`, built as that program).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::repo;

/// An example's binary, built by `cargo test` beside this test binary's folder.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(Path::parent).expect("target/PROFILE/deps");
    let path = dir.join("examples").join(name);
    assert!(path.exists(), "{} is not built: run the tests with `cargo test --release` from the repository root (it builds examples/)", path.display());
    path
}

/// Runs an example with `args`; returns its stdout after checking that it succeeded.
fn run(name: &str, args: &[&Path]) -> String {
    let o = Command::new(example(name)).args(args).env("GRADCAM_EFFNET_WEIGHTS", crate::effnet_weights()).output().expect("the example runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{name} failed:\n{stdout}\n{stderr}");
    stdout
}

/// Every file a line of `stdout` says it wrote exists and is not empty.
fn check_written(name: &str, stdout: &str, at_least: usize) {
    let files: Vec<&str> = stdout.lines().filter_map(|l| l.split("wrote ").nth(1)).map(|rest| rest.split(" (").next().unwrap_or(rest).trim()).collect();
    assert!(files.len() >= at_least, "{name} reported {} files, expected at least {at_least}:\n{stdout}", files.len());
    for f in files {
        let len = std::fs::metadata(f).unwrap_or_else(|e| panic!("{name} says it wrote {f}: {e}")).len();
        assert!(len > 0, "{name} wrote an empty {f}");
    }
}

#[test]
fn classify_example_explains_a_photo() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run("classify", &[&repo("data/photos/images/chelsea.png"), out.path()]);
    assert!(stdout.contains("top-5 of EfficientNet-Lite0") && stdout.contains("cat"), "{stdout}");
    assert!(stdout.contains("is supported by unit"), "no neuron report:\n{stdout}");
    check_written("classify", &stdout, 2);
}

#[test]
fn caption_words_example_writes_one_map_per_word() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run("caption_words", &[&repo("data/shapescenes/test/images/000019.png"), out.path()]);
    let caption = stdout.lines().next().unwrap_or_default().split(": ").nth(1).unwrap_or_default().to_string();
    assert!(caption.contains("yellow triangle"), "{stdout}");
    check_written("caption_words", &stdout, caption.split_whitespace().count());
}

#[test]
fn vqa_answer_example_writes_the_answer_and_its_counterfactual() {
    let out = tempfile::tempdir().unwrap();
    let q = PathBuf::from("what color is the triangle?");
    let stdout = run("vqa_answer", &[&repo("data/shapescenes/test/images/000019.png"), &q, out.path()]);
    assert!(stdout.contains("  yellow "), "{stdout}");
    assert!(stdout.contains("gradcam map of \"yellow\"") && stdout.contains("counterfactual map of \"yellow\""), "{stdout}");
    check_written("vqa_answer", &stdout, 2);
}

#[test]
fn batch_folder_example_writes_json_lines() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run("batch_folder", &[&repo("data/photos/images"), out.path()]);
    check_written("batch_folder", &stdout, 1);
    let lines = std::fs::read_to_string(out.path().join("results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 5, "one record per photo");
    for line in lines.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["predictions"].as_array().map(Vec::len), Some(5));
        let methods: Vec<&str> = r["explanations"].as_array().unwrap().iter().map(|e| e["method"].as_str().unwrap()).collect();
        assert_eq!(methods, ["gradcam", "gradcam++"]);
        assert!(Path::new(r["explanations"][0]["overlay"].as_str().unwrap()).exists());
    }
}

#[test]
fn custom_model_example_trains_and_explains_its_own_cnn() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run("custom_model", &[out.path()]);
    check_written("custom_model", &stdout, 10);
    assert!(stdout.contains("largest difference"), "{stdout}");
    let accuracy: f32 = stdout.lines().find_map(|l| l.strip_prefix("accuracy on 200 new images: ")).and_then(|v| v.trim().parse().ok()).expect("accuracy line");
    assert!(accuracy >= 0.95, "the toy CNN did not learn: {accuracy}");
    let gradcam = stdout.lines().find(|l| l.trim_start().starts_with("gradcam ")).expect("a Grad-CAM line");
    assert!(gradcam.contains("on the square"), "Grad-CAM misses the square: {gradcam}");
    // The example's own method, given to Cam as the built-in ones are.
    let occlusion = stdout.lines().find(|l| l.trim_start().starts_with("occlusion ")).expect("the user method's line");
    assert!(occlusion.contains("on the square") && out.path().join("occlusion.png").exists(), "{occlusion}");
}

/// A user's program, outside the repository, depending on the root crate by path: the custom
/// model example's source as its `main.rs`. It checks its Grad-CAM against a hand computation from
/// candle's backward (1e-5) and runs every method; built offline against the repository's lock
/// file and target folder, so only the gradcam crates and the program compile.
#[test]
fn a_program_outside_the_repository_explains_its_own_cnn() {
    let project = tempfile::tempdir().unwrap();
    let root = repo("");
    let manifest = format!(
        "[package]\nname = \"user-program\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\ngradcam = {{ path = {:?} }}\ncandle-core = \"0.11.1\"\ncandle-nn = \"0.11.1\"\nimage = {{ version = \"0.25.10\", default-features = false, features = [\"png\"] }}\n\n[workspace]\n",
        root.display().to_string()
    );
    std::fs::write(project.path().join("Cargo.toml"), manifest).unwrap();
    std::fs::create_dir(project.path().join("src")).unwrap();
    std::fs::copy(repo("examples/custom_model.rs"), project.path().join("src/main.rs")).unwrap();
    std::fs::copy(repo("Cargo.lock"), project.path().join("Cargo.lock")).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = std::env::current_exe().unwrap().parent().and_then(Path::parent).and_then(Path::parent).unwrap().to_path_buf();
    let build = Command::new(&cargo)
        .args(["build", "--release", "--offline", "--quiet"])
        .current_dir(project.path())
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("cargo runs");
    assert!(build.status.success(), "the user's program does not build:\n{}", String::from_utf8_lossy(&build.stderr));
    let out = project.path().join("out");
    let o = Command::new(target.join("release/user-program")).arg(&out).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "the user's program failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    let worst: f32 = stdout.lines().find_map(|l| l.split("largest difference ").nth(1)).and_then(|v| v.trim().parse().ok()).expect("the hand-computation line");
    assert!(worst <= 1e-5, "{stdout}");
    for method in gradcam_core::Method::ALL.map(|m| m.name()).into_iter().chain(["occlusion"]) {
        assert!(out.join(format!("{method}.png")).exists(), "no picture for {method}:\n{stdout}");
    }
}

#[test]
fn vit_example_explains_its_own_transformer_with_gradcam_rollout_and_relevance() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run("vit", &[out.path()]);
    check_written("vit", &stdout, 3);
    assert!(stdout.contains("gradcam: 4x4 map") && stdout.contains("relevance: 4x4 map") && stdout.contains("rollout: 4x4 map"), "{stdout}");
    let worst: f32 = stdout.lines().find_map(|l| l.split("largest difference ").nth(1)).and_then(|v| v.trim().parse().ok()).expect("the hand-computation line");
    assert!(worst <= 1e-5, "{stdout}");
}

#[test]
fn onnx_model_example_explains_an_exported_cnn() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run("onnx_model", &[&repo("tests/fixtures/onnx/densenet.onnx"), &repo("data/photos/images/chelsea.png"), out.path()]);
    assert!(stdout.contains("explained layer: /final_relu/Relu_output_0"), "{stdout}");
    check_written("onnx_model", &stdout, 2);
}
