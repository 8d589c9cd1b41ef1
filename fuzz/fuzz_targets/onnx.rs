#![no_main]
//! ONNX models: decoding, checks, constant folding and the traced run on zeros at load.
#[path = "common.rs"]
mod common;
use gradcam_encoders::onnx::{OnnxModel, OnnxOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file_with(data, "model.onnx");
    if let Ok(model) = OnnxModel::load(&path, &OnnxOptions::default()) {
        let model = std::sync::Arc::new(model);
        let _ = model.network(None);
    }
});
