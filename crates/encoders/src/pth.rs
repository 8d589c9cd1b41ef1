//! Reader for PyTorch checkpoints: the zip format of `torch.save` since 1.6 and the legacy
//! format before it (a pickle stream followed by raw storages), with any tensor strides.
//!
//! Candle's `from_pth` reads only contiguous zip checkpoints; the EfficientNet-Lite0 weights we
//! use are a legacy file with channels-last strides. This is a small pickle interpreter that
//! evaluates nothing: it only recognises `_rebuild_tensor_v2` / `_rebuild_parameter` calls and
//! `OrderedDict`s, and reports anything malformed as an error, never a panic.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A pickled value, as far as checkpoints need.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Call(Box<Value>, Vec<Value>),
    PersId(Box<Value>),
    Mark,
}

/// Deepest nesting of values a checkpoint may build. State dicts nest a few levels; a pickle
/// nested a million levels deep would overflow the stack when its values are dropped or cloned.
const MAX_DEPTH: usize = 1000;

/// The nesting depth of `v` (a scalar is 0), found without recursion.
fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut todo = vec![(v, 0usize)];
    while let Some((v, d)) = todo.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Tuple(items) | Value::List(items) => todo.extend(items.iter().map(|i| (i, d + 1))),
            Value::Dict(pairs) => todo.extend(pairs.iter().flat_map(|(k, v)| [(k, d + 1), (v, d + 1)])),
            Value::Call(callable, args) => {
                todo.push((callable, d + 1));
                todo.extend(args.iter().map(|i| (i, d + 1)));
            }
            Value::PersId(id) => todo.push((id, d + 1)),
            _ => {}
        }
    }
    deepest
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    what: &'a str,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], pos: usize, what: &'a str) -> Self {
        Self { data, pos, stack: Vec::new(), memo: HashMap::new(), what }
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Checkpoint(format!("{}: {msg} (at byte {})", self.what, self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(self.err("unexpected end of file"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err("unterminated line"))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("invalid UTF-8 string"))
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let what = self.what.to_string();
        let pos = self.pos;
        self.stack.last_mut().ok_or_else(|| Error::Checkpoint(format!("{what}: empty stack (at byte {pos})")))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.stack.iter().rposition(|v| *v == Value::Mark).ok_or_else(|| self.err("missing MARK"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, id: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(id, v);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<()> {
        let v = self.memo.get(&id).cloned().ok_or_else(|| self.err(format!("memo entry {id} missing")))?;
        self.stack.push(v);
        Ok(())
    }

    /// Refuses to nest `items` in a container when that would exceed [`MAX_DEPTH`]: every value
    /// is built by nesting, so checking here keeps every value of the machine within it.
    fn nest<'v>(&self, items: impl IntoIterator<Item = &'v Value>) -> Result<()> {
        if items.into_iter().any(|v| depth(v) + 1 > MAX_DEPTH) {
            return Err(self.err(format!("values nested more than {MAX_DEPTH} levels deep; not a checkpoint")));
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        self.nest(&items)?;
        if items.len() % 2 != 0 {
            return Err(self.err("odd number of dict items"));
        }
        let err = self.err("SETITEMS on a non-dict");
        match self.top()? {
            Value::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            _ => Err(err),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        self.nest(&items)?;
        let err = self.err("APPEND on a non-list");
        match self.top()? {
            Value::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(err),
        }
    }

    fn call(callable: Value, args: Value) -> Value {
        let args = match args {
            Value::Tuple(a) => a,
            other => vec![other],
        };
        match &callable {
            Value::Global(m, n) if m == "collections" && (n == "OrderedDict" || n == "defaultdict") => {
                Value::Dict(Vec::new())
            }
            _ => Value::Call(Box::new(callable), args),
        }
    }

    /// Runs until STOP and returns the pickled object.
    fn load(mut self) -> Result<(Value, usize)> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.take(8)?;
                }
                b'c' => {
                    let (m, n) = (self.line()?, self.line()?);
                    self.stack.push(Value::Global(m, n));
                }
                0x93 => {
                    let (n, m) = (self.pop()?, self.pop()?);
                    match (m, n) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'q' => {
                    let id = self.u8()? as u32;
                    self.memo_put(id)?;
                }
                b'r' => {
                    let id = self.u32()?;
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = self.memo.len() as u32;
                    self.memo_put(id)?;
                }
                b'h' => {
                    let id = self.u8()? as u32;
                    self.memo_get(id)?;
                }
                b'j' => {
                    let id = self.u32()?;
                    self.memo_get(id)?;
                }
                b'(' => self.stack.push(Value::Mark),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.nest(&items)?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.nest(&items)?;
                    self.stack.push(Value::Tuple(items));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let bytes = self.take(n)?;
                    // Only values that fit in i64 matter (sizes, strides, offsets); larger ones,
                    // such as the legacy format's magic number, are kept as their low 64 bits.
                    let mut v: i64 = 0;
                    for (i, &b) in bytes.iter().take(8).enumerate() {
                        v |= (b as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(if op == b'U' { Value::Str(String::from_utf8_lossy(&b).into_owned()) } else { Value::Bytes(b) });
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(if op == b'T' { Value::Str(String::from_utf8_lossy(&b).into_owned()) } else { Value::Bytes(b) });
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v));
                }
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'N' => self.stack.push(Value::None),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b's' => {
                    let (v, k) = (self.pop()?, self.pop()?);
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b']' => self.stack.push(Value::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.nest(&items)?;
                    self.stack.push(Value::List(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'R' | 0x81 => {
                    let (args, callable) = (self.pop()?, self.pop()?);
                    self.nest([&args, &callable])?;
                    self.stack.push(Self::call(callable, args));
                }
                b'b' => {
                    // State set on an object (e.g. an OrderedDict's `_metadata`): not needed.
                    self.pop()?;
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.nest([&id])?;
                    self.stack.push(Value::PersId(Box::new(id)));
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok((v, self.pos));
                }
                other => return Err(self.err(format!("unsupported pickle opcode 0x{other:02x}"))),
            }
        }
    }
}

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
    fn every_prefix_of_a_pickle_fails_cleanly() {
        // A pickled {'a': 1} at protocol 2.
        let pickle = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.";
        let (v, _) = Unpickler::new(pickle, 0, "t").load().unwrap();
        assert_eq!(v, Value::Dict(vec![(Value::Str("a".into()), Value::Int(1))]));
        for n in 0..pickle.len() {
            assert!(Unpickler::new(&pickle[..n], 0, "t").load().is_err());
        }
    }

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
