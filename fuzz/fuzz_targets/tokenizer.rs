#![no_main]
//! A model folder's tokenizer.json (the special tokens checked at load), then encoding and decoding.
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file_with(data, "tokenizer.json");
    if let Ok(vocab) = gradcam_scenes::vocab::Vocab::load(&path) {
        if let Ok(ids) = vocab.encode("a red circle left of a blue square") {
            let _ = vocab.decode(&ids);
        }
    }
});
