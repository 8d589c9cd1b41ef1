//! The readers take paths: each input is written to a file of this process in /dev/shm (or the
//! temp folder), named with the extension the reader dispatches on.

use std::path::PathBuf;

pub fn file_with(data: &[u8], name: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("gradcam-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("fuzz folder");
    let path = dir.join(name);
    std::fs::write(&path, data).expect("fuzz input written");
    path
}
