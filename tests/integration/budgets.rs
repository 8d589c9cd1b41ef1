//! Counts that come from one argument or one record (issue 34): each is a clear error or a run
//! bounded by the input and `--batch`, whatever the number given.

use crate::hostile::{fails_with, gradcam, run_measured, split_copy};
use crate::repo;

fn eval(extra: &[&str]) -> Vec<String> {
    let data = repo("data/shapescenes/test");
    let base = ["eval", "--model", "models/captioner", "--data", data.to_str().unwrap(), "--limit", "1"];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `--tolerance 10000000px` ran for minutes (a disc of 10^14 pixels around each peak); it is now
/// the whole image, at once. `--patch 1 --stride 1` made every occluded input at once (9.9 GB on
/// a photo); it now holds `--batch` of them.
#[test]
fn eval_work_is_bounded_by_the_image_and_the_batch() {
    let o = gradcam(&args(&eval(&["pointing", "--tolerance", "10000000px", "--json"])));
    let summary: serde_json::Value = serde_json::from_str(&crate::ok(&o)).unwrap();
    assert!(summary.to_string().contains("pointing"), "{summary}");
    // 4,096 occluded 64 px scenes: 200 MB at once, a batch of 8 at a time now.
    let (o, rss, _) = run_measured(&args(&eval(&["faithfulness", "--patch", "1", "--stride", "1", "--batch", "8"])));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(rss < 100_000, "peak RSS {rss} KiB");
    fails_with(&args(&eval(&["faithfulness", "--batch", "0"])), "--batch 0: give 1 to 1024");
    fails_with(&args(&eval(&["faithfulness", "--batch", "100000"])), "--batch 100000: give 1 to 1024");
    let photos = repo("data/photos");
    fails_with(&["eval", "adversarial", "--model", "efficientnet-lite0", "--data", photos.to_str().unwrap(), "--attack-steps", "1000000000"], "--attack-steps 1000000000: give 1 to 10000");
}

/// 10^6 annotations on one image aborted every eval task (a full-image mask each): more than
/// 10,000 on an image is refused, naming the image, before any mask is decoded.
#[test]
fn an_image_with_too_many_annotations_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    split_copy(dir.path());
    let path = dir.path().join("instances.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let image = v["images"][0]["id"].clone();
    let template = v["annotations"].as_array().unwrap().iter().find(|a| a["image_id"] == image).unwrap().clone();
    let many: Vec<serde_json::Value> = (0..10_001u64)
        .map(|i| {
            let mut a = template.clone();
            a["id"] = serde_json::json!(1_000_000 + i);
            a
        })
        .collect();
    v["annotations"] = serde_json::Value::Array(many);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    let (o, rss, _) = run_measured(&["eval", "pointing", "--model", "models/captioner", "--data", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(matches!(o.status.code(), Some(1 | 2)) && !stderr.contains("panicked") && !stderr.contains("loading models/captioner"), "{stderr}");
    assert!(stderr.contains(&format!("image {image} has more than 10000 annotations")), "{stderr}");
    assert!(rss < 200_000, "{rss} KiB");
}
