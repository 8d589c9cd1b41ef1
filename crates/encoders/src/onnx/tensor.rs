//! ONNX TensorProtos (initialisers, Constant values) as candle tensors, external data read from
//! regular files inside the model's folder only, each opened once, within a byte budget.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::check::MAX_WEIGHT_BYTES;
use super::proto::TensorProto;

/// The external data files of one model: the folder they must lie in, each file opened once
/// (2,000 tensors in one file read ranges of it), and the bytes read so far.
pub(crate) struct External {
    folder: PathBuf,
    /// The model's folder and, for a model file that is a symlink (a Hugging Face cache), its
    /// target's folder, canonical.
    roots: Vec<PathBuf>,
    files: HashMap<PathBuf, (File, u64)>,
    read: u64,
}

impl External {
    /// For the model file `model`.
    pub(crate) fn new(model: &Path) -> External {
        let folder = match model.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut roots: Vec<PathBuf> = folder.canonicalize().into_iter().collect();
        if let Some(real) = model.canonicalize().ok().and_then(|m| m.parent().map(Path::to_path_buf)) {
            if !roots.contains(&real) {
                roots.push(real);
            }
        }
        External { folder, roots, files: HashMap::new(), read: 0 }
    }

    /// The open file named by `location` (relative, inside the folder) and its length; a path
    /// leading outside the folder (`..`, absolute, a symlink out) or to anything but a regular
    /// file (a FIFO, a device) is refused before it is opened.
    fn open(&mut self, location: &str) -> std::result::Result<(PathBuf, u64), String> {
        let rel = Path::new(location);
        if location.is_empty() || rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(format!("names external data {location:?} outside the model's folder"));
        }
        let file = self.folder.join(rel);
        if let Some((_, len)) = self.files.get(&file) {
            return Ok((file, *len));
        }
        let real = file.canonicalize().map_err(|e| format!("external data file {}: {e}", file.display()))?;
        if !self.roots.iter().any(|r| real.starts_with(r)) {
            return Err(format!("external data file {}: path escapes model directory (it leads to {})", file.display(), real.display()));
        }
        let meta = std::fs::metadata(&real).map_err(|e| format!("external data file {}: {e}", file.display()))?;
        if !meta.is_file() {
            return Err(format!("external data file {} is not a regular file", file.display()));
        }
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        {
            // A FIFO swapped in after the check must not block the open.
            use std::os::unix::fs::OpenOptionsExt;
            options.custom_flags(libc::O_NONBLOCK);
        }
        let f = options.open(&real).map_err(|e| format!("external data file {}: {e}", file.display()))?;
        let meta = f.metadata().map_err(|e| format!("external data file {}: {e}", file.display()))?;
        if !meta.is_file() {
            return Err(format!("external data file {} is not a regular file", file.display()));
        }
        self.files.insert(file.clone(), (f, meta.len()));
        Ok((file, meta.len()))
    }

    /// `length` bytes (all that follow `offset` when `None`; `needed` must match) of the file
    /// `location` from `offset`, within the budget of [`MAX_WEIGHT_BYTES`] over the model.
    fn read(&mut self, location: &str, offset: Option<&str>, length: Option<&str>, needed: u64) -> std::result::Result<Vec<u8>, String> {
        let (file, size) = self.open(location)?;
        let offset: u64 = offset.map(str::parse).transpose().map_err(|_| format!("bad external offset {:?}", offset.unwrap_or_default()))?.unwrap_or(0);
        if offset > size {
            return Err(format!("offset {offset} is past the end of {} ({size} bytes)", file.display()));
        }
        let length: u64 = length.map(str::parse).transpose().map_err(|_| format!("bad external length {:?}", length.unwrap_or_default()))?.unwrap_or(needed);
        let end = offset.checked_add(length).ok_or_else(|| format!("external data offset {offset} + length {length} overflows"))?;
        if end > size {
            return Err(format!("external data {} is truncated ({size} bytes, {end} needed)", file.display()));
        }
        if length != needed {
            return Err(format!("has {length} bytes of external data for {needed} needed"));
        }
        if self.read.saturating_add(length) > MAX_WEIGHT_BYTES {
            return Err(format!("external data beyond the budget of {MAX_WEIGHT_BYTES} bytes for a model ({} read, {length} more asked)", self.read));
        }
        self.read += length;
        let f = &self.files.get(&file).expect("opened above").0;
        let mut buf = vec![0u8; usize::try_from(length).map_err(|_| "external data too large".to_string())?];
        let mut f: &File = f;
        f.seek(SeekFrom::Start(offset)).and_then(|_| f.read_exact(&mut buf)).map_err(|e| format!("external data file {}: {e}", file.display()))?;
        Ok(buf)
    }
}

