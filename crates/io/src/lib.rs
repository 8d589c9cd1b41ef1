//! Every file gradcam writes goes through here, so that none is ever half-written: the bytes go
//! to a temporary file in the destination's folder, which is renamed into place once complete.
//! A failed write leaves nothing behind, and with [`remove_temporaries_on_signals`] neither
//! does a run stopped by SIGINT or SIGTERM. A destination that exists and is not a regular file
//! (a device, a FIFO, a folder) is refused, never replaced.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::Tensor;
use image::RgbImage;

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file system refused (no such folder, no space, no permission, ...).
    #[error("cannot write {}", path.display())]
    Write {
        /// The destination.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A folder to write into could not be made (a file stands in its path, no permission, ...).
    #[error("cannot create the folder {}", path.display())]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The destination exists and is not a regular file; it is left as it is.
    #[error("{} exists and is not a regular file ({kind}); refusing to replace it", path.display())]
    NotARegularFile {
        /// The destination.
        path: PathBuf,
        /// What it is: `a directory`, `a device`, ...
        kind: &'static str,
    },
    /// An image could not be encoded.
    #[error("cannot encode {} as PNG", path.display())]
    Encode {
        /// The destination.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: image::ImageError,
    },
    /// Tensors could not be serialised as safetensors.
    #[error("cannot serialise tensors for {}", path.display())]
    Serialize {
        /// The destination.
        path: PathBuf,
        /// The serialiser's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor could not be read back from its device.
    #[error("cannot read the tensor written to {}", path.display())]
    Tensor {
        /// The destination.
        path: PathBuf,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
}

/// The result of a write.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes `bytes` to `path` atomically (see the crate's documentation).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Writes to `path` atomically through `write`, which gets the temporary file.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    refuse_special(path)?;
    let err = |source| Error::Write { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut tmp = Temporary::create(dir, &name).map_err(err)?;
    write(tmp.file.as_file_mut()).map_err(err)?;
    tmp.file.as_file_mut().flush().map_err(err)?;
    // Checked again: the destination may have appeared while the file was written.
    refuse_special(path)?;
    tmp.persist(path).map_err(err)
}

/// Creates the folder `path` and its parents (nothing to do when it exists).
pub fn create_dir_all(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| Error::CreateDir { path: path.to_path_buf(), source })
}

/// Writes an image as a PNG file, atomically.
pub fn write_png(image: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).map_err(|source| Error::Encode { path: path.to_path_buf(), source })?;
    write_atomic(path, bytes.get_ref())
}

/// Writes named tensors as a safetensors file, atomically.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|source| Error::Serialize { path: path.to_path_buf(), source })?;
    write_atomic(path, &bytes)
}

/// The bytes of an `.npy` file (format version 1.0) holding `values`, little-endian f32, C order,
/// of shape `shape`.
pub fn npy_bytes(values: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of
    // 64 and ended by a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// Writes a tensor as an `.npy` file (f32), atomically.
pub fn write_npy(tensor: &Tensor, path: &Path) -> Result<()> {
    let err = |source| Error::Tensor { path: path.to_path_buf(), source };
    let values = tensor.flatten_all().and_then(|t| t.to_dtype(candle_core::DType::F32)).and_then(|t| t.to_vec1::<f32>()).map_err(err)?;
    write_atomic(path, &npy_bytes(&values, tensor.dims()))
}

/// Refuses a destination that exists and is not a regular file (a symbolic link is replaced, not
/// followed).
fn refuse_special(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let t = meta.file_type();
    let kind = if t.is_file() || t.is_symlink() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else {
        special_kind(&t)
    };
    Err(Error::NotARegularFile { path: path.to_path_buf(), kind })
}

#[cfg(unix)]
fn special_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "not a regular file"
}

/// The temporary files in flight, removed if the process is stopped. Once the signal thread has
/// emptied it, it keeps the lock until the process exits, so no temporary is created after.
static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A temporary file being written, registered while it exists.
struct Temporary {
    file: tempfile::NamedTempFile,
    _registered: Registered,
}

/// A registry entry, removed when dropped (the file was renamed into place, or tempfile removed
/// it after a failed write).
struct Registered(PathBuf);

impl Drop for Registered {
    fn drop(&mut self) {
        TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != &self.0);
    }
}

