//! Finite-difference checks of every backward of the ops, and their forwards against candle's.

use candle_core::{Device, Tensor, Var};
use gradcam_kernels::{Activation, AdaptiveAvgPool2d, Conv2d, Linear, MaxPool2d, Padding, Pointwise};

/// Deterministic values in [-1, 1) with no ties (so max-pool has a unique maximum).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + i as f32 * 1e-6
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap()
}

/// Checks d(sum(w * f(x)))/dx from backward against central differences in f64 over f32 ops.
fn check_gradient(name: &str, x: &Tensor, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor()).unwrap();
    let w = tensor(y.dims(), 99);
    let loss = (&y * &w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let analytic = grads.get(var.as_tensor()).expect("gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eval = |v: &[f32]| -> f64 {
        let t = Tensor::from_vec(v.to_vec(), x.dims(), &Device::Cpu).unwrap();
        let y = f(&t).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        y.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    // Central differences at eps and eps/2: where they disagree, a step crosses a kink (ReLU at
    // 0, a change of max-pool winner) and the element is skipped (few may be). Elsewhere the
    // Richardson extrapolation of the two cancels the O(eps^2) curvature error.
    let eps = 1e-2f32;
    let (mut worst, mut skipped) = (0f64, 0);
    let scale = analytic.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let central = |i: usize, e: f32| -> f64 {
        let mut p = base.clone();
        p[i] += e;
        let mut m = base.clone();
        m[i] -= e;
        (eval(&p) - eval(&m)) / (2.0 * e as f64)
    };
    for i in 0..base.len() {
        let (wide, narrow) = (central(i, eps), central(i, eps / 2.0));
        if (wide - narrow).abs() > 2e-3 * scale.max(1.0) {
            skipped += 1;
            continue;
        }
        let numeric = (4.0 * narrow - wide) / 3.0;
        worst = worst.max((numeric - analytic[i] as f64).abs());
    }
    assert!(scale > 0.0, "{name}: gradient is all zero");
    assert!(skipped * 10 <= base.len(), "{name}: {skipped} of {} elements sit at kinks", base.len());
    assert!(worst <= 2e-3 * scale.max(1.0), "{name}: finite differences differ by {worst} (gradient scale {scale})");
}

#[test]
fn conv2d_input_gradient_matches_finite_differences() {
    let x = tensor(&[2, 4, 7, 6], 1);
    let cases = [
        ("dense 3x3 stride 1 pad 1", [5, 4, 3, 3], 1, 1, Padding::Symmetric(1), Activation::Identity),
        ("dense 3x3 stride 2 SAME", [5, 4, 3, 3], 1, 2, Padding::Same, Activation::Identity),
        ("pointwise", [3, 4, 1, 1], 1, 1, Padding::Same, Activation::Identity),
        ("strided 1x1", [3, 4, 1, 1], 1, 2, Padding::Symmetric(0), Activation::Identity),
        ("depthwise 5x5 stride 2 SAME", [4, 1, 5, 5], 4, 2, Padding::Same, Activation::Identity),
        ("depthwise 3x3 stride 1 SAME", [4, 1, 3, 3], 4, 1, Padding::Same, Activation::Identity),
        ("grouped", [6, 2, 3, 3], 2, 1, Padding::Symmetric(1), Activation::Identity),
        ("7x7 stride 2 pad 3", [2, 4, 7, 7], 1, 2, Padding::Symmetric(3), Activation::Identity),
        ("explicit pads (ONNX)", [5, 4, 3, 3], 1, 2, Padding::Explicit { top: 0, left: 1, bottom: 2, right: 1 }, Activation::Identity),
        ("depthwise explicit pads", [4, 1, 5, 5], 4, 2, Padding::Explicit { top: 1, left: 2, bottom: 2, right: 1 }, Activation::Identity),
    ];
    for (name, shape, groups, stride, padding, act) in cases {
        let w = tensor(&shape, 7);
        let b = tensor(&[shape[0]], 8);
        let conv = Conv2d::new(&w, Some(&b), groups, stride, padding, act).unwrap();
        check_gradient(name, &x, |x| conv.forward(x));
    }
}

#[test]
fn conv2d_forward_matches_candle() {
    // Where candle supports the case (symmetric padding), the two convolutions agree.
    let x = tensor(&[2, 4, 9, 8], 3);
    for (groups, stride, pad, k) in [(1, 1, 1, 3), (1, 2, 0, 3), (4, 1, 1, 3), (2, 2, 2, 5), (1, 1, 0, 1)] {
        let w = tensor(&[4, 4 / groups, k, k], 4);
        let ours = Conv2d::new(&w, None, groups, stride, Padding::Symmetric(pad), Activation::Identity).unwrap().forward(&x).unwrap();
        let theirs = x.conv2d(&w, pad, stride, 1, groups).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "groups {groups} stride {stride} pad {pad} k {k}: {diff}");
    }
    // Sizes that leave partial tiles in both directions of the packed kernels (19 output
    // channels; rows of 11 and 6 outputs for the pixel-major kernel, of 37 and 19 for the
    // column panels), with a fused activation.
    for (x, stride, pad, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 1)].into_iter().flat_map(|c| [(tensor(&[2, 5, 13, 11], 5), c), (tensor(&[1, 5, 6, 37], 8), c)]).map(|(x, (s, p, k))| (x, s, p, k)) {
        let (w, b) = (tensor(&[19, 5, k, k], 6), tensor(&[19], 7));
        let ours = Conv2d::new(&w, Some(&b), 1, stride, Padding::Symmetric(pad), Activation::Relu6).unwrap().forward(&x).unwrap();
        let theirs = x.conv2d(&w, pad, stride, 1, 1).unwrap().broadcast_add(&b.reshape((1, 19, 1, 1)).unwrap()).unwrap().clamp(0f32, 6f32).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "19 channels, stride {stride} pad {pad} k {k}: {diff}");
    }
    // More than 256 steps of k (the pixel-major kernel's passes, with partial sums kept between
    // them): 3x3 over 60 channels (k = 540: three passes) and 1x1 over 300 (two), on a 7x7 plane
    // (1x1 stride 1 read as one 49-pixel row, tiles crossing rows) and a 9x5 one, with a residual.
    for (c, k, stride, pad, (h, w)) in [(60, 3, 1, 1, (7, 7)), (60, 3, 2, 1, (9, 5)), (300, 1, 1, 0, (7, 7)), (300, 1, 1, 0, (9, 5)), (300, 1, 2, 0, (9, 5))] {
        let x = tensor(&[1, c, h, w], 9);
        let (wt, b) = (tensor(&[40, c, k, k], 10), tensor(&[40], 11));
        let conv = Conv2d::new(&wt, Some(&b), 1, stride, Padding::Symmetric(pad), Activation::Identity).unwrap();
        let theirs = x.conv2d(&wt, pad, stride, 1, 1).unwrap().broadcast_add(&b.reshape((1, 40, 1, 1)).unwrap()).unwrap();
        let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let r = tensor(theirs.dims(), 12);
        let ours = conv.forward_residual(&x, &r, Activation::Relu).unwrap();
        let diff = (ours - (theirs + r).unwrap().relu().unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5 * scale, "{c} channels {k}x{k} stride {stride} on {h}x{w}: {diff} of {scale}");
    }
}

