#![no_main]
//! ONNX graph semantics (issue 34): small valid graphs (convolutions, pooling, concatenation,
//! reshapes, slices, broadcasts) whose attributes, shapes, initializer dimensions and values,
//! input dimensions, ops and wiring the fuzzer's bytes mutate; each is encoded as a real ONNX
//! file, loaded (checks, constant folding, the traced run on zeros), split at its default layer,
//! run forward and differentiated. Whatever the graph, the loader must answer with a value or an
//! error: no panic, no abort, no runaway memory or time.
#[path = "common.rs"]
mod common;
use gradcam_encoders::onnx::{OnnxModel, OnnxOptions, SUPPORTED};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

#[derive(Clone)]
enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
}

#[derive(Clone)]
struct Node {
    op: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<(String, Attr)>,
}

#[derive(Clone)]
enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Clone)]
struct Init {
    name: String,
    dims: Vec<i64>,
    data: Data,
}

struct Graph {
    input: Vec<i64>,
    nodes: Vec<Node>,
    inits: Vec<Init>,
    opset: i64,
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) -> Node {
    Node {
        op: op.into(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

fn weights(name: &str, dims: &[i64]) -> Init {
    let n: i64 = dims.iter().product();
    Init { name: name.into(), dims: dims.to_vec(), data: Data::F32((0..n).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 200.0).collect()) }
}

fn ints(name: &str, values: &[i64]) -> Init {
    Init { name: name.into(), dims: vec![values.len() as i64], data: Data::I64(values.to_vec()) }
}

use Attr::{Int, Ints};

/// The seed graphs, each valid on a [1, 3, 16, 16] input.
fn template(k: u8) -> Graph {
    let (nodes, inits) = match k % 4 {
        // Conv -> Relu -> MaxPool -> Conv -> GlobalAveragePool -> Flatten.
        0 => (
            vec![
                node("Conv", &["input", "W1", "B1"], &["c1"], vec![("kernel_shape", Ints(vec![3, 3])), ("pads", Ints(vec![1, 1, 1, 1])), ("strides", Ints(vec![1, 1]))]),
                node("Relu", &["c1"], &["r1"], vec![]),
                node("MaxPool", &["r1"], &["m1"], vec![("kernel_shape", Ints(vec![2, 2])), ("strides", Ints(vec![2, 2]))]),
                node("Conv", &["m1", "W2"], &["c2"], vec![("kernel_shape", Ints(vec![1, 1])), ("group", Int(1))]),
                node("GlobalAveragePool", &["c2"], &["p"], vec![]),
                node("Flatten", &["p"], &["scores"], vec![("axis", Int(1))]),
            ],
            vec![weights("W1", &[8, 3, 3, 3]), weights("B1", &[8]), weights("W2", &[4, 8, 1, 1])],
        ),
        // Pad -> AveragePool -> Concat with itself -> Reshape -> ReduceMean -> Gemm.
        1 => (
            vec![
                node("Pad", &["input", "pads"], &["pd"], vec![("mode", Attr::Str("constant".into()))]),
                node("AveragePool", &["pd"], &["a"], vec![("kernel_shape", Ints(vec![3, 3])), ("strides", Ints(vec![2, 2])), ("count_include_pad", Int(0))]),
                node("Concat", &["a", "a"], &["cat"], vec![("axis", Int(1))]),
                node("Reshape", &["cat", "shape"], &["rs"], vec![]),
                node("ReduceMean", &["rs"], &["mean"], vec![("axes", Ints(vec![2])), ("keepdims", Int(0))]),
                node("Gemm", &["mean", "G", "GB"], &["scores"], vec![("transB", Int(1)), ("alpha", Attr::Float(1.0))]),
            ],
            vec![ints("pads", &[0, 0, 1, 1, 0, 0, 1, 1]), ints("shape", &[1, 6, -1]), weights("G", &[4, 6]), weights("GB", &[4])],
        ),
        // Conv -> Transpose -> Slice -> Unsqueeze -> Squeeze -> Add (broadcast) -> Softmax -> pooling.
        2 => (
            vec![
                node("Conv", &["input", "W1"], &["c1"], vec![("kernel_shape", Ints(vec![3, 3])), ("dilations", Ints(vec![2, 2])), ("strides", Ints(vec![2, 2]))]),
                node("Transpose", &["c1"], &["t"], vec![("perm", Ints(vec![0, 1, 3, 2]))]),
                node("Slice", &["t", "starts", "ends", "axes", "steps"], &["sl"], vec![]),
                node("Unsqueeze", &["sl", "uaxes"], &["u"], vec![]),
                node("Squeeze", &["u", "uaxes"], &["s"], vec![]),
                node("Add", &["s", "bias"], &["ad"], vec![]),
                node("Softmax", &["ad"], &["sm"], vec![("axis", Int(1))]),
                node("GlobalMaxPool", &["sm"], &["p"], vec![]),
                node("Flatten", &["p"], &["scores"], vec![]),
            ],
            vec![
                weights("W1", &[4, 3, 3, 3]),
                ints("starts", &[0, 0]),
                ints("ends", &[i64::MAX, 5]),
                ints("axes", &[2, 3]),
                ints("steps", &[1, 2]),
                ints("uaxes", &[0]),
                weights("bias", &[1, 4, 1, 1]),
            ],
        ),
        // Shape arithmetic: Shape -> Gather -> Concat -> Expand / Tile, Split, Mul, MatMul.
        _ => (
            vec![
                node("Shape", &["input"], &["sh"], vec![]),
                node("Gather", &["sh", "idx"], &["hw"], vec![("axis", Int(0))]),
                node("Concat", &["one", "hw"], &["target"], vec![("axis", Int(0))]),
                node("ReduceMean", &["input"], &["m"], vec![("axes", Ints(vec![1])), ("keepdims", Int(1))]),
                node("Expand", &["m", "target"], &["e"], vec![]),
                node("Tile", &["e", "reps"], &["ti"], vec![]),
                node("Split", &["ti", "split"], &["s1", "s2"], vec![("axis", Int(1))]),
                node("Mul", &["s1", "s2"], &["mu"], vec![]),
                node("Reshape", &["mu", "flat"], &["f"], vec![]),
                node("MatMul", &["f", "M"], &["scores"], vec![]),
            ],
            vec![ints("idx", &[2, 3]), ints("one", &[1, 1]), ints("reps", &[1, 2, 1, 1]), ints("split", &[1, 1]), ints("flat", &[1, -1]), weights("M", &[256, 4])],
        ),
    };
    Graph { input: vec![1, 3, 16, 16], nodes, inits, opset: 17 }
}

/// An integer a shape or attribute might hold, the edge cases first.
fn interesting(u: &mut Unstructured) -> Result<i64> {
    const VALUES: [i64; 20] = [0, 1, -1, 2, 3, -2, 16, 17, 4096, 4097, 1 << 20, 1 << 31, 1 << 32, 1 << 62, i64::MAX, i64::MIN, -5, 65536, 1 << 28, 8];
    Ok(match u.int_in_range(0..=3)? {
        0 => u.arbitrary::<i64>()?,
        1 => u.int_in_range(-4..=20)?,
        _ => VALUES[u.choose_index(VALUES.len())?],
    })
}

const ATTRS: [&str; 16] = ["strides", "pads", "dilations", "kernel_shape", "group", "axis", "axes", "perm", "keepdims", "transA", "transB", "ceil_mode", "count_include_pad", "split", "to", "allowzero"];

fn mutate(g: &mut Graph, u: &mut Unstructured) -> Result<()> {
    for _ in 0..u.int_in_range(1..=8)? {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=9)? {
            0 | 1 => {
                let n = u.choose_index(g.nodes.len())?;
                let name = ATTRS[u.choose_index(ATTRS.len())?].to_string();
                let value = if u.arbitrary()? {
                    Ints((0..u.int_in_range(0..=6)?).map(|_| interesting(u)).collect::<Result<_>>()?)
                } else {
                    Int(interesting(u)?)
                };
                let attrs = &mut g.nodes[n].attrs;
                attrs.retain(|(k, _)| *k != name);
                attrs.push((name, value));
            }
            2 => {
                let i = u.choose_index(g.inits.len())?;
                let dims: Vec<i64> = (0..u.int_in_range(0..=5)?).map(|_| interesting(u)).collect::<Result<_>>()?;
                let init = &mut g.inits[i];
                let n = dims.iter().try_fold(1i64, |a, &d| if d >= 0 { a.checked_mul(d) } else { None });
                // Data for the new shape when it is small (else the old data: a mismatch).
                if let Some(n) = n.filter(|&n| n <= 1 << 12) {
                    init.data = match &init.data {
                        Data::F32(_) => Data::F32((0..n).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect()),
                        Data::I64(v) => Data::I64((0..n as usize).map(|i| v.get(i).copied().unwrap_or(1)).collect()),
                    };
                }
                init.dims = dims;
            }
            3 => {
                let i = u.choose_index(g.inits.len())?;
                let init = &mut g.inits[i];
                match &mut init.data {
                    Data::I64(v) if !v.is_empty() => {
                        let k = u.choose_index(v.len())?;
                        v[k] = interesting(u)?;
                    }
                    Data::F32(v) if !v.is_empty() => {
                        let k = u.choose_index(v.len())?;
                        v[k] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, 0.0, -1.0][u.choose_index(6)?];
                    }
                    _ => {}
                }
            }
            4 => {
                if g.input.is_empty() || u.arbitrary()? {
                    g.input = (0..u.int_in_range(0..=5)?).map(|_| interesting(u)).collect::<Result<_>>()?;
                } else {
                    let k = u.choose_index(g.input.len())?;
                    g.input[k] = if u.arbitrary()? { interesting(u)? } else { u.int_in_range(1..=64)? };
                }
            }
            5 => {
                let n = u.choose_index(g.nodes.len())?;
                g.nodes[n].op = SUPPORTED[u.choose_index(SUPPORTED.len())?].to_string();
            }
            6 => {
                // Rewire an input to another value (an earlier one, a later one, an initializer).
                let n = u.choose_index(g.nodes.len())?;
                let mut names: Vec<String> = vec!["input".into(), String::new()];
                names.extend(g.inits.iter().map(|i| i.name.clone()));
                names.extend(g.nodes.iter().flat_map(|n| n.outputs.clone()));
                let pick = names[u.choose_index(names.len())?].clone();
                let node = &mut g.nodes[n];
                if node.inputs.is_empty() || u.ratio(1, 4)? {
                    node.inputs.push(pick);
                } else {
                    let k = u.choose_index(node.inputs.len())?;
                    node.inputs[k] = pick;
                }
            }
            7 => {
                let n = u.choose_index(g.nodes.len())?;
                let node = &mut g.nodes[n];
                match u.int_in_range(0..=2)? {
                    0 if !node.inputs.is_empty() => {
                        let k = u.choose_index(node.inputs.len())?;
                        node.inputs.remove(k);
                    }
                    1 => {
                        let copies = u.int_in_range(1..=64)?;
                        if let Some(first) = node.inputs.first().cloned() {
                            node.inputs.extend(std::iter::repeat_n(first, copies));
                        }
                    }
                    _ => node.outputs.push(format!("extra{n}")),
                }
            }
            8 => {
                let n = u.choose_index(g.nodes.len())?;
                let name = ["alpha", "beta", "epsilon", "value", "min", "max"][u.choose_index(6)?].to_string();
                let v = [f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30][u.choose_index(5)?];
                g.nodes[n].attrs.push((name, Attr::Float(v)));
            }
            _ => g.opset = [7, 10, 11, 12, 13, 17, 18, 22, 23][u.choose_index(9)?],
        }
    }
    Ok(())
}

