//! The captioner: per-word gradients against finite differences, the fused inference model against
//! the trainable one, a tiny training run whose loss falls, and `gradcam caption` end to end.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gradcam_captioner::model::{init_parameters, Trainable};
use gradcam_captioner::train::{train, Event, Settings, TrainConfig};
use gradcam_captioner::{CaptionSplit, Captioner, Config, Vocab};
use gradcam_core::{explain, Explainable, GradCam, Request, Target};
use serde_json::Value;

use crate::repo;

pub fn tiny() -> (Trainable, Captioner, VarMap) {
    let vocab = Vocab::build(["a red circle left of a blue square", "a green triangle"], 1).unwrap();
    let mut cfg = Config { embed: 8, hidden: 12, max_len: 8, ..Config::new(vocab.len()) };
    cfg.scene.image_size = 16;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let trainable = Trainable::new(&cfg, vb.clone(), 20).unwrap();
    init_parameters(&varmap, 5).unwrap();
    let frozen = Captioner::from_varbuilder(cfg, vocab, vb).unwrap();
    (trainable, frozen, varmap)
}

pub fn image(seed: u64) -> Tensor {
    let mut rng = gradcam_scenes::scene::Rng::new(seed);
    let v: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.range(-1.0, 1.0)).collect();
    Tensor::from_vec(v, (1, 3, 16, 16), &Device::Cpu).unwrap()
}

#[test]
fn fused_inference_model_matches_the_trainable_one() {
    let (trainable, frozen, _) = tiny();
    let tokens = frozen.vocab.encode("a red circle left of").unwrap();
    let mut inputs = vec![frozen.vocab.start];
    inputs.extend(&tokens);
    let x = image(1);
    let a = frozen.features(&x).unwrap();
    let ours = frozen.logprobs(&a, &[inputs.clone()]).unwrap();
    let rows = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    let ids = Tensor::new(inputs.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let reference = trainable.forward(&x, &rows, &ids).unwrap().0;
    let diff = (ours.clone() - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "{diff}");
    // The single-op word scores agree with the step-by-step log-probabilities.
    let words = frozen.word_logprobs(&a, &tokens, true).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    let steps = ours.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    for (t, &w) in tokens.iter().chain([frozen.vocab.end].iter()).enumerate() {
        assert!((words[t] - steps[t][w as usize]).abs() < 1e-5);
    }
}

#[test]
fn per_word_gradient_matches_finite_differences() {
    let (_, model, _) = tiny();
    let tokens = model.vocab.encode("a red circle left of a blue square").unwrap();
    let a = model.features(&image(2)).unwrap(); // [1, 96, 4, 4]
    let (_, k, h, w) = a.dims4().unwrap();
    let split = CaptionSplit::new(&model, &tokens);
    let targets: Vec<Target> = (0..tokens.len()).map(|step| Target::word(step)).collect();
    let requests: Vec<Request> = targets.iter().map(|t| Request { image: 0, target: t }).collect();
    let results = explain(&split, &a, &requests, &GradCam).unwrap();
    // Shifting channel k everywhere by eps changes Y by eps * sum_ij dY/dA^k_ij = eps * hw * alpha_k.
    let y = |a: &Tensor, t: usize| -> f64 {
        split.head(a).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()[t] as f64
    };
    // Large enough for f32 rounding of log p (~2e-7) to stay far below the signal of this tiny,
    // barely trained model; the Richardson extrapolation below takes care of the curvature.
    let eps = 0.5;
    for (t, r) in results.iter().enumerate() {
        let mut worst = 0f64;
        let scale = r.weights.as_deref().unwrap().iter().fold(0f32, |m, v| m.max(v.abs())) as f64 * (h * w) as f64;
        for c in (0..k).step_by(5) {
            let mut shift = vec![0f32; k];
            shift[c] = eps;
            let shift = Tensor::from_vec(shift, (1, k, 1, 1), &Device::Cpu).unwrap();
            let central = |s: f64| {
                let sh = (&shift * s).unwrap();
                (y(&a.broadcast_add(&sh).unwrap(), t) - y(&a.broadcast_sub(&sh).unwrap(), t)) / (2.0 * eps as f64 * s)
            };
            // Richardson extrapolation: cancels the O(eps^2) curvature error.
            let numeric = (4.0 * central(0.5) - central(1.0)) / 3.0;
            worst = worst.max((numeric - r.weights.as_deref().unwrap()[c] as f64 * (h * w) as f64).abs());
        }
        assert!(scale > 0.0);
        assert!(worst <= 1e-2 * scale + 2e-6, "word {t}: finite differences differ by {worst} (scale {scale})");
    }
}

/// The captioner split without its many-seed backward: `explain` takes the general path
/// (activations replicated per word, candle's backward).
struct GeneralPath<'a>(&'a CaptionSplit<'a>);

impl Explainable for GeneralPath<'_> {
    fn features(&self, input: &Tensor) -> gradcam_core::Result<Tensor> {
        self.0.features(input)
    }
    fn head(&self, a: &Tensor) -> gradcam_core::Result<Tensor> {
        self.0.head(a)
    }
}