#[test]
fn pointwise_activations_match_finite_differences_and_their_definitions() {
    // Spread over [-6, 6]: both sides of hard swish's and hard sigmoid's kinks.
    let x = (tensor(&[2, 3, 5, 5], 11) * 6.0).unwrap();
    let ops = [Pointwise::Sigmoid, Pointwise::Silu, Pointwise::HardSwish, Pointwise::HardSigmoid { alpha: 1.0 / 6.0, beta: 0.5 }, Pointwise::Erf, Pointwise::Gelu];
    // candle's erf and erf-GELU, for the reference values of ours.
    let erf = x.erf().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gelu = x.gelu_erf().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for op in ops {
        check_gradient(&format!("{op:?}"), &x, |x| op.forward(x));
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = op.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in v.iter().zip(&y).enumerate() {
            let s = 1.0 / (1.0 + (-a).exp());
            let expected = match op {
                Pointwise::Sigmoid => s,
                Pointwise::Silu => a * s,
                Pointwise::HardSwish => a * (a + 3.0).clamp(0.0, 6.0) / 6.0,
                Pointwise::HardSigmoid { alpha, beta } => (alpha * a + beta).clamp(0.0, 1.0),
                Pointwise::Erf => erf[i],
                Pointwise::Gelu => gelu[i],
            };
            assert!((expected - b).abs() < 1e-6, "{op:?}({a}) = {b}, expected {expected}");
        }
    }
}

