//! `--maps npy|safetensors`: a record's raw maps as arrays, `DIR/maps/INDEX.npy` (`[n, h, w]`,
//! the maps in the record's order) or `DIR/maps/INDEX.safetensors` (tensors `0`, `1`, ... of
//! `[h, w]` each, for maps of different sizes).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// The array format of `--maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum MapFormat {
    Npy,
    Safetensors,
}

/// A record's maps: every object in it with `cam_size` and `cam` (the `--json` map records of
/// every command), depth first in the record's order.
pub fn maps_of(record: &Value) -> Vec<([usize; 2], Vec<f32>)> {
    fn walk(v: &Value, out: &mut Vec<([usize; 2], Vec<f32>)>) {
        match v {
            Value::Object(o) => {
                if let (Some(size), Some(Value::Array(rows))) = (o.get("cam_size").and_then(|s| serde_json::from_value::<[usize; 2]>(s.clone()).ok()), o.get("cam")) {
                    let values = rows.iter().flat_map(|r| r.as_array().into_iter().flatten()).map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect();
                    out.push((size, values));
                    return;
                }
                o.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(record, &mut out);
    out
}

/// Writes input `index`'s maps from its record (JSON) to `dir/maps/`; returns the file.
pub fn write(dir: &Path, index: usize, format: MapFormat, record: &str) -> Result<PathBuf> {
    let value: Value = serde_json::from_str(record).map_err(|e| Error::Setting(format!("--maps: the record of input {index} is not JSON: {e}")))?;
    let maps = maps_of(&value);
    for (k, (size, values)) in maps.iter().enumerate() {
        if values.len() != size[0] * size[1] {
            return Err(Error::Setting(format!("--maps: map {k} of input {index} has {} values for a {}x{} map", values.len(), size[0], size[1])));
        }
    }
    let folder = dir.join("maps");
    gradcam_io::create_dir_all(&folder)?;
    let bytes = |values: &[f32]| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let file = match format {
        MapFormat::Npy => {
            let size = maps.first().map_or([0, 0], |m| m.0);
            if let Some((other, _)) = maps.iter().find(|m| m.0 != size) {
                return Err(Error::Setting(format!("--maps npy: input {index} has maps of {}x{} and {}x{}; give --maps safetensors", size[0], size[1], other[0], other[1])));
            }
            let values: Vec<f32> = maps.iter().flat_map(|m| m.1.iter().copied()).collect();
            let file = folder.join(format!("{index:09}.npy"));
            gradcam_io::write_atomic(&file, &gradcam_io::npy_bytes(&values, &[maps.len(), size[0], size[1]]))?;
            file
        }
        MapFormat::Safetensors => {
            let data: Vec<(String, [usize; 2], Vec<u8>)> = maps.iter().enumerate().map(|(k, (size, v))| (k.to_string(), *size, bytes(v))).collect();
            let views = data.iter().map(|(name, size, b)| Ok((name.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, size.to_vec(), b).map_err(|e| Error::Setting(format!("--maps: {e}")))?)));
            let views = views.collect::<Result<Vec<_>>>()?;
            let file = folder.join(format!("{index:09}.safetensors"));
            let out = safetensors::tensor::serialize(views, None).map_err(|e| Error::Setting(format!("--maps: {e}")))?;
            gradcam_io::write_atomic(&file, &out)?;
            file
        }
    };
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_of_a_record_are_written_as_arrays() {
        let record = r#"{"image":"a.png","words":[{"t":0,"cam_size":[1,2],"cam":[[0.5,1.0]]},{"t":1,"cam_size":[1,2],"cam":[[0.0,0.25]]}]}"#;
        let dir = tempfile::tempdir().unwrap();
        let npy = std::fs::read(write(dir.path(), 3, MapFormat::Npy, record).unwrap()).unwrap();
        assert!(std::str::from_utf8(&npy[10..80]).unwrap().contains("'shape': (2, 1, 2)"));
        let values: Vec<f32> = npy[npy.len() - 16..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(values, [0.5, 1.0, 0.0, 0.25]);
        let st = std::fs::read(write(dir.path(), 3, MapFormat::Safetensors, record).unwrap()).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        assert_eq!(st.tensor("1").unwrap().shape(), [1, 2]);
        let mixed = r#"{"a":[{"cam_size":[1,1],"cam":[[1.0]]},{"cam_size":[1,2],"cam":[[1.0,2.0]]}]}"#;
        assert!(write(dir.path(), 4, MapFormat::Npy, mixed).unwrap_err().to_string().contains("safetensors"));
    }
}
