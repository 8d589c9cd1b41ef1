//! Batches through every model kind (issue 30): `Cam::explain_batch` on a built-in network, a
//! trained classifier folder and an ONNX graph with a dynamic batch dimension gives each image
//! the explanations it gets alone; `classify_batch` gives each image its `classify` record.


use candle_core::Tensor;
use gradcam::models::{ModelKind, Network, Weights};
use gradcam::{Cam, Method, Target};

use crate::repo;

use crate::adversarial::tiny_classifier;
use crate::library::values;

/// Each image of `batch` explained with the others (`explain_batch`) against alone (`explain`),
/// with `methods`, at the network's default layer: the maps within 1e-5 of the map's largest
/// value (and at least 1e-5), the scores alike. Targets: a class and a counterfactual for the
/// first image, a class for the others, none for the second.
fn batch_equals_alone(net: &Network, batch: &Tensor, methods: &[Method]) {
    let split = net.split(net.layer_index(net.default_layer()).unwrap());
    let n = batch.dim(0).unwrap();
    let classes = net.num_classes();
    let targets: Vec<Vec<Target>> = (0..n)
        .map(|i| match i {
            0 => vec![Target::class(1 % classes), Target::class(2 % classes).counterfactual()],
            1 => vec![],
            _ => vec![Target::class(i % classes)],
        })
        .collect();
    for &method in methods {
        let cam = Cam::new(&split).method(method);
        let together = cam.explain_batch(batch, &targets).unwrap_or_else(|e| panic!("{}: {method}: {e}", net.arch()));
        assert_eq!(together.iter().map(Vec::len).collect::<Vec<_>>(), targets.iter().map(Vec::len).collect::<Vec<_>>());
        for (i, ts) in targets.iter().enumerate() {
            let alone = cam.explain(&batch.narrow(0, i, 1).unwrap(), ts).unwrap();
            for (a, b) in together[i].iter().zip(&alone) {
                let scale = b.map.iter().fold(1f32, |m, v| m.max(v.abs()));
                let worst = a.map.iter().zip(&b.map).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(a.map.len() == b.map.len() && worst <= 1e-5 * scale, "{} {method} image {i}: worst difference {worst} (scale {scale})", net.arch());
                assert!((a.score - b.score).abs() <= 1e-5 * a.score.abs().max(1.0) && a.is_counterfactual() == b.is_counterfactual(), "{} {method} image {i}: scores {} {}", net.arch(), a.score, b.score);
            }
        }
    }
}

/// EfficientNet-Lite0 on 8 images (a batch large enough for the depthwise kernel that puts the
/// images in the vector lanes, and whose 112x112 layers run in chunks of the batch).
#[test]
fn a_built_in_network_explains_a_batch_as_its_images_one_at_a_time() {
    let net = ModelKind::EfficientNetLite0.build(&Weights::load(&crate::effnet_weights()).unwrap()).unwrap();
    let batch = gradcam::bench::image_like_batch(8, 224, 224).unwrap();
    batch_equals_alone(&net, &batch, &[Method::GradCam, Method::GradCamPlusPlus, Method::GuidedGradCam]);
    // The logits of the batch are each image's.
    let all = net.forward(&batch).unwrap().to_vec2::<f32>().unwrap();
    for (i, row) in all.iter().enumerate() {
        let alone = net.forward(&batch.narrow(0, i, 1).unwrap()).unwrap().to_vec2::<f32>().unwrap().remove(0);
        let worst = row.iter().zip(&alone).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "image {i}: logits differ by {worst}");
    }
}


#[test]
fn a_trained_classifier_folder_explains_a_batch_as_its_images_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let net = tiny_classifier(dir.path());
    let (h, w) = net.preprocess().size;
    batch_equals_alone(&net, &values(&[4, 3, h, w], 3, 1.0), &[Method::GradCam, Method::LayerCam, Method::GuidedGradCam]);
}

/// The ONNX fixtures are exported with a dynamic batch dimension (`["batch", 3, 96, 96]`): the
/// graph runs a batch of 4 whole.
#[test]
fn an_onnx_graph_with_a_dynamic_batch_explains_a_batch_as_its_images_one_at_a_time() {
    let path = repo("tests/fixtures/onnx/resnet.onnx");
    let model = std::sync::Arc::new(gradcam::models::OnnxModel::load(&path, &Default::default()).unwrap());
    let net = model.network(None).unwrap();
    let batch = values(&[4, 3, 96, 96], 5, 1.0);
    assert_eq!(net.forward(&batch).unwrap().dims(), [4, net.num_classes()]);
    batch_equals_alone(&net, &batch, &[Method::GradCam, Method::HiResCam]);
}

/// `classify_batch` gives each image the record `classify` gives it alone (maps and logits
/// within 1e-6), with two methods and counterfactuals; an image that cannot be prepared (one
/// pixel, unresized) fails alone while the others are classified.
#[test]
fn classify_batch_gives_each_image_its_classify_record() {
    use gradcam::pipeline::classify::{classify, classify_batch, Options};
    use gradcam::pipeline::{Files, Settings};
    let dir = tempfile::tempdir().unwrap();
    let net = tiny_classifier(dir.path());
    let load = |p: &str| image::open(repo(p)).unwrap().to_rgb8();
    let images = [load("data/shapescenes/test/images/000018.png"), load("tests/fixtures/one_pixel.png"), load("data/shapescenes/test/images/000019.png"), load("data/shapescenes/train/images/000000.png")];
    let names = ["a", "tiny", "b", "c"];
    let settings = Settings { methods: vec![Method::GradCam, Method::GradCamPlusPlus], ..Default::default() };
    let options = Options { top_k: 3, counterfactual: true, resize: gradcam::models::Resize::None, settings, ..Default::default() };
    let files = || Files::in_memory("x");
    let batch: Vec<_> = images.iter().zip(names).map(|(img, name)| (img, name, files())).collect();
    let layer = net.layer_index(net.default_layer()).unwrap();
    let records = classify_batch(&net, layer, &batch, &options, None);
    assert_eq!(records.len(), 4);
    for (i, (img, name)) in images.iter().zip(names).enumerate() {
        let alone = classify(&net, layer, img, name, files(), &options, None);
        let (together, alone) = match (&records[i], alone) {
            (Err(a), Err(b)) => {
                assert_eq!(name, "tiny");
                assert_eq!(a.to_string(), b.to_string());
                continue;
            }
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => panic!("image {name}: {a:?} but alone {b:?}"),
        };
        assert_eq!((together.image.as_str(), together.input_size, together.predictions.len()), (name, alone.input_size, 3));
        for (p, q) in together.predictions.iter().zip(&alone.predictions) {
            assert!(p.class == q.class && (p.logit - q.logit).abs() <= 1e-6 && (p.prob - q.prob).abs() <= 1e-6, "{name}: {p:?} {q:?}");
        }
        assert_eq!(together.explanations.len(), 4, "two methods, the top class and its counterfactual");
        for (a, b) in together.explanations.iter().zip(&alone.explanations) {
            assert_eq!((a.class, a.map.method, a.map.counterfactual, a.map.cam_size), (b.class, b.map.method, b.map.counterfactual, b.map.cam_size));
            let worst = a.map.cam.iter().flatten().zip(b.map.cam.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-6 && (a.map.score - b.map.score).abs() <= 1e-6, "{name} {}: maps differ by {worst}", a.map.method);
        }
    }
    assert!(records[1].as_ref().is_err_and(|e| e.to_string().contains("at least")), "{:?}", records[1].as_ref().err());
}
