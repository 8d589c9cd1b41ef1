//! ONNX TensorProtos (initialisers, Constant values) as candle tensors, external data read from
//! beside the model only.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::proto::TensorProto;

/// A TensorProto as a candle tensor: floats (f32, f64, f16) as F32, integers and booleans as I64.
pub(crate) fn tensor(t: &TensorProto, folder: &Path) -> std::result::Result<Tensor, String> {
    let what = || format!("tensor {:?}", t.name);
    let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).map_err(|_| format!("{} has a negative dimension {d}", what()))).collect::<std::result::Result<_, _>>()?;
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| format!("{} has too many elements", what()))?;
    let raw_owned;
    let raw: Option<&[u8]> = if t.external_location || !t.external.is_empty() {
        let get = |k: &str| t.external.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let location = get("location").ok_or_else(|| format!("{} is stored externally but names no file", what()))?;
        let rel = Path::new(location);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(format!("{} names external data {location:?} outside the model's folder", what()));
        }
        let file = folder.join(rel);
        let offset: u64 = get("offset").map(str::parse).transpose().map_err(|_| format!("{}: bad external offset", what()))?.unwrap_or(0);
        let data = std::fs::read(&file).map_err(|e| format!("{}: external data file {}: {e}", what(), file.display()))?;
        let start = usize::try_from(offset).ok().filter(|&o| o <= data.len()).ok_or_else(|| format!("{}: offset {offset} is past the end of {}", what(), file.display()))?;
        let length: usize = get("length").map(str::parse).transpose().map_err(|_| format!("{}: bad external length", what()))?.unwrap_or(data.len() - start);
        if start + length > data.len() {
            return Err(format!("{}: external data {} is truncated ({} bytes, {} needed)", what(), file.display(), data.len(), start + length));
        }
        raw_owned = data[start..start + length].to_vec();
        Some(&raw_owned)
    } else {
        t.raw.as_deref()
    };
    let device = &Device::Cpu;
    let check = |n: usize| if n == count { Ok(()) } else { Err(format!("{} has {n} values for shape {dims:?}", what())) };
    let width = match t.data_type {
        1 | 6 | 12 => 4,
        7 | 11 | 13 => 8,
        10 | 16 | 4 | 5 => 2,
        2 | 3 | 9 => 1,
        other => return Err(format!("{} has data type {other}, which is not supported", what())),
    };
    if let Some(raw) = raw {
        if raw.len() != count * width {
            return Err(format!("{} has {} bytes of data for shape {dims:?} ({} needed)", what(), raw.len(), count * width));
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
