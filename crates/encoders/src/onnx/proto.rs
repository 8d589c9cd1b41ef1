//! The part of ONNX's protobuf schema (onnx.proto, IR version 3-10) that a CNN needs, decoded
//! straight from the wire format: no protoc, no generated code. Every read is bounds-checked and
//! every error names what was being read and where, so a file that is not ONNX, or a truncated
//! one, is refused with a message instead of a panic.

use std::collections::HashMap;

/// A decoding error: what was read, at which byte offset of its message.
#[derive(Debug)]
pub struct ProtoError(pub String);

type Result<T> = std::result::Result<T, ProtoError>;

/// One field of a protobuf message.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterates over the fields of one message.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    fn err(&self, why: &str) -> ProtoError {
        ProtoError(format!("{why} in {} at byte {} of {}", self.what, self.pos, self.buf.len()))
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else { return Err(self.err("truncated varint")) };
            self.pos += 1;
            value |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.err(&format!("field of {n} bytes runs past the end")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn next_field(&mut self) -> Result<Option<(u32, Wire<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        if field == 0 {
            return Err(self.err("field number 0"));
        }
        let value = match wire {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| self.err("length too large"))?;
                Wire::Bytes(self.take(n)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"))),
            other => return Err(self.err(&format!("unsupported wire type {other}"))),
        };
        Ok(Some((field, value)))
    }
}

fn string(b: &[u8], what: &str) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError(format!("{what} is not UTF-8")))
}

fn int(w: &Wire, what: &str) -> Result<i64> {
    match w {
        Wire::Varint(v) => Ok(*v as i64),
        _ => Err(ProtoError(format!("{what}: expected an integer"))),
    }
}

/// Appends a repeated int64 field, packed or not.
fn ints(w: &Wire, out: &mut Vec<i64>, what: &'static str) -> Result<()> {
    match w {
        Wire::Varint(v) => out.push(*v as i64),
        Wire::Bytes(b) => {
            let mut f = Fields::new(b, what);
            while f.pos < b.len() {
                out.push(f.varint()? as i64);
            }
        }
        _ => return Err(ProtoError(format!("{what}: expected integers"))),
    }
    Ok(())
}

/// Appends a repeated float field, packed or not.
fn floats(w: &Wire, out: &mut Vec<f32>, what: &str) -> Result<()> {
    match w {
        Wire::Fixed32(v) => out.push(f32::from_bits(*v)),
        Wire::Bytes(b) if b.len() % 4 == 0 => out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))),
        _ => return Err(ProtoError(format!("{what}: expected floats"))),
    }
    Ok(())
}

/// Appends a repeated double field, packed or not, as f32.
fn doubles(w: &Wire, out: &mut Vec<f32>, what: &str) -> Result<()> {
    match w {
        Wire::Fixed64(v) => out.push(f64::from_bits(*v) as f32),
        Wire::Bytes(b) if b.len() % 8 == 0 => out.extend(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)),
        _ => return Err(ProtoError(format!("{what}: expected doubles"))),
    }
    Ok(())
}

/// ModelProto.
#[derive(Debug, Default)]
pub struct Model {
    pub ir_version: i64,
    /// (domain, version); "" is the default ONNX domain.
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub graph: Option<Graph>,
}

/// GraphProto.
#[derive(Debug, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<TensorProto>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub value_info: Vec<ValueInfo>,
    pub sparse_initializers: usize,
}

/// NodeProto.
#[derive(Debug, Default, Clone)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: HashMap<String, Attribute>,
}

/// AttributeProto's value.
#[derive(Debug, Clone)]
pub enum Attribute {
    Float(f32),
    Int(i64),
    String(String),
    Tensor(TensorProto),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    /// Graphs, strings lists and other kinds no CNN op here reads.
    Other(i64),
}

/// ValueInfoProto: a name and, when the file gives it, an element type and shape (`None` for a
/// symbolic dimension such as a dynamic batch).
#[derive(Debug, Default, Clone)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: i32,
    pub shape: Option<Vec<Option<usize>>>,
    /// The first dimension given as 0 or negative (other than -1, unknown): (index, value).
    pub invalid_dim: Option<(usize, i64)>,
}