impl Temporary {
    /// A new temporary file `.NAME.XXXXXX.tmp` in `dir`, created and registered under the
    /// registry's lock.
    fn create(dir: &Path, name: &str) -> std::io::Result<Self> {
        let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = format!(".{name}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".tmp");
        // A written file gets the permissions of any other (0666 less the umask), not the
        // temporary's private 0600.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        // tempfile adds ` at path ".NAME.XXXXXX.tmp"` to its errors: the temporary's name means
        // nothing to the user, who is told the destination.
        let file = builder.tempfile_in(dir).map_err(|e| {
            let text = e.to_string();
            std::io::Error::new(e.kind(), text.rsplit_once(" at path \"").map_or(text.as_str(), |(why, _)| why))
        })?;
        registry.push(file.path().to_path_buf());
        let registered = Registered(file.path().to_path_buf());
        Ok(Temporary { file, _registered: registered })
    }

    /// Renames the file into place.
    fn persist(self, path: &Path) -> std::io::Result<()> {
        let Temporary { file, _registered } = self;
        file.persist(path).map(drop).map_err(|e| e.error)
    }
}

/// Removes every temporary file in flight and keeps the registry locked until the process ends
/// (no new temporary can be created after this).
fn remove_temporaries() {
    let mut registry = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
    for p in registry.drain(..) {
        let _ = std::fs::remove_file(p);
    }
    std::mem::forget(registry);
}

/// On SIGINT or SIGTERM, removes the temporary files in flight, then exits with 128 + the
/// signal. Call it once, first thing in `main`. The signals are taken by a thread of their own
/// (signal-hook), where removing files is safe.
#[cfg(unix)]
pub fn remove_temporaries_on_signals() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new().name("gradcam-signals".into()).spawn(move || {
        if let Some(signal) = signals.forever().next() {
            remove_temporaries();
            std::process::exit(128 + signal);
        }
    })?;
    Ok(())
}

/// Elsewhere, nothing: an interrupted run may leave a temporary file.
#[cfg(not(unix))]
pub fn remove_temporaries_on_signals() -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let failed = write_atomic_with(&path, |_| Err(std::io::Error::other("disk full")));
        assert!(matches!(failed, Err(Error::Write { .. })), "{failed:?}");
        assert_eq!(std::fs::read(&path).unwrap(), b"second", "a failed write keeps the old file");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out.txt"], "no temporary left behind");
        assert!(TEMPORARIES.lock().unwrap().is_empty());
        // Readable by others as any written file is (0666 less the umask, never 0600).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_ne!(mode, 0o600, "mode {mode:o}: the temporary's private mode");
        }
    }

    #[test]
    fn never_replaces_a_directory_or_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomic(dir.path(), b"x").unwrap_err();
        assert!(matches!(err, Error::NotARegularFile { kind: "a directory", .. }), "{err}");
        #[cfg(unix)]
        {
            let err = write_atomic(Path::new("/dev/null"), b"x").unwrap_err();
            assert!(matches!(err, Error::NotARegularFile { kind: "a device", .. }), "{err}");
            assert!(std::fs::symlink_metadata("/dev/null").unwrap().file_type().is_char_device_like());
        }
        let err = write_atomic(&dir.path().join("missing/out.txt"), b"x").unwrap_err();
        assert!(err.to_string().contains("missing/out.txt"), "{err}");
        // The reason is the system's, without the temporary's name.
        let why = std::error::Error::source(&err).unwrap().to_string();
        assert!(why.starts_with("No such file or directory") && !why.contains(".tmp"), "{why}");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = create_dir_all(&file.join("sub")).unwrap_err();
        assert_eq!(err.to_string(), format!("cannot create the folder {}", file.join("sub").display()));
    }

    #[cfg(unix)]
    trait CharDevice {
        fn is_char_device_like(&self) -> bool;
    }

    #[cfg(unix)]
    impl CharDevice for std::fs::FileType {
        fn is_char_device_like(&self) -> bool {
            std::os::unix::fs::FileTypeExt::is_char_device(self)
        }
    }

    #[test]
    fn npy_header_is_what_numpy_reads() {
        let bytes = npy_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + len) % 64, 0, "header padded to 64 bytes");
        let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }") && header.ends_with('\n'), "{header:?}");
        assert_eq!(bytes.len(), 10 + len + 24);
        assert_eq!(&bytes[10 + len..10 + len + 4], &1f32.to_le_bytes());
        let one = npy_bytes(&[1.0], &[1]);
        assert!(String::from_utf8_lossy(&one[10..one.len() - 4]).contains("'shape': (1,)"));
    }
}
