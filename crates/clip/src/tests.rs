//! The model's gradients against finite differences, and the split against the whole forward.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gradcam_core::{Explainable, Score};

use crate::model::{init_parameters, normalize, Clip, Config};
use crate::trained::VisionSplit;
use crate::{Matching, Probability};

fn tiny() -> Clip {
    let cfg = Config { image_size: 16, patch: 4, width: 8, layers: 2, heads: 2, text_width: 8, text_layers: 1, text_heads: 2, context_length: 6, vocab_size: 9, embed: 6, ..Config::new(9) };
    let map = VarMap::new();
    let clip = Clip::new(&cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu)).unwrap();
    init_parameters(&map, 3).unwrap();
    // Larger weights than training starts from, so that every path carries gradient.
    for v in map.all_vars() {
        let t = v.as_tensor();
        if t.rank() == 2 && t.dim(0).unwrap() > 1 {
            v.set(&(t * 8.0).unwrap()).unwrap();
        }
    }
    clip
}

/// Seeded values in [-1, 1).
fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = gradcam_scenes::scene::Rng::new(seed);
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.range(-1.0, 1.0)).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
}

fn input() -> Tensor {
    seeded(&[1, 3, 16, 16], 11)
}

#[test]
fn the_split_gives_the_whole_forward_and_its_grid() {
    let clip = tiny();
    let x = input();
    for block in 0..2 {
        let split = VisionSplit::new(&clip.vision, block, 4, 8);
        let a = split.features(&x).unwrap();
        let ours = split.head(&a).unwrap();
        let whole = clip.vision.forward(&x, None).unwrap();
        let d = (ours - whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "block {block}: {d}");
        assert_eq!(split.layout().dims(&a).unwrap(), (1, 8, 4, 4));
    }
}

#[test]
fn gradients_of_similarity_and_probability_match_finite_differences() {
    let clip = tiny();
    let x = input();
    let texts = normalize(&seeded(&[3, 6], 12)).unwrap();
    let split = VisionSplit::new(&clip.vision, 1, 4, 8);
    let a = split.features(&x).unwrap();
    let (n, len) = a.dims2().unwrap();
    assert_eq!(n, 1);
    // A logit scale small enough that the probability is not saturated (its gradient would vanish).
    for (scale, score) in [(1.0, None), (2.0, Some(Probability(2)))] {
        let m = Matching { image: &split, texts: texts.clone(), scale };
        let f = |a: &Tensor| -> Tensor {
            let row = m.head(a).unwrap();
            match score {
                Some(p) => p.score(&row).unwrap(),
                None => row.flatten_all().unwrap().get(0).unwrap(),
            }
        };
        let v = Var::from_tensor(&a).unwrap();
        let grads = f(v.as_tensor()).backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = a.to_dtype(DType::F64).unwrap();
        let at = |t: &Tensor| f(&t.to_dtype(DType::F32).unwrap()).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        // Coordinates of the grid (the class token's, a patch's) and of the residual stream.
        for i in [0, 3, 8 + 5, 8 * 9 + 2, len / 2 + 1, len - 1] {
            let eps = 1e-3;
            let mut e = vec![0f64; len];
            e[i] = eps;
            let e = Tensor::from_vec(e, (1, len), &Device::Cpu).unwrap();
            let fd = (at(&(&base + &e).unwrap()) - at(&(&base - &e).unwrap())) / (2.0 * eps);
            assert!((fd - g[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()), "scale {scale} coordinate {i}: backward {} finite difference {fd}", g[i]);
        }
        assert!(g.iter().any(|v| v.abs() > 1e-4), "some gradient");
    }
}

#[test]
fn embeddings_of_different_sizes_are_refused_by_name() {
    let clip = tiny();
    let split = VisionSplit::new(&clip.vision, 1, 4, 8);
    let m = Matching { image: &split, texts: normalize(&seeded(&[2, 5], 13)).unwrap(), scale: 1.0 };
    let err = m.head(&split.features(&input()).unwrap()).unwrap_err().to_string();
    assert!(err.contains("the image embedding has 6 values and the text embeddings 5"), "{err}");
}
