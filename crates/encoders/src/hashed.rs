//! Deterministic pseudo-random weights from a tensor's name, identical bit for bit to
//! `hashed_tensor` in `tests/fixtures/make_goldens.py`, so that PyTorch goldens can be computed
//! for architectures whose real weights are too large to ship (VGG-16: 528 MB).

use candle_core::{Device, Tensor};

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// (scale, shift) by the tensor's role: He-uniform for weights, near-identity batch norms.
fn scale_shift(name: &str, shape: &[usize]) -> (f32, f32) {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    match leaf {
        "weight" if shape.len() >= 2 => {
            let fan_in: usize = shape[1..].iter().product();
            ((6.0f64 / fan_in as f64).sqrt() as f32, 0.0)
        }
        "running_var" => (0.25, 1.0),
        "weight" => (0.2, 1.0),
        _ => (0.1, 0.0),
    }
}

/// The tensor `name` of the given shape, with values `u * scale + shift`, `u` in [-1, 1).
pub fn hashed_tensor(name: &str, shape: &[usize]) -> Tensor {
    let (scale, shift) = scale_shift(name, shape);
    let seed = fnv1a64(name);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n as u64)
        .map(|i| {
            let k = (splitmix64(seed.wrapping_add(i)) >> 40) as f32;
            let u = k * (1.0 / (1u32 << 23) as f32) - 1.0;
            u * scale + shift
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches the data")
}