// Protobuf wire format.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn int(out: &mut Vec<u8>, field: u32, v: i64) {
    key(out, field, 0);
    varint(out, v as u64);
}

fn packed(out: &mut Vec<u8>, field: u32, values: &[i64]) {
    let mut p = Vec::new();
    for &v in values {
        varint(&mut p, v as u64);
    }
    bytes(out, field, &p);
}

fn encode(g: &Graph) -> Vec<u8> {
    let mut graph = Vec::new();
    for n in &g.nodes {
        let mut b = Vec::new();
        for i in &n.inputs {
            bytes(&mut b, 1, i.as_bytes());
        }
        for o in &n.outputs {
            bytes(&mut b, 2, o.as_bytes());
        }
        bytes(&mut b, 3, format!("{}_{}", n.op, n.outputs.first().map_or("", |s| s.as_str())).as_bytes());
        bytes(&mut b, 4, n.op.as_bytes());
        for (name, a) in &n.attrs {
            let mut ab = Vec::new();
            bytes(&mut ab, 1, name.as_bytes());
            match a {
                Attr::Float(f) => {
                    key(&mut ab, 2, 5);
                    ab.extend_from_slice(&f.to_le_bytes());
                    int(&mut ab, 20, 1);
                }
                Attr::Int(v) => {
                    int(&mut ab, 3, *v);
                    int(&mut ab, 20, 2);
                }
                Attr::Str(s) => {
                    bytes(&mut ab, 4, s.as_bytes());
                    int(&mut ab, 20, 3);
                }
                Attr::Ints(v) => {
                    packed(&mut ab, 8, v);
                    int(&mut ab, 20, 7);
                }
            }
            bytes(&mut b, 5, &ab);
        }
        bytes(&mut graph, 1, &b);
    }
    bytes(&mut graph, 2, b"fuzz");
    for t in &g.inits {
        let mut b = Vec::new();
        packed(&mut b, 1, &t.dims);
        match &t.data {
            Data::F32(v) => {
                int(&mut b, 2, 1);
                bytes(&mut b, 9, &v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>());
            }
            Data::I64(v) => {
                int(&mut b, 2, 7);
                packed(&mut b, 7, v);
            }
        }
        bytes(&mut b, 8, t.name.as_bytes());
        bytes(&mut graph, 5, &b);
    }
    let value_info = |name: &str, dims: Option<&[i64]>| {
        let mut shape = Vec::new();
        for &d in dims.unwrap_or(&[]) {
            let mut dim = Vec::new();
            int(&mut dim, 1, d);
            bytes(&mut shape, 1, &dim);
        }
        let mut tensor = Vec::new();
        int(&mut tensor, 1, 1);
        if dims.is_some() {
            bytes(&mut tensor, 2, &shape);
        }
        let mut ty = Vec::new();
        bytes(&mut ty, 1, &tensor);
        let mut vi = Vec::new();
        bytes(&mut vi, 1, name.as_bytes());
        bytes(&mut vi, 2, &ty);
        vi
    };
    bytes(&mut graph, 11, &value_info("input", Some(&g.input)));
    bytes(&mut graph, 12, &value_info("scores", None));
    let mut model = Vec::new();
    int(&mut model, 1, 8);
    let mut opset = Vec::new();
    bytes(&mut opset, 1, b"");
    int(&mut opset, 2, g.opset);
    bytes(&mut model, 8, &opset);
    bytes(&mut model, 7, &graph);
    model
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(k) = u.arbitrary::<u8>() else { return };
    let mut g = template(k);
    let _ = mutate(&mut g, &mut u);
    let path = common::file_with(&encode(&g), "graph.onnx");
    let Ok(model) = OnnxModel::load(&path, &OnnxOptions::default()) else { return };
    let model = std::sync::Arc::new(model);
    let Ok(net) = model.network(None) else { return };
    let (h, w) = net.preprocess().size;
    let x = candle_core::Tensor::ones((1, 3, h, w), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let _ = net.forward(&x);
    // Grad-CAM's path: the features at the default layer, the head from them, its gradient.
    if let Ok(a) = net.features_at(&x, 0) {
        if let Ok(var) = candle_core::Var::from_tensor(&a) {
            if let Ok(y) = net.head_from(var.as_tensor(), 0) {
                let _ = y.sum_all().and_then(|s| s.backward());
            }
        }
    }
});
