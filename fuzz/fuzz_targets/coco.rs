#![no_main]
//! COCO instances (boxes, polygons, RLE masks) and captions files.
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file_with(data, "instances.json");
    if let Ok(instances) = gradcam_scenes::coco::Instances::read(&path) {
        for a in &instances.annotations {
            let _ = instances.category_name(a.category_id);
        }
    }
    if let Ok(captions) = gradcam_scenes::coco::Captions::read(&path) {
        let _ = captions.by_image();
    }
});
