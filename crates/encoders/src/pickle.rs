//! A small pickle interpreter for PyTorch checkpoints that evaluates nothing: it builds the
//! values a checkpoint holds (dicts, lists, tuples, calls of named globals, persistent ids) and
//! reports anything malformed, or nested deeper than [`MAX_DEPTH`], as an error, never a panic.

use std::collections::HashMap;

use crate::{Error, Result};

/// A pickled value, as far as checkpoints need.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
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
pub(crate) const MAX_DEPTH: usize = 1000;

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

pub(crate) struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    what: &'a str,
}

impl<'a> Unpickler<'a> {
    pub(crate) fn new(data: &'a [u8], pos: usize, what: &'a str) -> Self {
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
    pub(crate) fn load(mut self) -> Result<(Value, usize)> {
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
}