#[test]
fn convolutions_with_a_fused_smooth_activation_match_finite_differences_and_the_unfused_ops() {
    // Small inputs keep the pre-activations off hard swish's kinks at +-3 (the pointwise test covers them).
    let x = (tensor(&[2, 4, 6, 5], 12) * 0.3).unwrap();
    let ops = [Pointwise::Silu, Pointwise::HardSwish, Pointwise::Sigmoid, Pointwise::HardSigmoid { alpha: 1.0 / 6.0, beta: 0.5 }];
    for (shape, groups, stride) in [([5, 4, 3, 3], 1, 1), ([4, 1, 3, 3], 4, 2), ([3, 4, 1, 1], 1, 1)] {
        let (w, b) = (tensor(&shape, 13), tensor(&[shape[0]], 14));
        let plain = Conv2d::new(&w, Some(&b), groups, stride, Padding::Symmetric(shape[2] / 2), Activation::Identity).unwrap();
        for op in ops {
            let fused = plain.clone().with_pointwise(op).unwrap();
            let name = format!("{op:?} after conv {shape:?} groups {groups}");
            check_gradient(&name, &x, |x| fused.forward(x));
            let apart = op.forward(&plain.forward(&x).unwrap()).unwrap();
            let diff = (fused.forward(&x).unwrap() - apart).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{name}: fused and unfused differ by {diff}");
        }
    }
    let relu = Conv2d::new(&tensor(&[3, 4, 1, 1], 15), None, 1, 1, Padding::Same, Activation::Relu).unwrap();
    assert!(relu.with_pointwise(Pointwise::Silu).is_err(), "an activation and a pointwise epilogue at once");
}

#[test]
fn fused_activations_have_exact_gradients() {
    // Shifted so that no input sits at a kink within eps.
    let x = (tensor(&[1, 3, 5, 5], 5) * 4.0).unwrap();
    let w = tensor(&[3, 3, 3, 3], 6);
    for act in [Activation::Relu, Activation::Relu6] {
        let conv = Conv2d::new(&w, None, 1, 1, Padding::Symmetric(1), act).unwrap();
        check_gradient("conv + activation", &x, |x| conv.forward(x));
        check_gradient("activation", &x, |x| act.forward(&(x * 2.0)?));
    }
}

#[test]
fn winograd_convolutions_match_candle() {
    // 3x3 stride-1 convolutions with 512+ input channels on 28- to 32-wide planes take Winograd
    // F(2x2, 3x3): odd output sizes (the last 2x2 tiles cut), 40 output channels (a partial
    // block), padding 1 and 0, a residual.
    let x = tensor(&[1, 512, 29, 31], 41);
    let (w, b) = (tensor(&[40, 512, 3, 3], 42), tensor(&[40], 43));
    for pad in [1, 0] {
        let conv = Conv2d::new(&w, Some(&b), 1, 1, Padding::Symmetric(pad), Activation::Identity).unwrap();
        let theirs = x.conv2d(&w, pad, 1, 1, 1).unwrap().broadcast_add(&b.reshape((1, 40, 1, 1)).unwrap()).unwrap();
        let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let r = tensor(theirs.dims(), 44);
        let diff = (conv.forward(&x).unwrap() - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5 * scale, "pad {pad}: {diff} of {scale}");
        let fused = conv.forward_residual(&x, &r, Activation::Relu).unwrap();
        let diff = (fused - (theirs + r).unwrap().relu().unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5 * scale, "pad {pad}, residual: {diff} of {scale}");
    }
}

