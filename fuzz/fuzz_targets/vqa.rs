#![no_main]
//! VQA v2 questions and annotations: the input is split at its first NUL byte into the two files.
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let questions = common::file_with(&data[..cut], "questions.json");
    let annotations = common::file_with(data.get(cut + 1..).unwrap_or(&[]), "annotations.json");
    if let Ok(vqa) = gradcam_scenes::vqa::Vqa::read(&questions, Some(&annotations), None) {
        let _ = vqa.tally().rows().count();
    }
    let _ = gradcam_scenes::vqa::Vqa::read(&questions, None, None);
});
