//! The `gradcam` crate's API: any two closures explained with every method, Grad-CAM equal to a
//! hand computation from candle's backward; the guided rule through the VQA model's head; the
//! method names; the GEMM kernel's bounds.

use candle_core::{Device, Module, Tensor, Var};
use gradcam::ops::Activation;
use gradcam::{Cam, Error, Method, Split, Target};

use crate::repo;

/// Deterministic values in [-scale, scale].
pub(crate) fn values(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<f32> = (0..shape.iter().product())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

#[test]
fn any_two_closures_are_explained_by_every_method_and_grad_cam_equals_the_hand_computation() {
    let conv = candle_nn::Conv2d::new(values(&[6, 3, 3, 3], 1, 0.5), Some(values(&[6], 2, 0.1)), Default::default());
    let fc = candle_nn::Linear::new(values(&[4, 6], 3, 0.5), Some(values(&[4], 4, 0.1)));
    let features = |x: &Tensor| Activation::Relu.forward(&conv.forward(x)?); // [n, 6, 10, 10]
    let head = |a: &Tensor| fc.forward(&a.mean((2, 3))?); // [n, 4]
    // The whole model with guided ReLUs, for the guided methods.
    let guided = |x: &Tensor| head(&Activation::Relu.forward_with(&conv.forward(x)?, gradcam::Rule::Guided)?);
    let model = Split::new(features, head).guided(guided);
    let input = values(&[1, 3, 12, 12], 5, 1.0);

    // By hand: alpha_k = mean of dy/dA^k, map = ReLU(sum_k alpha_k A^k), from candle's backward.
    let a = Var::from_tensor(&features(&input).unwrap()).unwrap();
    let grads = head(a.as_tensor()).unwrap().get(0).unwrap().get(2).unwrap().backward().unwrap();
    let alpha = grads.get(a.as_tensor()).unwrap().mean((2, 3)).unwrap(); // [1, 6]
    let map = a.as_tensor().broadcast_mul(&alpha.unsqueeze(2).unwrap().unsqueeze(3).unwrap()).unwrap().sum(1).unwrap().relu().unwrap();
    let by_hand = map.flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let e = Cam::new(&model).explain(&input, &[Target::class(2), Target::class(2).counterfactual()]).unwrap();
    assert_eq!(e[0].map_size, (10, 10));
    let worst = e[0].map.iter().zip(&by_hand).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-5, "Grad-CAM differs from the hand computation by {worst}");
    assert_eq!(e[0].weights.as_ref().unwrap(), &alpha.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    // The counterfactual's weights are the negated ones; its score is the class's own.
    let cf: Vec<f32> = e[1].weights.as_ref().unwrap().iter().map(|w| -w).collect();
    assert_eq!(&cf, e[0].weights.as_ref().unwrap());
    assert!(e[1].is_counterfactual() && e[1].score == e[0].score);

    for method in Method::ALL {
        for (eigen, aug) in [(false, false), (true, false), (false, true)] {
            let cam = Cam::new(&model).method(method).eigen_smooth(eigen).aug_smooth(aug);
            let r = cam.explain(&input, &[Target::class(1)]);
            if method.is_perturbation() && (eigen || aug) {
                assert!(matches!(r, Err(Error::Unsupported(_))), "{method} with smoothing");
                continue;
            }
            let r = r.unwrap_or_else(|e| panic!("{method}: {e}"));
            assert!(r[0].map.iter().all(|v| v.is_finite() && *v >= 0.0), "{method}");
            assert_eq!(r[0].map_size, if aug { (12, 12) } else { (10, 10) }, "{method}");
            assert_eq!(r[0].guided.is_some(), method.is_guided(), "{method}");
            if method.is_guided() {
                assert_eq!(r[0].guided_size, (12, 12));
            }
        }
    }
    // Without a guided forward the guided methods are refused, not run with the plain gradient.
    let plain = Split::new(features, head);
    for method in [Method::GuidedBackprop, Method::GuidedGradCam] {
        let err = Cam::new(&plain).method(method).explain(&input, &[Target::class(1)]).unwrap_err();
        assert!(matches!(err, Error::CannotGuide { .. }), "{method}: {err}");
    }
    // Bad requests are errors that name the problem.
    let err = Cam::new(&model).explain(&input, &[Target::class(4)]).unwrap_err();
    assert!(err.to_string().contains("class 4 is out of range"), "{err}");
    let flat = Split::new(|x: &Tensor| x.flatten_from(1), |a: &Tensor| Ok(a.clone()));
    assert!(matches!(Cam::new(&flat).explain(&input, &[Target::class(0)]), Err(Error::Shape(_))));
    let unknown = "gradcam+".parse::<Method>().unwrap_err().to_string();
    assert!(unknown.contains("gradcam++") && unknown.contains("guided-gradcam"), "{unknown}");
}

/// A batch explained at once equals its images explained one at a time, for every method and
/// smoothing; `explain` refuses a batch and names `explain_batch`.
#[test]
fn a_batch_is_explained_as_its_images_are_one_at_a_time() {
    let conv = candle_nn::Conv2d::new(values(&[6, 3, 3, 3], 11, 0.5), Some(values(&[6], 12, 0.1)), Default::default());
    let fc = candle_nn::Linear::new(values(&[4, 6], 13, 0.5), Some(values(&[4], 14, 0.1)));
    let features = |x: &Tensor| Activation::Relu.forward(&conv.forward(x)?);
    let head = |a: &Tensor| fc.forward(&a.mean((2, 3))?);
    let guided = |x: &Tensor| head(&Activation::Relu.forward_with(&conv.forward(x)?, gradcam::Rule::Guided)?);
    let model = Split::new(features, head).guided(guided);
    let batch = values(&[3, 3, 12, 12], 15, 1.0);
    let targets = vec![vec![Target::class(1), Target::class(2).counterfactual()], vec![], vec![Target::class(0)]];
    for method in Method::ALL {
        for (eigen, aug) in [(false, false), (true, false), (false, true)] {
            if method.is_perturbation() && (eigen || aug) {
                continue;
            }
            let cam = Cam::new(&model).method(method).eigen_smooth(eigen).aug_smooth(aug);
            let together = cam.explain_batch(&batch, &targets).unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(together.iter().map(Vec::len).collect::<Vec<_>>(), [2, 0, 1]);
            for (i, ts) in targets.iter().enumerate() {
                let alone = cam.explain(&batch.narrow(0, i, 1).unwrap(), ts).unwrap();
                for (a, b) in together[i].iter().zip(&alone) {
                    let worst = a.map.iter().zip(&b.map).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                    assert!(worst <= 1e-5 && (a.score - b.score).abs() <= 1e-5 && a.is_counterfactual() == b.is_counterfactual(), "{method} eigen={eigen} aug={aug} image {i}: {worst}");
                }
            }
        }
    }
    let err = Cam::new(&model).explain(&batch, &[Target::class(0)]).unwrap_err().to_string();
    assert!(err.contains("explain_batch"), "{err}");
    assert!(Cam::new(&model).explain_batch(&batch, &targets[..2]).is_err(), "one list of targets per image");
}

/// Guided Backpropagation through the shipped VQA model's head, against the guided rule written
/// out by hand at each of its ReLUs (`image_proj`'s and the classifier's): the gradient into a
/// ReLU's input is the upstream gradient where both it and the ReLU's input are positive, zero
/// elsewhere. candle's own `relu` (which `image_proj` used) lets negative gradients through.
#[test]
fn guided_backprop_through_the_vqa_head_follows_the_guided_rule_at_every_relu() {
    let model = gradcam::models::Vqa::load(&repo("models/vqa")).unwrap();
    let w = candle_core::safetensors::load(repo("models/vqa/model.safetensors"), &Device::Cpu).unwrap();
    let img = gradcam::models::load_image(&repo("data/shapescenes/test/images/000018.png")).unwrap();
    let a = model.features(&model.preprocess(&img).unwrap().unsqueeze(0).unwrap()).unwrap();
    let split = gradcam::models::VqaSplit { model: &model, question: model.encode(&model.question("what color is the circle?").unwrap()).unwrap() };
    let answer = 0;

    // Ours: the guided backward of the answer's score to the activations.
    let var = Var::from_tensor(&a).unwrap();
    let head = model.logits_with(var.as_tensor(), &split.question, gradcam::Rule::Guided).unwrap();
    let ours = head.get(0).unwrap().get(answer).unwrap().backward().unwrap();
    let ours = ours.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();

    // By hand, from the weights: p = pool(A); u = W_p p + b_p; v = ReLU(u); h = W_1 (v * q) + b_1;
    // y = W_2 ReLU(h) + b_2.
    let t = |name: &str| w[name].to_dtype(candle_core::DType::F32).unwrap();
    let pool = model.cfg.scene.pooling();
    let p = pool.forward(&a).unwrap();
    let u = p.matmul(&t("image_proj.weight").t().unwrap()).unwrap().broadcast_add(&t("image_proj.bias")).unwrap();
    let v = u.relu().unwrap();
    let h = v.broadcast_mul(&split.question).unwrap().matmul(&t("classifier.0.weight").t().unwrap()).unwrap().broadcast_add(&t("classifier.0.bias")).unwrap();
    let guided = |upstream: &Tensor, input: &Tensor| -> Tensor {
        let up = upstream.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let x = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g: Vec<f32> = up.iter().zip(&x).map(|(&g, &x)| if g > 0.0 && x > 0.0 { g } else { 0.0 }).collect();
        Tensor::from_vec(g, input.shape(), &Device::Cpu).unwrap()
    };
    let g_relu_h = t("classifier.2.weight").get(answer).unwrap().unsqueeze(0).unwrap(); // dy/dReLU(h)
    let g_h = guided(&g_relu_h, &h);
    let g_v = g_h.matmul(&t("classifier.0.weight")).unwrap().broadcast_mul(&split.question).unwrap();
    let g_u = guided(&g_v, &u);
    let g_p = g_u.matmul(&t("image_proj.weight")).unwrap(); // [1, width]
    // Through the pooling (no ReLU in it): candle's backward of <pool(A), g_p>.
    let var2 = Var::from_tensor(&a).unwrap();
    let grads = (pool.forward(var2.as_tensor()).unwrap() * g_p).unwrap().sum_all().unwrap().backward().unwrap();
    let by_hand = grads.get(var2.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let max = by_hand.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = ours.iter().zip(&by_hand).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max > 0.0, "the hand computation is all zero");
    assert!(worst <= 1e-5 * max.max(1.0), "guided gradient differs from the hand computation by {worst} (max {max})");
    // The rule matters here: some of image_proj's upstream gradients are negative where u > 0.
    let (gv, uv) = (g_v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), u.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert!(gv.iter().zip(&uv).any(|(&g, &x)| g < 0.0 && x > 0.0), "no negative gradient reaches image_proj's ReLU; the test shows nothing");
}

#[test]
fn the_gemm_kernel_refuses_slices_too_small_for_its_strides() {
    let (mut dst, lhs, rhs) = (vec![0f32; 4], vec![1f32; 4], vec![1f32; 4]);
    gradcam::ops::matmul(&mut dst, &lhs, (2, 1), &rhs, (2, 1), 2, 2, 2);
    assert_eq!(dst, [2.0; 4]);
    for (lhs_strides, rhs_strides) in [((3, 1), (2, 1)), ((2, 1), (1, 3)), ((usize::MAX, 1), (2, 1))] {
        let r = std::panic::catch_unwind(|| {
            let mut dst = vec![0f32; 4];
            gradcam::ops::matmul(&mut dst, &lhs, lhs_strides, &rhs, rhs_strides, 2, 2, 2);
        });
        assert!(r.is_err(), "strides {lhs_strides:?} {rhs_strides:?} read past the slices");
    }
}
