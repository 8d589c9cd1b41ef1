//! `--model FILE.onnx` on transformers: Grad-CAM on token grids (ViT, DeiT with its distillation
//! token, Swin's channels-last values) and attention rollout / relevance against PyTorch's
//! (tests/fixtures/make_vit_fixtures.py), the gradient through a transformer head against finite
//! differences, every method and command on a ViT, and the layouts that are refused.

use std::process::{Command, Output};

use candle_core::{Tensor, Var};
use gradcam_core::Explainable;
use serde_json::Value;

use crate::repo;

fn gradcam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).output().expect("gradcam runs")
}

fn fixture(name: &str) -> String {
    repo(&format!("tests/fixtures/onnx/{name}")).display().to_string()
}

fn ok_json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().expect("a line")).expect("JSON")
}

pub(crate) fn fails_with(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(matches!(o.status.code(), Some(1 | 2)), "{:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

fn flat(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect()
}

/// Largest difference over the reference's maximum.
pub(crate) fn relative(ours: &[f64], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let max = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(max > 0.0, "the reference map is zero");
    ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max) / max
}

fn goldens() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("vit_goldens.json")).unwrap()).unwrap()
}

#[test]
fn token_grid_maps_match_pytorch_on_vit_deit_and_swin() {
    let out = tempfile::tempdir().unwrap();
    let image = fixture("input96.png");
    let mut models = 0;
    for (name, g) in goldens().as_object().unwrap() {
        let model = fixture(&format!("{name}.onnx"));
        let class = g["class"].as_u64().unwrap().to_string();
        let logits: Vec<f64> = g["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for case in g["cases"].as_array().unwrap() {
            let value = case["value"].as_str().unwrap();
            let args = vec!["classify", &image, "--model", &model, "--resize", "none", "--class", &class, "--json", "--out", out.path().to_str().unwrap()];
            // The default layer (the last block's attention input) without --layer, and with it.
            let runs = if case["default"].as_bool().unwrap() { vec![args.clone(), [args.clone(), vec!["--layer", value]].concat()] } else { vec![[args, vec!["--layer", value]].concat()] };
            for run in runs {
                let r = ok_json(&gradcam(&run));
                assert_eq!(r["layer"], case["value"], "{name}");
                let d = relative(&flat(&r["explanations"][0]["cam"]), &flat(&case["cam"]));
                assert!(d <= 1e-3, "{name} at {value}: map differs from PyTorch's by {d:.2e} of its maximum");
                let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
                assert_eq!(r["predictions"][0]["class"].as_u64().unwrap() as usize, best, "{name}: top-1");
                let logit = r["predictions"][0]["logit"].as_f64().unwrap();
                assert!((logit - logits[best]).abs() <= 1e-4 * logits[best].abs().max(1.0), "{name}: logit {logit} vs {}", logits[best]);
            }
        }
        models += 1;
    }
    assert_eq!(models, 3);
}

#[test]
fn rollout_and_relevance_match_pytorch_from_the_attention_probabilities() {
    let out = tempfile::tempdir().unwrap();
    let g = goldens();
    for name in ["vit", "deit"] {
        let class = g[name]["class"].as_u64().unwrap().to_string();
        let o = gradcam(&["classify", &fixture("input96.png"), "--model", &fixture(&format!("{name}.onnx")), "--resize", "none", "--class", &class, "--method", "rollout,relevance", "--json", "--out", out.path().to_str().unwrap()]);
        let r = ok_json(&o);
        let e = r["explanations"].as_array().unwrap();
        assert_eq!(e.len(), 2);
        for m in e {
            let method = m["method"].as_str().unwrap();
            assert_eq!(m["cam_size"], serde_json::json!([6, 6]), "{name} {method}");
            let d = relative(&flat(&m["cam"]), &flat(&g[name][method]));
            assert!(d <= 1e-3, "{name} {method}: differs from PyTorch's by {d:.2e} of its maximum");
            assert!(std::path::Path::new(m["overlay"].as_str().unwrap()).is_file());
        }
    }
}

