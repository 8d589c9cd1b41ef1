//! `gradcam match` on CLIP-style image-text pairs: an ONNX pair made by open_clip's own classes
//! with seeded weights (tests/fixtures/make_clip_fixtures.py) against PyTorch's similarities,
//! zero-shot probabilities, Grad-CAM maps (pytorch-grad-cam), rollout and relevance; its
//! tokenizer.json against open_clip's tokenizer; and the folders, texts and tokenizers refused.

use std::path::{Path, PathBuf};
use std::process::Output;

use gradcam_clip::Matcher;
use serde_json::Value;

use crate::transformers::{fails_with, relative};
use crate::{gradcam, repo};

fn tiny() -> PathBuf {
    repo("tests/fixtures/clip/tiny")
}

fn image() -> String {
    repo("tests/fixtures/clip/scene64.png").display().to_string()
}

fn goldens() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo("tests/fixtures/clip/clip_goldens.json")).unwrap()).unwrap()
}

fn texts(g: &Value) -> Vec<String> {
    g["texts"].as_array().unwrap().iter().map(|t| t["text"].as_str().unwrap().to_string()).collect()
}

fn run_match(model: &Path, extra: &[&str], texts: &[String]) -> Output {
    let out = tempfile::tempdir().unwrap();
    let mut args = vec!["match".to_string(), image(), "--model".into(), model.display().to_string(), "--json".into(), "--out".into(), out.path().display().to_string()];
    for t in texts {
        args.extend(["--text".to_string(), t.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    gradcam(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn record(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().expect("a line")).expect("JSON")
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        v => vec![v.as_f64().unwrap()],
    }
}

#[test]
fn similarities_probabilities_and_maps_match_pytorch_at_both_layers() {
    let g = goldens();
    let texts = texts(&g);
    for case in g["cases"].as_array().unwrap() {
        let value = case["value"].as_str().unwrap();
        let layer: Vec<&str> = if case["default"].as_bool().unwrap() { vec![] } else { vec!["--layer", value] };
        for softmax in [false, true] {
            let mut extra = layer.clone();
            if softmax {
                extra.push("--softmax");
            }
            let r = record(&run_match(&tiny(), &extra, &texts));
            assert_eq!(r["layer"], value, "the default layer is the last block's attention input");
            for (j, t) in r["texts"].as_array().unwrap().iter().enumerate() {
                let gt = &g["texts"][j];
                assert_eq!(t["text"], gt["text"]);
                let sim = t["similarity"].as_f64().unwrap();
                assert!((sim - gt["cosine"].as_f64().unwrap()).abs() < 1e-5, "{t} vs {gt}");
                if softmax {
                    assert!((t["probability"].as_f64().unwrap() - gt["prob"].as_f64().unwrap()).abs() < 1e-4, "{t}");
                } else {
                    assert!(t.get("probability").is_none());
                }
                let theirs = flat(&case[if softmax { "softmax" } else { "cosine" }][j]);
                let ours = flat(&t["cam"]);
                assert_eq!(t["explanations"][0]["cam_size"], serde_json::json!([4, 4]));
                let d = relative(&ours, &theirs);
                assert!(d < 1e-4, "{value} text {j} softmax {softmax}: {d}");
            }
        }
    }
}

#[test]
fn rollout_and_relevance_match_pytorch_and_counterfactuals_come_with_every_text() {
    let g = goldens();
    let texts = texts(&g);
    let r = record(&run_match(&tiny(), &["--method", "rollout,relevance,gradcam", "--counterfactual"], &texts));
    for (j, t) in r["texts"].as_array().unwrap().iter().enumerate() {
        let ex = t["explanations"].as_array().unwrap();
        let methods: Vec<(&str, bool)> = ex.iter().map(|e| (e["method"].as_str().unwrap(), e["counterfactual"].as_bool().unwrap())).collect();
        assert_eq!(methods, [("rollout", false), ("rollout", true), ("relevance", false), ("relevance", true), ("gradcam", false), ("gradcam", true)]);
        assert!(t.get("cam").is_none(), "several methods: no cam of its own");
        assert!(relative(&flat(&ex[0]["cam"]), &flat(&g["rollout"])) < 1e-4);
        assert!(relative(&flat(&ex[2]["cam"]), &flat(&g["relevance"][j])) < 1e-4, "text {j}");
        for e in ex {
            assert!(e["overlay"].as_str().unwrap().ends_with(".png"));
        }
    }
}

#[test]
fn the_tokenizer_gives_open_clips_ids_and_cuts_long_texts_keeping_the_end_token() {
    let Matcher::Pair(pair) = Matcher::load(&tiny()).unwrap() else { panic!("an ONNX pair") };
    let g = goldens();
    for case in g["tokenizer"].as_array().unwrap() {
        let ids: Vec<i64> = pair.tokens(case["text"].as_str().unwrap()).unwrap().ids.into_iter().filter(|&i| i != 0).collect();
        let mut theirs: Vec<i64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        // Longer than the context: cut, the end token kept (as open_clip's tokenize does).
        if theirs.len() > 16 {
            theirs.truncate(15);
            theirs.push(49407);
        }
        assert_eq!(ids, theirs, "{}", case["text"]);
    }
    let long = &g["truncated"];
    let t = pair.tokens(long["text"].as_str().unwrap()).unwrap();
    assert!(t.truncated);
    assert_eq!(serde_json::json!(t.ids), long["ids"]);
    let o = run_match(&tiny(), &[], &[long["text"].as_str().unwrap().to_string()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("longer than the model's context"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(record(&o)["texts"][0]["truncated"], true);
}

/// A copy of the tiny pair with `edit` applied to its folder.
fn edited(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "image.onnx", "text.onnx", "tokenizer.json"] {
        std::fs::copy(tiny().join(f), dir.path().join(f)).unwrap();
    }
    edit(dir.path());
    dir
}

#[test]
fn bad_folders_texts_and_tokenizers_are_refused_by_name() {
    let t = vec!["a red circle".to_string()];
    let empty = tempfile::tempdir().unwrap();
    fails_with(&run_match(empty.path(), &[], &t), &["has no config.json"]);
    let no_text = edited(|d| std::fs::remove_file(d.join("text.onnx")).unwrap());
    fails_with(&run_match(no_text.path(), &[], &t), &["no text tower file \"text.onnx\""]);
    let escape = edited(|d| {
        let cfg = std::fs::read_to_string(d.join("config.json")).unwrap().replace("\"tokenizer.json\"", "\"../tokenizer.json\"");
        std::fs::write(d.join("config.json"), cfg).unwrap();
    });
    fails_with(&run_match(escape.path(), &[], &t), &["must be a name inside the model folder"]);
    let no_end = edited(|d| {
        let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer.json")).unwrap()).unwrap();
        tok["post_processor"] = Value::Null;
        std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    });
    fails_with(&run_match(no_end.path(), &[], &t), &["adds no end token"]);
    fails_with(&run_match(&tiny(), &[], &["a red circle".into(), "  ".into()]), &["text 1 is empty"]);
    fails_with(&run_match(&tiny(), &["--softmax"], &t), &["two or more texts"]);
    fails_with(&run_match(&tiny(), &["--layer", "nope"], &t), &["nope"]);
}

fn generate_scenes(dir: &Path, n: &str, seed: &str) {
    let o = gradcam(&["scenes", "--out", dir.to_str().unwrap(), "--n", n, "--seed", seed]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn train_clip_writes_a_model_that_resumes_matches_and_is_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let (data, model) = (dir.path().join("scenes"), dir.path().join("clip"));
    generate_scenes(&data, "60", "5");
    let train = |epochs: &str, resume: bool| {
        let mut args = vec!["train", "clip", "--data", data.to_str().unwrap(), "--out", model.to_str().unwrap(), "--epochs", epochs, "--batch-size", "16", "--lr", "0.001"];
        if resume {
            args.push("--resume");
        }
        let o = gradcam(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(train("1", false).contains("epoch  0: train loss"));
    let resumed = train("2", true);
    assert!(resumed.contains("epoch  1: train loss") && !resumed.contains("epoch  0:"), "{resumed}");
    let ckpt: Value = serde_json::from_str(&std::fs::read_to_string(model.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(ckpt["epochs_done"], 2);
    let card = std::fs::read_to_string(model.join("README.md")).unwrap();
    assert!(card.contains("gradcam train clip --data") && card.contains("## Test metrics"), "{card}");
    // The trained folder is a model for `match` (unknown words named) and for `eval`.
    let img = std::fs::read_dir(data.join("test/images")).unwrap().next().unwrap().unwrap().path();
    let out = dir.path().join("out");
    let o = gradcam(&["match", img.to_str().unwrap(), "--model", model.to_str().unwrap(), "--text", "red circle", "--text", "a zebra", "--method", "gradcam,relevance", "--json", "--out", out.to_str().unwrap()]);
    let r = record(&o);
    assert_eq!(r["layer"], "visual.blocks.3.norm1");
    assert_eq!(r["texts"][1]["unknown_words"], serde_json::json!(["zebra"]));
    assert_eq!(r["texts"][0]["explanations"][0]["cam_size"], serde_json::json!([8, 8]));
    let o = gradcam(&["eval", "pointing", "--model", model.to_str().unwrap(), "--data", data.join("test").to_str().unwrap(), "--method", "relevance"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("clip (relevance"), "{}", String::from_utf8_lossy(&o.stdout));
}

/// The shipped model on scenes it never saw (another seed than its training set's): each
/// object's phrase points at the object and beats the colour-shape pairs absent from its scene.
#[test]
fn the_shipped_clip_points_at_each_phrase_and_ranks_it_above_absent_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("scenes");
    generate_scenes(&data, "500", "4242");
    let test = data.join("test");
    let out = dir.path().join("eval");
    let o = gradcam(&["eval", "pointing", "--model", repo("models/clip").to_str().unwrap(), "--data", test.to_str().unwrap(), "--method", "relevance", "--tolerance", "0.0625", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let p = &s["overall"]["pointing"];
    let rate = p["hits"].as_f64().unwrap() / p["count"].as_f64().unwrap();
    assert!(p["count"].as_u64().unwrap() > 80 && rate >= 0.85, "phrase pointing {rate} over {}", p["count"]);
    let model = gradcam_clip::Trained::load(&repo("models/clip")).unwrap();
    let f = gradcam_clip::eval::phrase_test(&model, &gradcam_scenes::Split::read(&test).unwrap(), &|_, _| {}).unwrap();
    assert!(f.metrics.phrase_vs_absent >= 0.93, "{:?}", f.metrics);
}
