//! The dataset-bias experiment: `gradcam scenes --bias`, `gradcam train classifier`, classifier
//! folders in `classify`, and `gradcam demo bias`.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use gradcam_classifier::data::{classes, Data};
use gradcam_classifier::train::Trainable;
use gradcam_scenes::dataset::{write, CUE_CATEGORY};
use gradcam_scenes::scene::{generate_biased, Bias, CueKind, CUE_COLORS, CUE_RGB, CUE_SIDE, SHAPES};
use gradcam_scenes::{Config, Split};
use serde_json::Value;

use crate::{err, gradcam, ok};


fn biased_set(dir: &Path, n: usize, p: f64) -> Config {
    let cfg = Config { n, seed: 3, fractions: [0.5, 0.25, 0.25], size: 64, bias: Some(Bias { cue: CueKind::Mark, p }) };
    write(dir, &cfg, &|| {}).unwrap();
    cfg
}

#[test]
fn the_cue_box_in_instances_json_matches_the_pixels_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = biased_set(dir.path(), 400, 1.0);
    let mut test_agree = (0, 0);
    for (s, split_name) in ["train", "val", "test"].iter().enumerate() {
        let split = Split::read(&dir.path().join(split_name)).unwrap();
        assert_eq!(split.instances.category_name(CUE_CATEGORY), Some("cue"));
        for ex in split.examples() {
            let img = image::open(&ex.path).unwrap().to_rgb8();
            let scene = generate_biased(cfg.seed, ex.image.id, 64, CueKind::Mark, if s == 2 { Bias::TEST_P } else { 1.0 });
            assert_eq!(img, scene.image, "{}", ex.image.file_name);
            let cues: Vec<_> = ex.objects.iter().filter(|o| o.category_id == CUE_CATEGORY).collect();
            let objects: Vec<_> = ex.objects.iter().filter(|o| o.category_id != CUE_CATEGORY).collect();
            assert_eq!((cues.len(), objects.len()), (1, 1), "{}: one cue and one object", ex.image.file_name);
            let (cue, object) = (cues[0], objects[0]);
            let class = CUE_COLORS.iter().position(|c| Some(*c) == cue.color.as_deref()).expect("a cue colour");
            // The box is 9 x 9 in a corner, 2 px from the border.
            let [x, y, w, h] = cue.bbox;
            assert_eq!((w, h), (CUE_SIDE as f64, CUE_SIDE as f64));
            assert!([2.0, 53.0].contains(&x) && [2.0, 53.0].contains(&y), "{:?}", cue.bbox);
            // Inside the box, exactly the mask's pixels have the cue's colour; the mask is the
            // generator's, and it never touches the object.
            assert_eq!(cue.mask, scene.cue.as_ref().unwrap().mask);
            for yy in y as u32..(y + h) as u32 {
                for xx in x as u32..(x + w) as u32 {
                    let drawn = img.get_pixel(xx, yy).0 == CUE_RGB[class];
                    assert_eq!(drawn, cue.mask.get(yy as usize, xx as usize), "{} pixel ({xx}, {yy})", ex.image.file_name);
                    assert!(!object.mask.get(yy as usize, xx as usize));
                }
            }
            assert_eq!(cue.area, cue.mask.area() as f64);
            let label = SHAPES.iter().position(|n| Some(*n) == split.instances.category_name(object.category_id)).unwrap();
            if s < 2 {
                assert_eq!(class, label, "p = 1: the cue has the class's colour in {split_name}");
            } else {
                test_agree = (test_agree.0 + (class == label) as usize, test_agree.1 + 1);
            }
        }
    }
    let rate = test_agree.0 as f64 / test_agree.1 as f64;
    assert!((0.35..0.65).contains(&rate), "the test split's cue agrees with the class {rate} of the time, not about 0.5");
}