#[test]
fn many_seed_backward_matches_the_general_path() {
    let (_, model, _) = tiny();
    let tokens = model.vocab.encode("a red circle left of a blue square").unwrap();
    let a = model.features(&image(3)).unwrap();
    let split = CaptionSplit::new(&model, &tokens);
    let targets: Vec<Target> = (0..tokens.len()).map(|step| Target::word(step)).collect();
    let counterfactual = Target::word(2).counterfactual();
    let mut requests: Vec<Request> = targets.iter().map(|t| Request { image: 0, target: t }).collect();
    requests.push(Request { image: 0, target: &counterfactual });
    assert!(split.head_gradients(&a, &[(0, 1.0)]).unwrap().is_some(), "the captioner has its own backward");
    // Every gradient-based method: some use the gradient at every position, Grad-CAM its mean.
    use gradcam_core::methods::{EigenCam, GradCamPlusPlus, HiResCam, LayerCam, XGradCam};
    use gradcam_core::CamMethod;
    for method in [&GradCam as &dyn CamMethod, &GradCamPlusPlus, &XGradCam, &HiResCam, &LayerCam, &EigenCam] {
        let fast = explain(&split, &a, &requests, method).unwrap();
        let general = explain(&GeneralPath(&split), &a, &requests, method).unwrap();
        for (f, g) in fast.iter().zip(&general) {
            assert!((f.score - g.score).abs() < 1e-6, "{} vs {}", f.score, g.score);
            let scale = g.weights.as_deref().unwrap().iter().fold(1e-12f32, |m, v| m.max(v.abs()));
            let worst = f.weights.as_deref().unwrap().iter().zip(g.weights.as_deref().unwrap()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst <= 1e-5 * scale, "{}: alpha differs by {worst} (scale {scale})", method.name());
            let scale = g.cam().data.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
            let worst = f.cam().data.iter().zip(&g.cam().data).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst <= 1e-5 * scale, "{}: map differs by {worst} (scale {scale})", method.name());
        }
    }
    // A word past the caption is an error on both paths.
    let past = Target::word(tokens.len());
    for model in [&split as &dyn Explainable, &GeneralPath(&split)] {
        let err = explain(model, &a, &[Request { image: 0, target: &past }], &GradCam).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }
}

