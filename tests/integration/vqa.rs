//! The VQA model: the answer gradient against finite differences, the frozen model against the
//! trainable one, a tiny training run whose loss falls, and question edge cases.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gradcam_core::{explain, Explainable, GradCam, Request, Target};
use gradcam_encoders::scene_cnn::init_parameters;
use gradcam_scenes::vocab::Vocab;
use gradcam_vqa::model::Trainable;
use gradcam_vqa::train::{train, Event, Settings, TrainConfig};
use gradcam_vqa::{Config, Vqa, VqaSplit};

fn tiny() -> (Trainable, Vqa) {
    let vocab = Vocab::build(["what color is the circle ?", "how many squares are there ?"], 1).unwrap();
    let mut cfg = Config::new(vocab.len(), vec!["red".into(), "blue".into(), "2".into()]);
    (cfg.scene.image_size, cfg.embed, cfg.hidden, cfg.joint, cfg.mlp) = (16, 8, 12, 10, 9);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let trainable = Trainable::new(&cfg, vb.clone(), false).unwrap();
    init_parameters(&varmap, 3).unwrap();
    (trainable, Vqa::from_varbuilder(cfg, vocab, vb).unwrap())
}

fn image(seed: u64) -> Tensor {
    let mut rng = gradcam_scenes::scene::Rng::new(seed);
    let v: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.range(-1.0, 1.0)).collect();
    Tensor::from_vec(v, (1, 3, 16, 16), &Device::Cpu).unwrap()
}