#[test]
fn layers_lists_token_values_with_their_grid_and_the_default() {
    for (name, default, grid) in [
        ("vit", "/encoder/layers/encoder_layer_2/ln_1/LayerNormalization_output_0\tLayerNormalization\t[1, 37, 32]\ttokens 1+6x6", "tokens 1+6x6"),
        ("deit", "/blocks/blocks.2/norm1/LayerNormalization_output_0\tLayerNormalization\t[1, 38, 32]\ttokens 2+6x6", "tokens 2+6x6"),
        ("swin", "/features/features.3/features.3.1/norm1/LayerNormalization_output_0\tLayerNormalization\t[1, 12, 12, 32]\tchannels-last 12x12", "channels-last 24x24"),
    ] {
        let o = gradcam(&["layers", "--model", &fixture(&format!("{name}.onnx"))]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        let defaults: Vec<&str> = text.lines().filter(|l| l.ends_with("(default)")).collect();
        assert_eq!(defaults, [format!("{default}  (default)")], "{name}");
        assert!(text.lines().any(|l| l.ends_with(grid)), "{name}: no value on {grid}");
    }
}

#[test]
fn every_method_counterfactual_neurons_and_eval_work_on_a_vit() {
    let out = tempfile::tempdir().unwrap();
    let methods = "gradcam,gradcam++,hirescam,xgradcam,layercam,eigencam,ablationcam,scorecam,guided-backprop,guided-gradcam,rollout,relevance";
    let o = gradcam(&["classify", &fixture("input96.png"), "--model", &fixture("vit.onnx"), "--resize", "none", "--method", methods, "--counterfactual", "--neurons", "--json", "--out", out.path().to_str().unwrap()]);
    let r = ok_json(&o);
    let e = r["explanations"].as_array().unwrap();
    let names: std::collections::BTreeSet<&str> = e.iter().map(|m| m["method"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 12, "{names:?}");
    for m in e {
        assert_eq!(m["cam_size"], serde_json::json!([6, 6]), "{}", m["method"]);
        assert!(flat(&m["cam"]).iter().all(|v| v.is_finite()), "{}", m["method"]);
        assert!(std::path::Path::new(m["overlay"].as_str().unwrap()).is_file(), "{}", m["overlay"]);
    }
    let text = e.iter().find(|m| m["method"] == "gradcam").unwrap()["text"].as_str().expect("a textual explanation").to_string();
    assert!(text.contains("unit"), "{text}");
    // The paper's evaluations take a transformer like any classifier (class names from --labels).
    let labels = out.path().join("labels.txt");
    std::fs::write(&labels, ["circle", "square", "triangle", "a", "b", "c", "d", "e", "f", "g"].join("\n")).unwrap();
    let data = repo("data/shapescenes/test");
    let o = gradcam(&["eval", "pointing,energy", "--model", &fixture("vit.onnx"), "--labels", labels.to_str().unwrap(), "--data", data.to_str().unwrap(), "--limit", "3", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).expect("a JSON summary");
    assert!(s.to_string().contains("pointing"), "{s}");
}

#[test]
fn token_layouts_that_do_not_fit_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let image = fixture("input96.png");
    let classify = |model: &str, extra: &[&str]| gradcam(&[&["classify", &image, "--model", &fixture(model), "--resize", "none", "--out", dir], extra].concat());
    // A value after the class-token pooling has no grid.
    fails_with(&classify("vit.onnx", &["--layer", "/Gather_output_0"]), &["/Gather_output_0", "after the tokens are pooled"]);
    // Overrides the value contradicts.
    let ln = "/encoder/layers/encoder_layer_2/ln_1/LayerNormalization_output_0";
    fails_with(&classify("vit.onnx", &["--layer", ln, "--tokens", "1:5x5"]), &["--layer", "37 tokens", "--tokens 1:5x5"]);
    fails_with(&classify("vit.onnx", &["--layer", ln, "--channels-last"]), &["--channels-last is for 4-D values"]);
    fails_with(&classify("vit.onnx", &["--tokens", "1:6x6", "--channels-last"]), &["--tokens and --channels-last", "give one"]);
    fails_with(&classify("vit.onnx", &["--tokens", "6x6"]), &["--tokens", "\"6x6\"", "give P:HxW"]);
    // An override that agrees gives the same map as the guess.
    let guessed = ok_json(&classify("deit.onnx", &["--json"]));
    let told = ok_json(&classify("deit.onnx", &["--json", "--tokens", "2:6x6"]));
    assert_eq!(guessed["explanations"][0]["cam"], told["explanations"][0]["cam"]);
    // A token count that lies on no grid of the input.
    fails_with(&gradcam(&["classify", &image, "--model", &fixture("tokens_no_grid.onnx"), "--layer", "tokens", "--out", dir]), &["8 tokens", "no grid of the 32x32 input", "patch grid is 4x4", "--tokens P:HxW"]);
    // Rollout and relevance: refused on a CNN and on Swin's windowed attention, with the reason.
    fails_with(&classify("resnet.onnx", &["--method", "rollout"]), &["rollout and relevance need a transformer's attention"]);
    fails_with(&classify("swin.onnx", &["--method", "relevance"]), &["windowed attention"]);
    // Built-in architectures take no token options.
    fails_with(&gradcam(&["classify", &image, "--model", "resnet18", "--tokens", "1:6x6", "--out", dir]), &["--tokens", "ONNX"]);
}

/// dy/dA through a transformer head (attention, LayerNorm, GELU, the residual stream held) against
/// central finite differences of the head on the packed activations.
#[test]
fn a_transformer_heads_gradient_equals_finite_differences() {
    let model = std::sync::Arc::new(gradcam_encoders::onnx::OnnxModel::load(std::path::Path::new(&fixture("vit.onnx")), &Default::default()).unwrap());
    let net = model.network(Some("/encoder/layers/encoder_layer_1/ln_1/LayerNormalization_output_0")).unwrap();
    let split = net.split(0);
    let mut state = 7u64;
    let input: Vec<f32> = (0..3 * 96 * 96)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let input = Tensor::from_vec(input, (1, 3, 96, 96), &candle_core::Device::Cpu).unwrap();
    let a = split.features(&input).unwrap(); // [1, len]: the tokens, then the residual stream
    let gradcam_core::Layout::Packed { start, h, w, channels } = split.layout() else { panic!("a token layout") };
    assert_eq!((start, h, w, channels), (32, 6, 6, 32));
    let class = 4;
    let v = Var::from_tensor(&a).unwrap();
    let y = split.head(v.as_tensor()).unwrap().get(0).unwrap().get(class).unwrap();
    let grads = y.backward().unwrap();
    let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let base = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let score = |values: Vec<f32>| -> f64 {
        let t = Tensor::from_vec(values, a.dims(), &candle_core::Device::Cpu).unwrap();
        split.head(&t).unwrap().get(0).unwrap().get(class).unwrap().to_scalar::<f32>().unwrap() as f64
    };
    // The class token, grid tokens and the residual stream (every 97th value).
    for i in (0..base.len()).step_by(97) {
        let eps = 1e-2f32;
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus[i] += eps;
        minus[i] -= eps;
        let fd = (score(plus) - score(minus)) / (2.0 * eps as f64);
        assert!((fd - g[i] as f64).abs() <= 2e-3 * (1.0 + fd.abs()), "value {i}: finite difference {fd:.5}, backward {:.5}", g[i]);
    }
}
