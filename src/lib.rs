//! Grad-CAM visual explanations (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep
//! Networks via Gradient-based Localization") for any [candle](https://github.com/huggingface/candle)
//! CNN, for an LSTM image captioner word by word, and for the answers of a VQA model.
//!
//! Split your model at the layer you explain: `features` runs the input up to that layer's
//! activations A (`[n, K, h, w]`), `head` runs the rest from A to the scores. That is all: the
//! backward runs through the head only, and every [`Method`] (Grad-CAM, Grad-CAM++, HiResCAM,
//! XGrad-CAM, LayerCAM, EigenCAM, Ablation-CAM, Score-CAM, Guided Backpropagation, Guided
//! Grad-CAM) works on it.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use gradcam::{Cam, Method, Split, Target};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A small CNN of your own: conv -> ReLU (the explained layer) -> global average pool -> linear.
//! let varmap = candle_nn::VarMap::new();
//! let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let conv = candle_nn::conv2d(3, 8, 3, Default::default(), vb.pp("conv"))?;
//! let fc = candle_nn::linear(8, 10, vb.pp("fc"))?;
//! let model = Split::new(
//!     |x: &Tensor| gradcam::ops::Activation::Relu.forward(&conv.forward(x)?), // [n, 8, 30, 30]
//!     |a: &Tensor| fc.forward(&a.mean((2, 3))?),                               // [n, 10]
//! );
//!
//! let image = Tensor::rand(0f32, 1f32, (1, 3, 32, 32), &Device::Cpu)?;
//! let maps = Cam::new(&model).method(Method::GradCamPlusPlus).explain(&image, &[Target::class(3), Target::class(3).counterfactual()])?;
//! assert_eq!(maps[0].map_size, (30, 30));
//! assert_eq!(maps[0].weights.as_ref().map(Vec::len), Some(8)); // alpha_k, one per channel
//! # Ok(())
//! # }
//! ```
//!
//! The ImageNet backbones ([`encoders`]), the shipped captioner ([`captioner`]) and VQA model
//! ([`vqa`]) implement [`Explainable`] themselves; [`pipeline`] does for one image what the
//! `gradcam` command-line tool does (predictions, maps, overlays, neuron reports, JSON records).
#![deny(missing_docs)]

pub mod bench;
pub mod pipeline;

pub use gradcam_core::{
    Cam, CamMethod, CamResult, Error, Explainable, Explanation, Map, Method, Neuron, NeuronReport, Result, Score, Split, Target, UnitNames, UnitTable,
    UnknownMethod,
};

/// Maps: resizing, normalisation, the jet colormap, overlays, atomic PNG output.
pub use gradcam_core::map;
/// The paper's evaluation tallies: pointing game, the 15% box, energy, deletion / insertion AUC.
pub use gradcam_core::metrics;
/// Differentiable CPU ops whose backward is exact (and obeys Guided Backpropagation's rule).
pub use gradcam_core::ops;
/// The per-image loop: every method for every target pictured, written and reported.
pub use gradcam_core::render;
/// Neuron reports (the paper's textual explanations).
pub use gradcam_core::report;

/// The Show-and-Tell captioner, its training, evaluation and model card.
pub use gradcam_captioner as captioner;
/// The paper's evaluations as one protocol over classifiers, the captioner and the VQA model.
pub use gradcam_eval as eval;
/// ImageNet CNNs (EfficientNet-Lite0, VGG-16, ResNet-18/50) with named layers, weight loading,
/// preprocessing and class names; the scene CNN of the shipped models.
pub use gradcam_encoders as encoders;
/// Network dissection: names for units, by the concepts whose masks they overlap.
pub use gradcam_neurons as neurons;
/// ShapeScenes, the synthetic dataset with masks, captions and questions, and the COCO / VQA
/// readers and writers.
pub use gradcam_scenes as scenes;
/// The VQA fusion model, its training, evaluation and model card.
pub use gradcam_vqa as vqa;
