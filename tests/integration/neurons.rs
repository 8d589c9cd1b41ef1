//! Textual explanations: dissection IoUs against a hand-computed case, reports that are views of
//! the alpha_k that made the map, and `--neurons` / `gradcam dissect` end to end.

use std::process::Command;

use gradcam_captioner::eval::word_explanations;
use gradcam_neurons::dissect::quantile_threshold;
use gradcam_neurons::{dissect, report, Concept, ImageMasks, Options, UnitNames};
use gradcam_scenes::rle::Mask;
use serde_json::Value;

use crate::repo;

fn mask(h: usize, w: usize, on: &[usize]) -> Mask {
    let mut m = Mask::new(h, w);
    for &i in on {
        m.data[i] = true;
    }
    m
}

#[test]
fn dissection_iou_matches_a_hand_computed_case() {
    // Two 2x2 images, two units. Unit 0's 8 values sorted: 0 0 0 0 1 2 3 4; with quantile 0.25
    // the 2 largest are "on" (threshold 2): image 0, pixels 0 and 1.
    let activations = vec![vec![4.0, 3.0, 0.0, 0.0, /* unit 1 */ 0.0, 0.0, 0.0, 0.0], vec![0.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]];
    let concepts = vec![Concept { name: "red".into(), category: "color".into() }, Concept { name: "circle".into(), category: "shape".into() }];
    let masks = vec![
        ImageMasks { height: 2, width: 2, masks: vec![Some(mask(2, 2, &[0, 2])), Some(mask(2, 2, &[1]))] },
        ImageMasks { height: 2, width: 2, masks: vec![None, Some(mask(2, 2, &[2, 3]))] },
    ];
    let units = dissect(&activations, (2, 2, 2), &masks, &concepts, Options { quantile: 0.25, iou_threshold: 0.3 }).unwrap();
    // red: intersection 1 (pixel 0), union 2 + 2 - 1 = 3; circle: intersection 1, union 2 + 3 - 1 = 4.
    assert_eq!(units[0].threshold, 2.0);
    assert_eq!(units[0].concept.as_deref(), Some("red"));
    assert_eq!(units[0].category.as_deref(), Some("color"));
    assert!((units[0].iou - 1.0 / 3.0).abs() < 1e-6, "{}", units[0].iou);
    assert!(units[0].named);
    // Unit 1 never fires: no concept, not named.
    assert_eq!((units[1].concept.as_deref(), units[1].iou, units[1].named), (None, 0.0, false));
    // Above the threshold only at 1/3 < 0.4: the best concept is kept but the unit is unnamed.
    let strict = dissect(&activations, (2, 2, 2), &masks, &concepts, Options { quantile: 0.25, iou_threshold: 0.4 }).unwrap();
    assert!(!strict[0].named && strict[0].concept.as_deref() == Some("red"));
}

#[test]
fn quantile_threshold_keeps_the_requested_fraction_above() {
    let mut v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let t = quantile_threshold(&mut v, 0.005);
    assert_eq!(v.iter().filter(|&&x| x > t).count(), 5);
}

#[test]
fn reports_are_the_alphas_that_made_the_map() {
    let (_, model, _) = crate::captioner::tiny();
    let tokens = model.vocab.encode("a red circle left of a blue square").unwrap();
    let a = model.features(&crate::captioner::image(3)).unwrap(); // [1, K, h, w]
    let results = word_explanations(&model, &a, &tokens).unwrap();
    let r = &results[1];
    let rep = report(r.weights.as_deref().unwrap(), &UnitNames::None, "red", 5);
    let mut sorted = r.weights.as_deref().unwrap().to_vec();
    sorted.sort_by(|x, y| y.total_cmp(x));
    assert_eq!(rep.top.iter().map(|n| n.alpha).collect::<Vec<_>>(), sorted[..5].to_vec());
    assert_eq!(rep.bottom.iter().map(|n| n.alpha).collect::<Vec<_>>(), sorted.iter().rev().take(5).copied().collect::<Vec<_>>());
    for n in rep.top.iter().chain(&rep.bottom) {
        assert_eq!(n.alpha.to_bits(), r.weights.as_deref().unwrap()[n.unit].to_bits());
    }
    // The map recomputed from these alphas: ReLU(sum_k alpha_k A^k).
    let (_, k, h, w) = a.dims4().unwrap();
    let acts = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for p in 0..h * w {
        let v: f32 = (0..k).map(|c| r.weights.as_deref().unwrap()[c] * acts[c * h * w + p]).sum::<f32>().max(0.0);
        assert!((v - r.cam().data[p]).abs() <= 1e-5 * (1.0 + v.abs()), "pixel {p}: {v} vs {}", r.cam().data[p]);
    }
    assert!(rep.text.starts_with("\"red\" is supported by unit"), "{}", rep.text);
    assert!(rep.text.contains("most against it: unit"), "{}", rep.text);
}