/// TensorProto, with its data still in the file's encoding.
#[derive(Debug, Default, Clone)]
pub struct TensorProto {
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: i32,
    pub raw: Option<Vec<u8>>,
    pub floats: Vec<f32>,
    pub ints: Vec<i64>,
    /// ONNX external data: (key, value) pairs such as location, offset, length.
    pub external: Vec<(String, String)>,
    pub external_location: bool,
}

impl Model {
    /// Decodes a whole model file.
    pub fn decode(buf: &[u8]) -> Result<Model> {
        let mut model = Model::default();
        let mut f = Fields::new(buf, "the model");
        while let Some((field, w)) = f.next_field()? {
            match (field, &w) {
                (1, _) => model.ir_version = int(&w, "ir_version")?,
                (2, Wire::Bytes(b)) => model.producer = string(b, "producer_name")?,
                (7, Wire::Bytes(b)) => model.graph = Some(Graph::decode(b)?),
                (8, Wire::Bytes(b)) => {
                    let (mut domain, mut version) = (String::new(), 0);
                    let mut g = Fields::new(b, "an opset_import");
                    while let Some((field, w)) = g.next_field()? {
                        match (field, &w) {
                            (1, Wire::Bytes(b)) => domain = string(b, "opset domain")?,
                            (2, _) => version = int(&w, "opset version")?,
                            _ => {}
                        }
                    }
                    model.opsets.push((domain, version));
                }
                _ => {}
            }
        }
        Ok(model)
    }
}

impl Graph {
    fn decode(buf: &[u8]) -> Result<Graph> {
        let mut g = Graph::default();
        let mut f = Fields::new(buf, "the graph");
        while let Some((field, w)) = f.next_field()? {
            let Wire::Bytes(b) = w else { continue };
            match field {
                1 => g.nodes.push(Node::decode(b)?),
                2 => g.name = string(b, "graph name")?,
                5 => g.initializers.push(TensorProto::decode(b)?),
                11 => g.inputs.push(ValueInfo::decode(b)?),
                12 => g.outputs.push(ValueInfo::decode(b)?),
                13 => g.value_info.push(ValueInfo::decode(b)?),
                15 => g.sparse_initializers += 1,
                _ => {}
            }
        }
        Ok(g)
    }
}

impl Node {
    fn decode(buf: &[u8]) -> Result<Node> {
        let mut n = Node::default();
        let mut f = Fields::new(buf, "a node");
        while let Some((field, w)) = f.next_field()? {
            let Wire::Bytes(b) = w else { continue };
            match field {
                1 => n.inputs.push(string(b, "node input")?),
                2 => n.outputs.push(string(b, "node output")?),
                3 => n.name = string(b, "node name")?,
                4 => n.op_type = string(b, "op_type")?,
                5 => {
                    let (name, value) = decode_attribute(b)?;
                    n.attributes.insert(name, value);
                }
                7 => n.domain = string(b, "node domain")?,
                _ => {}
            }
        }
        Ok(n)
    }
}

fn decode_attribute(buf: &[u8]) -> Result<(String, Attribute)> {
    let (mut name, mut kind) = (String::new(), 0i64);
    let (mut f32v, mut i64v, mut s, mut t) = (None, None, None, None);
    let (mut fl, mut il) = (Vec::new(), Vec::new());
    let mut f = Fields::new(buf, "an attribute");
    while let Some((field, w)) = f.next_field()? {
        match (field, &w) {
            (1, Wire::Bytes(b)) => name = string(b, "attribute name")?,
            (20, _) => kind = int(&w, "attribute type")?,
            (2, Wire::Fixed32(v)) => f32v = Some(f32::from_bits(*v)),
            (3, _) => i64v = Some(int(&w, "attribute int")?),
            (4, Wire::Bytes(b)) => s = Some(String::from_utf8_lossy(b).into_owned()),
            (5, Wire::Bytes(b)) => t = Some(TensorProto::decode(b)?),
            (7, _) => floats(&w, &mut fl, "attribute floats")?,
            (8, _) => ints(&w, &mut il, "attribute ints")?,
            _ => {}
        }
    }
    let value = match kind {
        1 => Attribute::Float(f32v.unwrap_or(0.0)),
        2 => Attribute::Int(i64v.unwrap_or(0)),
        3 => Attribute::String(s.unwrap_or_default()),
        4 => Attribute::Tensor(t.ok_or_else(|| ProtoError(format!("attribute {name:?} has no tensor")))?),
        6 => Attribute::Floats(fl),
        7 => Attribute::Ints(il),
        other => Attribute::Other(other),
    };
    Ok((name, value))
}

