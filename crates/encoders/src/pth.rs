//! Reader for PyTorch checkpoints: the zip format of `torch.save` since 1.6 and the legacy
//! format before it (a pickle stream followed by raw storages), with any tensor strides.
//!
//! Candle's `from_pth` reads only contiguous zip checkpoints; the EfficientNet-Lite0 weights we
//! use are a legacy file with channels-last strides. The pickles go through our own interpreter
//! (`pickle.rs`), which evaluates nothing; here we recognise `_rebuild_tensor_v2` /
//! `_rebuild_parameter` calls and `OrderedDict`s, and check every view against its storage before
//! materialising it.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::pickle::{Unpickler, Value};
use crate::{Error, Result};


/// Where a tensor's storage comes from and how it views it.
struct TensorRef {
    key: String,
    dtype: StorageType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum StorageType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    Other,
}

impl StorageType {
    fn from_name(name: &str) -> Self {
        match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            _ => Self::Other,
        }
    }

    fn element_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 | Self::I64 => 8,
            Self::F16 | Self::BF16 => 2,
            Self::Other => 1,
        }
    }
}

fn as_usizes(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) if *n >= 0 => Some(*n as usize),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Recognises `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, possibly wrapped in
/// `_rebuild_parameter`.
fn tensor_ref(v: &Value) -> Option<TensorRef> {
    let Value::Call(callable, args) = v else { return None };
    let Value::Global(module, name) = callable.as_ref() else { return None };
    if module == "torch._utils" && name == "_rebuild_parameter" {
        return tensor_ref(args.first()?);
    }
    if module != "torch._utils" || name != "_rebuild_tensor_v2" || args.len() < 4 {
        return None;
    }
    let Value::PersId(pid) = &args[0] else { return None };
    let Value::Tuple(pid) = pid.as_ref() else { return None };
    // ('storage', storage_type, key, location, numel[, view_metadata])
    let (Some(Value::Global(_, storage_type)), Some(key)) = (pid.get(1), pid.get(2)) else { return None };
    let key = match key {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => return None,
    };
    let Value::Int(offset) = args[1] else { return None };
    Some(TensorRef {
        key,
        dtype: StorageType::from_name(storage_type),
        offset: usize::try_from(offset).ok()?,
        size: as_usizes(&args[2])?,
        stride: as_usizes(&args[3])?,
    })
}

/// The (name, tensor) entries of a checkpoint's top-level dict, looking inside the usual
/// wrappers (`state_dict`, `model`) when the top level holds no tensors.
fn state_dict_entries(root: Value) -> Vec<(String, TensorRef)> {
    let Value::Dict(items) = root else { return Vec::new() };
    let tensors: Vec<(String, TensorRef)> = items
        .iter()
        .filter_map(|(k, v)| match k {
            Value::Str(k) => tensor_ref(v).map(|t| (k.clone(), t)),
            _ => None,
        })
        .collect();
    if !tensors.is_empty() {
        return tensors;
    }
    for (k, v) in items {
        if matches!(&k, Value::Str(s) if s == "state_dict" || s == "model" || s == "model_state_dict") {
            let inner = state_dict_entries(v);
            if !inner.is_empty() {
                return inner;
            }
        }
    }
    Vec::new()
}

/// Materialises a (possibly strided) view of a raw little-endian storage as a contiguous f32
/// tensor. Integer tensors (batch-norm counters) are returned as `None`.
fn materialise(name: &str, t: &TensorRef, storage: &[u8]) -> Result<Option<Tensor>> {
    if !matches!(t.dtype, StorageType::F32 | StorageType::F64 | StorageType::F16 | StorageType::BF16) {
        return Ok(None);
    }
    if t.size.len() != t.stride.len() {
        return Err(Error::Checkpoint(format!("tensor {name}: size and stride ranks differ")));
    }
    let es = t.dtype.element_size();
    let numel_storage = storage.len() / es;
    let overflow = || Error::Checkpoint(format!("tensor {name}: its size {:?} and strides {:?} overflow", t.size, t.stride));
    let count = t.size.iter().try_fold(1usize, |n, &s| n.checked_mul(s)).ok_or_else(overflow)?;
    // A view may repeat storage elements (a zero stride); materialised, it needs memory for all of
    // them. Beyond the storage itself, only small ones are believed: a 1.6 KB file must not ask
    // for terabytes.
    if count > numel_storage.max(1) && count > (64 << 20) / 4 {
        return Err(Error::Checkpoint(format!(
            "tensor {name}: a view of {count} elements over a storage of {numel_storage}; refusing to materialise it"
        )));
    }
    let reach = t.size.iter().zip(&t.stride).try_fold(t.offset, |acc, (s, st)| s.saturating_sub(1).checked_mul(*st).and_then(|v| acc.checked_add(v)));
    let last = reach.ok_or_else(overflow)?;
    if count > 0 && last >= numel_storage {
        return Err(Error::Checkpoint(format!(
            "tensor {name}: view reaches element {last} of a storage of {numel_storage}"
        )));
    }
    let read = |i: usize| -> f32 {
        let b = &storage[i * es..(i + 1) * es];
        match t.dtype {
            StorageType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageType::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
            StorageType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        }
    };
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; t.size.len()];
    for _ in 0..count {
        let off = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(read(off));
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(Some(Tensor::from_vec(out, t.size.as_slice(), &Device::Cpu)?))
}

/// Reads every floating-point tensor of a PyTorch checkpoint (zip or legacy format) as f32.
pub fn read_pth(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let data = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let what = path.display().to_string();
    if data.starts_with(b"PK\x03\x04") {
        read_zip(&data, &what)
    } else {
        read_legacy(&data, &what)
    }
}

fn read_legacy(data: &[u8], what: &str) -> Result<Vec<(String, Tensor)>> {
    if data.first() != Some(&0x80) {
        return Err(Error::Checkpoint(format!("{what}: not a PyTorch checkpoint (neither zip nor pickle)")));
    }
    // magic number, protocol version, system info, then the object itself.
    let (magic, pos) = Unpickler::new(data, 0, what).load()?;
    // The magic number 0x1950a86a20f9469cfc6c, as the low 64 bits the unpickler keeps.
    const MAGIC_LOW64: i64 = 0x1950a86a20f9469cfc6c_u128 as i64;
    if magic != Value::Int(MAGIC_LOW64) {
        return Err(Error::Checkpoint(format!("{what}: a pickle, but not a legacy torch.save file")));
    }
    let (_protocol, pos) = Unpickler::new(data, pos, what).load()?;
    let (_sys_info, pos) = Unpickler::new(data, pos, what).load()?;
    let (root, pos) = Unpickler::new(data, pos, what).load()?;
    let (keys, mut pos) = Unpickler::new(data, pos, what).load()?;
    let Value::List(keys) = keys else {
        return Err(Error::Checkpoint(format!("{what}: storage key list missing")));
    };
    let entries = state_dict_entries(root);
    let sizes: HashMap<&str, usize> = entries.iter().map(|(_, t)| (t.key.as_str(), t.dtype.element_size())).collect();
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let key = match key {
            Value::Str(s) => s,
            Value::Int(i) => i.to_string(),
            _ => return Err(Error::Checkpoint(format!("{what}: bad storage key"))),
        };
        let es = sizes.get(key.as_str()).copied().unwrap_or(1);
        let header = data.get(pos..pos + 8).ok_or_else(|| Error::Checkpoint(format!("{what}: truncated before storage {key}")))?;
        let numel = u64::from_le_bytes(header.try_into().expect("8 bytes")) as usize;
        let start = pos + 8;
        let end = numel.checked_mul(es).and_then(|n| n.checked_add(start)).filter(|&e| e <= data.len());
        let end = end.ok_or_else(|| Error::Checkpoint(format!("{what}: storage {key} is truncated")))?;
        storages.insert(key, &data[start..end]);
        pos = end;
    }
    entries
        .into_iter()
        .filter_map(|(name, t)| {
            let result = match storages.get(&t.key) {
                Some(s) => materialise(&name, &t, s),
                None => Err(Error::Checkpoint(format!("{what}: storage {} of {name} missing", t.key))),
            };
            result.transpose().map(|r| r.map(|tensor| (name, tensor)))
        })
        .collect()
}

fn read_zip(data: &[u8], what: &str) -> Result<Vec<(String, Tensor)>> {
    let zerr = |e: zip::result::ZipError| Error::Checkpoint(format!("{what}: {e}"));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(zerr)?;
    let pkl_name = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| Error::Checkpoint(format!("{what}: zip without data.pkl")))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let read_entry = |archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str| -> Result<Vec<u8>> {
        let mut f = archive.by_name(name).map_err(zerr)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| Error::Checkpoint(format!("{what}: {name}: {e}")))?;
        Ok(buf)
    };
    let pkl = read_entry(&mut archive, &pkl_name)?;
    let (root, _) = Unpickler::new(&pkl, 0, what).load()?;
    let mut out = Vec::new();
    for (name, t) in state_dict_entries(root) {
        let storage = read_entry(&mut archive, &format!("{prefix}data/{}", t.key))?;
        if let Some(tensor) = materialise(&name, &t, &storage)? {
            out.push((name, tensor));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_views_are_materialised_in_logical_order() {
        // A 2x3 tensor stored transposed (stride [1, 2]).
        let storage: Vec<u8> = [0f32, 3., 1., 4., 2., 5.].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = TensorRef { key: "0".into(), dtype: StorageType::F32, offset: 0, size: vec![2, 3], stride: vec![1, 2] };
        let x = materialise("x", &t, &storage).unwrap().unwrap();
        assert_eq!(x.to_vec2::<f32>().unwrap(), vec![vec![0., 1., 2.], vec![3., 4., 5.]]);
        let bad = TensorRef { stride: vec![3, 2], ..t };
        assert!(materialise("x", &bad, &storage).is_err());
    }
}