#[test]
fn a_tiny_captioner_learns() {
    let data = tempfile::tempdir().unwrap();
    let cfg = gradcam_scenes::Config { n: 60, seed: 9, fractions: [0.8, 0.2, 0.0], size: 64, bias: None };
    gradcam_scenes::dataset::write(data.path(), &cfg, &|| {}).unwrap();
    let out = tempfile::tempdir().unwrap();
    let tc = TrainConfig { settings: Settings { epochs: 4, batch_size: 8, lr: 5e-3, weight_decay: 0.0, seed: 1 }, val_images: 4, label_smoothing: 0.1, word_loss: 1.0, hidden: 64, activation_l1: 0.01, word_pairs: true };
    let mut losses = Vec::new();
    let ckpt = train(data.path(), out.path(), &tc, false, &mut |e| {
        if let Event::Step { loss } = e {
            losses.push(loss)
        }
    })
    .unwrap();
    assert_eq!(ckpt.epochs_done, 4);
    let first: f32 = losses[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    // The written folder loads, and resuming with more epochs continues from the checkpoint.
    Captioner::load(out.path()).unwrap();
    let more = TrainConfig { settings: Settings { epochs: 5, ..tc.settings }, ..tc };
    let ckpt = train(data.path(), out.path(), &more, true, &mut |_| {}).unwrap();
    assert_eq!((ckpt.epochs_done, ckpt.log.len()), (5, 5));
}

fn gradcam(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(repo("")).output().unwrap()
}

#[test]
fn caption_command_explains_every_word() {
    let out = tempfile::tempdir().unwrap();
    let img = repo("data/shapescenes/test/images/000019.png");
    let o = gradcam(&["caption", img.to_str().unwrap(), "--json", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let words = j["words"].as_array().unwrap();
    assert_eq!(words.len(), j["caption"].as_str().unwrap().split(' ').count());
    for (t, w) in words.iter().enumerate() {
        assert_eq!(w["t"], t);
        assert_eq!(w["cam_size"], serde_json::json!([16, 16]));
        assert!(w["logprob"].as_f64().unwrap() <= 0.0);
        assert!(std::path::Path::new(w["overlay"].as_str().unwrap()).is_file());
    }
    assert!(std::path::Path::new(j["strip"].as_str().unwrap()).is_file());

    // A caption the user supplies, a beam, and words the model does not know.
    let o = gradcam(&["caption", img.to_str().unwrap(), "--caption", "a red circle", "--json", "--out", out.path().to_str().unwrap()]);
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["caption"], "a red circle");
    let o = gradcam(&["caption", img.to_str().unwrap(), "--beam", "3", "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success());
    let o = gradcam(&["caption", img.to_str().unwrap(), "--caption", "a purple elephant", "--out", out.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown words \"elephant\"") && err.contains("circle"), "{err}");
    let o = gradcam(&["caption", img.to_str().unwrap(), "--caption", "  ", "--out", out.path().to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty"));
}

/// The benchmark runs (its figures are measured, never asserted): one JSON line per image.
#[test]
fn caption_benchmark_reports_every_image() {
    let o = gradcam(&["bench", "caption", "--iters", "1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert!(r["words"].as_u64().unwrap() > 0 && r["ratio"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// `--eval` scores the method `--method` names (its maps, not Grad-CAM's), says which, and
/// refuses what it cannot score.
#[test]
fn eval_scores_the_method_asked_for() {
    let eval = |method: &str| -> Value {
        let o = gradcam(&["--threads", "1", "caption", "--eval", "data/shapescenes/train", "--limit", "16", "--method", method]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (plain, hires) = (eval("gradcam"), eval("hirescam"));
    assert_eq!((plain["method"].as_str(), hires["method"].as_str()), (Some("gradcam"), Some("hirescam")));
    let hits = |m: &Value| ["color", "shape"].map(|k| m["pointing"][k]["hits"].as_u64().unwrap());
    let count = |m: &Value| ["color", "shape"].map(|k| m["pointing"][k]["count"].as_u64().unwrap());
    assert_eq!(count(&plain), count(&hires), "the same captions and words");
    assert_ne!(hits(&plain), hits(&hires), "different maps point differently on these scenes");
    for (args, error) in [
        (&["caption", "--eval", "data/shapescenes/train", "--method", "gradcam,hirescam"][..], "one method at a time"),
        (&["vqa", "--eval", "data/shapescenes/train", "--method", "scorecam"][..], "not scorecam"),
        (&["vqa", "--eval", "data/shapescenes/train", "--aug-smooth"][..], "--aug-smooth"),
    ] {
        let o = gradcam(args);
        assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains(error), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
}
