//! `--html FILE` of `classify`, `caption`, `vqa` and `match`: the explorer's view of one result
//! written as one self-contained file (the page, the image and every picture inline), to share
//! without a server.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::Value;

/// Which view a record fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// A `caption --json` record.
    Caption,
    /// A `vqa --json` record.
    Vqa,
    /// A `classify --json` record.
    Classify,
    /// A `match --json` record.
    Match,
}

/// The file for `image` when one run writes several: `FILE` itself for the first, then
/// `FILE`'s stem + `_STEM` + its extension.
pub fn file_for(file: &Path, stem: &str, first: bool) -> PathBuf {
    if first {
        return file.to_path_buf();
    }
    let base = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    file.with_file_name(format!("{base}_{stem}.html"))
}

fn data_url(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    let kind = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::Gif) => "image/gif",
        Ok(image::ImageFormat::WebP) => "image/webp",
        Ok(image::ImageFormat::Bmp) => "image/bmp",
        Ok(image::ImageFormat::Tiff) => "image/tiff",
        _ => "image/png",
    };
    Ok(format!("data:{kind};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes)))
}

/// Replaces the file names under `overlay` and `strip` keys by the pictures themselves.
fn inline(value: &mut Value) -> std::io::Result<()> {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match (key.as_str(), &*v) {
                    ("overlay" | "strip", Value::String(path)) if !path.starts_with("data:") => *v = Value::String(data_url(Path::new(path))?),
                    _ => inline(v)?,
                }
            }
        }
        Value::Array(items) => items.iter_mut().try_for_each(inline)?,
        _ => {}
    }
    Ok(())
}

/// Writes the page showing `record` (the command's `--json` record, whose pictures are files) on
/// `image` to `file`, atomically.
pub fn write(file: &Path, image: &Path, view: View, record: &impl serde::Serialize) -> std::io::Result<()> {
    let mut record = serde_json::to_value(record).map_err(std::io::Error::other)?;
    inline(&mut record)?;
    let method = ["/words/0/method", "/explanations/0/method", "/texts/0/explanations/0/method"].iter().find_map(|p| record.pointer(p)).cloned().unwrap_or(Value::Null);
    let key = match view {
        View::Caption => "caption",
        View::Vqa => "vqa",
        View::Classify => "classify",
        View::Match => "match",
    };
    let data = serde_json::json!({ "image": data_url(image)?, "method": method, key: record });
    // `</` cannot end the script early inside a JSON string written this way.
    let script = format!("<script>window.GRADCAM_DATA = {};</script>\n<script>", serde_json::to_string(&data).map_err(std::io::Error::other)?.replace("</", "<\\/"));
    let page = crate::PAGE.replacen("<script>", &script, 1);
    gradcam_io::write_atomic(file, page.as_bytes()).map_err(std::io::Error::other)
}