/// A TensorProto as a candle tensor: floats (f32, f64, f16) as F32, integers and booleans as I64.
/// External data is read through `external` (`None`: refused, as in a node's attribute).
pub(crate) fn tensor(t: &TensorProto, external: Option<&mut External>) -> std::result::Result<Tensor, String> {
    let what = || format!("tensor {:?}", t.name);
    let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).map_err(|_| format!("{} has a negative dimension {d}", what()))).collect::<std::result::Result<_, _>>()?;
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| format!("{} has too many elements", what()))?;
    let width = match t.data_type {
        1 | 6 | 12 => 4,
        7 | 11 | 13 => 8,
        10 | 16 | 4 | 5 => 2,
        2 | 3 | 9 => 1,
        other => return Err(format!("{} has data type {other}, which is not supported", what())),
    };
    let needed = count.checked_mul(width).ok_or_else(|| format!("{} has too many elements", what()))?;
    let raw_owned;
    let raw: Option<&[u8]> = if t.external_location || !t.external.is_empty() {
        let get = |k: &str| t.external.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let location = get("location").ok_or_else(|| format!("{} is stored externally but names no file", what()))?;
        let Some(external) = external else { return Err(format!("{} is stored externally, which only initializers may be", what())) };
        raw_owned = external.read(location, get("offset"), get("length"), needed as u64).map_err(|e| format!("{}: {e}", what()))?;
        Some(&raw_owned)
    } else {
        t.raw.as_deref()
    };
    let device = &Device::Cpu;
    let check = |n: usize| if n == count { Ok(()) } else { Err(format!("{} has {n} values for shape {dims:?}", what())) };
    if let Some(raw) = raw {
        if raw.len() != needed {
            return Err(format!("{} has {} bytes of data for shape {dims:?} ({needed} needed)", what(), raw.len()));
        }
        let chunks = raw.chunks_exact(width);
        return match t.data_type {
            1 => Tensor::from_vec(chunks.map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(), dims, device),
            11 => Tensor::from_vec(chunks.map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect::<Vec<_>>(), dims, device),
            10 => Tensor::from_vec(chunks.map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect::<Vec<_>>(), dims, device),
            16 => Tensor::from_vec(chunks.map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect::<Vec<_>>(), dims, device),
            6 => Tensor::from_vec(chunks.map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect::<Vec<_>>(), dims, device),
            12 => Tensor::from_vec(chunks.map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64).collect::<Vec<_>>(), dims, device),
            7 | 13 => Tensor::from_vec(chunks.map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(), dims, device),
            5 => Tensor::from_vec(chunks.map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64).collect::<Vec<_>>(), dims, device),
            4 => Tensor::from_vec(chunks.map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64).collect::<Vec<_>>(), dims, device),
            3 => Tensor::from_vec(raw.iter().map(|&b| b as i8 as i64).collect::<Vec<_>>(), dims, device),
            _ => Tensor::from_vec(raw.iter().map(|&b| b as i64).collect::<Vec<_>>(), dims, device),
        }
        .map_err(|e| e.to_string());
    }
    match t.data_type {
        1 | 11 => {
            check(t.floats.len())?;
            Tensor::from_vec(t.floats.clone(), dims, device)
        }
        10 | 16 => {
            // float16 data in int32_data, one value per entry.
            check(t.ints.len())?;
            let f = t.ints.iter().map(|&b| if t.data_type == 10 { half::f16::from_bits(b as u16).to_f32() } else { half::bf16::from_bits(b as u16).to_f32() });
            Tensor::from_vec(f.collect::<Vec<_>>(), dims, device)
        }
        _ => {
            check(t.ints.len())?;
            Tensor::from_vec(t.ints.clone(), dims, device)
        }
    }
    .map_err(|e| e.to_string())
}
