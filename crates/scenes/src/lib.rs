//! ShapeScenes, a deterministic synthetic vision-language dataset with ground truth (per-object
//! masks, captions, questions with the objects their answers depend on), written as COCO
//! captions, COCO instances and VQA v2 files; and readers for any dataset in those formats.

pub mod coco;
pub mod dataset;
mod json;
pub mod rle;
pub mod scene;
pub mod vocab;
pub mod vqa;

use std::path::{Path, PathBuf};

pub use dataset::{Config, Example, Split};

/// Errors of the scenes crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not valid JSON: {message}", file.display())]
    Json { file: PathBuf, message: String },
    #[error("{}: {record}: field `{field}`: {message}", file.display())]
    Field { file: PathBuf, record: String, field: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("unknown words {words}; the model knows: {known}")]
    UnknownWords { words: String, known: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Writes a file through a temporary file in the same folder renamed into place, so that an
/// interrupted run never leaves a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    // Created under the registry's lock: `remove_temporaries` removes under it and keeps it.
    let file = {
        let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
        let file = std::fs::File::create(&tmp);
        if file.is_ok() {
            registry.push(tmp.clone());
        }
        file
    };
    let result = file.and_then(|mut f| f.write_all(bytes)).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != &tmp);
    result.map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// The temporary files [`write_atomic`] has in flight.
static TEMPORARIES: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes the temporary files in flight (when the process is stopped: see
/// `gradcam_core::map::remove_temporaries_on_signals`).
pub fn remove_temporaries() {
    let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
    for p in registry.drain(..) {
        let _ = std::fs::remove_file(p);
    }
    // Held until the process ends: no temporary is created after this.
    std::mem::forget(registry);
}
