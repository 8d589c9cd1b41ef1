//! Where weights come from (a safetensors or PyTorch file, or an hf-hub repo id) and checked
//! access to them by PyTorch state-dict name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{Device, Tensor};

use crate::{pth, Error, Result};

/// A weights location as users write it: a file path, or `hf:OWNER/REPO` for the Hugging Face hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    File(PathBuf),
    Hub { repo: String },
}

impl WeightsSource {
    pub fn parse(s: &str) -> Self {
        match s.strip_prefix("hf:") {
            Some(repo) => WeightsSource::Hub { repo: repo.to_string() },
            None => WeightsSource::File(PathBuf::from(s)),
        }
    }

    /// Resolves to a local file, downloading from the hub if needed. With `HF_HUB_OFFLINE=1` only
    /// the local cache (`HF_HOME`, default `~/.cache/huggingface`) is consulted.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            WeightsSource::File(p) => Ok(p.clone()),
            WeightsSource::Hub { repo } => resolve_hub(repo),
        }
    }
}

/// Files tried, in order, in a hub repository.
const HUB_FILES: [&str; 3] = ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"];

fn resolve_hub(repo: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    for file in HUB_FILES {
        if let Some(path) = cache.model(repo.to_string()).get(file) {
            return Ok(path);
        }
    }
    if offline {
        return Err(Error::Hub {
            repo: repo.to_string(),
            message: format!(
                "HF_HUB_OFFLINE is set and none of {} is in the cache at {}",
                HUB_FILES.join(", "),
                cache.path().display()
            ),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub { repo: repo.to_string(), message: e.to_string() })?;
    let mut last = String::new();
    for file in HUB_FILES {
        match api.model(repo.to_string()).get(file) {
            Ok(path) => return Ok(path),
            Err(e) => last = format!("{file}: {e}"),
        }
    }
    Err(Error::Hub { repo: repo.to_string(), message: last })
}

/// A loaded state dict: tensors by PyTorch name, with the file they came from for messages.
#[derive(Debug)]
pub struct Weights {
    tensors: Mutex<HashMap<String, Tensor>>,
    origin: String,
    /// Deterministic pseudo-random weights made on request ([`Weights::hashed`]).
    hashed: bool,
}

impl Weights {
    /// Loads a `.safetensors` file or a PyTorch checkpoint (zip or legacy format, detected from
    /// the content, whatever the extension).
    pub fn load(path: &Path) -> Result<Self> {
        let mut head = [0u8; 9];
        let len = {
            use std::io::Read;
            let io = |source| Error::Io { path: path.to_path_buf(), source };
            let mut f = std::fs::File::open(path).map_err(io)?;
            let len = f.metadata().map_err(io)?.len();
            f.read_exact(&mut head[..len.min(9) as usize]).map_err(io)?;
            len
        };
        if len == 0 {
            return Err(Error::Checkpoint(format!("{}: the file is empty", path.display())));
        }
        // A safetensors file is its header's length (8 bytes, little-endian) and then that JSON
        // header: a length whose first byte is 0x80 must not be taken for a pickle's protocol.
        let header = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let is_safetensors = len >= 9 && head[8] == b'{' && header.checked_add(8).is_some_and(|end| end <= len);
        let is_pickle = !is_safetensors && (head[0] == 0x80 || head.starts_with(b"PK\x03\x04"));
        let tensors = if is_pickle {
            pth::read_pth(path)?.into_iter().collect()
        } else {
            candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| Error::Checkpoint(format!("{}: not a safetensors or PyTorch file: {e}", path.display())))?
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_dtype(candle_core::DType::F32)?)))
                .collect::<Result<HashMap<_, _>>>()?
        };
        check_finite(tensors.iter(), &path.display().to_string())?;
        Ok(Self::from_tensors(tensors, path.display().to_string()))
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>, origin: String) -> Self {
        // Checkpoints saved from DataParallel prefix every name with "module.".
        let tensors = if !tensors.is_empty() && tensors.keys().all(|k| k.starts_with("module.")) {
            tensors.into_iter().map(|(k, v)| (k["module.".len()..].to_string(), v)).collect()
        } else {
            tensors
        };
        Self { tensors: Mutex::new(tensors), origin, hashed: false }
    }

    /// Weights that do not come from a file: every tensor a model asks for is made on request by
    /// [`crate::hashed::hashed_tensor`] (the same values `tests/fixtures/make_goldens.py` loads into
    /// PyTorch) and kept, so that they can be saved.
    pub fn hashed() -> Self {
        Self { tensors: Mutex::new(HashMap::new()), origin: "hashed pseudo-random weights".into(), hashed: true }
    }

    fn tensors(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tensor>> {
        self.tensors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every tensor by name.
    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors().contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.tensors().keys().cloned().collect()
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.hashed {
            let mut tensors = self.tensors();
            let t = tensors.entry(name.to_string()).or_insert_with(|| crate::hashed::hashed_tensor(name, shape));
            return Ok(t.clone());
        }
        let found = self.tensors().get(name).cloned();
        let t = found.ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            origin: self.origin.clone(),
            hint: self.hint(),
        })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                origin: self.origin.clone(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// A few names actually present, to show what kind of file this is.
    fn hint(&self) -> String {
        let mut names = self.names();
        names.sort();
        let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
        if shown.is_empty() {
            "the file holds no floating-point tensors".to_string()
        } else {
            format!("the file holds {} tensors such as {}", names.len(), shown.join(", "))
        }
    }

    /// Writes every tensor to a safetensors file (atomically: a temporary file renamed into place).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        if self.tensors().is_empty() {
            return Err(Error::Checkpoint(format!("{}: no floating-point tensors to write", self.origin)));
        }
        Ok(gradcam_io::write_safetensors(&self.tensors(), path)?)
    }
}

/// Refuses weights with a NaN or an infinite value (one pass, no copy): they vanish at a ReLU and
/// leave a confident wrong answer and all-zero maps instead of an error.
pub fn check_finite<'a>(tensors: impl Iterator<Item = (&'a String, &'a Tensor)>, origin: &str) -> Result<()> {
    for (name, t) in tensors {
        let (storage, layout) = t.storage_and_layout();
        let finite = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => v[a..b].iter().all(|x| x.is_finite()),
            _ => {
                drop(storage);
                t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite())
            }
        };
        if !finite {
            return Err(Error::Checkpoint(format!("{origin}: tensor {name:?} holds NaN or infinite values")));
        }
    }
    Ok(())
}
