//! Flag hints: the libraries name a setting as they know it (`input_size`, `eps`, `segment.high`)
//! and carry it in a typed error; the message the user sees names the flag.

use std::error::Error;

use gradcam_core::SettingError;

/// The flag of a library setting.
pub fn flag(setting: &str) -> String {
    match setting {
        "classes" => "--class".into(),
        "tasks" => "TASKS".into(),
        "methods" => "--method".into(),
        "segment.high" => "--seed-high".into(),
        "segment.low" => "--seed-low".into(),
        "segment.threshold" => "--seg-threshold".into(),
        s => format!("--{}", s.replace('_', "-")),
    }
}

/// The message of `err` as the user sees it: its chain joined by ": " (as `{:#}` shows it, each
/// cause once), each setting named by its flag.
pub fn message(err: &anyhow::Error) -> String {
    gradcam_core::chain_message(err.as_ref(), &hinted)
}

fn hinted(e: &(dyn Error + 'static)) -> Option<String> {
    let encoders = e.downcast_ref::<gradcam_encoders::Error>().or(match e.downcast_ref::<gradcam_eval::Error>() {
        Some(gradcam_eval::Error::Encoders(inner)) => Some(inner),
        _ => None,
    });
    let setting = (e.downcast_ref::<SettingError>())
        .or_else(|| encoders.and_then(|e| e.setting()))
        .or_else(|| e.downcast_ref::<gradcam_eval::Error>().and_then(|e| e.setting()))
        .or_else(|| e.downcast_ref::<gradcam_neurons::Error>().and_then(|e| e.setting()))
        .or_else(|| e.downcast_ref::<gradcam::pipeline::Error>().and_then(|e| e.setting()))
        .or_else(|| match e.downcast_ref::<gradcam_train::Error>() {
            Some(gradcam_train::Error::Setting(s)) => Some(s),
            _ => None,
        });
    if let Some(s) = setting {
        return Some(s.render(&flag));
    }
    if let Some(gradcam_neurons::Error::NoDissection { model }) = e.downcast_ref() {
        let m = model.display();
        return Some(format!("{m} has no dissection.json; make one with `gradcam dissect --model {m} --data DATA` or pass --dissection FILE"));
    }
    match encoders? {
        gradcam_encoders::Error::LayerShape { .. } => Some(format!("--{e}")),
        gradcam_encoders::Error::NoDefaultLayer { .. } => Some(format!("{e}: give --layer (see gradcam layers --model FILE.onnx)")),
        _ => None,
    }
}
