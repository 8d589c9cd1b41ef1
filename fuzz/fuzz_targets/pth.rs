#![no_main]
//! PyTorch checkpoints (zip and legacy pickle formats): errors, never a panic, abort or hang.
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file_with(data, "input.pth");
    let _ = gradcam_encoders::pth::read_pth(&path);
});
