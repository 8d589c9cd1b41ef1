#![no_main]
//! COCO instances (boxes, polygons, RLE masks) and captions files.
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file_with(data, "instances.json");
    if let Ok(instances) = gradcam_scenes::coco::Instances::read(&path) {
        let _ = instances.by_image();
    }
    let _ = gradcam_scenes::coco::Captions::read(&path);
});