impl ValueInfo {
    fn decode(buf: &[u8]) -> Result<ValueInfo> {
        let mut v = ValueInfo::default();
        let mut f = Fields::new(buf, "a value_info");
        while let Some((field, w)) = f.next_field()? {
            match (field, &w) {
                (1, Wire::Bytes(b)) => v.name = string(b, "value name")?,
                (2, Wire::Bytes(b)) => {
                    // TypeProto.tensor_type (1): elem_type (1), shape (2) of dims (1): value (1) | param (2).
                    let mut tp = Fields::new(b, "a type");
                    while let Some((field, w)) = tp.next_field()? {
                        let (1, Wire::Bytes(tensor)) = (field, &w) else { continue };
                        let mut tt = Fields::new(tensor, "a tensor type");
                        while let Some((field, w)) = tt.next_field()? {
                            match (field, &w) {
                                (1, _) => v.elem_type = int(&w, "elem_type")? as i32,
                                (2, Wire::Bytes(shape)) => {
                                    let mut dims = Vec::new();
                                    let mut sf = Fields::new(shape, "a shape");
                                    while let Some((field, w)) = sf.next_field()? {
                                        let (1, Wire::Bytes(dim)) = (field, &w) else { continue };
                                        let mut value = None;
                                        let mut df = Fields::new(dim, "a dimension");
                                        while let Some((field, w)) = df.next_field()? {
                                            if field == 1 {
                                                let d = int(&w, "dim_value")?;
                                                value = usize::try_from(d).ok().filter(|&d| d > 0);
                                                if (d == 0 || d < -1) && v.invalid_dim.is_none() {
                                                    v.invalid_dim = Some((dims.len(), d));
                                                }
                                            }
                                        }
                                        dims.push(value);
                                    }
                                    v.shape = Some(dims);
                                }
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(v)
    }
}

impl TensorProto {
    fn decode(buf: &[u8]) -> Result<TensorProto> {
        let mut t = TensorProto::default();
        let mut f = Fields::new(buf, "a tensor");
        while let Some((field, w)) = f.next_field()? {
            match (field, &w) {
                (1, _) => ints(&w, &mut t.dims, "tensor dims")?,
                (2, _) => t.data_type = int(&w, "data_type")? as i32,
                (4, _) => floats(&w, &mut t.floats, "float_data")?,
                (5, _) | (7, _) => ints(&w, &mut t.ints, "int_data")?,
                (8, Wire::Bytes(b)) => t.name = string(b, "tensor name")?,
                (9, Wire::Bytes(b)) => t.raw = Some(b.to_vec()),
                (10, _) => doubles(&w, &mut t.floats, "double_data")?,
                (13, Wire::Bytes(b)) => {
                    let (mut key, mut value) = (String::new(), String::new());
                    let mut e = Fields::new(b, "an external_data entry");
                    while let Some((field, w)) = e.next_field()? {
                        match (field, &w) {
                            (1, Wire::Bytes(b)) => key = string(b, "external_data key")?,
                            (2, Wire::Bytes(b)) => value = string(b, "external_data value")?,
                            _ => {}
                        }
                    }
                    t.external.push((key, value));
                }
                (14, _) => t.external_location = int(&w, "data_location")? == 1,
                _ => {}
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_garbage_input_are_errors() {
        // A key announcing 100 bytes of graph with only 3 present.
        let buf = [0x3a, 100, 1, 2, 3];
        assert!(Model::decode(&buf).unwrap_err().0.contains("runs past the end"));
        // An unterminated varint.
        assert!(Model::decode(&[0x08, 0xff, 0xff]).unwrap_err().0.contains("truncated varint"));
        // Wire type 3 (deprecated groups) is refused.
        assert!(Model::decode(&[0x0b]).unwrap_err().0.contains("wire type 3"));
    }
}