fn gradcam(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(repo("")).output().unwrap()
}

#[test]
fn dissect_then_explain_with_named_neurons() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("dissection.json");
    let o = gradcam(&["dissect", "--model", "models/captioner", "--data", "data/shapescenes/val", "--out", table.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t: Value = serde_json::from_slice(&std::fs::read(&table).unwrap()).unwrap();
    let cfg: Value = serde_json::from_slice(&std::fs::read(repo("models/captioner/config.json")).unwrap()).unwrap();
    assert_eq!(t["units"].as_array().unwrap().len() as u64, cfg["channels"].as_u64().unwrap());
    assert!(String::from_utf8_lossy(&o.stdout).contains("units of conv4 named"));

    let img = repo("data/shapescenes/test/images/000019.png");
    let out = dir.path().join("maps");
    let o = gradcam(&["caption", img.to_str().unwrap(), "--json", "--neurons", "--dissection", table.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    for w in j["words"].as_array().unwrap() {
        let n = &w["neurons"];
        assert_eq!((n["top"].as_array().unwrap().len(), n["bottom"].as_array().unwrap().len()), (5, 5));
        assert_eq!(n["names"], "dissection");
        let top: Vec<f64> = n["top"].as_array().unwrap().iter().map(|x| x["alpha"].as_f64().unwrap()).collect();
        assert!(top.windows(2).all(|p| p[0] >= p[1]));
        assert!(w["text"].as_str().unwrap().contains("is supported by unit"));
    }

    // A model folder without a table: a clear error that says how to make one.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(repo("models/captioner").join(f), bare.join(f)).unwrap();
    }
    let o = gradcam(&["caption", img.to_str().unwrap(), "--neurons", "--model", bare.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("gradcam dissect"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn classifier_units_are_named_by_the_classes_their_weights_raise() {
    let weights = crate::effnet_weights();
    let out = tempfile::tempdir().unwrap();
    let o = gradcam(&["classify", "data/photos/images/chelsea.png", "--weights", weights.to_str().unwrap(), "--neurons", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = &j["explanations"][0];
    let n = &e["neurons"];
    assert_eq!(n["names"], "classifier-weights");
    // Global average pool + linear: the unit's name lists its 3 largest weights in the classifier.
    let w = gradcam_encoders::Weights::load(&weights).unwrap();
    let fc = w.get("_fc.weight", &[1000, 1280]).unwrap().to_vec2::<f32>().unwrap();
    for unit in n["top"].as_array().unwrap().iter().chain(n["bottom"].as_array().unwrap()) {
        let u = unit["unit"].as_u64().unwrap() as usize;
        let mut classes: Vec<usize> = (0..1000).collect();
        classes.sort_by(|&a, &b| fc[b][u].total_cmp(&fc[a][u]));
        let names: Vec<&str> = classes[..3].iter().map(|&c| gradcam_encoders::imagenet::class_name(c).unwrap()).collect();
        assert_eq!(unit["name"].as_str().unwrap(), format!("raises {}", names.join(" / ")));
        assert!(unit["iou"].is_null());
    }
    let label = j["predictions"][0]["label"].as_str().unwrap();
    assert!(e["text"].as_str().unwrap().starts_with(&format!("\"{label}\" is supported by unit")), "{}", e["text"]);
}

/// The shipped captioner with two silent units put back into `conv4` (zero weights, bias -1, any
/// projection columns) at `at`: `gradcam prune` must remove them and slice every tensor indexed
/// by the layer's units consistently.
#[test]
fn prune_removes_exactly_the_silent_units() {
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let (padded, pruned) = (dir.path().join("padded"), dir.path().join("pruned"));
    std::fs::create_dir(&padded).unwrap();
    let shipped = candle_core::safetensors::load(repo("models/captioner/model.safetensors"), &Device::Cpu).unwrap();
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(repo("models/captioner/config.json")).unwrap()).unwrap();
    let c = cfg["channels"].as_u64().unwrap() as usize;
    let at = [0usize, 40];
    // Inserts a slice of `extra` before positions `at` (in the original numbering) along `dim`,
    // within each of `blocks` blocks of `c`.
    let insert = |t: &Tensor, dim: usize, blocks: usize, extra: &Tensor| -> Tensor {
        let mut parts = Vec::new();
        for b in 0..blocks {
            let mut from = 0;
            for &u in &at {
                parts.push(t.narrow(dim, b * c + from, u - from).unwrap());
                parts.push(extra.clone());
                from = u;
            }
            parts.push(t.narrow(dim, b * c + from, c - from).unwrap());
        }
        Tensor::cat(&parts.iter().filter(|p| p.dim(dim).unwrap() > 0).collect::<Vec<_>>(), dim).unwrap()
    };
    let mut tensors = shipped.clone();
    let w = &shipped["encoder.conv4.weight"];
    tensors.insert("encoder.conv4.weight".into(), insert(w, 0, 1, &Tensor::zeros((1, w.dim(1).unwrap(), 3, 3), w.dtype(), &Device::Cpu).unwrap()));
    tensors.insert("encoder.conv4.bias".into(), insert(&shipped["encoder.conv4.bias"], 0, 1, &Tensor::new(&[-1f32], &Device::Cpu).unwrap()));
    let p = &shipped["image_proj.weight"];
    let blocks = p.dim(1).unwrap() / c;
    tensors.insert("image_proj.weight".into(), insert(p, 1, blocks, &Tensor::ones((p.dim(0).unwrap(), 1), p.dtype(), &Device::Cpu).unwrap()));
    let wd = &shipped["words.weight"];
    tensors.insert("words.weight".into(), insert(wd, 1, 1, &Tensor::ones((wd.dim(0).unwrap(), 1), wd.dtype(), &Device::Cpu).unwrap()));
    candle_core::safetensors::save(&tensors, padded.join("model.safetensors")).unwrap();
    cfg["channels"] = (c + at.len()).into();
    std::fs::write(padded.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(repo("models/captioner/tokenizer.json"), padded.join("tokenizer.json")).unwrap();

    let o = gradcam(&["prune", "--model", padded.to_str().unwrap(), "--data", "data/shapescenes", "--out", pruned.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The 20 sample scenes leave a few rare units of the shipped model silent too; the two put
    // back must be among the removed, and the rest of every tensor must be the padded model's.
    let stdout = String::from_utf8_lossy(&o.stdout);
    let list = &stdout[stdout.find('[').unwrap() + 1..stdout.find(']').unwrap()];
    let removed: Vec<usize> = list.split(", ").map(|u| u.parse().unwrap()).collect();
    assert!(removed.contains(&0) && removed.contains(&41), "{stdout}");
    let keep: Vec<u32> = (0..(c + 2) as u32).filter(|u| !removed.contains(&(*u as usize))).collect();
    let idx = |blocks: usize| {
        let v: Vec<u32> = (0..blocks as u32).flat_map(|b| keep.iter().map(move |&u| b * (c + 2) as u32 + u)).collect();
        Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
    };
    let back = candle_core::safetensors::load(pruned.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &tensors {
        let expected = match name.as_str() {
            "encoder.conv4.weight" | "encoder.conv4.bias" => t.index_select(&idx(1), 0).unwrap(),
            "image_proj.weight" => t.index_select(&idx(blocks), 1).unwrap(),
            "words.weight" => t.index_select(&idx(1), 1).unwrap(),
            _ => t.clone(),
        };
        let diff = (expected - &back[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
    let cfg: Value = serde_json::from_slice(&std::fs::read(pruned.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["channels"].as_u64(), Some(keep.len() as u64));
    // The same captions from the padded and the pruned model.
    let img = repo("data/shapescenes/test/images/000019.png");
    let caption = |m: &std::path::Path| {
        let o = gradcam(&["caption", img.to_str().unwrap(), "--model", m.to_str().unwrap(), "--json", "--out", dir.path().join("maps").to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["caption"].clone()
    };
    assert_eq!(caption(&padded), caption(&pruned));

    // Nothing left to prune; the model's own folder as --out; a folder without images.
    let o = gradcam(&["prune", "--model", pruned.to_str().unwrap(), "--data", "data/shapescenes", "--out", dir.path().join("again").to_str().unwrap()]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("nothing to prune"));
    assert!(!dir.path().join("again").exists());
    let o = gradcam(&["prune", "--model", pruned.to_str().unwrap(), "--data", "data/shapescenes", "--out", pruned.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--out must be a new folder"));
    let o = gradcam(&["prune", "--model", padded.to_str().unwrap(), "--data", "data/shapescenes", "--out", pruned.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is not empty"), "{}", String::from_utf8_lossy(&o.stderr));
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = gradcam(&["prune", "--model", pruned.to_str().unwrap(), "--data", empty.to_str().unwrap(), "--out", dir.path().join("x").to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no images found"), "{}", String::from_utf8_lossy(&o.stderr));
}