#[test]
fn frozen_model_matches_the_trainable_one() {
    let (trainable, model) = tiny();
    let q = model.question("What color is the circle?").unwrap();
    assert!(q.unknown.is_empty());
    let x = image(1);
    let ours = model.logits(&model.features(&x).unwrap(), &model.encode(&q).unwrap()).unwrap();
    let t = q.tokens.len();
    let tokens = Tensor::new(q.tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mask = Tensor::ones((1, t), DType::F32, &Device::Cpu).unwrap();
    let rows = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    let reference = trainable.forward(&x, &rows, &tokens, &mask).unwrap();
    let diff = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn answer_gradient_matches_finite_differences() {
    let (_, model) = tiny();
    let q = model.question("how many squares are there?").unwrap();
    let split = VqaSplit { model: &model, question: model.encode(&q).unwrap() };
    let a = split.features(&image(2)).unwrap(); // [1, 96, 4, 4]
    let (_, k, h, w) = a.dims4().unwrap();
    let (t, c) = (Target::class(1), Target::class(1).counterfactual());
    let targets: [&Target; 2] = [&t, &c];
    let r = explain(&split, &a, &targets.map(|target| Request { image: 0, target }), &GradCam).unwrap();
    let y = |a: &Tensor| split.head(a).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()[1] as f64;
    // Shifting channel c everywhere by s changes y by s * hw * alpha_c (central differences,
    // Richardson-extrapolated; the head has a ReLU, so a few channels may sit at a kink).
    let mut checked = 0;
    for ch in 0..k {
        let shift = |s: f32| {
            let mut v = vec![0f32; k];
            v[ch] = s;
            Tensor::from_vec(v, (1, k, 1, 1), &Device::Cpu).unwrap()
        };
        let central = |s: f32| (y(&a.broadcast_add(&shift(s)).unwrap()) - y(&a.broadcast_sub(&shift(s)).unwrap())) / (2.0 * s as f64);
        let (wide, narrow) = (central(0.1), central(0.05));
        if (wide - narrow).abs() > 1e-4 {
            continue;
        }
        let numeric = (4.0 * narrow - wide) / 3.0;
        let analytic = r[0].weights.as_deref().unwrap()[ch] as f64 * (h * w) as f64;
        assert!((numeric - analytic).abs() < 1e-3 * analytic.abs().max(1e-2), "channel {ch}: {numeric} vs {analytic}");
        assert_eq!(r[1].weights.as_deref().unwrap()[ch], -r[0].weights.as_deref().unwrap()[ch], "the counterfactual negates the weights");
        checked += 1;
    }
    assert!(checked * 10 >= k * 9, "only {checked} of {k} channels away from kinks");
}

#[test]
fn a_tiny_vqa_model_learns() {
    let data = tempfile::tempdir().unwrap();
    let cfg = gradcam_scenes::Config { n: 60, seed: 4, fractions: [0.8, 0.2, 0.0], size: 64, bias: None };
    gradcam_scenes::dataset::write(data.path(), &cfg, &|| {}).unwrap();
    let out = tempfile::tempdir().unwrap();
    let tc = TrainConfig { settings: Settings { epochs: 5, batch_size: 8, lr: 3e-3, weight_decay: 0.0, seed: 2 }, ..Default::default() };
    let mut losses = Vec::new();
    let ckpt = train(data.path(), out.path(), &tc, false, &mut |e| {
        if let Event::Step { loss } = e {
            losses.push(loss)
        }
    })
    .unwrap();
    assert_eq!(ckpt.epochs_done, 5);
    let first: f32 = losses[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    let model = Vqa::load(out.path()).unwrap();
    // Unknown words are read as <unk> and reported; empty questions are an error; long ones are cut.
    let q = model.question("what colour is the dodecahedron?").unwrap();
    assert_eq!(q.unknown, vec!["colour".to_string(), "dodecahedron".to_string()]);
    assert!(matches!(model.question("   "), Err(gradcam_vqa::Error::EmptyQuestion)));
    let long = "what ".repeat(100);
    let q = model.question(&long).unwrap();
    assert!(q.truncated && q.tokens.len() == model.cfg.max_question_len);
    let err = model.answer_index("elephant").unwrap_err().to_string();
    assert!(err.contains("elephant") && err.contains("yes"), "{err}");
}

/// A 30-scene dataset and a captioner trained on it for one epoch (an encoder to start from).
fn scenes_and_a_captioner() -> (tempfile::TempDir, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let cfg = gradcam_scenes::Config { n: 30, seed: 6, fractions: [0.8, 0.2, 0.0], size: 64, bias: None };
    gradcam_scenes::dataset::write(data.path(), &cfg, &|| {}).unwrap();
    let captioner = tempfile::tempdir().unwrap();
    let tc = gradcam_captioner::train::TrainConfig { settings: Settings { epochs: 1, batch_size: 8, ..Default::default() }, hidden: 16, val_images: 2, ..Default::default() };
    gradcam_captioner::train::train(data.path(), captioner.path(), &tc, false, &mut |_| {}).unwrap();
    (data, captioner)
}

/// The largest absolute difference of two tensors of one shape.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn a_vqa_model_can_start_from_a_trained_encoder_and_keep_it_fixed() {
    let (data, captioner) = scenes_and_a_captioner();
    let out = tempfile::tempdir().unwrap();
    let tc = TrainConfig { settings: Settings { epochs: 2, batch_size: 8, ..Default::default() }, encoder_from: Some(captioner.path().to_path_buf()), freeze_encoder: true, ..Default::default() };
    train(data.path(), out.path(), &tc, false, &mut |_| {}).unwrap();
    let load = |dir: &std::path::Path| candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let (theirs, ours) = (load(captioner.path()), load(out.path()));
    let mut compared = 0;
    for (name, t) in ours.iter().filter(|(n, _)| n.starts_with("encoder.")) {
        let diff = max_diff(t, &theirs[name]);
        assert_eq!(diff, 0.0, "{name} changed");
        compared += 1;
    }
    assert_eq!(compared, 8, "4 convolutions, weight and bias each");
    // Not frozen: the encoder moves.
    let out2 = tempfile::tempdir().unwrap();
    train(data.path(), out2.path(), &TrainConfig { freeze_encoder: false, ..tc.clone() }, false, &mut |_| {}).unwrap();
    let moved = load(out2.path());
    let diff = max_diff(&moved["encoder.conv1.weight"], &theirs["encoder.conv1.weight"]);
    assert!(diff > 0.0);
    // Its own learning rate: a tiny one moves it much less than the rest's.
    let out3 = tempfile::tempdir().unwrap();
    train(data.path(), out3.path(), &TrainConfig { freeze_encoder: false, encoder_lr: Some(1e-7), ..tc.clone() }, false, &mut |_| {}).unwrap();
    let slow = load(out3.path());
    let slow_diff = max_diff(&slow["encoder.conv1.weight"], &theirs["encoder.conv1.weight"]);
    assert!(slow_diff > 0.0 && slow_diff < diff / 100.0, "{slow_diff} vs {diff}");
    let err = train(data.path(), out3.path(), &TrainConfig { encoder_lr: Some(1e-4), ..tc.clone() }, false, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("frozen encoder"), "{err}");
    // Freezing without a trained encoder is an error.
    let err = train(data.path(), out2.path(), &TrainConfig { encoder_from: None, freeze_encoder: true, ..Default::default() }, false, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("encoder"), "{err}");
}

/// `drop_background_units` leaves out exactly the encoder units active at more than half of
/// the positions of the training images (two planted ones, whose bias makes them fire
/// everywhere, among them), and copies the others' weights unchanged.
#[test]
fn background_units_are_left_out_of_the_loaded_encoder() {
    let (data, captioner) = scenes_and_a_captioner();
    // Units 3 and 40 fire everywhere.
    let weights = captioner.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let mut bias = tensors["encoder.conv4.bias"].to_vec1::<f32>().unwrap();
    let channels = bias.len();
    (bias[3], bias[40]) = (50.0, 50.0);
    tensors.insert("encoder.conv4.bias".into(), Tensor::new(bias, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &weights).unwrap();

    // Each unit's share of active positions on the training images, computed here.
    let (cnn, size) = gradcam_encoders::scene_cnn::load_encoder(captioner.path()).unwrap();
    let split = gradcam_scenes::Split::read(&data.path().join("train")).unwrap();
    let inputs: Vec<Tensor> = split.examples().iter().map(|ex| gradcam_encoders::scene_cnn::SceneCnn::preprocess(&image::open(&ex.path).unwrap().to_rgb8(), size).unwrap()).collect();
    let a = cnn.forward(&Tensor::stack(&inputs, 0).unwrap()).unwrap();
    let active = a.gt(0.0).unwrap().to_dtype(DType::F32).unwrap().mean((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
    let expected: Vec<u32> = (0..channels as u32).filter(|&u| active[u as usize] > 0.5).collect();
    assert!(expected.contains(&3) && expected.contains(&40), "{active:?}");

    let out = tempfile::tempdir().unwrap();
    let tc = TrainConfig { settings: Settings { epochs: 1, batch_size: 8, ..Default::default() }, encoder_from: Some(captioner.path().to_path_buf()), freeze_encoder: true, drop_background_units: true, ..Default::default() };
    let ckpt = train(data.path(), out.path(), &tc, false, &mut |_| {}).unwrap();
    assert_eq!(ckpt.extra.dropped_units.iter().map(|&(u, _)| u).collect::<Vec<_>>(), expected);
    for &(u, share) in &ckpt.extra.dropped_units {
        assert!((share - active[u as usize] as f64).abs() < 1e-6, "unit {u}: {share} vs {}", active[u as usize]);
    }
    let model = Vqa::load(out.path()).unwrap();
    assert_eq!(model.cfg.scene.channels, channels - expected.len());
    let ours = candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let keep: Vec<u32> = (0..channels as u32).filter(|u| !expected.contains(u)).collect();
    let keep = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
    for name in ["encoder.conv1.weight", "encoder.conv3.bias", "encoder.conv4.weight", "encoder.conv4.bias"] {
        let theirs = if name.starts_with("encoder.conv4") { tensors[name].index_select(&keep, 0).unwrap() } else { tensors[name].clone() };
        let diff = max_diff(&ours[name], &theirs);
        assert_eq!(diff, 0.0, "{name}");
    }
    let err = train(data.path(), out.path(), &TrainConfig { encoder_from: None, freeze_encoder: false, ..tc }, false, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("background units"), "{err}");
}

fn gradcam(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(crate::repo("")).output().unwrap()
}

#[test]
fn vqa_command_answers_explains_and_scores_a_file() {
    let out = tempfile::tempdir().unwrap();
    let img = crate::repo("data/shapescenes/test/images/000019.png");
    let o = gradcam(&["vqa", img.to_str().unwrap(), "What color is the triangle?", "--answer", "red", "--counterfactual", "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["answers"][0]["answer"], "yellow");
    let e = j["explanations"].as_array().unwrap();
    assert_eq!(e.len(), 4, "yellow and red, each with its counterfactual");
    assert_eq!((e[0]["answer"].as_str(), e[1]["counterfactual"].as_bool()), (Some("yellow"), Some(true)));
    assert_eq!(e[0]["cam_size"], serde_json::json!([16, 16]));

    let o = gradcam(&["vqa", img.to_str().unwrap(), "   ", "--out", out.path().to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("the question is empty"));
    let o = gradcam(&["vqa", img.to_str().unwrap(), "is there a mauve blob?", "--json", "--out", out.path().to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["unknown_words"], serde_json::json!(["mauve", "blob"]));

    let dir = crate::repo("data/shapescenes/test");
    let o = gradcam(&[
        "vqa", "--questions", dir.join("questions.json").to_str().unwrap(), "--images", dir.join("images").to_str().unwrap(),
        "--annotations", dir.join("annotations.json").to_str().unwrap(), "--json", "--out", out.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("VQA accuracy overall"));
    assert!(String::from_utf8_lossy(&o.stdout).lines().count() >= 5);
}

/// The counterfactual check's mass: the share of a map on a mask, 0 for an empty map; and the
/// evaluation counts the empty counterfactual maps it let pass.
#[test]
fn counterfactual_check_counts_empty_maps() {
    use gradcam_core::Map;
    use gradcam_vqa::eval::mass_on;
    let mut mask = gradcam_scenes::rle::Mask::new(4, 4);
    for i in [0, 1, 4, 5] {
        mask.data[i] = true;
    }
    let on = Map::new(4, 4, (0..16).map(|i| [0, 1, 4, 5].contains(&i) as u8 as f32).collect());
    assert!((mass_on(&on, &mask) - 1.0).abs() < 1e-6);
    let half = Map::new(4, 4, (0..16).map(|i| if [0, 1, 4, 5, 10, 11, 14, 15].contains(&i) { 1.0 } else { 0.0 }).collect());
    assert!((mass_on(&half, &mask) - 0.5).abs() < 1e-6);
    assert_eq!(mass_on(&Map::new(4, 4, vec![0.0; 16]), &mask), 0.0);

    let o = gradcam(&["vqa", "--model", "models/vqa", "--eval", "data/shapescenes/train", "--limit", "200"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["method"], "gradcam");
    // The counts agree with each other and with their sums over question types (whether any map
    // here is empty depends on the shipped model: the one before had some, this one none).
    let counts = |c: &serde_json::Value| ["questions", "less_mass", "empty", "less_mass_nonempty"].map(|k| c[k].as_u64().unwrap());
    let [n, less, empty, nonempty] = counts(&m["counterfactual"]);
    assert!(n > 0 && nonempty <= less && less - nonempty <= empty && empty <= n, "{}", m["counterfactual"]);
    let mut sum = [0; 4];
    for c in m["counterfactual_per_type"].as_object().unwrap().values() {
        sum.iter_mut().zip(counts(c)).for_each(|(s, x)| *s += x);
    }
    assert_eq!(sum, [n, less, empty, nonempty]);
}
