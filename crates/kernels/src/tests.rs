//! The convolutions against a direct reference, value by value.

use candle_core::{Device, Tensor};

use crate::{Activation, Avx512, Conv2d, Padding};

/// A direct convolution, loop by loop: the reference.
fn naive(x: &[f32], (c, h, w): (usize, usize, usize), wt: &[f32], bias: &[f32], m: usize, k: usize, stride: usize, pad: usize) -> Vec<f32> {
    let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
    let mut out = vec![0f32; m * oh * ow];
    for o in 0..m {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = bias[o] as f64;
                for ci in 0..c {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (iy, ix) = ((oy * stride + ky) as isize - pad as isize, (ox * stride + kx) as isize - pad as isize);
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                acc += (x[(ci * h + iy as usize) * w + ix as usize] * wt[((o * c + ci) * k + ky) * k + kx]) as f64;
                            }
                        }
                    }
                }
                out[(o * oh + oy) * ow + ox] = acc as f32;
            }
        }
    }
    out
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0).collect()
}

/// Every output value of every kernel path (on this CPU: the packed AVX-512 kernels where it
/// has them, which write into uninitialised memory, else the portable ones) against the
/// direct reference: 1x1 wide (column panels), 3x3 and 7x7 (pixel-major), strided 1x1,
/// narrow 1x1, Winograd's 512-channel 3x3, odd sizes with partial tiles, and the residual.
#[test]
fn every_output_value_is_written_and_right() {
    let cases: [(usize, usize, usize, usize, usize, usize); 7] = [
        // (c, hw, m, k, stride, pad)
        (24, 40, 40, 1, 1, 0),
        (5, 23, 37, 3, 1, 1),
        (3, 29, 20, 7, 2, 3),
        (16, 14, 33, 1, 2, 0),
        (40, 7, 50, 1, 1, 0),
        (512, 28, 34, 3, 1, 1),
        (9, 17, 70, 3, 2, 1),
    ];
    for (i, &(c, hw, m, k, stride, pad)) in cases.iter().enumerate() {
        let x = values(c * hw * hw, i as u32);
        let wt: Vec<f32> = values(m * c * k * k, 7 + i as u32).iter().map(|v| v / (c * k * k) as f32).collect();
        let bias = values(m, 99);
        let xt = Tensor::from_vec(x.clone(), (1, c, hw, hw), &Device::Cpu).unwrap();
        let wtt = Tensor::from_vec(wt.clone(), (m, c, k, k), &Device::Cpu).unwrap();
        let bt = Tensor::from_vec(bias.clone(), m, &Device::Cpu).unwrap();
        let conv = Conv2d::new(&wtt, Some(&bt), 1, stride, Padding::Symmetric(pad), Activation::Identity).unwrap();
        let expected = naive(&x, (c, hw, hw), &wt, &bias, m, k, stride, pad);
        let got = conv.forward(&xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), expected.len(), "case {i}");
        let worst = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "case {i} {:?}: worst difference {worst} (packed kernels: {})", cases[i], Avx512::detect().is_some());
        // The residual in the epilogue: relu(conv(x) + r).
        let r = values(expected.len(), 3);
        let rt = Tensor::from_vec(r.clone(), conv.forward(&xt).unwrap().shape(), &Device::Cpu).unwrap();
        let got = conv.forward_residual(&xt, &rt, Activation::Relu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(expected.iter().zip(&r)).map(|(a, (e, q))| (a - (e + q).max(0.0)).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "case {i} with a residual: worst difference {worst}");
    }
}

#[test]
fn a_convolution_without_output_channels_gives_an_empty_output() {
    let w = Tensor::zeros((0, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let conv = Conv2d::new(&w, None, 1, 1, Padding::Same, Activation::Relu).unwrap();
    let y = conv.forward(&Tensor::ones((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(y.dims(), [1, 0, 8, 8]);
}

/// A batch's depthwise convolution with the images in the vector lanes (8 images or more; here
/// 19: a full group and a partial one) gives each image exactly what it gets alone, strided and
/// padded, with ReLU6 and with a smooth activation, and with a residual.
#[test]
fn a_batch_in_the_vector_lanes_is_each_image_alone() {
    use crate::Pointwise;
    let (b, c) = (19, 6);
    for (k, stride, hw, padding) in [(5, 2, 15, Padding::Same), (3, 1, 7, Padding::Symmetric(1)), (5, 1, 14, Padding::Same)] {
        let x = Tensor::from_vec(values(b * c * hw * hw, k as u32), (b, c, hw, hw), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(values(c * k * k, 5), (c, 1, k, k), &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(values(c, 8), c, &Device::Cpu).unwrap();
        let relu6 = Conv2d::new(&w, Some(&bias), c, stride, padding, Activation::Relu6).unwrap();
        let silu = Conv2d::new(&w, Some(&bias), c, stride, padding, Activation::Identity).unwrap().with_pointwise(Pointwise::Silu).unwrap();
        for conv in [relu6, silu] {
            let all = conv.forward(&x).unwrap();
            let r = (all.ones_like().unwrap() * 0.25).unwrap();
            let plain = Conv2d::new(&w, Some(&bias), c, stride, padding, Activation::Identity).unwrap();
            let res = plain.forward_residual(&x, &r, Activation::Relu).unwrap();
            for i in 0..b {
                let one = x.narrow(0, i, 1).unwrap();
                let alone = conv.forward(&one).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(all.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), alone, "k {k} stride {stride} image {i}");
                let alone = plain.forward_residual(&one, &r.narrow(0, i, 1).unwrap(), Activation::Relu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(res.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), alone, "residual, k {k} image {i}");
            }
        }
    }
}
