//! The PyTorch checkpoint reader (zip and legacy formats, strided tensors) and weight errors.

use gradcam_encoders::{ModelKind, Weights};
use serde_json::Value;

use crate::repo;

#[test]
fn zip_and_legacy_checkpoints_read_the_same_values() {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(repo("tests/fixtures/tiny.json")).unwrap()).unwrap();
    for file in ["tests/fixtures/tiny_zip.pth", "tests/fixtures/tiny_legacy.pth"] {
        let w = Weights::load(&repo(file)).unwrap();
        for name in ["a", "b"] {
            let rows = expected[name].as_array().unwrap();
            let shape = [rows.len(), rows[0].as_array().unwrap().len()];
            let t = w.get(name, &shape).unwrap().to_vec2::<f32>().unwrap();
            let e: Vec<Vec<f32>> = rows.iter().map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()).collect();
            assert_eq!(t, e, "{file}: {name}");
        }
        // Integer tensors are not weights.
        assert!(!w.contains("n"));
    }
}

#[test]
fn every_prefix_of_a_checkpoint_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["tests/fixtures/tiny_zip.pth", "tests/fixtures/tiny_legacy.pth"] {
        let data = std::fs::read(repo(file)).unwrap();
        for n in 0..data.len() {
            let p = dir.path().join("prefix.pth");
            std::fs::write(&p, &data[..n]).unwrap();
            assert!(Weights::load(&p).is_err(), "{file}: prefix of {n} bytes was accepted");
        }
    }
}

#[test]
fn weights_of_another_model_name_the_missing_tensor() {
    let w = Weights::load(&repo("tests/fixtures/tiny_zip.pth")).unwrap();
    let err = ModelKind::ResNet18.build(&w).unwrap_err().to_string();
    assert!(err.contains("\"conv1.weight\"") && err.contains("another model"), "{err}");

    // Right names, wrong shapes: ResNet-50's stem is ResNet-18's, its first block is not.
    let r18 = Weights::hashed();
    ModelKind::ResNet18.build(&r18).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r18.safetensors");
    r18.save_safetensors(&p).unwrap();
    let err = ModelKind::ResNet50.build(&Weights::load(&p).unwrap()).unwrap_err().to_string();
    assert!(err.contains("layer1.0.conv1.weight") && err.contains("[64, 64, 3, 3]"), "{err}");
}

#[test]
fn a_safetensors_round_trip_keeps_every_tensor() {
    let w = Weights::load(&repo("tests/fixtures/tiny_legacy.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.safetensors");
    w.save_safetensors(&p).unwrap();
    let back = Weights::load(&p).unwrap();
    let a = w.get("b", &[4, 3]).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(back.get("b", &[4, 3]).unwrap().to_vec2::<f32>().unwrap(), a);
    assert!(!dir.path().join("tiny.safetensors.tmp").exists());
}

#[test]
fn timm_vgg_layout_gives_the_same_network_as_torchvision() {
    use candle_core::{Device, Tensor};
    let tv = Weights::hashed();
    let net = ModelKind::Vgg16.build(&tv).unwrap();
    // Rename and reshape the classifier as timm's checkpoint filter does.
    let timm: std::collections::HashMap<String, Tensor> = tv
        .into_tensors()
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "classifier.0.weight" => ("pre_logits.fc1.weight".to_string(), v.reshape((4096, 512, 7, 7)).unwrap()),
            "classifier.0.bias" => ("pre_logits.fc1.bias".to_string(), v),
            "classifier.3.weight" => ("pre_logits.fc2.weight".to_string(), v.reshape((4096, 4096, 1, 1)).unwrap()),
            "classifier.3.bias" => ("pre_logits.fc2.bias".to_string(), v),
            "classifier.6.weight" => ("head.fc.weight".to_string(), v),
            "classifier.6.bias" => ("head.fc.bias".to_string(), v),
            _ => (k, v),
        })
        .collect();
    let timm_net = ModelKind::Vgg16.build(&Weights::from_tensors(timm, "timm".into())).unwrap();
    let x = Tensor::from_vec((0..3 * 64 * 64).map(|i| ((i % 97) as f32 / 97.0) - 0.5).collect::<Vec<f32>>(), (1, 3, 64, 64), &Device::Cpu).unwrap();
    let (a, b) = (net.forward(&x).unwrap(), timm_net.forward(&x).unwrap());
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
}