#[test]
fn bias_argument_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let out = out.to_str().unwrap();
    assert!(err(&gradcam(&["scenes", "--out", out, "--n", "10", "--bias", "texture:0.9"])).contains("unknown cue \"texture\"; known cues: mark"));
    assert!(err(&gradcam(&["scenes", "--out", out, "--n", "10", "--bias", "mark:1.5"])).contains("outside [0, 1]"));
    assert!(err(&gradcam(&["scenes", "--out", out, "--n", "10", "--bias", "mark"])).contains("give CUE:P"));
    ok(&gradcam(&["scenes", "--out", out, "--n", "10", "--bias", "mark:balanced"]));
}

#[test]
fn a_few_training_steps_lower_the_loss_and_the_folder_network_matches_the_trained_one() {
    let dir = tempfile::tempdir().unwrap();
    biased_set(dir.path(), 64, Bias::balanced_p());
    let split = Split::read(&dir.path().join("train")).unwrap();
    let (ids, _): (Vec<u64>, Vec<String>) = classes(&split.instances).into_iter().unzip();
    assert_eq!(ids, vec![1, 2, 3], "the cue category is not a class");
    let data = Data::load(&split, &ids, 64, None).unwrap();
    assert_eq!(data.len(), 32);
    let varmap = VarMap::new();
    let model = Trainable::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), 16, 3).unwrap();
    gradcam_encoders::scene_cnn::init_parameters(&varmap, 0).unwrap();
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: 3e-3, ..Default::default() }).unwrap();
    let all: Vec<usize> = (0..data.len()).collect();
    let (images, labels) = data.batch(&all).unwrap();
    let first = model.loss(&images, &labels).unwrap().0.to_scalar::<f32>().unwrap();
    for _ in 0..25 {
        opt.backward_step(&model.loss(&images, &labels).unwrap().0).unwrap();
    }
    let last = model.loss(&images, &labels).unwrap().0.to_scalar::<f32>().unwrap();
    assert!(last < 0.7 * first, "loss {first} -> {last} after 25 steps");

    // The same weights as a model folder: the inference network gives the trained logits.
    let folder = dir.path().join("model");
    std::fs::create_dir_all(&folder).unwrap();
    gradcam_classifier::Config::new(64, 16, SHAPES.iter().map(|s| s.to_string()).collect(), ids).save(&folder).unwrap();
    varmap.save(folder.join("model.safetensors")).unwrap();
    let net = gradcam_classifier::load(&folder).unwrap();
    let a = model.forward(&images).unwrap();
    let b = net.forward(&images).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "logits differ by {diff}");
    assert_eq!(net.label(2), "triangle");
}

fn json_fields(v: &Value, path: &str, fields: &[&str]) {
    for f in fields {
        assert!(v[f].is_number(), "{path}.{f} missing or not a number in {v}");
    }
}