#[test]
fn residual_convolutions_match_the_separate_ops_and_finite_differences() {
    // act(conv(x) + r) in one op, through every kernel: 3x3 and 1x1, narrow and wide outputs.
    for (shape, k, pad) in [([1, 5, 6, 37], 3, 1), ([2, 5, 7, 9], 3, 1), ([1, 6, 5, 40], 1, 0), ([1, 6, 7, 7], 1, 0)] {
        let x = tensor(&shape, 31);
        let (w, b) = (tensor(&[19, shape[1], k, k], 32), tensor(&[19], 33));
        let conv = Conv2d::new(&w, Some(&b), 1, 1, Padding::Symmetric(pad), Activation::Identity).unwrap();
        let r = tensor(&[shape[0], 19, shape[2], shape[3]], 34);
        for act in [Activation::Relu, Activation::Identity] {
            let fused = conv.forward_residual(&x, &r, act).unwrap();
            let separate = act.forward(&(conv.forward(&x).unwrap() + &r).unwrap()).unwrap();
            let diff = (fused - separate).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{shape:?} {k}x{k} {act:?}: {diff}");
        }
        // Each input value reaches up to 171 outputs, too many ReLU kinks for differences.
        check_gradient("conv + residual, input", &x, |x| conv.forward_residual(x, &r, Activation::Identity));
        // The residual moved off ReLU's kink: no pre-activation within 0.02 of 0.
        let z = (conv.forward(&x).unwrap() + &r).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let off: Vec<f32> = r.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(&z).map(|(&v, &z)| if z.abs() < 0.02 { v + 0.05 } else { v }).collect();
        let r = Tensor::from_vec(off, r.dims(), &Device::Cpu).unwrap();
        check_gradient("conv + residual, residual", &r, |r| conv.forward_residual(&x, r, Activation::Relu));
    }
    let relu = Conv2d::new(&tensor(&[4, 3, 1, 1], 35), None, 1, 1, Padding::Symmetric(0), Activation::Relu).unwrap();
    assert!(relu.forward_residual(&tensor(&[1, 3, 4, 4], 36), &tensor(&[1, 4, 4, 4], 37), Activation::Relu).is_err());
    let plain = Conv2d::new(&tensor(&[4, 3, 1, 1], 35), None, 1, 1, Padding::Symmetric(0), Activation::Identity).unwrap();
    assert!(plain.forward_residual(&tensor(&[1, 3, 4, 4], 36), &tensor(&[1, 4, 4, 5], 37), Activation::Relu).is_err());
}

#[test]
fn linear_input_gradient_matches_finite_differences() {
    let x = tensor(&[3, 10], 11);
    let l = Linear::new(&tensor(&[4, 10], 12), Some(&tensor(&[4], 13)), Activation::Identity).unwrap();
    check_gradient("linear", &x, |x| l.forward(x));
    // Few rows take the weight-streaming kernels, more rows a GEMM; odd sizes reach the kernels'
    // tails, and ReLU's silent units the rows the backward skips.
    let (w, b) = (tensor(&[11, 37], 14), tensor(&[11], 15));
    let relu = Linear::new(&w, Some(&b), Activation::Relu).unwrap();
    for rows in [1, 3, 6] {
        let x = tensor(&[rows, 37], 16 + rows as u64);
        check_gradient("linear + relu", &x, |x| relu.forward(x));
        let want = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap().relu().unwrap();
        let diff = (relu.forward(&x).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{rows} rows: forward differs from candle's by {diff}");
    }
}

#[test]
fn max_pool_gradient_matches_finite_differences_where_candle_fails() {
    let x = tensor(&[2, 3, 9, 8], 21);
    let overlapping = MaxPool2d { kernel: 3, stride: 2, padding: 1 };
    check_gradient("max-pool 3/2 pad 1", &x, |x| overlapping.forward(x));
    let tiled = MaxPool2d { kernel: 2, stride: 2, padding: 0 };
    check_gradient("max-pool 2/2", &x, |x| tiled.forward(x));
    // Forward values: candle's where it has them (no padding), and a NaN wins its windows.
    for (k, st) in [(2, 2), (3, 2), (3, 1)] {
        let ours = MaxPool2d { kernel: k, stride: st, padding: 0 }.forward(&x).unwrap();
        let diff = (ours - x.max_pool2d_with_stride(k, st).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "max-pool {k}/{st}");
    }
    // With padding: candle's on the input padded with a value below every input, windows cut on
    // every side (9 rows and 8 columns: the last windows hang over by one and by none).
    let padded = Tensor::full(-1e9f32, (2, 3, 11, 10), &Device::Cpu).unwrap().slice_assign(&[0..2, 0..3, 1..10, 1..9], &x).unwrap();
    for (k, st) in [(3, 2), (2, 2), (3, 1)] {
        let ours = MaxPool2d { kernel: k, stride: st, padding: 1 }.forward(&x).unwrap();
        let theirs = padded.max_pool2d_with_stride(k, st).unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "max-pool {k}/{st} pad 1");
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "max-pool {k}/{st} pad 1");
    }
    let mut v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[8 * 3 + 5] = f32::NAN; // row 3, column 5 of the first plane
    let nan = MaxPool2d { kernel: 3, stride: 2, padding: 1 }.forward(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap()).unwrap();
    let first = nan.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
    let nans: Vec<(usize, usize)> = (0..5).flat_map(|r| (0..4).map(move |c| (r, c))).filter(|&(r, c)| first[r][c].is_nan()).collect();
    assert_eq!(nans, vec![(1, 2), (1, 3), (2, 2), (2, 3)], "windows that hold the NaN");
    // candle's own backward: scaled by 1/k^2 for kernel == stride, an error otherwise.
    let var = Var::from_tensor(&x).unwrap();
    assert!(var.as_tensor().max_pool2d_with_stride(3, 2).unwrap().sum_all().unwrap().backward().is_err());
}

