//! Field access for hand-validated JSON: every error names the file, the record and the field.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// Parses a JSON file.
pub(crate) fn read(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::Json { file: path.to_path_buf(), message: e.to_string() })
}

/// Writes JSON through a temporary file renamed into place.
pub(crate) fn write(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::Json { file: path.to_path_buf(), message: e.to_string() })?;
    crate::write_atomic(path, &bytes)
}

/// One record (object) of a file, for error messages: `annotations[3] (id 17)`.
pub(crate) struct Record<'a> {
    pub file: &'a Path,
    pub name: String,
    pub value: &'a Value,
}

impl<'a> Record<'a> {
    /// The records of array `key` at the top level of `root`.
    pub fn list(file: &'a Path, root: &'a Value, key: &str) -> Result<Vec<Record<'a>>> {
        let top = Record { file, name: "top level".into(), value: root };
        let items = top.field(key)?.as_array().ok_or_else(|| top.err(key, "must be an array"))?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| {
                let id = value.get("id").or_else(|| value.get("question_id")).and_then(Value::as_u64);
                let name = match id {
                    Some(id) => format!("{key}[{i}] (id {id})"),
                    None => format!("{key}[{i}]"),
                };
                Record { file, name, value }
            })
            .collect())
    }

    pub fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Field { file: self.file.to_path_buf(), record: self.name.clone(), field: field.to_string(), message: message.into() }
    }

    pub fn field(&self, key: &str) -> Result<&'a Value> {
        if !self.value.is_object() {
            return Err(self.err(key, "the record is not a JSON object"));
        }
        self.value.get(key).ok_or_else(|| self.err(key, "missing"))
    }

    pub fn opt(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.field(key)?.as_u64().ok_or_else(|| self.err(key, "must be a non-negative integer"))
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.field(key)?.as_f64().ok_or_else(|| self.err(key, "must be a number"))
    }

    pub fn str(&self, key: &str) -> Result<&'a str> {
        self.field(key)?.as_str().ok_or_else(|| self.err(key, "must be a string"))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.opt(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| self.err(key, "must be a string")),
        }
    }

    pub fn f64s(&self, key: &str, n: usize) -> Result<Vec<f64>> {
        let v = self.field(key)?.as_array().ok_or_else(|| self.err(key, format!("must be an array of {n} numbers")))?;
        if v.len() != n {
            return Err(self.err(key, format!("must have {n} numbers, has {}", v.len())));
        }
        v.iter().map(|x| x.as_f64().ok_or_else(|| self.err(key, "must hold numbers"))).collect()
    }

    pub fn u64s(&self, key: &str) -> Result<Vec<u64>> {
        let v = self.field(key)?.as_array().ok_or_else(|| self.err(key, "must be an array of integers"))?;
        v.iter().map(|x| x.as_u64().ok_or_else(|| self.err(key, "must hold non-negative integers"))).collect()
    }
}