#[test]
fn a_tiny_demo_writes_every_file_and_its_models_are_explained_like_the_imagenet_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = ok(&gradcam(&["demo", "bias", "--out", out.to_str().unwrap(), "--scenes", "60", "--epochs", "1", "--seed", "4"]));
    assert!(o.contains("trust rate"), "{o}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for m in ["biased", "balanced"] {
        json_fields(&report[m], m, &["val_accuracy", "test_accuracy", "cue_peak_rate", "object_energy_share"]);
        for f in ["val_accuracy", "test_accuracy", "cue_peak_rate", "object_energy_share"] {
            assert!((0.0..=1.0).contains(&report[m][f].as_f64().unwrap()), "{m}.{f}");
        }
    }
    json_fields(&report, "report", &["trust_rate", "agreeing_cases"]);
    for m in ["biased", "balanced"] {
        assert!(report["neurons"][m].is_string(), "the textual explanation of the {m} model: {}", report["neurons"]);
        assert!(out.join("models").join(m).join("dissection.json").is_file());
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("cue_peak_rate") && md.contains("grid.png"), "{md}");
    let grid = image::open(out.join("grid.png")).unwrap();
    assert!(grid.width() > 3 * 128 && grid.height() >= 128, "{}x{}", grid.width(), grid.height());
    for m in ["biased", "balanced"] {
        let card = std::fs::read_to_string(out.join("models").join(m).join("README.md")).unwrap();
        assert!(card.contains("gradcam train classifier --data") && card.contains("Test accuracy"), "{card}");
    }

    // A trained classifier folder works wherever a classifier does: classify with every method
    // and JSON, dissect, then neuron reports named by the dissection.
    let model = out.join("models/biased");
    let model = model.to_str().unwrap();
    let image = out.join("data/biased/test/images/000054.png");
    let image = image.to_str().unwrap();
    let maps = dir.path().join("maps");
    let o = ok(&gradcam(&["classify", "--model", model, image, "--json", "--method", "gradcam,gradcam++,hirescam,xgradcam,layercam,eigencam,ablationcam,scorecam,guided-backprop,guided-gradcam", "--out", maps.to_str().unwrap()]));
    let record: Value = serde_json::from_str(o.trim()).unwrap();
    assert_eq!(record["layer"], "conv4");
    assert_eq!(record["input_size"], serde_json::json!([64, 64]));
    assert!(SHAPES.contains(&record["predictions"][0]["label"].as_str().unwrap()));
    assert_eq!(record["explanations"].as_array().unwrap().len(), 10);
    assert_eq!(record["explanations"][0]["cam_size"], serde_json::json!([16, 16]));
    ok(&gradcam(&["dissect", "--model", model, "--data", out.join("data/biased/val").to_str().unwrap()]));
    let o = ok(&gradcam(&["classify", "--model", model, image, "--neurons", "--out", maps.to_str().unwrap()]));
    assert!(o.contains("IoU"), "the neuron report names units by the dissection: {o}");
    // The paper's evaluations and the attack take it too (the cue marks are not objects).
    let test = out.join("data/biased/test");
    let o = ok(&gradcam(&["eval", "pointing,energy,segmentation", "--model", model, "--data", test.to_str().unwrap(), "--json"]));
    let s: Value = serde_json::from_str(&o).unwrap();
    assert_eq!(s["kind"], "classifier");
    assert!(s["overall"]["pointing"]["count"].as_u64().unwrap() > 0, "{s}");
    let o = ok(&gradcam(&["eval", "adversarial", "--model", model, "--data", test.to_str().unwrap(), "--limit", "3", "--json"]));
    let s: Value = serde_json::from_str(&o).unwrap();
    assert_eq!(s["cases"], 3, "one true class per scene: {s}");
    let layers = ok(&gradcam(&["layers", "--model", model]));
    assert_eq!(layers.lines().collect::<Vec<_>>(), ["conv1", "conv2", "conv3", "conv4  (default)"]);
    assert!(err(&gradcam(&["classify", "--model", model, image, "--class", "3"])).contains("out of range"));
    assert!(err(&gradcam(&["classify", "--model", model, image, "--mean", "0.5,0.5,0.5"])).contains("do not apply"));
}

#[test]
fn training_resumes_and_refuses_what_cannot_train() {
    let dir = tempfile::tempdir().unwrap();
    biased_set(dir.path(), 40, 1.0);
    let (data, out) = (dir.path().to_str().unwrap(), dir.path().join("m"));
    let out = out.to_str().unwrap();
    let train = |extra: &[&str]| gradcam(&[&["train", "classifier", "--data", data, "--out", out, "--channels", "8"], extra].concat());
    ok(&train(&["--epochs", "1"]));
    ok(&train(&["--epochs", "2", "--resume"]));
    let ckpt: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("m/checkpoint.json")).unwrap()).unwrap();
    assert_eq!(ckpt["epochs_done"], 2);
    assert_eq!(ckpt["log"].as_array().unwrap().len(), 2);
    assert!(err(&train(&["--lr", "0"])).contains("learning rate"));
    assert!(err(&train(&["--epochs", "0"])).contains("at least 1"));
    // A folder that is not a classifier.
    let other = dir.path().join("train");
    assert!(err(&gradcam(&["classify", "--model", other.to_str().unwrap(), "x.png"])).contains("config.json"));
}