#[test]
fn adaptive_avg_pool_gradient_matches_finite_differences() {
    let x = tensor(&[1, 2, 9, 10], 31);
    let pool = AdaptiveAvgPool2d { out_h: 7, out_w: 7 };
    check_gradient("adaptive avg pool 9x10 -> 7x7", &x, |x| pool.forward(x));
}

#[test]
fn trainable_conv_gradients_match_finite_differences() {
    use gradcam_kernels::TrainableConv2d;
    let x = tensor(&[2, 3, 7, 6], 71);
    let w = tensor(&[4, 3, 3, 3], 72);
    let b = tensor(&[4], 73);
    for (stride, padding, activation) in [(1, Padding::Symmetric(1), Activation::Relu), (2, Padding::Same, Activation::Identity), (2, Padding::Symmetric(0), Activation::Relu)] {
        let conv = TrainableConv2d { stride, padding, activation, rule: gradcam_kernels::Rule::Exact };
        check_gradient("trainable conv: input", &x, |x| conv.forward(x, &w, &b));
        // A weight or bias step moves every output of its channel: with ReLU some always cross
        // zero, so those gradients are checked without it (the ReLU mask is the same code).
        let linear = TrainableConv2d { activation: Activation::Identity, ..conv };
        check_gradient("trainable conv: weight", &w, |w| linear.forward(&x, w, &b));
        check_gradient("trainable conv: bias", &b, |b| linear.forward(&x, &w, b));
        let frozen = Conv2d::new(&w, Some(&b), 1, stride, padding, activation).unwrap().forward(&x).unwrap();
        let diff = (conv.forward(&x, &w, &b).unwrap() - frozen).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5);
    }
}

#[test]
fn fused_lstm_cell_gradient_matches_finite_differences() {
    use gradcam_kernels::LstmCell;
    let (e, h) = (5, 4);
    let cell = LstmCell::new(&tensor(&[4 * h, e], 81), &tensor(&[4 * h, h], 82), &tensor(&[4 * h], 83), &tensor(&[4 * h], 84)).unwrap();
    let xhc = tensor(&[3, e + 2 * h], 85);
    check_gradient("lstm cell", &xhc, |xhc| {
        let (x, hh, c) = (xhc.narrow(1, 0, e)?, xhc.narrow(1, e, h)?, xhc.narrow(1, e + h, h)?);
        let (h2, c2) = cell.step(&x, &hh, &c).unwrap();
        Tensor::cat(&[h2, c2], 1)
    });
}

#[test]
fn global_avg_max_pool_gradient_matches_finite_differences() {
    let x = tensor(&[2, 3, 5, 4], 91);
    check_gradient("global avg + max pool", &x, |x| gradcam_kernels::GlobalAvgMaxPool.forward(x));
}
