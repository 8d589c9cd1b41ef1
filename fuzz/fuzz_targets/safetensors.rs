#![no_main]
//! The weights loader on a .safetensors file (format told by the header, finiteness checked).
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file_with(data, "input.safetensors");
    let _ = gradcam_encoders::Weights::load(&path);
});
