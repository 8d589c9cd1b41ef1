#![no_main]
//! Image decoding with the project's limits, then the three preprocessing modes.
use gradcam_encoders::preprocess::{decode_image, prepare, Resize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = decode_image(data, "fuzz") {
        for mode in [Resize::CenterCrop, Resize::Stretch, Resize::None] {
            let _ = prepare(&img, mode);
        }
    }
});
